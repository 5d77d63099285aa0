"""Choosing HTTP/2 or HTTP/1.1 for a TLS connection, as ALPN agreed."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure


class NegotiatedProtocol(Protocol):
    """Hands a TLS connection to the protocol ALPN chose.

    The choice is known once the handshake is done, which is before the
    first application data: the protocol is built then. Until that, a
    connection that never completes its handshake is dropped after
    ``timeout`` seconds.
    """

    def __init__(
        self,
        http1: Callable[[], IProtocol | None],
        http2: Callable[[], IProtocol],
        clock: IReactorTime,
        timeout: float,
    ):
        self._http1 = http1
        self._http2 = http2
        self._clock = clock
        self._timeout = timeout
        self._chosen: IProtocol | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        chosen = self._chosen
        if chosen is None:
            chosen = self._choose()
            if chosen is None:
                return
        chosen.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self._chosen is not None:
            self._chosen.connectionLost(reason)

    def _choose(self) -> IProtocol | None:
        self._cancel_timer()
        transport = self.transport
        assert transport is not None
        negotiated = getattr(transport, "negotiatedProtocol", None)
        chosen = self._http2() if negotiated == b"h2" else self._http1()
        if chosen is None:
            transport.loseConnection()
            return None
        self._chosen = chosen
        chosen.makeConnection(transport)
        # From now on the chosen protocol takes the data directly.
        self.dataReceived = chosen.dataReceived  # type: ignore[method-assign]
        return chosen

    def _too_slow(self) -> None:
        self._timer = None
        if self._chosen is None and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
