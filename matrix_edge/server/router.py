"""Where each request goes, decided from its raw request line and headers
before any body byte is read."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Collection

import attrs
from twisted.internet.defer import Deferred

from matrix_edge import errors
from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerConfig, ListenerType
from matrix_edge.config.routes import MAIN
from matrix_edge.errors import MatrixError
from matrix_edge.metrics.registry import ListenerMetrics
from matrix_edge.pools.dispatch import Dispatcher, Placed
from matrix_edge.pools.pool import Lease
from matrix_edge.server.fields import HeaderFields
from matrix_edge.target import check_target, disguised_matrix_path
from matrix_edge.upstream.client import Upstream

# What each kind of listener forwards to Synapse, as in Synapse's
# reverse-proxy documentation.
FORWARDED_PREFIXES: dict[ListenerType, tuple[bytes, ...]] = {
    ListenerType.CLIENT: (b"/_matrix", b"/_synapse/client"),
    ListenerType.FEDERATION: (b"/_matrix",),
}

ADMIN_PREFIX = b"/_synapse/admin"

# Longer request targets get 414, as from nginx with its default buffers;
# this also bounds what any routing pattern has to scan.
MAX_TARGET_LENGTH = 8192

# Synapse-internal paths that no public listener ever forwards, whatever
# else is configured.
INTERNAL_PREFIXES = (
    b"/_synapse/replication",
    b"/_synapse/metrics",
    b"/_synapse/worker",
)

# The prefixes above as path_has_prefix tests them: the path is one of
# them, or starts with one and a slash.
_INTERNAL_EXACT = frozenset(INTERNAL_PREFIXES)
_INTERNAL_BELOW = tuple(prefix + b"/" for prefix in INTERNAL_PREFIXES)
_ADMIN_BELOW = ADMIN_PREFIX + b"/"
_SYNAPSE = b"/_synapse"
_SYNAPSE_BELOW = _SYNAPSE + b"/"

# The refusal of a path outside the forwarded prefixes that a normalising
# server would read as inside /_matrix or /_synapse.
DISGUISED = "The request path is a /_matrix or /_synapse path in disguise"

# Media uploads, which get the larger body limit.
_MEDIA_UPLOAD = re.compile(
    rb"\A/_matrix/media/(?:r0|v1|v3|unstable/[^/]+)/upload(?:/|\Z)"
)


class Local(enum.Enum):
    """Answered by the listener's own resources (/health, .well-known)."""

    LOCAL = "local"


LOCAL = Local.LOCAL


@attrs.frozen
class Forward:
    placed: Lease | Deferred[Lease]
    """The process that takes the request, or one to come (a user to look
    up, a slot to wait for)."""

    body_limit: int
    replace: Callable[[Collection[Upstream]], Placed] | None = None
    """Places the request again, away from processes that refused the
    connection; None where there is no other choice."""


Decision = Local | Forward | MatrixError


class Router:
    """The routing rules of one listener."""

    def __init__(
        self,
        listener: ListenerConfig,
        config: EdgeConfig,
        upstream: Upstream,
        fallback: Upstream | None,
        local_paths: frozenset[bytes],
        dispatcher: Dispatcher | None = None,
        metrics: ListenerMetrics | None = None,
    ):
        self._listener = listener
        self._metrics = metrics
        self._config = config
        self._upstream = Lease(upstream, MAIN)
        self._fallback = Lease(fallback, "fallback") if fallback else None
        self._dispatcher = dispatcher
        self._local_paths = local_paths
        prefixes = FORWARDED_PREFIXES[listener.type]
        self._forwarded_exact = frozenset(prefixes)
        self._forwarded_below = tuple(prefix + b"/" for prefix in prefixes)
        self._scheme = listener.scheme

    def route(
        self,
        method: bytes,
        target: bytes,
        path: bytes,
        headers: HeaderFields,
        client_ip: str,
        length: int | None,
    ) -> Decision:
        """Decide what happens to a request. The target has been checked
        by nothing yet; every decision below is made on the raw path."""
        if len(target) > MAX_TARGET_LENGTH:
            return MatrixError(414, "M_UNKNOWN", "Request target too long")
        problem = check_target(method, target)
        if problem is not None:
            return errors.bad_request(problem)
        hosts = headers.values(b"host") or ()
        if len(hosts) != 1:
            return errors.bad_request(
                "More than one Host header" if hosts else "Missing Host header"
            )
        if path in self._local_paths:
            return LOCAL
        # path_has_prefix, for each prefix at once.
        if path in _INTERNAL_EXACT or path.startswith(_INTERNAL_BELOW):
            return errors.not_found()
        if path == ADMIN_PREFIX or path.startswith(_ADMIN_BELOW):
            if not self._listener.admin_allow:
                return errors.not_found()
            if not admin_allowed(client_ip, self._listener):
                return errors.forbidden("The admin API is not available from here")
        elif not (
            path.startswith(self._forwarded_below) or path in self._forwarded_exact
        ):
            if path == _SYNAPSE or path.startswith(_SYNAPSE_BELOW):
                return errors.not_found()
            if disguised_matrix_path(path):
                # Never to the fallback web server, which may read it as
                # /_synapse/admin; not a Matrix path as sent either.
                return errors.bad_request(DISGUISED)
            if self._fallback is not None:
                return self._forward(
                    self._fallback, self._config.max_request_size, length
                )
            return errors.not_found()

        maintenance = self._config.maintenance
        if maintenance.enabled:
            return errors.unavailable(maintenance.message, maintenance.retry_after)
        limit = (
            self._config.max_upload_size
            if _MEDIA_UPLOAD.match(path)
            else self._config.max_request_size
        )
        if self._dispatcher is None:
            return self._forward(self._upstream, limit, length)
        if length is not None and length > limit:
            # Refused before a worker is chosen, so that no slot is taken.
            return errors.too_large(limit)
        return self._to_worker(method, target, path, headers, client_ip, limit)

    def _to_worker(
        self,
        method: bytes,
        target: bytes,
        path: bytes,
        headers: HeaderFields,
        client_ip: str,
        limit: int,
    ) -> Decision:
        assert self._dispatcher is not None
        dispatcher = self._dispatcher
        query = target[len(path) + 1 :]
        scheme = self._scheme
        placed = dispatcher.place_request(
            method, target, path, query, headers, client_ip, scheme
        )
        if isinstance(placed, Lease):
            if placed.upstream is dispatcher.main:
                return self._forward(placed, limit, None)
        elif isinstance(placed, MatrixError):
            return placed

        def replace(exclude: Collection[Upstream]) -> Placed:
            return dispatcher.place_request(
                method, target, path, query, headers, client_ip, scheme, exclude
            )

        return Forward(placed, limit, replace)

    def _forward(self, lease: Lease, limit: int, length: int | None) -> Decision:
        if length is not None and length > limit:
            return errors.too_large(limit)
        upstream = lease.upstream
        if (
            upstream.known_down
            and self._config.upstream_check.fail_fast
            # The only process for it: tried all the same, one request at
            # a time, in case it is back before the next check.
            and not upstream.try_while_down()
        ):
            if self._metrics is not None:
                self._metrics.upstream_error(lease.pool, 502, "upstream_down")
            return errors.bad_gateway()
        return Forward(lease, limit)


def admin_allowed(client_ip: str, listener: ListenerConfig) -> bool:
    """Whether ``client_ip`` is in the listener's ``admin_allow``."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(address in network for network in listener.admin_allow)
