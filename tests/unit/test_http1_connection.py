"""Adversarial framing for the HTTP/1.1 client connection, in memory: exact
bytes in, exact bytes out, and what reaches Synapse.

The invariant throughout: Synapse sees exactly the requests the client
framed, no more and no fewer, bodies intact; and the client gets an answer
for each (a Matrix JSON error for bad input), never silence or a traceback.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import StringTransport

from matrix_edge.server.request import LINGER_SECONDS
from tests.http1_messages import (
    VERSIONS,
    Resp,
    assert_json_error,
    get,
    post,
    post_chunked,
)
from tests.unit.test_site import Harness, make_harness


def reply(n: int) -> bytes:
    """Synapse's answer number ``n``; it closes its connection after it, so
    that each forwarded request is on an upstream connection of its own."""
    body = b'{"n": %d}' % n
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """A chunked body's content, and whether its last chunk came."""
    out = b""
    while True:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return out, False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return out, rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
        if len(rest) < size + 2:
            return out + rest[:size], False
        out += rest[:size]
        data = rest[size + 2 :]


def responses(data: bytes, method: bytes = b"GET", closed: bool = True) -> list[Resp]:
    """Every response in ``data``, in order; a body of no announced length
    runs to the end (the connection closed)."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head!r}"
        status_line, *lines = head.split(b"\r\n")
        version, code, _ = status_line.split(b" ", 2)
        headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines]
        resp = Resp(version, int(code), headers, b"")  # type: ignore[arg-type]
        length = resp.header(b"content-length")
        if resp.status < 200 or resp.status in (204, 304) or method == b"HEAD":
            pass
        elif (resp.header(b"transfer-encoding") or b"").lower() == b"chunked":
            resp.body, complete = dechunk(data)
            assert complete, f"incomplete chunked body: {data!r}"
            data = data[data.index(b"\r\n0\r\n\r\n") + 7 :] if resp.body else data[5:]
        elif length is not None:
            resp.body, data = data[: int(length)], data[int(length) :]
            assert len(resp.body) == int(length), "truncated body"
        else:
            assert closed, "body of unknown length on an open connection"
            resp.body, data = data, b""
        out.append(resp)
    return out


def final(data: bytes) -> list[Resp]:
    """The responses without the interim (1xx) ones."""
    return [r for r in responses(data) if r.status >= 200]


def next_upstream(h: Harness) -> StringTransport:
    """The connection to Synapse that the next forwarded request went on."""
    assert len(h.clock.tcpClients) == 1, h.clock.tcpClients
    return h.connect_upstream()


def without_request_id(head: bytes) -> bytes:
    return b"\r\n".join(
        line for line in head.split(b"\r\n") if not line.startswith(b"X-Request-ID:")
    )


def forwarded_head(target: bytes, *fields: bytes) -> bytes:
    return (
        b"%s HTTP/1.1\r\n" % target
        + b"".join(field + b"\r\n" for field in fields)
        + b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: http\r\n\r\n"
    )


def is_closing(h: Harness) -> bool:
    return bool(h.client.disconnecting or h.client.disconnected)


# Pipelining -------------------------------------------------------------------


def test_pipelined_gets_are_forwarded_one_at_a_time_in_order():
    h = make_harness()
    h.send(get(b"/_matrix/client/v3/a") + get(b"/_matrix/client/v3/b") + get())
    assert h.client.producerState == "paused"  # the rest waits in the queue
    for n, target in enumerate(
        [b"/_matrix/client/v3/a", b"/_matrix/client/v3/b", VERSIONS], 1
    ):
        upstream = next_upstream(h)
        assert upstream.value().startswith(b"GET " + target + b" HTTP/1.1\r\n")
        assert upstream.value().count(b"HTTP/1.1\r\n") == 1
        assert h.clock.tcpClients == []  # the next one waits for this answer
        h.upstream_says(reply(n))
    assert [r.json()["n"] for r in final(h.response())] == [1, 2, 3]
    assert h.client.producerState == "producing"
    assert not is_closing(h)


def test_pipelined_bodies_reach_synapse_intact_and_in_order():
    """Content-Length and chunked bodies, mixed with GETs, all in one
    read."""
    h = make_harness()
    chunked = b'3;a=b\r\nabc\r\n2;x="y z"\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n'
    h.send(get() + post(b"hello") + post_chunked(chunked) + post(b"") + get())
    seen = []
    for n in range(1, 6):
        upstream = next_upstream(h)
        seen.append(upstream.value())
        h.upstream_says(reply(n))
    assert [r.json()["n"] for r in final(h.response())] == [1, 2, 3, 4, 5]
    assert seen[0].startswith(b"GET ") and seen[0].endswith(b"\r\n\r\n")
    assert b"Content-Length: 5\r\n" in seen[1]
    assert seen[1].endswith(b"\r\n\r\nhello")
    head, _, body = seen[2].partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert dechunk(body) == (b"abcde", True)
    assert seen[3].startswith(b"POST ") and seen[3].endswith(b"\r\n\r\n")
    assert seen[4].startswith(b"GET ") and seen[4].endswith(b"\r\n\r\n")
    assert not is_closing(h)


def test_pipelined_body_split_across_reads():
    """Part of a queued request's body came with the first read; the rest
    is read once it is that request's turn."""
    h = make_harness()
    h.send(get() + post(b"0123456789")[:-6])
    first = next_upstream(h)
    assert first.value().count(b"HTTP/1.1") == 1
    h.upstream_says(reply(1))
    second = next_upstream(h)
    assert second.value().endswith(b"\r\n\r\n0123")
    assert h.client.producerState == "producing"
    h.send(b"456789")
    assert second.value().endswith(b"\r\n\r\n0123456789")
    h.upstream_says(reply(2))
    assert [r.json()["n"] for r in final(h.response())] == [1, 2]


