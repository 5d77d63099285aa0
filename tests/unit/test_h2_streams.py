"""HTTP/2 streams through their whole lives, in memory: resets that race
the edge's own writes, flow-control window given back whatever ends a
stream, streams reset by the edge and still logged, stalls, local
resources, and the upstream connection behind a stream."""

from __future__ import annotations

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from matrix_edge.server.request import LOCAL_BODY_LIMIT
from tests.h2_harness import H2Harness

ErrorCodes = h2.errors.ErrorCodes
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture
def failures():
    """Logged failures (tracebacks) during the test."""
    seen: list[dict] = []

    def observer(event):
        if event.get("log_failure") is not None:
            seen.append(event)

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def zero_window(h: H2Harness) -> None:
    h.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    h.send()
    h.receive()


def test_window_update_and_reset_in_one_read_still_cancel_the_upstream(failures):
    """A response is streaming, held back by a closed window; the client
    opens the window and resets the stream in the same read. The reset
    must still reach the request: the upstream exchange is cancelled."""
    h = H2Harness()
    zero_window(h)
    stream_id = h.request(b"GET", b"/_matrix/media/v3/download/a/b")
    upstream = h.connect_upstream()
    h.upstream_says(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    raw = (
        hyperframe.frame.WindowUpdateFrame(stream_id, window_increment=100).serialize()
        + hyperframe.frame.RstStreamFrame(stream_id, error_code=8).serialize()
    )
    h.send(raw)
    h.receive()
    assert not failures
    assert upstream.disconnecting  # Synapse's work is cancelled


def test_window_update_and_reset_in_one_read_are_charged_as_a_reset():
    """Rapid reset through the same race: HEADERS for a local resource and
    RST_STREAM in one read. The answer, written while handling the HEADERS,
    meets a stream h2 already reset; the StreamReset event that follows
    must still find the stream and charge the reset."""
    h = H2Harness()
    budget_before = None
    for index in range(300):
        stream_id = h.client.get_next_available_stream_id()
        h.client.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":path", b"/health"),
                (b":authority", b"hs.example"),
            ],
            end_stream=True,
        )
        h.client.reset_stream(stream_id, ErrorCodes.CANCEL)
        h.send()
        if h.transport.disconnecting:
            break
        if index == 0:
            budget_before = h.protocol._chosen._budget
    h.receive()
    # 300 resets at reset_cost 10 each exceed the budget of 1000 by far.
    assert (
        h.goaway() is not None and h.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM
    ), budget_before


def send_until_blocked(
    h: H2Harness, stream_id: int, limit: int = 4 * 1024 * 1024
) -> int:
    """Send body on ``stream_id`` for as long as the windows allow, or until
    the edge closes the stream."""
    sent = 0
    while sent < limit:
        try:
            window = h.client.local_flow_control_window(stream_id)
            if window <= 0:
                break
            size = min(16384, window)
            h.client.send_data(stream_id, b"x" * size)
        except h2.exceptions.StreamClosedError:
            break
        sent += size
        h.send()
        h.receive()
    return sent


def withheld(h: H2Harness) -> int:
    """Connection-level request bytes the edge received and has not
    accounted for as consumed (granted back, or batched by h2 to be)."""
    manager = h.protocol._chosen._conn._inbound_flow_control_window_manager
    return (
        manager.max_window_size - manager.current_window_size - manager._bytes_processed
    )


def fail_upstream_connect(h: H2Harness) -> None:
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure

    _host, _port, factory, _timeout, _bind = h.clock.tcpClients.pop(0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("no")))


def test_upload_reset_while_waiting_for_the_upstream_returns_its_connection_window():
    """While the upstream connection is being made, body beyond the pending
    limit is held (the stream gets no more window). When the stream then
    ends without an upstream connection, that withheld data must still be
    granted back at the connection level, or the connection's window
    shrinks for good with every such upload."""
    h = H2Harness()
    start = h.client.outbound_flow_control_window
    for _ in range(6):
        stream_id = h.request(b"PUT", b"/_matrix/client/v3/x", end=False)
        send_until_blocked(h, stream_id)
        h.client.reset_stream(stream_id, ErrorCodes.CANCEL)
        h.send()
        h.receive()
        h.clock.advance(0)
        assert withheld(h) == 0
    assert h.client.outbound_flow_control_window == start
    # And so a seventh upload can still be sent at all.
    stream_id = h.request(b"PUT", b"/_matrix/client/v3/x", end=False)
    assert h.client.local_flow_control_window(stream_id) > 0


def test_upload_answered_502_while_held_returns_its_connection_window():
    """The same with Synapse down: the connection attempt fails and the
    client gets its 502; the withheld window is granted back, or after a
    few uploads nothing more could be uploaded on the connection."""
    h = H2Harness()
    for _ in range(6):
        stream_id = h.request(b"PUT", b"/_matrix/client/v3/x", end=False)
        send_until_blocked(h, stream_id)
        fail_upstream_connect(h)
        h.clock.advance(0)
        h.receive()
        assert h.response(stream_id)[0] == 502
        assert withheld(h) == 0
    assert h.client.outbound_flow_control_window > 0


