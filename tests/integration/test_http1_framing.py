"""Adversarial HTTP/1.1 framing over real loopback sockets: pipelining,
HTTP/1.0, upgrade heads, chunked bodies, head limits, 100-continue.

The invariant throughout: the recording upstream sees exactly the requests
the client framed, no more and no fewer, bodies intact; and the client gets
an answer for each (a Matrix JSON error for bad input), in order, never
silence or a traceback.
"""

from __future__ import annotations

import hashlib
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.http1_messages import (
    VERSIONS,
    Resp,
    assert_json_error,
    get,
    parse_head,
    post,
    post_chunked,
)
from tests.rawhttp import connect


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse(buf: bytes, method: bytes, eof: bool) -> tuple[Resp, bytes] | None:
    """One response from the front of ``buf``; None while incomplete."""
    parsed = parse_head(buf)
    if parsed is None:
        return None
    resp, rest = parsed
    if resp.status < 200 or resp.status in (204, 304) or method == b"HEAD":
        return resp, rest
    if (resp.header(b"transfer-encoding") or b"").lower() == b"chunked":
        body = b""
        while True:
            line, sep, after = rest.partition(b"\r\n")
            if not sep:
                return None
            size = int(line.split(b";")[0], 16)
            if size == 0:
                if not after.startswith(b"\r\n"):
                    return None
                resp.body = body
                return resp, after[2:]
            if len(after) < size + 2:
                return None
            body += after[:size]
            rest = after[size + 2 :]
    length = resp.header(b"content-length")
    if length is not None:
        if len(rest) < int(length):
            return None
        resp.body = rest[: int(length)]
        return resp, rest[int(length) :]
    if not eof:
        return None
    resp.body = rest
    return resp, b""