def test_refused_head_first_then_pipelined_requests():
    h = make_harness()
    h.send(get(b"/nope") + get() + get(b"/_synapse/admin/v1/x"))
    upstream = next_upstream(h)
    assert upstream.value().startswith(b"GET " + VERSIONS + b" ")
    h.upstream_says(reply(1))
    answers = final(h.response())
    assert [r.status for r in answers] == [404, 200, 404]
    assert_json_error(answers[0], 404)
    assert h.clock.tcpClients == []
    assert not is_closing(h)


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (post(b"hello", target=b"/nope"), 404),
        (post(b"x" * 2000), 413),
    ],
    ids=["404-with-body", "413-content-length"],
)
def test_refusal_with_body_then_pipelined_request_is_not_forwarded(first, status):
    """Once a refusal closes the connection, what follows in the same read
    is not parsed, let alone forwarded (it once was)."""
    h = make_harness(max_request_size="1K")
    h.send(first + get())
    answers = final(h.response())
    assert_json_error(answers[0], status)
    assert is_closing(h)
    assert h.clock.tcpClients == []  # nothing reached Synapse
    assert len(answers) == 1


def test_garbage_after_a_pipelined_request():
    """The valid request is answered first, then 400, then the close."""
    h = make_harness()
    h.send(get() + b"GARBAGE\x00\r\n\r\n")
    assert h.response() == b""
    next_upstream(h)
    h.upstream_says(reply(1))
    answers = final(h.response())
    assert [r.status for r in answers] == [200, 400]
    assert_json_error(answers[1], 400)
    assert is_closing(h)
    assert h.clock.tcpClients == []


