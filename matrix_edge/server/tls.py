"""The TLS layer of a TLS listener, with an answer for plain HTTP.

TLS itself is the standard library's ``ssl`` on memory BIOs: per request it
costs less than half of what pyOpenSSL's memory-BIO layer in Twisted does
(bench/: about 8 against 20 microseconds). Records are written to the
socket as they are made (L{write_eagerly}); the HTTP protocols above write
a response's bytes in one go.

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

import contextlib
import ssl
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from matrix_edge.acme.challenges import ACME_TLS_1_BYTES, TLSALPNResponder
from matrix_edge.errors import MatrixError, closing_response
from matrix_edge.tls import ServerTLS
from matrix_edge.twisted_private import write_eagerly

log = Logger()

# After the answer, how long and how much of the rest of the request is read
# and dropped before the connection is cut. Closing with unread bytes in the
# socket makes the kernel reset the connection, and the client may then
# never see the answer.
DRAIN_SECONDS = 5.0
DRAIN_BYTES = 1 << 20

# Plaintext taken out of the TLS layer at a time: a record's worth, or more.
READ_SIZE = 64 * 1024

PLAIN_HTTP = MatrixError(400, "M_UNKNOWN", "This port speaks HTTPS")


def _starts_plain_http(first: int) -> bool:
    """Whether the first byte of a connection is the start of an HTTP method
    (a capital letter) rather than a TLS record (a content type, 20 to 24, or
    an SSLv2-style hello with the top bit set)."""
    return 0x41 <= first <= 0x5A


# A TLS record: content type, version (2 bytes), length (2 bytes), at most
# 2^14 bytes of plaintext (a ClientHello is plaintext).
_RECORD_HEADER = 5
_MAX_RECORD = 1 << 14


def _first_record(data: bytes) -> bytes | None:
    """The first TLS record of a connection, or None while more of it is
    to come. Anything but a handshake record of sane length is taken as it
    is: the TLS engine refuses it."""
    if data[0] != 0x16:
        return data
    if len(data) < _RECORD_HEADER:
        return None
    length = int.from_bytes(data[3:5], "big")
    if length > _MAX_RECORD:
        return data
    end = _RECORD_HEADER + length
    return data[:end] if len(data) >= end else None


@implementer(ITransport, IPushProducer)
class TLSServerConnection(Protocol):
    """One accepted connection, TLS on the outside; the wrapped protocol
    (HTTP/1.1, or ALPN's choice) sees this as its transport.

    The wrapped protocol is connected at once, as with Twisted's TLS, so
    that its idle timeout covers a handshake that never ends; what it
    writes before the handshake is done waits for it. Pausing, producers
    and addresses are the TCP connection's.
    """

    factory: HTTPSOnlyFactory

    def __init__(self, factory: HTTPSOnlyFactory, wrapped: IProtocol):
        self.factory = factory
        self.wrapped = wrapped
        self.negotiatedProtocol: bytes | None = None
        self.disconnecting = False
        self.disconnected = False
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._early: list[bytes] | None = []
        """What the wrapped protocol wrote before the handshake was done;
        None once it is."""
        self._drained = 0
        self._drain_timer: Any = None
        self._validation = False
        """An ACME tls-alpn-01 validation: a handshake, then the end."""
        self._hello = b""
        """The first TLS record so far, while it is incomplete (ACME only)."""
        # Shadows dataReceived until the first bytes have been looked at.
        self.dataReceived = self._first_bytes  # type: ignore[method-assign]

    # From TCP ------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        write_eagerly(transport)
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        self._tls = self.factory.tls.server_side(self._incoming, self._outgoing)
        self.wrapped.makeConnection(self)

    def _first_bytes(self, data: bytes) -> None:
        if self._hello:
            data = self._hello + data
        if not data:
            return
        if not _starts_plain_http(data[0]):
            acme = self.factory.acme
            if acme is not None:
                record = _first_record(data)
                if record is None:
                    # The CA's ClientHello may come in pieces; its ALPN list
                    # is in the first record, whole before anything is fed.
                    self._hello = data
                    return
                self._hello = b""
                if ACME_TLS_1_BYTES in record:
                    # The CA validating a tls-alpn-01 challenge, not a client.
                    self._validation = True
                    self._tls = acme.server_side(self._incoming, self._outgoing)
            del self.dataReceived  # TLS from now on, without this check.
            self.dataReceived(data)
            return
        self.dataReceived = self._drop  # type: ignore[method-assign]
        self._answer_plain_http(data)

    def dataReceived(self, data: bytes) -> None:
        tls = self._tls
        assert tls is not None
        self._incoming.write(data)
        if self._early is not None:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                self._send()
                return
            except ssl.SSLError as e:
                self.factory.handshakes_failed += 1
                self._failed(e)
                return
            self._handshake_done(tls)
            if self._validation:
                # Nothing follows the handshake of a validation (RFC 8737).
                self.loseConnection()
                return
        wrapped = self.wrapped
        while True:
            try:
                plain = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                # The client's close_notify: ours goes back, then the end.
                self.loseConnection()
                return
            except ssl.SSLError as e:
                self._failed(e)
                return
            if not plain:
                break
            wrapped.dataReceived(plain)
            if self.disconnected:
                return
            if not self._incoming.pending and not tls.pending():
                # All read: spares the exception the next read would raise.
                break
        if self._outgoing.pending:
            # Session tickets, alerts, key updates.
            self._send()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.disconnected = True
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        self.wrapped.connectionLost(reason)

    # To the wrapped protocol: its transport --------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.disconnected or not data:
            return
        early = self._early
        if early is not None:
            early.append(data)
            return
        assert self._tls is not None
        try:
            self._tls.write(data)
        except ssl.SSLError as e:
            self._failed(e)
            return
        self._send()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close: close_notify and TCP's FIN after what was written; then
        what the client still sends is read and dropped until it closes
        too, for at most L{DRAIN_SECONDS} and L{DRAIN_BYTES}. Closing the
        socket with unread bytes in it would reset the connection, and the
        client could lose the last response (or GOAWAY) unread."""
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        tls = self._tls
        if tls is not None and self._early is None:
            # close_notify is written; the client's is not waited for.
            with contextlib.suppress(ssl.SSLError):
                tls.unwrap()
            self._send()
        self._stop_reading_and_drain()

    def abortConnection(self) -> None:
        self.disconnecting = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def getPeer(self) -> IAddress:
        assert self.transport is not None
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        assert self.transport is not None
        return self.transport.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._tcp.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._tcp.unregisterProducer()

    def pauseProducing(self) -> None:
        self._tcp.pauseProducing()

    def resumeProducing(self) -> None:
        self._tcp.resumeProducing()

    def stopProducing(self) -> None:
        self._tcp.stopProducing()

    def __getattr__(self, name: str) -> Any:
        # As Twisted's protocol wrappers do: socket options and the like
        # are the TCP connection's.
        # (Protocol.transport is a class attribute: no recursion here.)
        return getattr(self.transport, name)

    # Internals ------------------------------------------------------------------

    @property
    def _tcp(self) -> Any:
        return self.transport

    def _handshake_done(self, tls: ssl.SSLObject) -> None:
        self.factory.handshakes_ok += 1
        protocol = tls.selected_alpn_protocol()
        self.negotiatedProtocol = protocol.encode("ascii") if protocol else b""
        early, self._early = self._early or [], None
        for data in early:
            self.write(data)

    def _send(self) -> None:
        out = self._outgoing.read()
        if out and self.transport is not None:
            self.transport.write(out)

    def _failed(self, error: ssl.SSLError) -> None:
        """The handshake or a record failed: the alert goes out, then the
        connection closes."""
        log.debug("TLS failed with {peer}: {error}", peer=self.transport, error=error)
        self._send()
        self.disconnecting = True
        if self.transport is not None:
            self.transport.loseConnection()

    def _answer_plain_http(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        log.info(
            "Plain HTTP from {peer} on a TLS port: answered 400",
            peer=transport.getPeer(),
        )
        # Straight onto the connection, past TLS, which never sees a byte.
        transport.write(self.factory.answer)
        self.disconnecting = True
        self._stop_reading_and_drain()
        self._drop(data)

    def _stop_reading_and_drain(self) -> None:
        """Send FIN after what is written; the client sees the end and
        closes, and whatever it sends meanwhile is dropped, within bounds."""
        transport = self.transport
        assert transport is not None
        close_writing = getattr(transport, "loseWriteConnection", None)
        if close_writing is None:
            transport.loseConnection()
            return
        self.dataReceived = self._drop  # type: ignore[method-assign]
        close_writing()
        self._drain_timer = self.factory.clock.callLater(DRAIN_SECONDS, self._cut)

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


class HTTPSOnlyFactory(Factory):
    """Builds a L{TLSServerConnection} around each connection of
    ``wrapped``; plain HTTP gets a 400 instead of a broken handshake."""

    noisy = False

    def __init__(
        self,
        tls: ServerTLS,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        server_header: bytes | None = None,
        acme: TLSALPNResponder | None = None,
    ):
        """
        @param tls: the listener's certificates and TLS settings.
        @param wrapped: the factory of what runs over TLS (the site).
        @param server_header: the Server header of the 400, or None.
        @param acme: answers the CA's tls-alpn-01 validations, when the
            edge gets certificates from an ACME CA.
        """
        self.tls = tls
        self.acme = acme
        self.wrapped = wrapped
        self.answer = closing_response(PLAIN_HTTP, server_header)
        self.clock = clock
        self.handshakes_ok = 0
        self.handshakes_failed = 0
        """Handshakes completed, and refused or broken by a TLS error, for
        metrics."""

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        wrapped = self.wrapped.buildProtocol(addr)
        if wrapped is None:
            return None
        return TLSServerConnection(self, wrapped)

    def doStart(self) -> None:
        self.wrapped.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
        super().doStop()