class Client:
    """A blocking client that reads responses one by one off a connection
    that pipelined them (run it in a thread)."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = connect(port, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
        self.buf += chunk

    def response(self, method: bytes = b"GET") -> Resp:
        while True:
            parsed = _parse(self.buf, method, self.eof)
            if parsed is not None:
                resp, self.buf = parsed
                return resp
            assert not self.eof, f"connection ended mid-response: {self.buf[:200]!r}"
            self._fill()

    def final(self, method: bytes = b"GET") -> Resp:
        """The next response that is not an interim one."""
        while (resp := self.response(method)).status < 200:
            pass
        return resp

    def closed(self) -> bool:
        """True when the server closed with nothing more to read; False when
        it sent more, or kept the connection open past the timeout."""
        if self.buf:
            return False
        self.sock.settimeout(0.5)  # a close is immediate: no long wait
        try:
            self._fill()
        except TimeoutError:
            return False
        return self.eof and not self.buf

    def silent(self, seconds: float = 0.3) -> bool:
        """True when nothing arrives within ``seconds`` and the connection
        stays open."""
        self.sock.settimeout(seconds)
        try:
            self._fill()
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def pipeline(port: int, raw: bytes, count: int, **kwargs) -> tuple[list[Resp], bool]:
    """Send ``raw`` in one write; read ``count`` final responses, then
    whether the connection closed."""
    client = Client(port, **kwargs)
    try:
        client.send(raw)
        answers = [client.final() for _ in range(count)]
        return answers, client.closed()
    finally:
        client.close()


async def settle() -> None:
    """Let the edge and upstream finish what is in flight."""
    await deferLater(reactor, 0.05, lambda: None)


# Pipelining -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelined_mix_in_one_send(make_stack, tracebacks):
    """GETs and bodies framed both ways, one write: each forwarded once, in
    order, answered in order, bodies intact."""
    stack = make_stack()
    big = bytes(range(256)) * 300  # more than a read, more than a send buffer
    requests = [
        (get(b"/_matrix/client/v3/a"), b"/_matrix/client/v3/a", b""),
        (post(b"hello", b"/_matrix/client/v3/b"), b"/_matrix/client/v3/b", b"hello"),
        (
            post_chunked(
                b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n",
                b"/_matrix/client/v3/c",
            ),
            b"/_matrix/client/v3/c",
            b"abcdefg",
        ),
        (get(b"/_matrix/client/v3/d"), b"/_matrix/client/v3/d", b""),
        (post(big, b"/_matrix/client/v3/e"), b"/_matrix/client/v3/e", big),
        (
            post_chunked(b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big), b"/_matrix/f"),
            b"/_matrix/f",
            big,
        ),
        (post(b"", b"/_matrix/client/v3/g"), b"/_matrix/client/v3/g", b""),
    ]
    raw = b"".join(r for r, _, _ in requests)
    answers, closed = await deferToThread(pipeline, stack.port, raw, len(requests))
    assert not closed
    assert [a.status for a in answers] == [200] * len(requests)
    assert [a.json()["target"].encode() for a in answers] == [t for _, t, _ in requests]
    recorded = stack.upstream.requests
    assert [r.target for r in recorded] == [t for _, t, _ in requests]
    for rec, (_, _, body) in zip(recorded, requests, strict=True):
        assert rec.complete
        assert rec.body_length == len(body)
        assert rec.body_sha256 == sha(body)
    assert tracebacks == []


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
@pytest_twisted.ensureDeferred
async def test_keep_alive_after_a_large_upload(make_stack, pipelined):
    """An upload that filled the send buffer to Synapse paused reading; the
    next request on the connection must still be read (it once hung)."""
    stack = make_stack()
    body = bytes(range(256)) * 800  # 200 KiB: fills Synapse's send buffer

    def run():
        client = Client(stack.port, timeout=2.0)
        try:
            if pipelined:
                client.send(post(body) + get(b"/_matrix/client/v3/next"))
                first = client.final()
            else:
                client.send(post(body))
                first = client.final()
                client.send(get(b"/_matrix/client/v3/next"))
            try:
                second = client.final()
            except TimeoutError:
                second = None
            return first, second
        finally:
            client.close()

    first, second = await deferToThread(run)
    assert first.status == 200 and first.json()["body_sha256"] == sha(body)
    assert second is not None, "the request after the upload was never read"
    assert second.json()["target"] == "/_matrix/client/v3/next"


@pytest_twisted.ensureDeferred
async def test_pipelined_after_a_refused_head(make_stack):
    stack = make_stack()
    raw = get(b"/nope") + get(b"/_matrix/client/v3/a") + get(b"/_synapse/admin/v1/x")
    raw += get(b"/_matrix/client/v3/b")
    answers, closed = await deferToThread(pipeline, stack.port, raw, 4)
    assert [a.status for a in answers] == [404, 200, 404, 200]
    assert_json_error(answers[0], 404)
    assert_json_error(answers[2], 404)
    assert not closed
    assert [r.target for r in stack.upstream.requests] == [
        b"/_matrix/client/v3/a",
        b"/_matrix/client/v3/b",
    ]


@pytest.mark.parametrize(
    ("first", "status"),
    [(post(b"hello", b"/nope"), 404), (post(b"x" * 2000), 413)],
    ids=["404-with-body", "413-content-length"],
)
@pytest_twisted.ensureDeferred
async def test_refusal_with_body_then_pipelined(make_stack, first, status):
    """A refusal that closes the connection, its body in the same read: the
    request pipelined behind it must not reach Synapse (it once did)."""
    stack = make_stack(max_request_size="1K")
    # An idle pooled connection to Synapse takes a request at once; without
    # one, the connection attempt is given up when the client leaves.
    warm, _ = await deferToThread(pipeline, stack.port, get(), 1)
    assert warm[0].status == 200
    raw = first + post(b"do-not-run", b"/_matrix/client/v3/pay")
    answers, closed = await deferToThread(pipeline, stack.port, raw, 1)
    assert_json_error(answers[0], status)
    assert closed
    await settle()
    assert [r.target for r in stack.upstream.requests] == [VERSIONS]


@pytest_twisted.ensureDeferred
async def test_garbage_after_a_valid_request(make_stack, tracebacks):
    stack = make_stack()
    raw = get(b"/_matrix/client/v3/a") + b"\x00\x01GARBAGE\r\n\r\n" + get()
    answers, closed = await deferToThread(pipeline, stack.port, raw, 2)
    assert answers[0].status == 200
    assert_json_error(answers[1], 400)
    assert closed
    assert [r.target for r in stack.upstream.requests] == [b"/_matrix/client/v3/a"]
    assert tracebacks == []


@pytest_twisted.ensureDeferred
async def test_bad_chunk_in_a_queued_request(make_stack):
    """A pipelined request whose chunked body breaks while an earlier one is
    answered: 400 after the earlier response, never a partial forward
    (it once waited for body_idle)."""
    stack = make_stack()
    raw = get(b"/_matrix/client/v3/a") + post_chunked(b"5\r\nhello\r\n0x5\r\nworld\r\n")

    def run():
        client = Client(stack.port, timeout=2.0)
        try:
            client.send(raw)
            first = client.final()
            try:
                second = client.final()
            except TimeoutError:
                second = None
            return first, second, client.closed()
        finally:
            client.close()

    first, second, closed = await deferToThread(run)
    assert first.status == 200
    assert second is not None, "no answer to the broken request"
    assert_json_error(second, 400)
    assert closed
    await settle()
    assert [r.complete for r in stack.upstream.requests][1:] in ([], [False])


@pytest_twisted.ensureDeferred
async def test_many_pipelined_refusals_behind_a_forwarded_request(
    make_stack, tracebacks
):
    """Refusals parsed ahead are answered in a loop, not by recursion (1500
    of them once raised RecursionError)."""
    stack = make_stack()
    raw = get(b"/_matrix/client/v3/a") + get(b"/nope") * 1500
    answers, closed = await deferToThread(pipeline, stack.port, raw, 1501)
    assert [a.status for a in answers] == [200] + [404] * 1500
    assert not closed
    assert len(stack.upstream.requests) == 1
    assert tracebacks == []


@pytest_twisted.ensureDeferred
async def test_connection_close_then_more_bytes(make_stack):
    stack = make_stack()
    raw = get(b"/_matrix/client/v3/a", b"Connection: close\r\n")
    raw += post(b"second", b"/_matrix/client/v3/b") + get(b"/_matrix/client/v3/c")
    answers, closed = await deferToThread(pipeline, stack.port, raw, 1)
    assert answers[0].status == 200
    assert answers[0].header(b"connection") == b"close"
    assert closed
    await settle()
    assert [r.target for r in stack.upstream.requests] == [b"/_matrix/client/v3/a"]


# HTTP/1.0 ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http10_without_keep_alive(make_stack):
    stack = make_stack()
    raw = b"GET /_matrix/client/v3/a HTTP/1.0\r\n\r\n" + get(b"/_matrix/client/v3/b")
    answers, closed = await deferToThread(pipeline, stack.port, raw, 1)
    assert answers[0].version == b"HTTP/1.0"
    assert answers[0].status == 200
    assert answers[0].header(b"connection") == b"close"
    assert closed
    await settle()
    [rec] = stack.upstream.requests
    assert rec.target == b"/_matrix/client/v3/a"
    assert len(rec.headers(b"host")) == 1


@pytest_twisted.ensureDeferred
async def test_http10_keep_alive(make_stack):
    stack = make_stack()
    one = get(b"/_matrix/client/v3/a", b"Connection: keep-alive\r\n", b"1.0")
    two = get(b"/_matrix/client/v3/b", b"Connection: Keep-Alive\r\n", b"1.0")
    answers, closed = await deferToThread(pipeline, stack.port, one + two, 2)
    for answer in answers:
        assert answer.version == b"HTTP/1.0"
        assert answer.status == 200
        assert answer.header(b"connection") == b"keep-alive"
        assert answer.header(b"transfer-encoding") is None
    assert [a.json()["target"] for a in answers] == [
        "/_matrix/client/v3/a",
        "/_matrix/client/v3/b",
    ]
    assert not closed
    for rec in stack.upstream.requests:
        assert rec.request_line.endswith(b" HTTP/1.1")
        assert b"keep-alive" not in b"".join(rec.headers(b"connection")).lower()


@pytest_twisted.ensureDeferred
async def test_http10_keep_alive_unknown_length_is_close_delimited(make_stack):
    """Synapse answers chunked: an HTTP/1.0 client cannot read that, so the
    body runs to the connection's end."""
    stack = make_stack()
    raw = get(b"/_matrix/chunked", b"Connection: keep-alive\r\n", b"1.0") + get()
    answers, closed = await deferToThread(pipeline, stack.port, raw, 1)
    [answer] = answers
    assert answer.version == b"HTTP/1.0"
    assert answer.header(b"connection") == b"close"
    assert answer.header(b"transfer-encoding") is None
    assert answer.header(b"content-length") is None
    assert answer.body == b"hello world"
    assert closed
    await settle()
    assert len(stack.upstream.requests) == 1


