"""The pooled HTTP/1.1 client that carries requests to Synapse.

Twisted's ``Agent`` rebuilds the request target from a parsed URI, which
drops an empty query (``/p?`` becomes ``/p``). Here the pool hands out
connections and the request line is written from the client's bytes, so
what Synapse sees is exactly what the client sent.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.web.client import HTTPConnectionPool, Request
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.config.upstream import UpstreamAddress, UpstreamPoolConfig


class Upstream:
    """One Synapse listener, reached over a pool of keep-alive connections."""

    def __init__(
        self,
        reactor: IReactorTime,
        address: UpstreamAddress,
        pool_config: UpstreamPoolConfig,
        timeouts: TimeoutsConfig,
        endpoint: IStreamClientEndpoint | None = None,
    ):
        self.address = address
        self._endpoint = endpoint or _endpoint_for(reactor, address, timeouts)
        self._key = ("matrix-edge-upstream", str(address))
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = pool_config.max_idle_connections
        self._pool.cachedConnectionTimeout = pool_config.idle_timeout  # type: ignore[assignment]
        self._pool.retryAutomatically = True
        self.healthy: bool | None = None
        """What the last check or request saw: None until then."""
        self.watched = False
        """Whether active checks run, and so will notice a recovery."""
        self.on_state_change: list[Callable[[bool, str], None]] = []

    @property
    def known_down(self) -> bool:
        """Down, as far as checks that will also see it come back can
        tell: only then may requests be failed without trying."""
        return self.watched and self.healthy is False

    def mark(self, healthy: bool, reason: str = "") -> None:
        """Record whether Synapse answers, telling listeners of a change."""
        if healthy is not self.healthy:
            self.healthy = healthy
            for callback in self.on_state_change:
                callback(healthy, reason)

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        """Send one request; the Deferred fires with the response once its
        headers have arrived, and cancelling it aborts the connection."""
        d = self._pool.getConnection(self._key, self._endpoint)

        def send(connection):  # type: ignore[no-untyped-def]
            # A request without a body, answered from a pooled connection
            # that turned out to be closed, is retried on a fresh one by the
            # pool's retrying wrapper; one with a body is not.
            return connection.request(
                Request(method, target, headers, body, persistent=True)
            )

        return d.addCallback(send)

    def close(self) -> Deferred[None]:
        """Close the idle pooled connections (at shutdown)."""
        return self._pool.closeCachedConnections()


def _endpoint_for(
    reactor: IReactorTime, address: UpstreamAddress, timeouts: TimeoutsConfig
) -> IStreamClientEndpoint:
    timeout = max(1, round(timeouts.upstream_connect))
    if address.is_unix:
        return UNIXClientEndpoint(reactor, address.unix_path, timeout=timeout)
    return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
