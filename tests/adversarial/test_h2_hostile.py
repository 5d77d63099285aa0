"""The probes of test_paths.py and test_smuggling.py over HTTP/2 (TLS,
ALPN h2): disguised paths, encoded dot segments in ``:path``,
``content-length`` disagreeing with the DATA sent, and connection-specific
fields (RFC 9113 section 8.2.2). Each HTTP/2 request becomes exactly one
HTTP/1.1 request upstream, or an error on its own stream: what is refused
never reaches Synapse, nor the fallback web server, and no request the
client did not send is ever made of its bytes."""

from __future__ import annotations

import hpack
import pytest
import pytest_twisted
from hyperframe.frame import DataFrame, HeadersFrame
from twisted.internet.threads import deferToThread

from tests.adversarial.conftest import ScriptedUpstream
from tests.adversarial.test_paths import DISGUISED
from tests.adversarial.test_upstream_faults import pause, until
from tests.h2client import H2Client
from tests.h2raw import RawH2, header_block

PROTOCOL_ERROR = 1
SMUGGLED = b"GET /_matrix/client/v3/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


@pytest.fixture(scope="module")
def h2_stack(module_edge):
    return module_edge(tls=True, fallback=ScriptedUpstream())


def _settled(stack) -> tuple[int, int]:
    assert stack.fallback is not None
    return len(stack.upstream.requests), len(stack.fallback.requests)


# Paths ---------------------------------------------------------------------------

ENCODED_DOTS = [
    b"/_matrix/client/v3/%2e%2e/%2e%2e/_synapse/admin/v1/users",
    b"/_matrix/client/v3/rooms/%2E%2E/..%2F..%2F_synapse/admin",
    b"/_matrix/client/v3/./../../_synapse/admin/v1/users",
    b"/_matrix/client/v3/a/%2e/b",
]


@pytest.mark.parametrize("path", DISGUISED + ENCODED_DOTS)
@pytest_twisted.ensureDeferred
async def test_disguised_paths_are_refused_over_http2(h2_stack, tracebacks, path):
    """As over HTTP/1.1: a 4xx Matrix error on the stream, nothing
    forwarded to Synapse or to the fallback web server."""
    before = _settled(h2_stack)

    def run():
        client = H2Client(h2_stack.port)
        try:
            assert client.alpn == "h2"
            return client.request(b"GET", path)
        finally:
            client.close()

    stream = await deferToThread(run)
    await pause(0.1)
    assert _settled(h2_stack) == before, "forwarded"
    assert stream.status in (400, 403, 404), stream
    assert stream.headers[b"content-type"] == b"application/json"
    assert b"errcode" in stream.body
    assert tracebacks == []


@pytest_twisted.ensureDeferred
async def test_an_ordinary_path_is_forwarded_over_http2(h2_stack):
    """The setting the probes rely on: the same connection type forwards a
    plain request, its ``:path`` byte for byte."""
    path = b"/_matrix/client/v3/rooms/%21r%3Ah/messages?dir=b&from=%2F"

    def run():
        client = H2Client(h2_stack.port)
        try:
            return client.request(b"GET", path)
        finally:
            client.close()

    stream = await deferToThread(run)
    assert stream.status == 200
    assert h2_stack.upstream.requests[-1].target == path


# Framing -------------------------------------------------------------------------


def _raw_exchange(port: int, frames: list[bytes | tuple]) -> tuple[RawH2, int]:
    """Send a request built frame by frame on stream 1, and wait for its
    end (a response ended, or RST_STREAM)."""
    client = RawH2(port)
    try:
        stream_id = client.new_stream()
        out = b""
        for frame in frames:
            out += frame(stream_id) if callable(frame) else frame
        client.send(out)
        client.wait(
            lambda: (
                stream_id in client.ended
                or stream_id in client.resets
                or client.goaway is not None
            ),
            10,
        )
        return client, stream_id
    finally:
        client.close()


def _headers(client_fields: list[tuple[bytes, bytes]], method: bytes, end: bool):
    def build(stream_id: int) -> bytes:
        frame = HeadersFrame(
            stream_id,
            header_block(
                hpack.Encoder(), b"/_matrix/client/v3/h2", method, client_fields
            ),
        )
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    return build


