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


# Retiring a site a reload replaced: nothing is cut, not even a request a
# client sends just as the reload happens.


def test_a_retired_idle_connection_stays_open_and_its_next_answer_is_the_last():
    h = make_harness()
    h.send(GET)
    h.connect_upstream()
    h.upstream_says(OK)
    retired = h.site.retire()
    assert not h.client.disconnecting
    h.send(GET)
    h.upstream_says(OK)
    second = h.response().split(b"HTTP/1.1 200 OK")[2]
    assert b"\r\nConnection: close\r\n" in second
    assert h.client.disconnecting
    assert not retired.called
    h.channel.connectionLost(None)
    assert retired.called


def test_a_request_in_flight_when_retired_is_answered_as_the_last_one():
    h = make_harness()
    h.send(GET)
    h.connect_upstream()
    retired = h.site.retire()
    h.upstream_says(OK)
    assert h.response().count(b"HTTP/1.1 200 OK") == 1
    assert b"\r\nConnection: close\r\n" in h.response()
    assert h.client.disconnecting
    h.channel.connectionLost(None)
    assert retired.called


def test_pipelined_requests_read_before_retiring_are_all_answered():
    h = make_harness()
    h.send(GET + GET)
    h.connect_upstream()
    h.site.retire()
    h.upstream_says(OK)
    h.connect_upstream()
    h.upstream_says(OK)
    first, second = h.response().split(b"HTTP/1.1 200 OK")[1:]
    assert b"Connection: close" not in first
    assert b"\r\nConnection: close\r\n" in second
    assert h.client.disconnecting


def test_a_connection_that_opens_after_retiring_is_retired():
    h = make_harness()
    h.site.retire()
    transport = StringTransport()
    protocol = h.site.buildProtocol(None)
    protocol.makeConnection(transport)
    assert not transport.disconnecting
    protocol.dataReceived(GET)
    h.connect_upstream()
    h.upstream_says(OK)
    assert b"\r\nConnection: close\r\n" in transport.value()
    assert transport.disconnecting


def test_http2_is_retired_with_goaway():
    h = H2Harness()
    stream_id = h.request(b"GET", b"/_matrix/client/versions")
    h.connect_upstream()
    h.transport.clear()
    h.site.retire()
    [goaway] = [f for f in _frames(h.transport.value()) if isinstance(f, GoAwayFrame)]
    assert (goaway.last_stream_id, goaway.error_code) == (stream_id, 0)


def test_a_response_already_under_way_when_retired_keeps_its_word():
    """Its head went out without Connection: close, so the client will
    send another request: that one is answered, with the close."""
    h = make_harness()
    h.send(GET)
    h.connect_upstream()
    h.upstream_says(OK[:-2])  # the head is out, the body not yet
    h.site.retire()
    h.upstream_says(OK[-2:])
    assert b"Connection: close" not in h.response()
    assert not h.client.disconnecting
    h.send(GET)
    h.upstream_says(OK)
    second = h.response().split(b"HTTP/1.1 200 OK")[2]
    assert b"\r\nConnection: close\r\n" in second
    assert h.client.disconnecting
