"""The HTTP/2 server side, frame by frame, on the in-memory reactor: RFC 9113
section by section, and the invariant that a client's HTTP/2 request
becomes exactly one well-framed HTTP/1.1 request upstream, or an error on
its own stream."""

from __future__ import annotations

import json

import h2.errors
import h2.events
import hyperframe.frame
import pytest
from twisted.logger import globalLogPublisher

from matrix_edge.server.h2 import CLOSE_GRACE, OUTBOX_HIGH, H2Settings
from tests.h2_harness import H2Harness

ErrorCodes = h2.errors.ErrorCodes
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHROMIUM_ORDER = [
    (b"content-length", b"2"),
    (b"sec-ch-ua-platform", b'"Linux"'),
    (b"authorization", b"Bearer syt_secret"),
    (b"user-agent", b"Mozilla/5.0"),
    (b"content-type", b"application/json"),
    (b"accept", b"*/*"),
    (b"origin", b"http://127.0.0.1:9000"),
    (b"priority", b"u=1, i"),
]


def upstream_head(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *fields = head.split(b"\r\n")
    return line, [tuple(f.split(b": ", 1)) for f in fields], body  # type: ignore[misc]


def forwarded(h: H2Harness) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """The one request the upstream received, names in lower case (as
    twisted.web writes them, whatever the client's case), without the
    request ID."""
    upstream = h.connect_upstream()
    line, fields, body = upstream_head(upstream.value())
    fields = [(n.lower(), v) for n, v in fields if n != b"X-Request-ID"]
    return line, fields, body


# RFC 9113 section 8.2: fields in the order the client sent them -------------


def test_every_header_survives_content_length_first():
    """Chromium sends content-length early; nothing after it may be lost."""
    h = H2Harness()
    h.request(b"POST", b"/_matrix/client/v3/createRoom", CHROMIUM_ORDER, body=b"{}")
    line, fields, body = forwarded(h)
    assert line == b"POST /_matrix/client/v3/createRoom HTTP/1.1"
    assert fields == [
        (b"host", b"hs.example"),
        *[(n, v) for n, v in CHROMIUM_ORDER if n != b"content-length"],
        (b"x-forwarded-for", b"203.0.113.7"),
        (b"x-forwarded-proto", b"https"),
        (b"content-length", b"2"),
    ]
    assert body == b"{}"


def test_cookie_crumbs_become_one_field_where_the_first_was():
    h = H2Harness()
    h.request(
        b"GET",
        b"/_matrix/client/versions",
        [
            (b"cookie", b"a=1"),
            (b"accept", b"*/*"),
            (b"cookie", b"b=2"),
            (b"cookie", b"c=3"),
        ],
    )
    _, fields, _ = forwarded(h)
    assert fields[:3] == [
        (b"host", b"hs.example"),
        (b"cookie", b"a=1; b=2; c=3"),
        (b"accept", b"*/*"),
    ]


def test_host_equal_to_authority_is_one_host():
    h = H2Harness()
    h.request(b"GET", b"/_matrix/client/versions", [(b"host", b"hs.example")])
    _, fields, _ = forwarded(h)
    assert [v for n, v in fields if n.lower() == b"host"] == [b"hs.example"]


def test_host_without_authority_is_the_host():
    h = H2Harness()
    stream_id = h.client.get_next_available_stream_id()
    h.client.send_headers(
        stream_id,
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/_matrix/x"),
            (b"host", b"other.example"),
        ],
        end_stream=True,
    )
    h.send()
    _, fields, _ = forwarded(h)
    assert fields[0] == (b"host", b"other.example")


def test_host_contradicting_authority_is_a_connection_error():
    h = H2Harness()
    h.request(b"GET", b"/_matrix/client/versions", [(b"host", b"evil.example")])
    h.receive()
    assert h.goaway().error_code == ErrorCodes.PROTOCOL_ERROR
    assert h.clock.tcpClients == []


# RFC 9113 section 8.1.1: framing the body ------------------------------------


def test_content_length_with_end_stream_on_headers_is_refused():
    """The smuggling shape: a head announcing a body that never comes."""
    h = H2Harness()
    stream_id = h.request(
        b"POST", b"/_matrix/client/v3/x", [(b"content-length", b"40")]
    )
    h.receive()
    status, body, ended, _ = h.response(stream_id)
    assert status == 400 and ended
    assert json.loads(body)["errcode"] == "M_UNKNOWN"
    assert h.clock.tcpClients == []