# Upgrade heads ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_h2c_upgrade_and_pipelined_get_are_plain_requests(make_stack):
    stack = make_stack()
    upgrade = get(
        b"/_matrix/client/v3/a",
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    )
    raw = upgrade + get(b"/_matrix/client/v3/b")
    answers, closed = await deferToThread(pipeline, stack.port, raw, 2)
    assert [a.status for a in answers] == [200, 200]
    assert not closed
    recorded = stack.upstream.requests
    assert [r.target for r in recorded] == [
        b"/_matrix/client/v3/a",
        b"/_matrix/client/v3/b",
    ]
    for rec in recorded:
        assert rec.headers(b"upgrade") == []
        assert rec.headers(b"http2-settings") == []
        assert b"upgrade" not in b"".join(rec.headers(b"connection")).lower()


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
    ids=["content-length", "chunked"],
)
@pytest_twisted.ensureDeferred
async def test_upgrade_with_a_body_is_refused(make_stack, framing):
    stack = make_stack()
    raw = (
        b"POST /_matrix/client/v3/a HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n" + framing + get()
    )
    answers, closed = await deferToThread(pipeline, stack.port, raw, 1)
    assert_json_error(answers[0], 400)
    assert closed
    await settle()
    assert stack.upstream.requests == []


# Chunked bodies ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_chunk_extensions_and_trailers(make_stack):
    stack = make_stack()
    raw = (
        post_chunked(
            b'5;a=b;c="d;e"\r\nhello\r\n1;x\r\n \r\n5\r\nworld\r\n'
            b"0;end=1\r\nX-Checksum: 1\r\nX-More: 2\r\n\r\n"
        )
        + get()
    )
    answers, closed = await deferToThread(pipeline, stack.port, raw, 2)
    assert [a.status for a in answers] == [200, 200]
    assert not closed
    rec = stack.upstream.requests[0]
    assert rec.complete and rec.body_sha256 == sha(b"hello world")
    assert len(stack.upstream.requests) == 2


