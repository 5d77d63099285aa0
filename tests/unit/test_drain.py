"""Draining a listener for a graceful stop, on in-memory transports: idle
connections close at once, a request in flight is answered (as the last
on its HTTP/1.1 connection, after GOAWAY on HTTP/2), and the drain ends
when the last connection has closed."""

from __future__ import annotations

from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame
from twisted.internet.testing import StringTransport

from tests.h2_harness import H2Harness
from tests.unit.test_site import OK, make_harness

GET = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n"


def test_an_idle_http11_connection_closes_at_once():
    h = make_harness()
    h.send(GET)
    h.connect_upstream()
    h.upstream_says(OK)
    drained = h.site.drain()
    assert h.client.disconnecting
    assert not drained.called
    h.channel.connectionLost(None)
    assert drained.called


def test_a_request_in_flight_is_answered_as_the_last_one():
    h = make_harness()
    h.send(GET)
    h.connect_upstream()
    drained = h.site.drain()
    assert not h.client.disconnecting
    # A request pipelined now is not taken.
    h.send(GET)
    h.upstream_says(OK)
    assert h.response().count(b"HTTP/1.1 200 OK") == 1
    assert b"\r\nConnection: close\r\n" in h.response()
    assert h.client.disconnecting
    h.channel.connectionLost(None)
    assert drained.called


def test_a_connection_opened_while_draining_is_closed():
    h = make_harness()
    h.site.drain()
    transport = StringTransport()
    h.site.buildProtocol(None).makeConnection(transport)
    assert transport.disconnecting


def _frames(data: bytes) -> list[Frame]:
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def test_http2_gets_goaway_and_its_stream_is_answered():
    h = H2Harness()
    stream_id = h.request(b"GET", b"/_matrix/client/versions")
    h.connect_upstream()
    h.transport.clear()
    drained = h.site.drain()
    [goaway] = [f for f in _frames(h.transport.value()) if isinstance(f, GoAwayFrame)]
    assert (goaway.last_stream_id, goaway.error_code) == (stream_id, 0)
    assert not h.transport.disconnecting
    h.transport.clear()
    h.upstreams[-1][1].dataReceived(OK)
    h.clock.advance(0)
    answered = [f for f in _frames(h.transport.value()) if isinstance(f, HeadersFrame)]
    assert [f.stream_id for f in answered] == [stream_id]
    # The last stream is done: the connection closes.
    assert h.transport.disconnecting
    h.protocol.connectionLost(None)
    assert drained.called