def logged(h: H2Harness) -> list:
    entries: list = []
    h.site.access_log.log = entries.append  # type: ignore[method-assign]
    return entries


def test_upstream_breaking_off_mid_response_resets_the_stream_and_is_logged():
    h = H2Harness()
    entries = logged(h)
    stream_id = h.request(b"GET", b"/_matrix/media/v3/download/a/b")
    upstream = h.connect_upstream()
    h.upstream_says(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    h.upstreams[-1][1].connectionLost(Failure(ConnectionLost()))
    h.receive()
    status, body, ended, reset = h.response(stream_id)
    assert (status, body, ended, reset) == (
        200,
        b"hello",
        False,
        ErrorCodes.INTERNAL_ERROR,
    )
    # The request is over: one access-log entry, as over HTTP/1.1 (where
    # the connection's loss logs it).
    assert len(entries) == 1
    request = entries[0]
    assert request.finished or request.is_disconnected
    del upstream


def test_stalled_upload_abandoned_is_logged():
    """body_idle passes with an upload stalled: the stream is reset
    (request.abort()), and the request must be accounted for."""
    h = H2Harness()
    entries = logged(h)
    stream_id = h.request(b"PUT", b"/_matrix/client/v3/x", body=b"abc", end=False)
    upstream = h.connect_upstream()
    h.clock.advance(h.config.timeouts.body_idle + 1)
    h.receive()
    assert h.response(stream_id)[3] == ErrorCodes.CANCEL
    assert upstream.disconnecting
    assert len(entries) == 1


def test_bodiless_post_is_not_sent_twice_when_a_reused_connection_dies():
    """A POST without a body (HEADERS with END_STREAM, as h2 clients send
    an empty POST) goes out on a pooled connection; the connection dies
    before the response head. Synapse may have acted on it, so it must not
    be sent again: one request upstream, or an error on its stream."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    h = H2Harness()
    first = h.request(b"GET", b"/_matrix/client/versions")
    h.connect_upstream()
    h.upstream_says(OK)
    assert h.response(first)[0] == 200
    post = h.request(b"POST", b"/_matrix/client/v3/logout")
    pooled = h.upstreams[-1][0]
    assert pooled.value().count(b"POST /_matrix/client/v3/logout") == 1
    # Synapse took the request, then its connection broke.
    h.upstreams[-1][1].connectionLost(Failure(ConnectionLost()))
    h.receive()
    resent = h.clock.tcpClients != []
    assert not resent, "the POST was sent upstream a second time"
    assert h.response(post)[0] == 502


def test_unframed_upstream_response_cut_by_a_reset_is_not_a_clean_end():
    """A response without Content-Length or chunking ends when Synapse
    closes; an abortive close (ECONNRESET) is a failure, and the client
    must see its stream reset rather than END_STREAM."""
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    h = H2Harness()
    stream_id = h.request(b"GET", b"/_matrix/media/v3/download/a/b")
    h.connect_upstream()
    h.upstream_says(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\nhalf")
    h.upstreams[-1][1].connectionLost(Failure(ConnectionLost("reset by peer")))
    h.receive()
    status, body, ended, reset = h.response(stream_id)
    assert (status, body) == (200, b"half")
    assert not ended and reset is not None


def test_body_posted_to_a_local_resource_is_bounded():
    """/health and friends take no body: past LOCAL_BODY_LIMIT the request
    is answered 413 and the stream closed, rather than stored without end."""
    h = H2Harness()
    stream_id = h.request(b"POST", b"/health", end=False)
    sent = send_until_blocked(h, stream_id, limit=8 * 1024 * 1024)
    assert sent <= LOCAL_BODY_LIMIT + 16384
    status, _body, ended, reset = h.response(stream_id)
    assert (status, ended, reset) == (413, True, ErrorCodes.NO_ERROR)


def test_streams_held_open_to_a_local_resource_do_not_live_for_ever():
    """HEADERS for /health without END_STREAM, then silence. A local
    request has no body_idle of its own and the connection's idle timer runs
    only without streams, so the stall sweep must end such streams; and no
    temporary file (twisted.web's store for a body of unknown length) may
    hold a descriptor meanwhile."""
    import os

    h = H2Harness()
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        h.request(b"POST", b"/health", end=False)
    h.receive()
    fds_during = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        h.clock.advance(h.config.timeouts.client_idle)
    h.receive()
    proto = h.protocol._chosen
    open_streams = len(proto._streams)
    h.protocol.connectionLost(Failure(ConnectionDone()))
    assert (
        h.transport.disconnecting or open_streams == 0,
        fds_during - fds_before,
    ) == (
        True,
        0,
    ), (
        f"{open_streams} streams open after 10 idle timeouts, {fds_during - fds_before} fds"
    )


def test_a_client_that_never_opens_its_window_does_not_hold_responses_for_ever():
    """INITIAL_WINDOW_SIZE 0 and no WINDOW_UPDATE: each response (up to
    OUTBOX_HIGH, 64 KiB, before the upstream is paused) sits in its
    stream's outbox after the request has finished and stopped its timers.
    The stall sweep must reset such streams, or 100 of them would hold
    ~6 MiB a connection for ever."""
    h = H2Harness()
    zero_window(h)
    size = 60_000
    for index in range(20):
        h.request(b"GET", b"/_matrix/media/v3/download/a/%d" % index)
        if h.clock.tcpClients:
            h.connect_upstream()
        h.upstream_says(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size
        )
    for _ in range(10):
        h.clock.advance(h.config.timeouts.client_idle)
    h.receive()
    proto = h.protocol._chosen
    held = sum(s._outbox_size for s in proto._streams.values())
    assert h.transport.disconnecting, (
        f"{len(proto._streams)} streams, {held} bytes held"
    )


def test_a_form_posted_to_a_local_resource_is_not_parsed_and_gets_an_answer():
    """twisted.web would parse a form posted to a local resource, in memory,
    and reset the stream on a malformed one; the edge reads no form: the
    resource answers (405 for /health) and the request is logged."""
    h = H2Harness()
    entries = logged(h)
    stream_id = h.request(
        b"POST", b"/health", [(b"content-type", b"multipart/form-data")], body=b"xx"
    )
    h.receive()
    status, _body, ended, reset = h.response(stream_id)
    assert (status, ended, reset) == (405, True, None)
    assert len(entries) == 1


def test_trailers_ending_a_body_short_of_its_content_length_are_refused():
    """Content-Length 10, three bytes of DATA, then trailers with
    END_STREAM. h2 checks the length only when END_STREAM comes on DATA.
    Taken as complete, the upstream would have a head announcing 10 bytes
    and three of them, and its pooled connection would let the next
    client's request supply the missing seven (desync). RFC 9113 section
    8.1.1: the request is malformed, and the upstream connection must go."""
    h = H2Harness()
    stream_id = h.request(
        b"PUT",
        b"/_matrix/client/v3/x",
        [(b"content-length", b"10")],
        body=b"abc",
        end=False,
    )
    upstream = h.connect_upstream()
    h.client.send_headers(stream_id, [(b"x-trailer", b"1")], end_stream=True)
    h.send()
    h.receive()
    # An upstream that answers before reading the whole body (a fallback
    # web server's 405, say): the connection is reused.
    h.upstream_says(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
    upstream.clear()
    victim = h.request(
        b"GET",
        b"/_matrix/client/v3/account/whoami",
        [(b"authorization", b"Bearer victim")],
    )
    reused = upstream.value()
    assert not reused.startswith(b"GET /_matrix/client/v3/account/whoami"), (
        "the next request went on the connection still owing 7 body bytes"
    )
    del victim


def test_http2_connections_turn_off_nagle_like_http1_ones():
    """TCP_NODELAY on both protocols: small writes (responses, HTTP/2
    window updates) must not wait for the peer's delayed ACK."""
    from tests.h2_harness import HOST, PEER, TLSStringTransport

    class Recording(TLSStringTransport):
        nodelay: list[bool]

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.nodelay.append(enabled)

    def connect(alpn: bytes) -> list[bool]:
        h = H2Harness()
        transport = Recording(peerAddress=PEER, hostAddress=HOST)
        transport.negotiatedProtocol = alpn
        transport.nodelay = []
        protocol = h.site.buildProtocol(PEER)
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            if alpn == b"h2"
            else b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        return transport.nodelay

    assert connect(b"http/1.1") == [True]
    assert connect(b"h2") == [True]


def test_early_401_while_the_upload_is_held_returns_the_connection_window():
    """(Holds up.) The upstream's send buffer is full, the stream gets no
    more window; Synapse answers 401 before the body is in. The stream is
    answered and reset with NO_ERROR, and the withheld window comes back to
    the connection, so other uploads can go on."""
    h = H2Harness()
    start = h.client.outbound_flow_control_window
    stream_id = h.request(b"PUT", b"/_matrix/media/v3/upload", end=False)
    upstream = h.connect_upstream()
    upstream.producer.pauseProducing()
    send_until_blocked(h, stream_id)
    h.upstream_says(
        b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    status, body, ended, reset = h.response(stream_id)
    assert (status, body, ended, reset) == (401, b"{}", True, ErrorCodes.NO_ERROR)
    assert upstream.disconnecting
    assert withheld(h) == 0
    del start
