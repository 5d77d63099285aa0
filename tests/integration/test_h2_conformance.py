"""RFC 9113 conformance of the HTTP/2 server side, over a real TLS
connection (ALPN h2), on the ground the h2spec tool covers: one case per
h2spec case, with its id (``6.5.3/1``) and its description.

Each case sends raw frames, valid or not, and expects what h2spec accepts:

* a connection error: GOAWAY with one of the given codes, or the
  connection closed (a GOAWAY with another code fails, where h2spec would
  still pass once the connection closes);
* a stream error: RST_STREAM or GOAWAY with one of the given codes, or the
  connection closed (RFC 9113 section 5.4.1: an endpoint may treat a
  stream error as a connection error);
* for valid input: the answer the protocol asks for (PING ACK, SETTINGS
  ACK, a response, DATA within the granted window).

Then the upstream's side: a request that reaches it must be one valid
HTTP/1.1 request, complete only if the client's request was.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import attrs
import h2.errors
import pytest
import pytest_twisted
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.h2frames import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Header,
    RawH2,
    describe,
    error_name,
    raw_frame,
    settings_payload,
)
from tests.recording_upstream import Recorded

E = h2.errors.ErrorCodes
PATH = b"/_matrix/client/versions"
"""Forwarded to the upstream, which answers 200 with a JSON body."""
AUTHORITY = b"matrix.test"
WAIT = 3.0
"""How long an expected frame, or the close, may take."""

IWS = SettingsFrame.INITIAL_WINDOW_SIZE
MAX_FRAME = 16384


def common(method: bytes = b"GET", path: bytes = PATH) -> list[Header]:
    """A valid request's pseudo-header fields, as h2spec sends them."""
    return [
        (b":method", method),
        (b":scheme", b"https"),
        (b":path", path),
        (b":authority", AUTHORITY),
    ]


def dummies(count: int) -> list[Header]:
    """Large regular fields, 4,000 bytes each, as h2spec pads blocks."""
    return [(b"x-dummy%d" % i, b"x" * 4000) for i in range(count)]


# What the edge must answer ----------------------------------------------------

Expect = Callable[[RawH2], None]


def _names(codes: tuple[int, ...]) -> str:
    return " or ".join(error_name(code) for code in codes)


def connection_error(*codes: int) -> Expect:
    """GOAWAY with one of ``codes``, or the connection closed."""

    def expect(c: RawH2) -> None:
        frame = c.wait_for(lambda f: isinstance(f, GoAwayFrame))
        if frame is None:
            assert c.closed, (
                f"expected GOAWAY {_names(codes)} or the connection closed; got "
                f"{c.since_handshake()} and nothing more for {WAIT}s"
            )
            return
        assert isinstance(frame, GoAwayFrame)
        assert frame.error_code in codes, (
            f"expected GOAWAY {_names(codes)}; got {c.since_handshake()}"
        )

    return expect


def stream_error(*codes: int) -> Expect:
    """RST_STREAM or GOAWAY with one of ``codes``, or the connection closed."""

    def expect(c: RawH2) -> None:
        frame = c.wait_for(
            lambda f: (
                isinstance(f, GoAwayFrame)
                or (isinstance(f, RstStreamFrame) and f.error_code in codes)
            )
        )
        if frame is None:
            assert c.closed, (
                f"expected RST_STREAM or GOAWAY {_names(codes)}, or the connection "
                f"closed; got {c.since_handshake()} and nothing more for {WAIT}s"
            )
            return
        assert isinstance(frame, (GoAwayFrame, RstStreamFrame))
        assert frame.error_code in codes, (
            f"expected RST_STREAM or GOAWAY {_names(codes)}; got {c.since_handshake()}"
        )
        if isinstance(frame, RstStreamFrame):
            still_serving(c)

    return expect


def goaway(code: int) -> Expect:
    """A GOAWAY with ``code``: closing without one is not enough."""

    def expect(c: RawH2) -> None:
        frame = c.wait_for(lambda f: isinstance(f, GoAwayFrame))
        assert isinstance(frame, GoAwayFrame) and frame.error_code == code, (
            f"expected GOAWAY {error_name(code)}; got {c.since_handshake()}"
            + (" and the connection closed" if c.closed else "")
        )

    return expect


def rst_stream(stream_id: int, code: int) -> Expect:
    """RST_STREAM on ``stream_id`` with ``code``, the connection kept."""

    def expect(c: RawH2) -> None:
        frame = c.wait_for(
            lambda f: (
                isinstance(f, GoAwayFrame)
                or (isinstance(f, RstStreamFrame) and f.stream_id == stream_id)
            )
        )
        assert isinstance(frame, RstStreamFrame) and frame.error_code == code, (
            f"expected RST_STREAM({stream_id}) {error_name(code)}; got "
            f"{c.since_handshake()}"
            + (" and the connection closed" if c.closed else "")
        )
        still_serving(c)

    return expect


def still_serving(c: RawH2) -> None:
    """After a stream error, the connection goes on: a new stream gets its
    answer (from the edge itself, so that the upstream sees nothing)."""
    c.send(c.headers(LATER, common(path=b"/health"), ES, EH))
    response(LATER)(c)


def closed(c: RawH2) -> None:
    """The connection closed (a GOAWAY before the close is fine)."""
    c.wait_for(lambda f: False)
    assert c.closed, (
        f"expected the connection closed; got {c.since_handshake()} and it "
        f"stayed open for {WAIT}s"
    )


