"""The first-bytes check of TLS listeners on in-memory transports: TLS goes
to TLS with the check out of the way, plain HTTP gets its 400 and the
connection ends within bounds."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from matrix_edge.server.tls import DRAIN_BYTES, DRAIN_SECONDS, HTTPSOnlyFactory
from matrix_edge.tls import ServerTLS
from tests.pki import make_pki

PEER = IPv4Address("TCP", "203.0.113.7", 50000)


class _HalfClosable(StringTransport):
    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def _connect(tmp_path, server_header: bytes | None = b"matrix-edge"):
    pki = make_pki(tmp_path)
    clock = MemoryReactorClock()
    factory = HTTPSOnlyFactory(
        ServerTLS(pki.chain_path, pki.key_path),
        Factory.forProtocol(_Recorder),
        clock,
        server_header,
    )
    protocol = factory.buildProtocol(PEER)
    transport = _HalfClosable(peerAddress=PEER)
    protocol.makeConnection(transport)
    return clock, protocol, transport


def test_tls_bytes_go_to_tls_and_the_check_steps_aside(tmp_path):
    _, protocol, transport = _connect(tmp_path)
    assert "dataReceived" in vars(protocol)
    protocol.dataReceived(b"")  # nothing to decide on yet
    assert "dataReceived" in vars(protocol)
    protocol.dataReceived(b"\x16")
    # The class's own method from now on: no check on later reads.
    assert "dataReceived" not in vars(protocol)
    assert transport.value() == b""
    assert not transport.write_closed


def test_plain_http_gets_the_answer_and_a_half_close(tmp_path):
    clock, protocol, transport = _connect(tmp_path)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 400 Bad Request",
        b"Server: matrix-edge",
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    assert json.loads(body) == {
        "errcode": "M_UNKNOWN",
        "error": "This port speaks HTTPS",
    }
    assert protocol.wrapped.received == b""
    assert transport.write_closed and not transport.aborted
    # The client never closes: cut after the drain time.
    protocol.dataReceived(b"more")
    clock.advance(DRAIN_SECONDS - 0.1)
    assert not transport.aborted
    clock.advance(0.2)
    assert transport.aborted


def test_a_client_that_keeps_sending_is_cut_off(tmp_path):
    clock, protocol, transport = _connect(tmp_path, server_header=None)
    protocol.dataReceived(b"POST /upload HTTP/1.1\r\n")
    assert b"Server:" not in transport.value()
    protocol.dataReceived(b"x" * DRAIN_BYTES)
    assert transport.aborted
    assert not clock.getDelayedCalls()


class _Echo(_Recorder):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        assert self.transport is not None
        self.transport.write(b"echo:" + data)


def _tls_client(pki):
    import ssl

    context = ssl.create_default_context(cafile=str(pki.ca_cert_path))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    return client, incoming, outgoing


def test_tls_end_to_end_then_close_notify_fin_and_drain(tmp_path):
    """Application data crosses the standard-library TLS layer both ways;
    the wrapped protocol's close sends close_notify and FIN, then what the
    client still sends is dropped until the drain time is up."""
    import ssl

    pki = make_pki(tmp_path)
    clock = MemoryReactorClock()
    factory = HTTPSOnlyFactory(
        ServerTLS(pki.chain_path, pki.key_path), Factory.forProtocol(_Echo), clock
    )
    protocol = factory.buildProtocol(PEER)
    transport = _HalfClosable(peerAddress=PEER)
    protocol.makeConnection(transport)
    client, incoming, outgoing = _tls_client(pki)

    def pump() -> None:
        for _ in range(10):
            sent = outgoing.read()
            if sent:
                protocol.dataReceived(sent)
            answer = transport.value()
            transport.clear()
            if answer:
                incoming.write(answer)
            if not sent and not answer:
                return

    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    client.write(b"hello")
    pump()
    assert protocol.wrapped.received == b"hello"
    assert client.read(100) == b"echo:hello"

    protocol.wrapped.transport.loseConnection()
    pump()
    # The client's read ends cleanly: close_notify came.
    assert client.read(100) == b""
    assert transport.write_closed and not transport.aborted
    protocol.dataReceived(b"late bytes, dropped")
    assert protocol.wrapped.received == b"hello"
    clock.advance(DRAIN_SECONDS)
    assert transport.aborted


def test_attributes_it_lacks_are_looked_up_on_the_tcp_connection(tmp_path):
    """Socket options and the like come from the TCP connection; before
    there is one, a lookup fails as any missing attribute does."""
    pki = make_pki(tmp_path)
    factory = HTTPSOnlyFactory(
        ServerTLS(pki.chain_path, pki.key_path),
        Factory.forProtocol(_Recorder),
        MemoryReactorClock(),
    )
    protocol = factory.buildProtocol(PEER)
    assert getattr(protocol, "loseWriteConnection", None) is None
    transport = _HalfClosable(peerAddress=PEER)
    protocol.makeConnection(transport)
    assert protocol.loseWriteConnection == transport.loseWriteConnection
