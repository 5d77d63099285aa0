"""The pooled HTTP/1.1 client that carries requests to Synapse.

Connections are kept open between requests (bounded by
``upstream_pool.max_idle_connections``) and the request line is written
from the client's bytes, so what Synapse sees is exactly what the client
sent; Twisted's ``Agent`` would rebuild the target from a parsed URI and
drop an empty query (``/p?`` becoming ``/p``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.config.upstream import UpstreamAddress, UpstreamPoolConfig
from matrix_edge.server.body import RequestBody
from matrix_edge.upstream.protocol import (
    HeaderList,
    ResponseHandler,
    UpstreamConnection,
)


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
        self._clock = reactor
        self._endpoint = endpoint or _endpoint_for(reactor, address, timeouts)
        self._max_idle = pool_config.max_idle_connections
        self._idle_timeout = pool_config.idle_timeout
        self._idle: list[UpstreamConnection] = []
        self._idle_since: dict[UpstreamConnection, float] = {}
        self._sweep: IDelayedCall | None = None
        self._factory = _ConnectionFactory(self._on_idle, self._on_lost)
        self.healthy: bool | None = None
        """What the last check or request saw: None until then."""
        self.watched = False
        """Whether active checks run, and so will notice a recovery."""
        self.on_state_change: list[Callable[[bool, str], None]] = []
        self.pool: str | None = None
        """The worker pools this process belongs to, for logs; None for
        main."""
        self.connect_failures = 0
        """Connections that could not be made (for requests and checks),
        for metrics."""
        self.on_trial = False
        """Whether a request has been let through to try it while it is
        known to be down; until the next news of its state (L{mark})."""

    # Health --------------------------------------------------------------

    @property
    def known_down(self) -> bool:
        """Down, as far as checks that will also see it come back can
        tell: only then may requests be failed without trying."""
        return self.watched and self.healthy is False

    def try_while_down(self) -> bool:
        """Whether a request may try this upstream although it is known
        down: where there is nothing else to send it to, one request at a
        time does (the others may fail fast), so that a Synapse back before
        the next check is seen at once. Any news of its state (L{mark}: the
        next check, or this request's outcome) lets the next one try."""
        if self.on_trial:
            return False
        self.on_trial = True
        return True

    def mark(self, healthy: bool, reason: str = "") -> None:
        """Record whether Synapse answers, telling listeners of a change."""
        self.on_trial = False
        if healthy is not self.healthy:
            self.healthy = healthy
            for callback in self.on_state_change:
                callback(healthy, reason)

    # Requests ------------------------------------------------------------

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: HeaderList,
        body: RequestBody | None,
        handler: ResponseHandler,
    ) -> UpstreamExchange:
        """Start one exchange; ``handler`` hears how it goes."""
        exchange = UpstreamExchange(self, method, target, headers, body, handler)
        exchange.start()
        return exchange

    def idle_connection(self) -> UpstreamConnection | None:
        """An idle pooled connection, most recently used first."""
        while self._idle:
            connection = self._idle.pop()
            self._idle_since.pop(connection, None)
            if connection.transport is not None:
                return connection
        return None

    def new_connection(self) -> Deferred[UpstreamConnection]:
        return self._endpoint.connect(self._factory)  # type: ignore[return-value]

    def _on_idle(self, connection: UpstreamConnection) -> None:
        if len(self._idle) >= self._max_idle:
            connection.abort()
            return
        self._idle.append(connection)
        self._idle_since[connection] = self._clock.seconds()
        # One timer for the whole pool, rather than one set and cancelled
        # per request.
        if self._sweep is None:
            self._sweep = self._clock.callLater(self._idle_timeout, self._expire)

    def _expire(self) -> None:
        """Close the connections idle for longer than the idle timeout."""
        self._sweep = None
        now = self._clock.seconds()
        for connection, since in list(self._idle_since.items()):
            if now - since >= self._idle_timeout:
                self._on_lost(connection)
                connection.abort()
        if self._idle_since:
            oldest = min(self._idle_since.values())
            self._sweep = self._clock.callLater(
                max(0.0, oldest + self._idle_timeout - now), self._expire
            )

    def _on_lost(self, connection: UpstreamConnection) -> None:
        self._idle_since.pop(connection, None)
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> Deferred[None]:
        """Close the idle connections (at shutdown)."""
        for connection in list(self._idle):
            connection.abort()
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        return succeed(None)