def test_garbage_in_a_later_read_while_a_request_is_answered():
    h = make_harness()
    h.send(get())
    upstream = next_upstream(h)
    h.send(b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n")
    assert h.response() == b""
    h.upstream_says(reply(1))
    assert [r.status for r in final(h.response())] == [200, 400]
    assert upstream.value().count(b"HTTP/1.1\r\n") == 1
    assert is_closing(h)


def test_broken_chunked_body_of_a_queued_request():
    """A request parsed ahead whose body breaks never starts: the earlier
    response, then 400 (it once started with a partial body and hung)."""
    h = make_harness()
    h.send(get() + post_chunked(b"5\r\nhello\r\nzz\r\n"))
    next_upstream(h)
    h.upstream_says(reply(1))
    answers = final(h.response())
    assert [r.status for r in answers] == [200, 400]
    assert_json_error(answers[1], 400)
    assert is_closing(h)
    # Synapse saw at most a cut-off exchange, never a complete request.
    if h.clock.tcpClients:
        upstream = h.connect_upstream()
        assert not dechunk(upstream.value().partition(b"\r\n\r\n")[2])[1]
        assert upstream.disconnecting or upstream.disconnected


def test_connection_close_ends_reading():
    h = make_harness()
    h.send(get(extra=b"Connection: close\r\n") + get(b"/_matrix/client/v3/more"))
    upstream = next_upstream(h)
    h.send(get(b"/_matrix/client/v3/later"))
    h.upstream_says(reply(1))
    [answer] = final(h.response())
    assert answer.header(b"connection") == b"close"
    assert is_closing(h)
    assert upstream.value().count(b"HTTP/1.1\r\n") == 1
    assert b"more" not in upstream.value() and b"later" not in upstream.value()
    assert h.clock.tcpClients == []


def test_many_pipelined_refusals_behind_a_forwarded_request():
    """Requests parsed ahead start in a loop (recursion once overflowed)."""
    h = make_harness()
    h.send(get() + get(b"/nope") * 1500)
    next_upstream(h)
    h.upstream_says(reply(1))
    answers = final(h.response())
    assert len(answers) == 1501
    assert [r.status for r in answers[:2]] == [200, 404]


# HTTP/1.0 ---------------------------------------------------------------------


def test_http10_without_keep_alive_is_answered_and_closed():
    h = make_harness()
    h.send(get(version=b"1.0") + get(b"/_matrix/client/v3/more"))
    upstream = next_upstream(h)
    assert upstream.value().count(b"HTTP/1.1\r\n") == 1
    h.upstream_says(reply(1))
    [answer] = final(h.response())
    assert answer.version == b"HTTP/1.0"
    assert answer.header(b"connection") == b"close"
    assert is_closing(h)
    assert h.clock.tcpClients == []


def test_http10_keep_alive_goes_on():
    h = make_harness()
    h.send(get(version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    next_upstream(h)
    h.upstream_says(reply(1))
    h.send(get(version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    next_upstream(h)
    h.upstream_says(reply(2))
    answers = final(h.response())
    assert [r.json()["n"] for r in answers] == [1, 2]
    for answer in answers:
        assert answer.version == b"HTTP/1.0"
        assert answer.header(b"connection") == b"keep-alive"
        assert answer.header(b"transfer-encoding") is None
    assert not is_closing(h)


def test_http10_keep_alive_response_of_unknown_length_is_close_delimited():
    h = make_harness()
    h.send(get(version=b"1.0", extra=b"Connection: keep-alive\r\n"))
    next_upstream(h)
    h.upstream_says(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    head, _, body = h.response().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"\r\nConnection: close" in head
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert body == b"hello world"
    assert is_closing(h)


def test_http10_expect_gets_no_100_continue():
    h = make_harness()
    h.send(
        b"POST /_matrix/client/v3/x HTTP/1.0\r\nHost: h\r\n"
        b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    next_upstream(h)
    assert h.response() == b""


# Upgrade heads ----------------------------------------------------------------


def test_h2c_upgrade_then_pipelined_get_are_plain_requests():
    h = make_harness()
    upgrade = get(
        b"/_matrix/client/v3/up",
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
    )
    h.send(upgrade + get())
    seen = []
    for n in (1, 2):
        upstream = next_upstream(h)
        seen.append(upstream.value())
        h.upstream_says(reply(n))
    assert without_request_id(seen[0]) == forwarded_head(
        b"GET /_matrix/client/v3/up", b"Host: h"
    )
    assert without_request_id(seen[1]) == forwarded_head(b"GET " + VERSIONS, b"Host: h")
    assert [r.status for r in responses(h.response())] == [200, 200]
    assert not is_closing(h)


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
    ids=["content-length", "chunked"],
)
def test_upgrade_with_a_body_is_refused(framing):
    h = make_harness()
    h.send(
        b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\n"
        b"Connection: Upgrade\r\n" + framing + get()
    )
    [answer] = responses(h.response())
    assert_json_error(answer, 400)
    assert is_closing(h)
    assert h.clock.tcpClients == []


def test_many_upgrade_heads_in_one_read():
    """Each upgrade head restarts the parser in a loop (recursion once
    overflowed)."""
    h = make_harness()
    h.send(get(b"/health", b"Upgrade: h2c\r\nConnection: Upgrade\r\n") * 1500)
    assert [r.status for r in responses(h.response())] == [200] * 1500


# Chunked request bodies -------------------------------------------------------


def test_chunk_extensions_and_trailers():
    h = make_harness()
    h.send(
        post_chunked(
            b'5;name=value;flag\r\nhello\r\n6;q="a;b"\r\n world\r\n'
            b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
        )
        + get()
    )
    upstream = next_upstream(h)
    assert dechunk(upstream.value().partition(b"\r\n\r\n")[2]) == (b"hello world", True)
    h.upstream_says(reply(1))
    next_upstream(h)
    h.upstream_says(reply(2))
    assert [r.json()["n"] for r in final(h.response())] == [1, 2]


BAD_CHUNKS = [
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"5 ;a=b\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b" 5\r\nhello\r\n0\r\n\r\n",
    b"5\nhello\n0\n\n",
    b"5\r\nhelloXX\r\n0\r\n\r\n",
    b"3\r\nhello\r\n0\r\n\r\n",
    b"5;a b\r\nhello\r\n0\r\n\r\n",
    b"1" + b"0" * 16 + b"\r\nhello\r\n",
    b"zz\r\n",
]


@pytest.mark.parametrize("chunks", BAD_CHUNKS)
def test_bad_chunks_in_one_read(chunks):
    """The head and a broken body in one read: 400, and Synapse never sees
    a complete request."""
    h = make_harness()
    h.send(post_chunked(chunks) + get())
    [answer] = responses(h.response())
    assert_json_error(answer, 400)
    assert is_closing(h)
    # A connection to Synapse may have been started for the head; it was
    # given up before it carried anything.
    assert h.upstream is None


@pytest.mark.parametrize("bad", [b"0x5\r\n", b"5 ;a\r\n", b"ffffffffffffffff0\r\n"])
def test_bad_chunk_after_a_forwarded_one_cuts_the_exchange(bad):
    h = make_harness()
    h.send(post_chunked(b"5\r\nhello\r\n"))
    upstream = next_upstream(h)
    assert upstream.value().endswith(b"\r\n\r\n5\r\nhello\r\n")
    h.send(bad + b"hello\r\n0\r\n\r\n")
    [answer] = responses(h.response())
    assert_json_error(answer, 400)
    assert is_closing(h)
    assert upstream.disconnecting or upstream.disconnected
    assert not dechunk(upstream.value().partition(b"\r\n\r\n")[2])[1]


def test_huge_chunk_size_is_bounded_by_the_body_limit():
    h = make_harness(max_request_size="1K")
    h.send(post_chunked(b"ffffffffffffffff\r\n" + b"x" * 2000))
    [answer] = responses(h.response())
    assert_json_error(answer, 413)
    assert h.upstream is None
    h.clock.advance(LINGER_SECONDS + 1)  # the rest of the body never comes
    assert is_closing(h)


# Header limits and malformed heads ----------------------------------------------


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * (16 * 1024) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X-A: b\r\n" * 256, 431),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(9)),
            431,
        ),
        (b"GET /_matrix/" + b"a" * (16 * 1024) + b" HTTP/1.1\r\nHost: h\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n\tb\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost\t: h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\nX-A: b\r\n", 400),
        (b"GET / HTTP/1.1\nHost: h\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: b\n", 400),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: h\r\n", 505),
    ],
    ids=[
        "field-16k+1",
        "257-fields",
        "head-over-64k",
        "target-16k+",
        "obs-fold-space",
        "obs-fold-tab",
        "space-before-colon",
        "tab-before-colon",
        "bare-lf-in-field",
        "bare-lf-after-request-line",
        "bare-lf-ending-head",
        "two-content-lengths",
        "content-length-and-chunked",
        "gzip-chunked",
        "two-transfer-encodings",
        "signed-content-length",
        "http-2.0",
    ],
)
def test_bad_heads_get_a_json_error_and_nothing_is_forwarded(head, status):
    h = make_harness()
    h.send(head + b"\r\n" + get())
    [answer] = responses(h.response())
    if status == 505:
        assert answer.status in (400, 505)
    else:
        assert_json_error(answer, status)
    assert is_closing(h)
    assert h.clock.tcpClients == []


def test_fields_at_the_limits_are_taken():
    """256 fields, one of them 16 KiB name and value together."""
    fields = [b"X-Big: " + b"a" * (16 * 1024 - 5)] + [
        b"X-%d: v" % i for i in range(254)
    ]
    h = make_harness()
    h.send(
        b"GET "
        + VERSIONS
        + b" HTTP/1.1\r\n"
        + b"Host: h\r\n"
        + b"\r\n".join(fields)
        + b"\r\n\r\n"
    )
    upstream = next_upstream(h)
    # And X-Forwarded-For, X-Forwarded-Proto, X-Request-ID.
    assert upstream.value().count(b"\r\nX-") == 255 + 3
    h.upstream_says(reply(1))
    assert final(h.response())[0].status == 200


def test_overlong_target_answered_before_it_ends():
    h = make_harness()
    h.send(b"GET /_matrix/" + b"a" * (17 * 1024))
    [answer] = responses(h.response())
    assert_json_error(answer, 414)
    assert is_closing(h)


def test_overlong_field_answered_before_it_ends():
    """An unfinished field is counted as it arrives (httptools buffers it
    without bound; once it was only checked when complete)."""
    h = make_harness()
    h.send(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * (256 * 1024))
    [answer] = responses(h.response())
    assert_json_error(answer, 431)
    assert is_closing(h)


# Expect: 100-continue ---------------------------------------------------------


def test_100_continue_when_forwarded():
    h = make_harness()
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    assert h.response() == b"HTTP/1.1 100 Continue\r\n\r\n"
    upstream = next_upstream(h)
    assert b"Expect" not in upstream.value() or b"100-continue" in upstream.value()
    h.send(b"hello")
    assert upstream.value().endswith(b"\r\n\r\nhello")
    h.upstream_says(reply(1))
    assert [r.status for r in responses(h.response())] == [100, 200]


@pytest.mark.parametrize(
    ("target", "status"),
    [(b"/nope", 404), (b"/_matrix/media/v3/upload", 413)],
)
def test_no_100_continue_when_refused(target, status):
    h = make_harness(max_upload_size="1K")
    h.send(
        b"POST %s HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5000\r\n\r\n" % target
    )
    h.clock.advance(0)
    [answer] = responses(h.response())
    assert_json_error(answer, status)
    assert b"100 Continue" not in h.response()
    assert h.clock.tcpClients == []


def test_100_continue_of_a_queued_request_follows_the_earlier_response():
    h = make_harness()
    h.send(
        get() + b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    next_upstream(h)
    assert h.response() == b""
    h.upstream_says(reply(1))
    assert [r.status for r in responses(h.response())] == [200, 100]
    upstream = next_upstream(h)
    h.send(b"hello")
    assert upstream.value().endswith(b"\r\n\r\nhello")
    h.upstream_says(reply(2))
    assert [r.status for r in responses(h.response())] == [200, 100, 200]


# Trickled input ---------------------------------------------------------------


def test_head_and_body_byte_by_byte():
    """Every byte a read of its own, for two requests in a row."""
    h = make_harness()
    for byte in post_chunked(b"5;e=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"):
        h.send(bytes([byte]))
    upstream = next_upstream(h)
    head, _, body = upstream.value().partition(b"\r\n\r\n")
    assert head.startswith(b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n")
    assert dechunk(body) == (b"hello", True)
    h.upstream_says(reply(1))
    for byte in get(b"/_matrix/client/v3/next"):
        h.send(bytes([byte]))
    upstream = next_upstream(h)
    assert without_request_id(upstream.value()) == forwarded_head(
        b"GET /_matrix/client/v3/next", b"Host: h"
    )
    h.upstream_says(reply(2))
    assert [r.json()["n"] for r in final(h.response())] == [1, 2]
    assert not is_closing(h)