@pytest.mark.parametrize(
    "chunks",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n5\nworld\r\n0\r\n\r\n",
        b"5\r\nhello\r\n3\r\nworld\r\n0\r\n\r\n",
        b"5\r\nhello\r\n" + b"f" * 17 + b"\r\nworld\r\n0\r\n\r\n",
        b"5\r\nhello\r\n-1\r\nworld\r\n0\r\n\r\n",
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_chunk_sizes(make_stack, tracebacks, chunks):
    """400 JSON, and Synapse sees nothing, or a cut-off exchange: never a
    complete request with another body."""
    stack = make_stack()
    answers, closed = await deferToThread(
        pipeline, stack.port, post_chunked(chunks) + get(), 1
    )
    assert_json_error(answers[0], 400)
    assert closed
    await settle()
    assert [r.complete for r in stack.upstream.requests] in ([], [False])
    assert tracebacks == []


@pytest_twisted.ensureDeferred
async def test_bad_chunk_after_part_of_the_body_was_forwarded(make_stack):
    stack = make_stack()

    def run():
        client = Client(stack.port)
        try:
            client.send(post_chunked(b"5\r\nhello\r\n"))
            assert client.silent()
            client.send(b"0x5\r\nworld\r\n0\r\n\r\n")
            return client.final(), client.closed()
        finally:
            client.close()

    answer, closed = await deferToThread(run)
    assert_json_error(answer, 400)
    assert closed
    await settle()
    assert [r.complete for r in stack.upstream.requests] in ([], [False])


@pytest_twisted.ensureDeferred
async def test_huge_chunk_size_hits_the_body_limit(make_stack):
    stack = make_stack(max_request_size="1K")
    raw = post_chunked(b"ffffffffffffffff\r\n" + b"x" * 4096)
    answers, _ = await deferToThread(pipeline, stack.port, raw, 1)
    assert_json_error(answers[0], 413)
    await settle()
    assert [r.complete for r in stack.upstream.requests] in ([], [False])


# Head limits and malformed heads ------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (get(b"/_matrix/client/versions", b"X-Big: " + b"a" * 17000 + b"\r\n"), 431),
        (get(extra=b"".join(b"X-%d: v\r\n" % i for i in range(300))), 431),
        (get(b"/_matrix/" + b"a" * (17 * 1024)), 414),
        (get(extra=b"X-A: a\r\n folded\r\n"), 400),
        (get(extra=b"X-A : a\r\n"), 400),
        (b"GET /_matrix/client/versions HTTP/1.1\nHost: h\n\n", 400),
        (get(extra=b"X-A: a\nX-B: b\r\n"), 400),
    ],
    ids=[
        "big-field",
        "300-fields",
        "long-target",
        "obs-fold",
        "space-before-colon",
        "bare-lf",
        "bare-lf-in-one-field",
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_heads(make_stack, tracebacks, head, status):
    stack = make_stack()
    answers, closed = await deferToThread(pipeline, stack.port, head + get(), 1)
    assert_json_error(answers[0], status)
    assert closed
    await settle()
    assert stack.upstream.requests == []
    assert tracebacks == []


# Expect: 100-continue ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_100_continue_then_the_body(make_stack):
    stack = make_stack()
    head = (
        b"PUT /_matrix/client/v3/a HTTP/1.1\r\nHost: h\r\n"
        b"Expect: 100-continue\r\nContent-Length: 11\r\n\r\n"
    )

    def run():
        client = Client(stack.port)
        try:
            client.send(head)
            interim = client.response()
            client.send(b"hello world")
            return interim, client.response()
        finally:
            client.close()

    interim, answer = await deferToThread(run)
    assert (interim.version, interim.status) == (b"HTTP/1.1", 100)
    assert answer.status == 200
    [rec] = stack.upstream.requests
    assert rec.complete and rec.body_sha256 == sha(b"hello world")


@pytest.mark.parametrize(
    ("target", "status"),
    [(b"/nope", 404), (b"/_matrix/media/v3/upload", 413)],
)
@pytest_twisted.ensureDeferred
async def test_no_100_continue_when_refused(make_stack, target, status):
    stack = make_stack(max_upload_size="1K")
    head = (
        b"POST %s HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5000\r\n\r\n" % target
    )

    def run():
        client = Client(stack.port)
        try:
            client.send(head)
            return client.response()
        finally:
            client.close()

    answer = await deferToThread(run)
    assert_json_error(answer, status)  # not 100 first
    await settle()
    assert stack.upstream.requests == []


# Trickled input ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_head_sent_byte_by_byte(make_stack):
    stack = make_stack()
    raw = post(b"hello", b"/_matrix/client/v3/a", b"X-Custom: yes\r\n")

    def run():
        client = Client(stack.port)
        try:
            for byte in raw:
                client.send(bytes([byte]))
            first = client.response()
            for byte in get(b"/_matrix/client/v3/b"):
                client.send(bytes([byte]))
            return first, client.response()
        finally:
            client.close()

    first, second = await deferToThread(run)
    assert (first.status, second.status) == (200, 200)
    one, two = stack.upstream.requests
    assert one.request_line == b"POST /_matrix/client/v3/a HTTP/1.1"
    assert one.headers(b"x-custom") == [b"yes"]
    assert one.complete and one.body_sha256 == sha(b"hello")
    assert two.request_line == b"GET /_matrix/client/v3/b HTTP/1.1"