_LOCAL_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_local_shortage(failure: Failure) -> bool:
    """Whether a connection failed for want of resources here (file
    descriptors, buffers), which says nothing about the upstream."""
    code = getattr(failure.value, "osError", None)
    if code is None and isinstance(failure.value, OSError):
        code = failure.value.errno
    return code in _LOCAL_SHORTAGES


def describe_failure(failure: Failure) -> str:
    """A one-line reason for logs, unwrapping Twisted's aggregate
    failures."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(describe_failure(r) for r in reasons)
    if failure.check(CancelledError, ConnectingCancelledError):
        return "cancelled"
    return f"{type(failure.value).__name__}: {failure.value}"


class UpstreamExchange:
    """One request to Synapse and its response, relayed to a handler.

    A request without a body that went out on a reused connection which
    turns out to have been closed by Synapse in the meantime (the usual race
    of keep-alive) is sent once more on a new connection.
    """

    def __init__(
        self,
        upstream: Upstream,
        method: bytes,
        target: bytes,
        headers: HeaderList,
        body: RequestBody | None,
        handler: ResponseHandler,
    ):
        self._upstream = upstream
        self._method = method
        self._target = target
        self._headers = headers
        self._body = body
        self._handler = handler
        self._connecting: Deferred[UpstreamConnection] | None = None
        self._connection: UpstreamConnection | None = None
        self._retried = False
        self._cancelled = False

    def start(self) -> None:
        connection = self._upstream.idle_connection()
        if connection is not None:
            self._connected(connection)
            return
        d = self._connecting = self._upstream.new_connection()
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, connection: UpstreamConnection) -> None:
        self._connecting = None
        if self._cancelled:
            connection.abort()
            return
        self._connection = connection
        connection.send(self._method, self._target, self._headers, self._body, self)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self._cancelled:
            self._upstream.connect_failures += 1
            self._handler.upstream_failed(failure)

    @property
    def producer(self) -> IPushProducer | None:
        """What to pause to stop reading the response."""
        return self._connection.producer if self._connection is not None else None

    def cancel(self) -> None:
        """Give up: close the connection, tell no one."""
        self._cancelled = True
        if self._connecting is not None:
            self._connecting.addErrback(lambda f: f.trap(CancelledError))
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.abort()

    # ResponseHandler, passed through -------------------------------------

    def response_head(
        self, code: int, phrase: bytes, headers: HeaderList, length: int | None
    ) -> None:
        self._handler.response_head(code, phrase, headers, length)

    def response_data(self, data: bytes) -> None:
        self._handler.response_data(data)

    def response_flush(self) -> None:
        self._handler.response_flush()

    def response_end(self, complete: bool, reason: str) -> None:
        self._handler.response_end(complete, reason)

    def upstream_failed(self, reason: Failure, timed_out: bool = False) -> None:
        connection = self._connection
        if (
            connection is not None
            and connection.reused
            and self._body is None
            and self._method in IDEMPOTENT
            and not self._retried
            and not self._cancelled
        ):
            self._retried = True
            self._connection = None
            d = self._connecting = self._upstream.new_connection()
            d.addCallbacks(self._connected, self._connect_failed)
            return
        self._handler.upstream_failed(reason, timed_out)


# RFC 9110 section 9.2.2: the methods a request may be repeated with. A POST
# without a body (a logout) may well have been acted on before the
# connection died.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(
        self,
        on_idle: Callable[[UpstreamConnection], None],
        on_lost: Callable[[UpstreamConnection], None],
    ):
        self._on_idle = on_idle
        self._on_lost = on_lost

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._on_idle, self._on_lost)


def _endpoint_for(
    reactor: IReactorTime, address: UpstreamAddress, timeouts: TimeoutsConfig
) -> IStreamClientEndpoint:
    timeout = max(1, round(timeouts.upstream_connect))
    if address.is_unix:
        return UNIXClientEndpoint(reactor, address.unix_path, timeout=timeout)
    # An address needs no resolving, and HostnameEndpoint's machinery for
    # names (resolution, racing attempts) costs on every new connection,
    # thousands of them when clients come back after a restart.
    if isIPAddress(address.host):
        return TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    if isIPv6Address(address.host):
        return TCP6ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