def _data(payload: bytes, end: bool = True):
    def build(stream_id: int) -> bytes:
        frame = DataFrame(stream_id, payload)
        if end:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    return build


def _refused(client: RawH2, stream_id: int) -> bool:
    """An error on the stream: RST_STREAM, GOAWAY, or a 4xx answer."""
    status = client.status.get(stream_id)
    return (
        stream_id in client.resets
        or client.goaway is not None
        or (status is not None and 400 <= status < 500)
    )


LENGTH_CASES = {
    "length-more-than-data": ([(b"content-length", b"10")], b"hello"),
    "length-less-than-data": ([(b"content-length", b"5")], b"hello" + SMUGGLED),
    "length-without-data": ([(b"content-length", b"5")], None),
    "two-lengths": ([(b"content-length", b"5"), (b"content-length", b"6")], b"hello"),
    "length-list": ([(b"content-length", b"5, 5")], b"hello"),
    "length-signed": ([(b"content-length", b"+5")], b"hello"),
}


@pytest.mark.parametrize("case", list(LENGTH_CASES))
@pytest_twisted.ensureDeferred
async def test_content_length_disagreeing_with_data_is_a_stream_error(
    h2_stack, tracebacks, case
):
    """RFC 9113 section 8.1.1: a request whose content-length is not the
    sum of its DATA is malformed. The stream gets an error; the upstream
    never gets it whole (anything started there is cut, on a connection
    closed), and the bytes past the length never make a request."""
    fields, payload = LENGTH_CASES[case]
    before = len(h2_stack.upstream.requests)
    frames: list = [_headers(fields, b"POST", end=payload is None)]
    if payload is not None:
        frames.append(_data(payload))
    client, stream_id = await deferToThread(_raw_exchange, h2_stack.port, frames)
    await pause(0.1)
    assert _refused(client, stream_id), (client.status, client.resets)
    records = h2_stack.upstream.requests[before:]
    assert all(r.target != b"/_matrix/client/v3/smuggled" for r in records)
    for rec in records:
        assert not rec.complete, f"forwarded whole: {rec}"
        await until(lambda rec=rec: rec.connection_id in h2_stack.upstream.lost)
    assert tracebacks == []


CONNECTION_SPECIFIC = [
    (b"connection", b"keep-alive"),
    (b"connection", b"close"),
    (b"transfer-encoding", b"chunked"),
    (b"keep-alive", b"timeout=5"),
    (b"proxy-connection", b"keep-alive"),
    (b"upgrade", b"h2c"),
    (b"te", b"gzip"),
]


@pytest.mark.parametrize("field", CONNECTION_SPECIFIC, ids=lambda f: f[0].decode())
@pytest_twisted.ensureDeferred
async def test_connection_specific_fields_are_a_stream_error(
    h2_stack, tracebacks, field
):
    """RFC 9113 section 8.2.2: a request with a connection-specific field
    is malformed: a stream error, nothing forwarded. With
    ``transfer-encoding: chunked``, a body that looks chunked and hides a
    request never becomes one."""
    before = len(h2_stack.upstream.requests)
    body = b"0\r\n\r\n" + SMUGGLED
    frames = [_headers([field], b"POST", end=False), _data(body)]
    client, stream_id = await deferToThread(_raw_exchange, h2_stack.port, frames)
    await pause(0.1)
    assert _refused(client, stream_id), (client.status, client.resets)
    assert h2_stack.upstream.requests[before:] == [], "forwarded"
    assert tracebacks == []


@pytest_twisted.ensureDeferred
async def test_te_trailers_is_forwarded_over_http2(h2_stack):
    """The one connection-specific field allowed (``te: trailers``): the
    request is forwarded, without it, with its body whole."""
    before = len(h2_stack.upstream.requests)
    frames = [
        _headers([(b"te", b"trailers"), (b"content-length", b"5")], b"POST", False),
        _data(b"hello"),
    ]
    client, stream_id = await deferToThread(_raw_exchange, h2_stack.port, frames)
    assert client.status.get(stream_id) == 200
    [rec] = h2_stack.upstream.requests[before:]
    assert rec.complete and rec.body_length == 5
    assert rec.headers(b"te") == []
