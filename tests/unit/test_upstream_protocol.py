"""The lean HTTP/1.1 client, fed exact bytes on in-memory transports."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport

from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.config.upstream import UpstreamAddress, UpstreamPoolConfig
from matrix_edge.server.body import ClientReading, RequestBody
from matrix_edge.upstream.client import Upstream


@attrs.define
class Recorder:
    """A ResponseHandler that writes down what it hears."""

    events: list = attrs.Factory(list)

    def response_head(self, code, phrase, headers, length):
        self.events.append(("head", code, phrase, headers, length))

    def response_data(self, data):
        if self.events and self.events[-1][0] == "data":
            self.events[-1] = ("data", self.events[-1][1] + data)
        else:
            self.events.append(("data", data))

    def response_flush(self):
        pass

    def response_end(self, complete, reason):
        self.events.append(("end", complete))

    def upstream_failed(self, reason, timed_out=False):
        self.events.append(("failed", type(reason.value).__name__))


def make_upstream(**pool):
    clock = MemoryReactorClock()
    upstream = Upstream(
        clock,
        UpstreamAddress(host="127.0.0.1", port=8008),
        UpstreamPoolConfig(**pool),
        TimeoutsConfig(),
        endpoint=TCP4ClientEndpoint(clock, "127.0.0.1", 8008),
    )
    return clock, upstream


def connect(clock):
    host, port, factory, _timeout, _bind = clock.tcpClients.pop(0)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


HEADERS = [(b"Host", b"hs.test")]


def test_request_line_is_the_clients_bytes():
    clock, upstream = make_upstream()
    upstream.request(b"GET", b"/_matrix/x%2Fy?", HEADERS, None, Recorder())
    _, transport = connect(clock)
    assert transport.value() == b"GET /_matrix/x%2Fy? HTTP/1.1\r\nHost: hs.test\r\n\r\n"


@pytest.mark.parametrize(
    ("chunks", "expected_body"),
    [
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], b"hello"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", b"l", b"lo"], b"hello"),
        (
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                b"lo\r\n6\r\n worl",
                b"d\r\n0\r\nX-Trailer: t\r\n\r\n",
            ],
            b"hello world",
        ),
        (
            [
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            ],
            b"ok",
        ),
        ([b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n", b"\r\nok"], b"ok"),
    ],
)
def test_framing_across_packets(chunks, expected_body):
    clock, upstream = make_upstream()
    recorder = Recorder()
    upstream.request(b"GET", b"/x", HEADERS, None, recorder)
    protocol, transport = connect(clock)
    for chunk in chunks:
        protocol.dataReceived(chunk)
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["head", "data", "end"]
    assert recorder.events[1][1] == expected_body
    assert recorder.events[2] == ("end", True)
    assert not transport.disconnecting  # kept for the next request


def test_connection_reused_for_the_next_request():
    clock, upstream = make_upstream()
    upstream.request(b"GET", b"/1", HEADERS, None, Recorder())
    protocol, transport = connect(clock)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    upstream.request(b"GET", b"/2", HEADERS, None, Recorder())
    assert clock.tcpClients == []
    assert transport.value().endswith(b"GET /2 HTTP/1.1\r\nHost: hs.test\r\n\r\n")


def test_idle_connection_expires():
    clock, upstream = make_upstream(idle_timeout=30.0)
    upstream.request(b"GET", b"/1", HEADERS, None, Recorder())
    protocol, transport = connect(clock)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    clock.advance(31)
    assert transport.disconnected


def test_idle_pool_is_bounded():
    clock, upstream = make_upstream(max_idle_connections=1)
    recorders = [Recorder(), Recorder()]
    for recorder in recorders:
        upstream.request(b"GET", b"/", HEADERS, None, recorder)
    (p1, t1), (p2, t2) = connect(clock), connect(clock)
    p1.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    p2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not t1.disconnected and t2.disconnected


@pytest.mark.parametrize(
    ("method", "response", "length"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", 1234),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", None),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", 10),
    ],
)
def test_responses_without_a_body(method, response, length):
    clock, upstream = make_upstream()
    recorder = Recorder()
    upstream.request(method, b"/x", HEADERS, None, recorder)
    protocol, transport = connect(clock)
    protocol.dataReceived(response)
    assert [e[0] for e in recorder.events] == ["head", "end"]
    assert recorder.events[0][4] == length
    assert not transport.disconnecting


def test_close_delimited_body_ends_with_the_connection():
    clock, upstream = make_upstream()
    recorder = Recorder()
    upstream.request(b"GET", b"/x", HEADERS, None, recorder)
    protocol, _transport = connect(clock)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
    protocol.dataReceived(b" body")
    protocol.connectionLost(None)
    assert recorder.events[1:] == [("data", b"some body"), ("end", True)]


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
)
def test_broken_off_responses_are_incomplete(response):
    clock, upstream = make_upstream()
    recorder = Recorder()
    upstream.request(b"GET", b"/x", HEADERS, None, recorder)
    protocol, _transport = connect(clock)
    protocol.dataReceived(response)
    protocol.connectionLost(None)
    assert recorder.events[-1] == ("end", False)


@pytest.mark.parametrize(
    "response",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        # Chunk sizes Python's int() takes and HTTP does not.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0_5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        # Heads that are not HTTP/1.1's.
        b"HTTP/1.1 -20 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_malformed_responses(response):
    clock, upstream = make_upstream()
    recorder = Recorder()
    upstream.request(b"GET", b"/x", HEADERS, None, recorder)
    protocol, transport = connect(clock)
    protocol.dataReceived(response)
    assert recorder.events[-1] in (("failed", "UpstreamError"), ("end", False))
    assert transport.disconnected


def test_stale_keep_alive_connection_is_retried_once():
    clock, upstream = make_upstream()
    upstream.request(b"GET", b"/1", HEADERS, None, Recorder())
    protocol, _ = connect(clock)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    recorder = Recorder()
    upstream.request(b"GET", b"/2", HEADERS, None, recorder)
    # Synapse had closed the idle connection as the request went out.
    protocol.connectionLost(None)
    fresh, transport = connect(clock)
    assert transport.value() == b"GET /2 HTTP/1.1\r\nHost: hs.test\r\n\r\n"
    fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert recorder.events[-1] == ("end", True)


def test_body_is_framed_and_back_pressure_reaches_the_client():
    clock, upstream = make_upstream()
    paused = []
    body = RequestBody(
        None, ClientReading(lambda: paused.append(True), lambda: paused.append(False))
    )
    recorder = Recorder()
    upstream.request(b"POST", b"/up", HEADERS, body, recorder)
    body.write(b"early")  # before the connection is up: held
    protocol, transport = connect(clock)
    body.write(b"late")
    body.finish()
    assert transport.value().endswith(
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nearly\r\n4\r\nlate\r\n0\r\n\r\n"
    )
    assert transport.producer is None  # unregistered once the body is sent
    body2 = RequestBody(
        3, ClientReading(lambda: paused.append(True), lambda: paused.append(False))
    )
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    upstream.request(b"PUT", b"/up", HEADERS, body2, Recorder())
    assert transport.producer is body2
    transport.producer.pauseProducing()
    assert paused[-1] is True
    transport.producer.resumeProducing()
    assert paused[-1] is False


def test_early_answer_closes_a_connection_with_an_unsent_body():
    clock, upstream = make_upstream()
    body = RequestBody(1000, ClientReading(lambda: None, lambda: None))
    recorder = Recorder()
    upstream.request(b"POST", b"/up", HEADERS, body, recorder)
    protocol, transport = connect(clock)
    body.write(b"x" * 10)
    protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert recorder.events[-1] == ("end", True)
    assert transport.disconnected


def test_local_descriptor_shortage_is_not_an_upstream_failure():
    import errno

    from twisted.internet.error import ConnectError, ConnectionRefusedError
    from twisted.python.failure import Failure

    from matrix_edge.upstream.client import is_local_shortage

    assert is_local_shortage(Failure(ConnectError(osError=errno.EMFILE)))
    assert is_local_shortage(
        Failure(OSError(errno.ENFILE, "Too many open files in system"))
    )
    assert not is_local_shortage(Failure(ConnectionRefusedError()))


def test_idle_expiry_counts_from_the_last_use():
    clock, upstream = make_upstream(idle_timeout=30.0)
    upstream.request(b"GET", b"/1", HEADERS, None, Recorder())
    protocol, transport = connect(clock)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    clock.advance(20)
    upstream.request(b"GET", b"/2", HEADERS, None, Recorder())  # reused
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    clock.advance(20)  # 40 s since the first use, 20 since the last
    assert not transport.disconnected
    clock.advance(11)
    assert transport.disconnected
    assert upstream.idle_connection() is None


def test_bytes_after_a_response_make_the_connection_single_use():
    """What follows a complete response on a pooled connection was asked
    for by no one; the next request must not read it as its answer."""
    clock, upstream = make_upstream()
    recorder = Recorder()
    upstream.request(b"GET", b"/x", HEADERS, None, recorder)
    protocol, transport = connect(clock)
    protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    )
    assert recorder.events == [
        ("head", 200, b"OK", [(b"Content-Length", b"2")], 2),
        ("data", b"ok"),
        ("end", True),
    ]
    assert transport.disconnected
    assert upstream.idle_connection() is None


def test_head_response_followed_by_nothing_keeps_the_connection():
    clock, upstream = make_upstream()
    first = Recorder()
    upstream.request(b"HEAD", b"/x", HEADERS, None, first)
    protocol, transport = connect(clock)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    second = Recorder()
    upstream.request(b"GET", b"/y", HEADERS, None, second)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsome body")
    assert [e[0] for e in first.events] == ["head", "end"]
    assert second.events[1:] == [("data", b"some body"), ("end", True)]
    assert not transport.disconnecting