def ping_ack(data: bytes) -> Expect:
    """The first PING the edge sends is the ACK of ours, same payload."""

    def expect(c: RawH2) -> None:
        frame = c.wait_for(lambda f: isinstance(f, PingFrame))
        assert (
            isinstance(frame, PingFrame)
            and "ACK" in frame.flags
            and bytes(frame.opaque_data) == data
        ), f"expected PING(ACK, {data!r}); got {c.since_handshake()}"

    return expect


def ping_ack_or_closed(data: bytes) -> Expect:
    def expect(c: RawH2) -> None:
        frame = c.wait_for(lambda f: isinstance(f, PingFrame))
        if frame is None and c.closed:
            return
        assert (
            isinstance(frame, PingFrame)
            and "ACK" in frame.flags
            and bytes(frame.opaque_data) == data
        ), (
            f"expected PING(ACK, {data!r}) or the connection closed; got "
            f"{c.since_handshake()}"
        )

    return expect


def settings_ack(c: RawH2) -> None:
    frame = c.wait_for(lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags)
    assert frame is not None, f"expected SETTINGS(ACK); got {c.since_handshake()}"


def response(stream_id: int) -> Expect:
    """A complete 200 response on ``stream_id``."""

    def expect(c: RawH2) -> None:
        frame = c.wait_for(
            lambda f: (
                isinstance(f, (GoAwayFrame, RstStreamFrame))
                or (
                    isinstance(f, (HeadersFrame, DataFrame))
                    and f.stream_id == stream_id
                    and "END_STREAM" in f.flags
                )
            )
        )
        assert isinstance(frame, (HeadersFrame, DataFrame)), (
            f"expected a response on stream {stream_id}; got {c.since_handshake()}"
        )
        head = dict(c.responses.get(stream_id, []))
        assert head.get(b":status") == b"200", head

    return expect


def data_frame(stream_id: int, length: int) -> Expect:
    """The next DATA frame on ``stream_id`` is ``length`` bytes: no more
    than the client's window allows."""

    def expect(c: RawH2) -> None:
        frame = c.wait_for(
            lambda f: (
                isinstance(f, (GoAwayFrame, RstStreamFrame))
                or (isinstance(f, DataFrame) and f.stream_id == stream_id)
            )
        )
        assert isinstance(frame, DataFrame) and len(frame.data) == length, (
            f"expected DATA({stream_id}) of {length} bytes; got {c.since_handshake()}"
        )

    return expect


def _stream_closed(c: RawH2, stream_id: int) -> None:
    """Wait for the edge to end its side of a stream, as h2spec does before
    sending on a closed stream."""
    frame = c.wait_for(
        lambda f: (
            f.stream_id == stream_id
            and (
                (isinstance(f, (HeadersFrame, DataFrame)) and "END_STREAM" in f.flags)
                or (isinstance(f, RstStreamFrame) and f.error_code == E.NO_ERROR)
            )
        )
    )
    assert frame is not None, (
        f"expected stream {stream_id} to close; got {c.since_handshake()}"
    )


# What reaches the upstream ----------------------------------------------------

NOTHING = "nothing"
"""No request reaches the upstream."""
ONE = "one"
"""Exactly one request, complete and valid."""
AT_MOST_ONE = "at most one"
"""A complete request that went out before the error may have reached it."""
INCOMPLETE = "incomplete"
"""A request head may have reached it, but never a complete request: its
upstream connection is dropped."""

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"


def assert_valid_http11(recorded: Recorded) -> None:
    """One well-formed HTTP/1.1 request head, framed one way only."""
    assert re.fullmatch(rb"[A-Z]+ /\S* HTTP/1\.1", recorded.request_line), recorded.head
    for line in recorded.header_lines:
        assert re.fullmatch(_TOKEN + rb": [^\r\n]*", line), recorded.head
    assert len(recorded.headers(b"host")) == 1, recorded.head
    lengths = recorded.headers(b"content-length")
    chunked = recorded.headers(b"transfer-encoding")
    assert len(lengths) <= 1 and not (lengths and chunked), recorded.head


async def _sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def _until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await _sleep(0.02)


async def check_upstream(stack: Any, case: Case) -> None:
    upstream = stack.upstream
    recorded = upstream.requests
    if case.upstream == ONE:
        await _until(lambda: any(r.complete for r in recorded))
        await _sleep(0.05)
        assert len(recorded) == 1 and recorded[0].complete, recorded
        request = recorded[0]
        assert_valid_http11(request)
        assert request.headers(b"host") == [AUTHORITY], request.head
        assert request.body_length == case.body_length
        for name in {name for name, _ in case.forwarded}:
            values = [value for n, value in case.forwarded if n == name]
            # Repeated fields arrive as lines of their own, or joined.
            assert request.headers(name) in (values, [b", ".join(values)]), name
        return
    await _sleep(0.15)
    if case.upstream == NOTHING:
        assert recorded == [], [r.head for r in recorded]
    elif case.upstream == AT_MOST_ONE:
        assert len(recorded) <= 1, [r.head for r in recorded]
        for r in recorded:
            assert_valid_http11(r)
    elif case.upstream == INCOMPLETE:
        await _until(lambda: all(r.connection_id in upstream.lost for r in recorded))
        for r in recorded:
            assert_valid_http11(r)
            assert not r.complete, r.head
            assert r.connection_id in upstream.lost, "upstream request not dropped"


# The cases ------------------------------------------------------------------------

Send = Callable[[RawH2], None]