def test_two_content_lengths_are_refused_not_forwarded_twice():
    h = H2Harness()
    stream_id = h.request(
        b"POST",
        b"/_matrix/client/v3/createRoom",
        [(b"content-length", b"2"), (b"content-length", b"2")],
        body=b"{}",
    )
    h.receive()
    assert h.response(stream_id)[0] == 400
    assert h.clock.tcpClients == []


def test_more_data_than_declared_is_a_connection_error_and_the_upstream_connection_is_dropped():
    h = H2Harness()
    stream_id = h.request(
        b"POST", b"/_matrix/client/v3/x", [(b"content-length", b"3")], end=False
    )
    upstream = h.connect_upstream()
    # Bypass the client's own check: a DATA frame of 10 bytes, raw.
    frame = hyperframe.frame.DataFrame(stream_id, b"0123456789")
    h.send(frame.serialize())
    h.receive()
    assert h.goaway().error_code == ErrorCodes.PROTOCOL_ERROR
    assert upstream.disconnecting
    assert upstream.value().endswith(b"\r\n\r\n")


def test_end_stream_short_of_the_declared_length_never_completes_upstream():
    h = H2Harness()
    stream_id = h.request(
        b"POST", b"/_matrix/client/v3/x", [(b"content-length", b"10")], end=False
    )
    upstream = h.connect_upstream()
    h.send(
        hyperframe.frame.DataFrame(stream_id, b"abc", flags=["END_STREAM"]).serialize()
    )
    h.receive()
    assert h.goaway().error_code == ErrorCodes.PROTOCOL_ERROR
    assert upstream.disconnecting
    assert h.response(stream_id)[0] is None


def test_body_without_length_goes_upstream_chunked():
    h = H2Harness()
    h.request(b"PUT", b"/_matrix/client/v3/x", body=b"hello", end=False)
    upstream = h.connect_upstream()
    h.client.send_data(1, b" world", end_stream=True)
    h.send()
    _, fields, body = upstream_head(upstream.value())
    assert (b"Transfer-Encoding", b"chunked") in fields
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


def test_trailers_are_not_forwarded():
    h = H2Harness()
    stream_id = h.request(
        b"PUT",
        b"/_matrix/client/v3/x",
        [(b"content-length", b"5")],
        body=b"hello",
        end=False,
    )
    h.client.send_headers(stream_id, [(b"x-checksum", b"abc")], end_stream=True)
    h.send()
    upstream = h.connect_upstream()
    assert b"x-checksum" not in upstream.value()
    assert upstream.value().endswith(b"\r\n\r\nhello")
    h.upstream_says(OK)
    assert h.response(stream_id)[:3] == (200, b"{}", True)


def test_padding_counts_against_the_window_and_is_granted_back():
    """Padding uses flow-control window like data; if the edge granted back
    only the data, padded frames would close the window for good."""
    h = H2Harness()
    frames = 1200  # 1,200 x 260 bytes: more than a stream window
    stream_id = h.request(
        b"PUT",
        b"/_matrix/client/v3/x",
        [(b"content-length", b"%d" % (5 * frames))],
        end=False,
    )
    upstream = h.connect_upstream()
    for index in range(frames):
        assert h.client.local_flow_control_window(stream_id) >= 260, index
        h.client.send_data(
            stream_id, b"hello", pad_length=254, end_stream=index == frames - 1
        )
        h.send()
        h.receive()
    assert upstream.value().endswith(b"\r\n\r\n" + b"hello" * frames)


# Methods and pseudo-headers --------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [b"GET /_synapse/admin/v1/users HTTP/1.1", b"GET\t/x", b"PO ST", b"G(E)T"],
)
def test_method_must_be_a_token(method):
    h = H2Harness()
    stream_id = h.request(method, b"/_matrix/client/versions")
    h.receive()
    assert h.response(stream_id)[0] == 400
    assert h.clock.tcpClients == []


def test_connect_is_answered_on_its_stream_and_the_connection_goes_on():
    h = H2Harness()
    stream_id = h.client.get_next_available_stream_id()
    h.client.send_headers(
        stream_id,
        [(b":method", b"CONNECT"), (b":authority", b"synapse:8008")],
        end_stream=False,
    )
    h.send()
    h.clock.advance(0)
    h.receive()
    assert h.response(stream_id)[0] == 405
    assert h.goaway() is None
    second = h.request(b"GET", b"/_matrix/client/versions")
    h.connect_upstream()
    h.upstream_says(OK)
    assert h.response(second)[:3] == (200, b"{}", True)


