"""The TLS layer of a TLS listener: Twisted's, with an answer for plain HTTP.

A client that speaks plain HTTP to a TLS port (``curl http://host:8448/``, a
misconfigured reverse proxy or health check) would otherwise get an empty
reply: OpenSSL reads its request as a broken handshake and the connection
closes without a word. As nginx does, the edge answers such a connection
with a 400 in plain HTTP, here a Matrix error, and closes it.

A TLS connection opens with a record header whose first byte is a content
type (0x16 for the handshake), an HTTP request with a method name, in
capital letters. The first byte that arrives decides; after it the check
takes itself out of the read path, so a TLS connection pays for it once.
Behind a PROXY protocol wrapper the first byte is the one after the PROXY
header, which the wrapper consumes before anything reaches this layer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from matrix_edge.http.errors import MatrixError, closing_response
from matrix_edge.twisted_private import write_eagerly

log = Logger()

# After the answer, how long and how much of the rest of the request is read
# and dropped before the connection is cut. Closing with unread bytes in the
# socket makes the kernel reset the connection, and the client may then
# never see the answer.
DRAIN_SECONDS = 5.0
DRAIN_BYTES = 1 << 20

PLAIN_HTTP = MatrixError(400, "M_UNKNOWN", "This port speaks HTTPS")


def _starts_plain_http(first: int) -> bool:
    """Whether the first byte of a connection is the start of an HTTP method
    (a capital letter) rather than a TLS record (a content type, 20 to 24, or
    an SSLv2-style hello with the top bit set)."""
    return 0x41 <= first <= 0x5A


class _HTTPSOnlyProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS protocol, but for the first bytes: plain HTTP is
    answered past TLS, then read and dropped until the client closes, for
    at most L{DRAIN_SECONDS} and L{DRAIN_BYTES}.

    Not Twisted's buffering variant, which holds small writes for a turn
    of the reactor with a timer: both HTTP protocols write a response's
    bytes in one go already. Records go to the socket at once
    (L{write_eagerly}).
    """

    factory: HTTPSOnlyFactory

    def __init__(self, factory: HTTPSOnlyFactory, wrapped: Any):
        super().__init__(factory, wrapped)
        # Shadows dataReceived until the first bytes have been looked at.
        self.dataReceived = self._first_bytes  # type: ignore[method-assign]
        self._drained = 0
        self._drain_timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        write_eagerly(transport)
        super().makeConnection(transport)

    def _first_bytes(self, data: bytes) -> None:
        if not data:
            return
        if not _starts_plain_http(data[0]):
            del self.dataReceived  # TLS from now on, without this check.
            self.dataReceived(data)
            return
        self.dataReceived = self._drop  # type: ignore[method-assign]
        self._answer_plain_http(data)

    def _answer_plain_http(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        log.info(
            "Plain HTTP from {peer} on a TLS port: answered 400",
            peer=transport.getPeer(),
        )
        # Straight onto the connection, past TLS, which never sees a byte.
        transport.write(self.factory.answer)
        close_writing = getattr(transport, "loseWriteConnection", None)
        if close_writing is None:
            transport.loseConnection()
            return
        # The client sees the end of the answer and closes; whatever it sent
        # meanwhile is dropped, within bounds.
        close_writing()
        self._drain_timer = self.factory.clock.callLater(DRAIN_SECONDS, self._cut)
        self._drop(data)

    def _drop(self, data: bytes) -> None:
        self._drained += len(data)
        if self._drained > DRAIN_BYTES:
            self._cut()

    def _cut(self) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        super().connectionLost(reason)


class HTTPSOnlyFactory(TLSMemoryBIOFactory):
    """L{TLSMemoryBIOFactory} for a server, whose connections answer plain
    HTTP with a 400 instead of trying to read it as TLS."""

    protocol = _HTTPSOnlyProtocol

    def __init__(
        self,
        context: Any,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        server_header: bytes | None = None,
    ):
        """
        @param context: the server's TLS context (a L{ServerTLS}).
        @param wrapped: the factory of what runs over TLS (the site).
        @param server_header: the Server header of the 400, or None.
        """
        super().__init__(context, False, wrapped, clock)
        self.answer = closing_response(PLAIN_HTTP, server_header)
        self.clock = clock