@attrs.frozen
class Case:
    id: str
    """h2spec's id: section/number."""
    what: str
    """h2spec's description of what is sent."""
    send: Send
    expect: Expect
    upstream: str = NOTHING
    body_length: int = 0
    """The body the one upstream request has."""
    forwarded: tuple[Header, ...] = ()
    """Fields the one upstream request must carry."""
    handshake: bool = True


ES, EH = "END_STREAM", "END_HEADERS"
LATER = 1001
"""A stream opened after every case's own."""


def _send(*frames: Callable[[RawH2], Frame | bytes] | Frame | bytes) -> Send:
    """Send frames in order; a callable builds its frame with the
    connection (for HPACK blocks in the connection's context)."""

    def send(c: RawH2) -> None:
        c.send(*(f(c) if callable(f) else f for f in frames))

    return send


def _headers(
    stream_id: int, headers: list[Header] | None = None, *flags: str
) -> Callable[[RawH2], Frame]:
    return lambda c: c.headers(
        stream_id, common() if headers is None else headers, *flags
    )


def _continuation(
    stream_id: int, headers: list[Header], *flags: str
) -> Callable[[RawH2], Frame]:
    return lambda c: c.continuation(stream_id, headers, *flags)


def _raw_continuation(
    stream_id: int, headers: list[Header], flags: int
) -> Callable[[RawH2], bytes]:
    return lambda c: raw_frame(CONTINUATION, flags, stream_id, c.encode(headers))


ZEROS = b"\0" * 8
H2SPEC = b"h2spec\0\0"
REQUEST = _headers(1, None, ES, EH)
"""A valid GET on stream 1, with END_STREAM."""
POST_OPEN = _headers(1, common(b"POST"), EH)
"""A POST on stream 1 whose body is still to come."""
GET_OPEN = _headers(1, None, EH)


def _preface_then_settings(c: RawH2) -> None:
    c.send(
        PREFACE,
        raw_frame(SETTINGS, 0, 0, settings_payload((IWS, 65535))),
    )


def _first_frame_is_settings(c: RawH2) -> None:
    frame = c.wait_for(lambda f: True)
    assert isinstance(frame, SettingsFrame) and "ACK" not in frame.flags, (
        f"expected SETTINGS first; got {[describe(f) for f in c.received]}"
    )


def _max_size_data(c: RawH2) -> None:
    size = c.server_settings.get(SettingsFrame.MAX_FRAME_SIZE, MAX_FRAME)
    c.send(POST_OPEN(c), DataFrame(1, b"x" * size, flags=[ES]))


def _oversized_headers(c: RawH2) -> None:
    block = c.encode(common() + dummies(5))
    assert len(block) > MAX_FRAME
    c.send(HeadersFrame(1, block, flags=[ES, EH]))


def _too_many_streams(c: RawH2) -> None:
    limit = c.server_settings[SettingsFrame.MAX_CONCURRENT_STREAMS]
    # A zero window keeps the edge from ending its responses.
    frames: list[Frame | bytes] = [SettingsFrame(0, {IWS: 0})]
    for index in range(limit + 1):
        frames.append(c.headers(1 + 2 * index, common(path=b"/health"), ES, EH))
    c.send(*frames)


def _then_closed(*after: Callable[[RawH2], Frame | bytes] | Frame | bytes) -> Send:
    """A valid GET, its response awaited, then ``after`` on its stream."""

    def send(c: RawH2) -> None:
        block = c.encode(common())
        c.send(HeadersFrame(1, block, flags=[ES, EH]))
        _stream_closed(c, 1)
        c.send(*(f(c) if callable(f) else f for f in after))

    return send


def _resend_closed_headers(c: RawH2) -> None:
    block = c.encode(common())
    c.send(HeadersFrame(1, block, flags=[ES, EH]))
    _stream_closed(c, 1)
    c.send(HeadersFrame(1, block, flags=[ES, EH]))


def _padded_headers_bad_pad(c: RawH2) -> None:
    block = c.encode(common())
    payload = bytes([len(block) + 2]) + block
    c.send(raw_frame(HEADERS, PADDED | END_HEADERS | END_STREAM, 1, payload))


def _windowed_request(*settings: tuple[int, int]) -> Send:
    """SETTINGS, their ACK awaited, then a GET on stream 1."""

    def send(c: RawH2) -> None:
        c.send(raw_frame(SETTINGS, 0, 0, settings_payload(*settings)))
        settings_ack(c)
        c.send(REQUEST(c))

    return send


def _window_opened_by_settings(c: RawH2) -> None:
    _windowed_request((IWS, 0))(c)
    c.send(SettingsFrame(0, {IWS: 1}))


def _negative_window(c: RawH2) -> None:
    _windowed_request((IWS, 3))(c)
    first = c.wait_for(lambda f: isinstance(f, DataFrame))
    assert first is not None, f"expected DATA; got {c.since_handshake()}"
    c.send(SettingsFrame(0, {IWS: 2}))
    settings_ack(c)
    # The window is now -1: an increment of 2 leaves room for one byte.
    c.send(WindowUpdateFrame(1, window_increment=2))


def _upper_case(name: bytes) -> list[Header]:
    return [*common(), (name, b"ok")]


def _without(name: bytes) -> list[Header]:
    return [h for h in common() if h[0] != name]


def _twice(name: bytes) -> list[Header]:
    headers = common()
    return [*headers, next(h for h in headers if h[0] == name)]