def test_a_refused_head_reaches_no_upstream_and_other_streams_go_on():
    h = H2Harness()
    bad = h.request(b"GET", b"/_matrix/../_synapse/admin")
    good = h.request(b"GET", b"/_matrix/client/versions")
    h.receive()
    assert h.response(bad)[0] == 400
    upstream = h.connect_upstream()
    assert upstream.value().startswith(b"GET /_matrix/client/versions HTTP/1.1\r\n")
    h.upstream_says(OK)
    assert h.response(good)[0] == 200
    assert h.clock.tcpClients == []


# Stream states ----------------------------------------------------------------


def test_many_streams_one_request_each():
    h = H2Harness()
    streams = [
        h.request(b"GET", b"/_matrix/client/v3/sync?n=%d" % i) for i in range(20)
    ]
    upstreams = [h.connect_upstream() for _ in streams]
    targets = sorted(u.value().split(b" ")[1] for u in upstreams)
    assert targets == sorted(b"/_matrix/client/v3/sync?n=%d" % i for i in range(20))
    for index in range(len(upstreams)):
        h.upstream_says(OK, index)
    assert all(h.response(s)[:3] == (200, b"{}", True) for s in streams)


def test_client_reset_cancels_the_upstream_request():
    h = H2Harness()
    stream_id = h.request(b"GET", b"/_matrix/client/v3/sync")
    upstream = h.connect_upstream()
    h.client.reset_stream(stream_id, ErrorCodes.CANCEL)
    h.send()
    assert upstream.disconnecting


def test_early_answer_ends_the_stream_then_asks_the_client_to_stop():
    h = H2Harness(max_upload_size="1K")
    stream_id = h.request(
        b"POST",
        b"/_matrix/media/v3/upload",
        [(b"content-length", b"5000")],
        body=b"x" * 100,
        end=False,
    )
    h.clock.advance(0)
    h.receive()
    status, _, ended, reset = h.response(stream_id)
    assert status == 413 and ended
    assert reset == ErrorCodes.NO_ERROR
    # Body frames already on their way are dropped without harm.
    h.send(hyperframe.frame.DataFrame(stream_id, b"x" * 1000).serialize())
    h.receive()
    assert h.goaway() is None
    assert h.clock.tcpClients == []


def test_response_complete_before_a_late_end_stream_is_not_reset():
    """A client that sends END_STREAM in an empty DATA frame after the whole
    declared body (Node, several libraries) gets a clean response."""
    h = H2Harness()
    stream_id = h.request(
        b"PUT",
        b"/_matrix/client/v3/x",
        [(b"content-length", b"2")],
        body=b"{}",
        end=False,
    )
    h.connect_upstream()
    h.upstream_says(OK)
    status, _, ended, reset = h.response(stream_id)
    assert (status, ended, reset) == (200, True, None)
    h.client.end_stream(stream_id)
    h.send()
    h.receive()
    assert h.goaway() is None


# Flow control -------------------------------------------------------------------


def test_request_window_opens_only_as_the_upstream_takes_the_body():
    h = H2Harness()
    window = H2Settings().stream_window
    stream_id = h.request(
        b"PUT",
        b"/_matrix/media/v3/upload",
        [(b"content-length", b"%d" % (4 * window))],
        end=False,
    )
    upstream = h.connect_upstream()
    upstream.producer.pauseProducing()  # the upstream's send buffer is full
    sent = 0
    while h.client.local_settings and h.client.local_flow_control_window(stream_id) > 0:
        size = min(16384, h.client.local_flow_control_window(stream_id))
        h.client.send_data(stream_id, b"x" * size)
        sent += size
        h.send()
        h.receive()
    assert sent == window  # no more than one stream window outstanding
    upstream.producer.resumeProducing()
    h.receive()
    assert h.client.local_flow_control_window(stream_id) > 0


def test_zero_response_window_pauses_the_upstream_then_resumes():
    h = H2Harness()
    h.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    h.send()
    h.receive()
    stream_id = h.request(b"GET", b"/_matrix/media/v3/download/x/y")
    upstream = h.connect_upstream()
    body = b"y" * (8 * OUTBOX_HIGH)
    h.upstream_says(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
    for start in range(0, 4 * OUTBOX_HIGH, 16384):
        h.upstreams[-1][1].dataReceived(body[start : start + 16384])
    assert upstream.producerState == "paused"
    h.client.increment_flow_control_window(len(body), stream_id)
    h.client.increment_flow_control_window(len(body))
    h.send()
    assert upstream.producerState == "producing"


def test_window_update_to_the_maximum_is_fine_and_beyond_is_an_error():
    h = H2Harness()
    h.client.increment_flow_control_window(2**31 - 1 - 65535)
    h.send()
    h.receive()
    assert h.goaway() is None
    frame = hyperframe.frame.WindowUpdateFrame(0, window_increment=1)
    h.send(frame.serialize())
    h.receive()
    assert h.goaway().error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_a_client_that_does_not_read_stops_being_read():
    h = H2Harness()
    # The transport's buffer filled: Twisted pauses its registered producer.
    h.transport.producer.pauseProducing()
    assert h.transport.producerState == "paused"
    h.transport.producer.resumeProducing()
    assert h.transport.producerState == "producing"


# GOAWAY and closing -------------------------------------------------------------


def test_after_a_protocol_error_input_is_dropped_and_the_connection_closes_in_time():
    h = H2Harness()
    h.send(hyperframe.frame.WindowUpdateFrame(1, window_increment=0).serialize())
    h.receive()
    assert h.goaway() is not None
    assert h.transport.disconnecting
    assert h.transport.producerState == "paused"  # no longer read
    h.transport.clear()
    h.send(b"\x00" * 100_000)
    assert h.transport.value() == b""
    h.clock.advance(CLOSE_GRACE)
    assert h.transport.disconnected


def test_idle_connection_gets_goaway():
    h = H2Harness()
    h.clock.advance(h.config.timeouts.client_idle)
    h.receive()
    assert h.goaway().error_code == ErrorCodes.NO_ERROR
    assert h.transport.disconnecting


def test_a_long_poll_keeps_the_connection():
    h = H2Harness()
    stream_id = h.request(b"GET", b"/_matrix/client/v3/sync?timeout=30000")
    h.connect_upstream()
    h.clock.advance(h.config.timeouts.client_idle + 1)
    h.receive()
    assert h.goaway() is None
    h.upstream_says(OK)
    assert h.response(stream_id)[0] == 200


# Abuse ----------------------------------------------------------------------------


def test_ping_flood_is_stopped():
    h = H2Harness()
    pings = b"".join(
        hyperframe.frame.PingFrame(0, opaque_data=b"%08d" % i).serialize()
        for i in range(2000)
    )
    h.send(pings)
    h.receive()
    assert h.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_rapid_reset_is_stopped():
    h = H2Harness()
    for _ in range(200):
        stream_id = h.request(b"GET", b"/_matrix/client/v3/sync")
        h.client.reset_stream(stream_id, ErrorCodes.CANCEL)
        h.send()
        if h.transport.disconnecting:
            break
    h.receive()
    assert h.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM
    # Each stream had started an upstream request; about a hundred did,
    # and no more after the GOAWAY.
    settings = H2Settings()
    assert len(h.clock.tcpClients) <= settings.abuse_budget / settings.reset_cost + 1


def test_continuation_trickled_past_the_header_deadline_closes_the_connection():
    h = H2Harness()
    headers = hyperframe.frame.HeadersFrame(1)
    headers.data = h.client.encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/_matrix/x")]
    )
    h.send(headers.serialize())
    seconds = h.config.timeouts.request_headers
    for _ in range(int(seconds / 2) + 2):
        h.clock.advance(2)
        if h.transport.disconnecting:
            break
        frame = hyperframe.frame.ContinuationFrame(1)
        frame.data = h.client.encoder.encode([(b"x-pad", b"1")])
        h.send(frame.serialize())
    assert h.transport.disconnecting
    assert h.clock.tcpClients == []


def test_continuation_flood_is_refused():
    h = H2Harness()
    headers = hyperframe.frame.HeadersFrame(1)
    headers.data = h.client.encoder.encode(
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/_matrix/x")]
    )
    frames = [headers.serialize()]
    for _ in range(200):
        frame = hyperframe.frame.ContinuationFrame(1)
        frame.data = b"\x00" * 1000
        frames.append(frame.serialize())
    h.send(b"".join(frames))
    h.receive()
    assert h.goaway() is not None
    assert h.clock.tcpClients == []