CASES = [
    # 3.5 HTTP/2 Connection Preface
    Case(
        "3.5/1",
        "Sends client connection preface",
        _preface_then_settings,
        _first_frame_is_settings,
        handshake=False,
    ),
    Case(
        "3.5/2",
        "Sends invalid connection preface",
        _send(b"INVALID CONNECTION PREFACE\r\n\r\n"),
        connection_error(E.PROTOCOL_ERROR),
        handshake=False,
    ),
    # 4.1 Frame Format
    Case(
        "4.1/1",
        "Sends a frame with unknown type",
        _send(raw_frame(0x16, 0, 0, ZEROS), PingFrame(0, ZEROS)),
        ping_ack(ZEROS),
    ),
    Case(
        "4.1/2",
        "Sends a frame with undefined flag",
        _send(raw_frame(PING, 0x16, 0, ZEROS)),
        ping_ack(ZEROS),
    ),
    Case(
        "4.1/3",
        "Sends a frame with reserved field bit",
        _send(raw_frame(PING, 0x16, 0x80000000, ZEROS)),
        ping_ack(ZEROS),
    ),
    # 4.2 Frame Size
    Case(
        "4.2/1",
        "Sends a DATA frame with 2^14 octets in length",
        _max_size_data,
        response(1),
        upstream=ONE,
        body_length=MAX_FRAME,
    ),
    Case(
        "4.2/2",
        "Sends a large size DATA frame that exceeds the SETTINGS_MAX_FRAME_SIZE",
        _send(POST_OPEN, DataFrame(1, b"x" * (MAX_FRAME + 1), flags=[ES])),
        stream_error(E.FRAME_SIZE_ERROR),
        upstream=INCOMPLETE,
    ),
    Case(
        "4.2/3",
        "Sends a large size HEADERS frame that exceeds the SETTINGS_MAX_FRAME_SIZE",
        _oversized_headers,
        connection_error(E.FRAME_SIZE_ERROR),
    ),
    # 4.3 Header Compression and Decompression
    Case(
        "4.3/1",
        "Sends invalid header block fragment",
        # A literal with incremental indexing, without its name and value.
        _send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x40")),
        connection_error(E.COMPRESSION_ERROR),
    ),
    Case(
        "4.3/2",
        "Sends a PRIORITY frame while sending the header blocks",
        _send(
            _headers(1),
            PriorityFrame(1, 0, 255),
            _continuation(1, dummies(1), EH),
        ),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "4.3/3",
        "Sends a HEADERS frame to another stream while sending the header blocks",
        _send(_headers(1), _headers(3, None, ES, EH), _continuation(1, dummies(1), EH)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    # 5.1 Stream States
    Case(
        "5.1/1",
        "idle: Sends a DATA frame",
        _send(DataFrame(1, b"test", flags=[ES])),
        stream_error(E.PROTOCOL_ERROR, E.STREAM_CLOSED),
    ),
    Case(
        "5.1/2",
        "idle: Sends a RST_STREAM frame",
        _send(RstStreamFrame(1, E.CANCEL)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "5.1/3",
        "idle: Sends a WINDOW_UPDATE frame",
        _send(WindowUpdateFrame(1, window_increment=100)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "5.1/4",
        "idle: Sends a CONTINUATION frame",
        _send(_continuation(1, common(), EH)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "5.1/5",
        "half closed (remote): Sends a DATA frame",
        _send(REQUEST, DataFrame(1, b"test", flags=[ES])),
        stream_error(E.STREAM_CLOSED),
        upstream=AT_MOST_ONE,
    ),
    Case(
        "5.1/6",
        "half closed (remote): Sends a HEADERS frame",
        _send(REQUEST, REQUEST),
        stream_error(E.STREAM_CLOSED),
        upstream=AT_MOST_ONE,
    ),
    Case(
        "5.1/7",
        "half closed (remote): Sends a CONTINUATION frame",
        _send(REQUEST, _continuation(1, common(), EH)),
        stream_error(E.STREAM_CLOSED, E.PROTOCOL_ERROR),
        upstream=AT_MOST_ONE,
    ),
    Case(
        "5.1/8",
        "closed: Sends a DATA frame after sending RST_STREAM frame",
        _send(GET_OPEN, RstStreamFrame(1, E.CANCEL), DataFrame(1, b"test", flags=[ES])),
        stream_error(E.STREAM_CLOSED),
        upstream=INCOMPLETE,
    ),
    Case(
        "5.1/9",
        "closed: Sends a HEADERS frame after sending RST_STREAM frame",
        _send(GET_OPEN, RstStreamFrame(1, E.CANCEL), REQUEST),
        stream_error(E.STREAM_CLOSED),
        upstream=INCOMPLETE,
    ),
    Case(
        "5.1/10",
        "closed: Sends a CONTINUATION frame after sending RST_STREAM frame",
        _send(GET_OPEN, RstStreamFrame(1, E.CANCEL), _continuation(1, dummies(1), EH)),
        stream_error(E.STREAM_CLOSED, E.PROTOCOL_ERROR),
        upstream=INCOMPLETE,
    ),
    Case(
        "5.1/11",
        "closed: Sends a DATA frame",
        _then_closed(DataFrame(1, b"test", flags=[ES])),
        stream_error(E.STREAM_CLOSED),
        upstream=ONE,
    ),
    Case(
        "5.1/12",
        "closed: Sends a HEADERS frame",
        _resend_closed_headers,
        connection_error(E.STREAM_CLOSED),
        upstream=ONE,
    ),
    Case(
        "5.1/13",
        "closed: Sends a CONTINUATION frame",
        _then_closed(_continuation(1, dummies(1), EH)),
        connection_error(E.STREAM_CLOSED, E.PROTOCOL_ERROR),
        upstream=ONE,
    ),
    # 5.1.1 Stream Identifiers
    Case(
        "5.1.1/1",
        "Sends even-numbered stream identifier",
        _send(_headers(2, None, ES, EH)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "5.1.1/2",
        "Sends stream identifier that is numerically smaller than previous",
        _send(_headers(5, None, ES, EH), _headers(3, None, ES, EH)),
        connection_error(E.PROTOCOL_ERROR),
        upstream=AT_MOST_ONE,
    ),
    # 5.1.2 Stream Concurrency
    Case(
        "5.1.2/1",
        "Sends HEADERS frames that causes their advertised concurrent stream "
        "limit to be exceeded",
        _too_many_streams,
        stream_error(E.PROTOCOL_ERROR, E.REFUSED_STREAM),
    ),
    # 5.3.1 Stream Dependencies
    Case(
        "5.3.1/1",
        "Sends HEADERS frame that depends on itself",
        _send(
            lambda c: HeadersFrame(
                1,
                c.encode(common()),
                flags=[ES, EH, "PRIORITY"],
                depends_on=1,
                stream_weight=255,
            )
        ),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "5.3.1/2",
        "Sends PRIORITY frame that depend on itself",
        _send(PriorityFrame(1, depends_on=1, stream_weight=255)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    # 5.4.1 Connection Error Handling
    Case(
        "5.4.1/1",
        "Sends an invalid PING frame for connection close",
        _send(raw_frame(PING, 0, 3, ZEROS)),
        closed,
    ),
    Case(
        "5.4.1/2",
        "Sends an invalid PING frame to receive GOAWAY frame",
        _send(raw_frame(PING, 0, 3, ZEROS)),
        goaway(E.PROTOCOL_ERROR),
    ),
    # 5.5 Extending HTTP/2
    Case(
        "5.5/1",
        "Sends an unknown extension frame",
        _send(raw_frame(0x16, 0, 0, ZEROS), PingFrame(0, ZEROS)),
        ping_ack(ZEROS),
    ),
    Case(
        "5.5/2",
        "Sends an unknown extension frame in the middle of a header block",
        _send(_headers(1, None, ES), raw_frame(0x16, 0, 0, ZEROS)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    # 6.1 DATA
    Case(
        "6.1/1",
        "Sends a DATA frame with 0x0 stream identifier",
        _send(raw_frame(DATA, END_STREAM, 0, b"test")),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.1/2",
        'Sends a DATA frame on the stream that is not in "open" or '
        '"half-closed (local)" state',
        _send(_headers(1, common(b"POST"), ES, EH), DataFrame(1, b"test", flags=[ES])),
        stream_error(E.STREAM_CLOSED),
        upstream=AT_MOST_ONE,
    ),
    Case(
        "6.1/3",
        "Sends a DATA frame with invalid pad length",
        _send(
            _headers(1, [*common(b"POST"), (b"content-length", b"4")], EH),
            # Pad length 6 in a 5-byte payload.
            raw_frame(DATA, PADDED | END_STREAM, 1, b"\x06Test"),
        ),
        connection_error(E.PROTOCOL_ERROR),
        upstream=INCOMPLETE,
    ),
    # 6.2 HEADERS
    Case(
        "6.2/1",
        "Sends a HEADERS frame without the END_HEADERS flag, and a PRIORITY frame",
        _send(_headers(1), PriorityFrame(1, 0, 255), _continuation(1, dummies(1), EH)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.2/2",
        "Sends a HEADERS frame to another stream while sending a HEADERS frame",
        _send(_headers(1), _headers(3, None, ES, EH), _continuation(1, dummies(1), EH)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.2/3",
        "Sends a HEADERS frame with 0x0 stream identifier",
        _send(
            lambda c: raw_frame(
                HEADERS, END_STREAM | END_HEADERS, 0, c.encode(common())
            )
        ),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.2/4",
        "Sends a HEADERS frame with invalid pad length",
        _padded_headers_bad_pad,
        stream_error(E.PROTOCOL_ERROR),
    ),
    # 6.3 PRIORITY
    Case(
        "6.3/1",
        "Sends a PRIORITY frame with 0x0 stream identifier",
        _send(raw_frame(PRIORITY, 0, 0, b"\x00\x00\x00\x00\xff")),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.3/2",
        "Sends a PRIORITY frame with a length other than 5 octets",
        _send(REQUEST, raw_frame(PRIORITY, 0, 1, b"\x80\x00\x00\x01")),
        stream_error(E.FRAME_SIZE_ERROR),
        upstream=AT_MOST_ONE,
    ),
    # 6.4 RST_STREAM
    Case(
        "6.4/1",
        "Sends a RST_STREAM frame with 0x0 stream identifier",
        _send(raw_frame(RST_STREAM, 0, 0, b"\x00\x00\x00\x08")),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.4/2",
        "Sends a RST_STREAM frame on a idle stream",
        _send(RstStreamFrame(1, E.CANCEL)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.4/3",
        "Sends a RST_STREAM frame with a length other than 4 octets",
        _send(REQUEST, raw_frame(RST_STREAM, 0, 1, b"\x00\x00\x00")),
        stream_error(E.FRAME_SIZE_ERROR),
        upstream=AT_MOST_ONE,
    ),
    # 6.5 SETTINGS
    Case(
        "6.5/1",
        "Sends a SETTINGS frame with ACK flag and payload",
        _send(raw_frame(SETTINGS, ACK, 0, b"\x00")),
        connection_error(E.FRAME_SIZE_ERROR),
    ),
    Case(
        "6.5/2",
        "Sends a SETTINGS frame with a stream identifier other than 0x0",
        _send(raw_frame(SETTINGS, 0, 1, settings_payload((3, 100)))),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.5/3",
        "Sends a SETTINGS frame with a length other than a multiple of 6 octets",
        _send(raw_frame(SETTINGS, 0, 0, b"\x00\x03\x00")),
        stream_error(E.PROTOCOL_ERROR, E.FRAME_SIZE_ERROR),
    ),
    # 6.5.2 Defined SETTINGS Parameters
    Case(
        "6.5.2/1",
        "SETTINGS_ENABLE_PUSH (0x2): Sends the value other than 0 or 1",
        _send(raw_frame(SETTINGS, 0, 0, settings_payload((0x2, 2)))),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.5.2/2",
        "SETTINGS_INITIAL_WINDOW_SIZE (0x4): Sends the value above the maximum "
        "flow control window size",
        _send(raw_frame(SETTINGS, 0, 0, settings_payload((IWS, 2**31)))),
        connection_error(E.FLOW_CONTROL_ERROR),
    ),
    Case(
        "6.5.2/3",
        "SETTINGS_MAX_FRAME_SIZE (0x5): Sends the value below the initial value",
        _send(raw_frame(SETTINGS, 0, 0, settings_payload((0x5, 16383)))),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.5.2/4",
        "SETTINGS_MAX_FRAME_SIZE (0x5): Sends the value above the maximum "
        "allowed frame size",
        _send(raw_frame(SETTINGS, 0, 0, settings_payload((0x5, 2**24)))),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.5.2/5",
        "Sends a SETTINGS frame with unknown identifier",
        _send(
            raw_frame(SETTINGS, 0, 0, settings_payload((0xFF, 1))), PingFrame(0, ZEROS)
        ),
        ping_ack(ZEROS),
    ),
    # 6.5.3 Settings Synchronization
    Case(
        "6.5.3/1",
        "Sends multiple values of SETTINGS_INITIAL_WINDOW_SIZE",
        _windowed_request((IWS, 100), (IWS, 1)),
        data_frame(1, 1),
        upstream=ONE,
    ),
    Case(
        "6.5.3/2",
        "Sends a SETTINGS frame without ACK flag",
        _send(SettingsFrame(0, {SettingsFrame.ENABLE_PUSH: 0})),
        settings_ack,
    ),
    # 6.7 PING
    Case(
        "6.7/1",
        "Sends a PING frame",
        _send(PingFrame(0, H2SPEC)),
        ping_ack(H2SPEC),
    ),
    Case(
        "6.7/2",
        "Sends a PING frame with ACK",
        _send(PingFrame(0, b"invalid\0", flags=["ACK"]), PingFrame(0, H2SPEC)),
        ping_ack(H2SPEC),
    ),
    Case(
        "6.7/3",
        "Sends a PING frame with a stream identifier field value other than 0x0",
        _send(raw_frame(PING, 0, 1, ZEROS)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.7/4",
        "Sends a PING frame with a length field value other than 8",
        _send(raw_frame(PING, 0, 0, b"\0" * 6)),
        connection_error(E.FRAME_SIZE_ERROR),
    ),
    # 6.8 GOAWAY
    Case(
        "6.8/1",
        "Sends a GOAWAY frame with a stream identifier other than 0x0",
        _send(raw_frame(GOAWAY, 0, 1, ZEROS)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    # 6.9 WINDOW_UPDATE
    Case(
        "6.9/1",
        "Sends a WINDOW_UPDATE frame with a flow control window increment of 0",
        _send(raw_frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\0")),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.9/2",
        "Sends a WINDOW_UPDATE frame with a flow control window increment of 0 "
        "on a stream",
        _send(GET_OPEN, raw_frame(WINDOW_UPDATE, 0, 1, b"\0\0\0\0")),
        stream_error(E.PROTOCOL_ERROR),
        upstream=INCOMPLETE,
    ),
    Case(
        "6.9/3",
        "Sends a WINDOW_UPDATE frame with a length other than 4 octets",
        _send(raw_frame(WINDOW_UPDATE, 0, 0, b"\0\0\x01")),
        connection_error(E.FRAME_SIZE_ERROR),
    ),
    # 6.9.1 The Flow-Control Window
    Case(
        "6.9.1/1",
        "Sends SETTINGS frame to set the initial window size to 1 and sends "
        "HEADERS frame",
        _windowed_request((IWS, 1)),
        data_frame(1, 1),
        upstream=ONE,
    ),
    Case(
        "6.9.1/2",
        "Sends multiple WINDOW_UPDATE frames increasing the flow control window "
        "to above 2^31-1",
        _send(
            WindowUpdateFrame(0, window_increment=2**31 - 1),
            WindowUpdateFrame(0, window_increment=2**31 - 1),
        ),
        goaway(E.FLOW_CONTROL_ERROR),
    ),
    Case(
        "6.9.1/3",
        "Sends multiple WINDOW_UPDATE frames increasing the flow control window "
        "to above 2^31-1 on a stream",
        _send(
            GET_OPEN,
            WindowUpdateFrame(1, window_increment=2**31 - 1),
            WindowUpdateFrame(1, window_increment=2**31 - 1),
        ),
        rst_stream(1, E.FLOW_CONTROL_ERROR),
        upstream=INCOMPLETE,
    ),
    # 6.9.2 Initial Flow-Control Window Size
    Case(
        "6.9.2/1",
        "Changes SETTINGS_INITIAL_WINDOW_SIZE after sending HEADERS frame",
        _window_opened_by_settings,
        data_frame(1, 1),
        upstream=ONE,
    ),
    Case(
        "6.9.2/2",
        "Sends a SETTINGS frame for window size to be negative",
        _negative_window,
        data_frame(1, 1),
        upstream=ONE,
    ),
    Case(
        "6.9.2/3",
        "Sends a SETTINGS_INITIAL_WINDOW_SIZE settings with an exceeded maximum "
        "window size value",
        _send(raw_frame(SETTINGS, 0, 0, settings_payload((IWS, 2**31)))),
        connection_error(E.FLOW_CONTROL_ERROR),
    ),
    # 6.10 CONTINUATION
    Case(
        "6.10/1",
        "Sends multiple CONTINUATION frames preceded by a HEADERS frame",
        _send(
            _headers(1, None, ES),
            _continuation(1, dummies(1)),
            _continuation(1, dummies(1), EH),
        ),
        response(1),
        upstream=ONE,
        forwarded=tuple(dummies(1) * 2),
    ),
    Case(
        "6.10/2",
        "Sends a CONTINUATION frame followed by any frame other than CONTINUATION",
        _send(
            _headers(1, common(b"POST")),
            _continuation(1, dummies(1)),
            DataFrame(1, b"test", flags=[ES]),
        ),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.10/3",
        "Sends a CONTINUATION frame with 0x0 stream identifier",
        _send(_headers(1, None, ES), _raw_continuation(0, dummies(1), END_HEADERS)),
        connection_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "6.10/4",
        "Sends a CONTINUATION frame preceded by a HEADERS frame with END_HEADERS flag",
        _send(REQUEST, _continuation(1, dummies(1), EH)),
        connection_error(E.PROTOCOL_ERROR),
        upstream=AT_MOST_ONE,
    ),
    Case(
        "6.10/5",
        "Sends a CONTINUATION frame preceded by a CONTINUATION frame with "
        "END_HEADERS flag",
        _send(
            _headers(1, None, ES),
            _continuation(1, dummies(1), EH),
            _continuation(1, dummies(1), EH),
        ),
        connection_error(E.PROTOCOL_ERROR),
        upstream=AT_MOST_ONE,
    ),
    Case(
        "6.10/6",
        "Sends a CONTINUATION frame preceded by a DATA frame",
        _send(
            _headers(1, common(b"POST")),
            DataFrame(1, b"test", flags=[ES]),
            _continuation(1, dummies(1)),
            _raw_continuation(0, dummies(1), END_HEADERS),
        ),
        connection_error(E.PROTOCOL_ERROR),
    ),
    # 7 Error Codes
    Case(
        "7/1",
        "Sends a GOAWAY frame with unknown error code",
        _send(GoAwayFrame(0, 0, 0xFF), PingFrame(0, H2SPEC)),
        ping_ack_or_closed(H2SPEC),
    ),
    Case(
        "7/2",
        "Sends a RST_STREAM frame with unknown error code",
        _send(POST_OPEN, RstStreamFrame(1, 0xFF), PingFrame(0, ZEROS)),
        ping_ack_or_closed(ZEROS),
        upstream=INCOMPLETE,
    ),
    # 8.1 HTTP Request/Response Exchange
    Case(
        "8.1/1",
        "Sends a second HEADERS frame without the END_STREAM flag",
        _send(POST_OPEN, DataFrame(1, b"test"), _headers(1, [(b"x-test", b"ok")], EH)),
        stream_error(E.PROTOCOL_ERROR),
        upstream=INCOMPLETE,
    ),
    # 8.1.2 HTTP Header Fields
    Case(
        "8.1.2/1",
        "Sends a HEADERS frame that contains the header field name in uppercase "
        "letters",
        _send(_headers(1, _upper_case(b"X-TEST"), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    # 8.1.2.1 Pseudo-Header Fields
    Case(
        "8.1.2.1/1",
        "Sends a HEADERS frame that contains a unknown pseudo-header field",
        _send(_headers(1, [*common(), (b":test", b"ok")], ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.1/2",
        "Sends a HEADERS frame that contains the pseudo-header field defined for "
        "response",
        _send(_headers(1, [*common(), (b":status", b"200")], ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.1/3",
        "Sends a HEADERS frame that contains a pseudo-header field as trailers",
        _send(
            POST_OPEN, DataFrame(1, b"test"), _headers(1, [(b":method", b"POST")], EH)
        ),
        stream_error(E.PROTOCOL_ERROR),
        upstream=INCOMPLETE,
    ),
    Case(
        "8.1.2.1/4",
        "Sends a HEADERS frame that contains a pseudo-header field that appears "
        "in a header block after a regular header field",
        _send(_headers(1, [(b"x-test", b"ok"), *common()], ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    # 8.1.2.2 Connection-Specific Header Fields
    Case(
        "8.1.2.2/1",
        "Sends a HEADERS frame that contains the connection-specific header field",
        _send(_headers(1, [*common(), (b"connection", b"keep-alive")], ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.2/2",
        "Sends a HEADERS frame that contains the TE header field with any value "
        'other than "trailers"',
        _send(
            _headers(
                1,
                [*common(), (b"trailers", b"test"), (b"te", b"trailers, deflate")],
                ES,
                EH,
            )
        ),
        stream_error(E.PROTOCOL_ERROR),
    ),
    # 8.1.2.3 Request Pseudo-Header Fields
    Case(
        "8.1.2.3/1",
        'Sends a HEADERS frame with empty ":path" pseudo-header field',
        _send(_headers(1, common(path=b""), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.3/2",
        'Sends a HEADERS frame that omits ":method" pseudo-header field',
        _send(_headers(1, _without(b":method"), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.3/3",
        'Sends a HEADERS frame that omits ":scheme" pseudo-header field',
        _send(_headers(1, _without(b":scheme"), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.3/4",
        'Sends a HEADERS frame that omits ":path" pseudo-header field',
        _send(_headers(1, _without(b":path"), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.3/5",
        'Sends a HEADERS frame with duplicated ":method" pseudo-header field',
        _send(_headers(1, _twice(b":method"), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.3/6",
        'Sends a HEADERS frame with duplicated ":scheme" pseudo-header field',
        _send(_headers(1, _twice(b":scheme"), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    Case(
        "8.1.2.3/7",
        'Sends a HEADERS frame with duplicated ":path" pseudo-header field',
        _send(_headers(1, _twice(b":path"), ES, EH)),
        stream_error(E.PROTOCOL_ERROR),
    ),
    # 8.1.2.6 Malformed Requests and Responses
    Case(
        "8.1.2.6/1",
        'Sends a HEADERS frame with the "content-length" header field which does '
        "not equal the DATA frame payload length",
        _send(
            _headers(1, [*common(b"POST"), (b"content-length", b"1")], EH),
            DataFrame(1, b"test", flags=[ES]),
        ),
        stream_error(E.PROTOCOL_ERROR),
        upstream=INCOMPLETE,
    ),
    Case(
        "8.1.2.6/2",
        'Sends a HEADERS frame with the "content-length" header field which does '
        "not equal the sum of the multiple DATA frames payload length",
        _send(
            _headers(1, [*common(b"POST"), (b"content-length", b"1")], EH),
            DataFrame(1, b"test"),
            DataFrame(1, b"test", flags=[ES]),
        ),
        stream_error(E.PROTOCOL_ERROR),
        upstream=INCOMPLETE,
    ),
    # 8.2 Server Push
    Case(
        "8.2/1",
        "Sends a PUSH_PROMISE frame",
        _send(
            lambda c: PushPromiseFrame(
                1, promised_stream_id=3, data=c.encode(common()), flags=[EH]
            )
        ),
        connection_error(E.PROTOCOL_ERROR),
    ),
]


def section(number: str) -> list[Any]:
    """The cases of a section and its subsections, by h2spec id."""
    return [
        pytest.param(case, id=case.id)
        for case in CASES
        if case.id.split("/")[0] == number
        or case.id.split("/")[0].startswith(number + ".")
    ]


def _run(port: int, case: Case) -> None:
    client = RawH2(port, timeout=WAIT)
    try:
        assert client.alpn == "h2"
        if case.handshake:
            client.handshake()
        try:
            case.send(client)
            case.expect(client)
        except AssertionError as e:
            raise AssertionError(f"{case.id} {case.what}: {e}") from None
    finally:
        client.close()


async def conformance(make_stack: Any, case: Case) -> None:
    stack = make_stack(tls=True)
    await deferToThread(_run, stack.port, case)
    await check_upstream(stack, case)


@pytest.mark.parametrize("case", section("3"))
@pytest_twisted.ensureDeferred
async def test_3_starting_http2(make_stack, case):
    """The connection preface both ways."""
    await conformance(make_stack, case)


@pytest.mark.parametrize("case", section("4"))
@pytest_twisted.ensureDeferred
async def test_4_http_frames(make_stack, case):
    """Frame format, frame size and header compression."""
    await conformance(make_stack, case)


@pytest.mark.parametrize("case", section("5"))
@pytest_twisted.ensureDeferred
async def test_5_streams_and_multiplexing(make_stack, case):
    """Stream states, identifiers, concurrency, priority, error handling
    and extensions."""
    await conformance(make_stack, case)


@pytest.mark.parametrize("case", section("6"))
@pytest_twisted.ensureDeferred
async def test_6_frame_definitions(make_stack, case):
    """Each frame type: DATA to CONTINUATION."""
    await conformance(make_stack, case)


@pytest.mark.parametrize("case", section("7"))
@pytest_twisted.ensureDeferred
async def test_7_error_codes(make_stack, case):
    """Unknown error codes trigger nothing special."""
    await conformance(make_stack, case)


@pytest.mark.parametrize("case", section("8"))
@pytest_twisted.ensureDeferred
async def test_8_http_message_exchanges(make_stack, case):
    """Requests as HTTP semantics require them: header fields,
    pseudo-header fields, malformed requests, no server push from clients."""
    await conformance(make_stack, case)


def test_every_h2spec_case_once():
    """The ids are h2spec's: unique, and numbered without gaps."""
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) == 95
    by_section: dict[str, list[int]] = {}
    for case_id in ids:
        number, index = case_id.split("/")
        by_section.setdefault(number, []).append(int(index))
    for indexes in by_section.values():
        assert indexes == list(range(1, len(indexes) + 1))