def test_hpack_bomb_is_refused():
    """One large indexed entry referenced many times: decoded, it would be
    far larger than the header list limit."""
    h = H2Harness()
    big = [(b"x-big", b"a" * 4000)]
    block = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/_matrix/x"),
        (b":authority", b"a"),
    ]
    stream_id = h.client.get_next_available_stream_id()
    h.client.send_headers(stream_id, block + big * 100, end_stream=True)
    h.send()
    h.receive()
    assert h.goaway() is not None
    assert h.clock.tcpClients == []


def test_an_answer_racing_the_clients_reset_in_one_read_is_quiet():
    """h2 takes in a whole read before the edge sees its events: an answer
    written while handling the DATA must not trip over the RST_STREAM that
    came in the same read."""
    failures: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_failure") is not None:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        h = H2Harness(max_upload_size="1K")
        stream_id = h.request(b"POST", b"/_matrix/media/v3/upload", end=False)
        h.connect_upstream()
        h.client.send_data(stream_id, b"x" * 2000)
        h.client.reset_stream(stream_id, ErrorCodes.CANCEL)
        h.send()
        h.receive()
        second = h.request(b"GET", b"/_matrix/client/versions")
        h.connect_upstream()
        h.upstream_says(OK)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == []
    assert h.goaway() is None
    assert h.response(second)[:3] == (200, b"{}", True)


@pytest.mark.parametrize(
    "frame",
    [
        # h2 drops these without an event: only the frame count sees them.
        hyperframe.frame.RstStreamFrame(1, error_code=0),
        hyperframe.frame.WindowUpdateFrame(1, window_increment=1),
        # Events the edge ignores, but not for free.
        hyperframe.frame.DataFrame(1, b""),
        b"\x00\x00\x01\xfa\x00\x00\x00\x00\x00x",  # type 0xfa, one byte
    ],
    ids=["rst-closed", "window-update-closed", "empty-data", "unknown-type"],
)
def test_floods_of_frames_that_do_nothing_are_stopped(frame):
    h = H2Harness()
    stream_id = h.request(b"POST", b"/_matrix/client/v3/x", body=b"", end=False)
    if not isinstance(frame, hyperframe.frame.DataFrame):
        h.client.end_stream(stream_id)
        h.send()
        h.connect_upstream()
        h.upstream_says(OK)
    raw = frame if isinstance(frame, bytes) else frame.serialize()
    h.send(raw * 200_000)
    h.receive()
    assert h.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_client_acknowledging_every_data_frame_is_served():
    """Some clients send a WINDOW_UPDATE for each DATA frame they read."""
    h = H2Harness()
    for _ in range(3000):
        stream_id = h.request(b"GET", b"/_matrix/client/versions")
        if h.clock.tcpClients:
            h.connect_upstream()
        h.upstream_says(OK, 0)
        h.send(
            hyperframe.frame.WindowUpdateFrame(0, window_increment=2).serialize()
            + hyperframe.frame.WindowUpdateFrame(
                stream_id, window_increment=2
            ).serialize()
        )
    assert h.goaway() is None


def test_goaway_names_the_last_stream_the_edge_took():
    """A protocol error in a read loses the requests h2 had read before it;
    the GOAWAY must not claim them, so the client may retry them."""
    h = H2Harness()
    first = h.request(b"GET", b"/_matrix/client/versions")
    block = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/_matrix/x"),
        (b":authority", b"a"),
    ]
    for _ in range(99):  # up to the limit of 100 open streams, in one read
        stream_id = h.client.get_next_available_stream_id()
        h.client.send_headers(stream_id, block, end_stream=True)
    extra = hyperframe.frame.HeadersFrame(
        stream_id + 2, flags=["END_HEADERS", "END_STREAM"]
    )
    extra.data = h.client.encoder.encode(block)
    h.send(extra.serialize())  # the 101st
    h.receive()
    goaway = h.goaway()
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert goaway.last_stream_id == first
    assert len(h.clock.tcpClients) == 1


def test_a_refused_head_is_logged_with_its_request_id():
    entries: list[dict] = []

    def observe(event: dict) -> None:
        if "access" in event:
            entries.append(event["access"])

    globalLogPublisher.addObserver(observe)
    try:
        h = H2Harness()
        stream_id = h.request(b"G(E)T", b"/_matrix/client/versions")
        h.receive()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert h.response(stream_id)[0] == 400
    [entry] = entries
    assert (entry["method"], entry["status"], entry["protocol"]) == (
        "G(E)T",
        400,
        "HTTP/2",
    )
    assert entry["request_id"]
