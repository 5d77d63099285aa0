"""An upstream that fails (report items 1, 6, 8 and 9): a response cut
short, answers that are not HTTP/1.1, Synapse coming back after a restart,
a worker restarting under pooled keep-alive connections.

The upstream is the recording one, scripted per test to write raw bytes.
"Promptly" means within 10 s, where the failure mode is a wait for
``upstream_response`` (180 s) or for the connection to be closed by
someone else."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from matrix_edge.upstream.health import UpstreamWatch
from tests.adversarial.conftest import ScriptedProtocol, ScriptedUpstream
from tests.adversarial.wire import Conn, dechunk
from tests.h2client import H2Client
from tests.http1_messages import Resp, assert_json_error, get
from tests.processes import free_port
from tests.recording_upstream import Recorded, UpstreamProtocol

PROMPTLY = 10.0
SENT = 40_000


async def pause(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await pause(0.02)


# Item 1: a response cut short ---------------------------------------------------


def cut_short(framing: str, ending: str):
    """A script: a 200 whose body stops after SENT bytes, then the
    connection ends (an orderly close, or a reset once the bytes are out)."""

    def script(proto: ScriptedProtocol, rec: Recorded, nth: int) -> bool:
        if framing == "length":
            proto.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"a" * SENT
            )
        else:
            proto.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (SENT // 2, b"a" * (SENT // 2))
                + b"%x\r\n%s\r\n" % (SENT // 2, b"a" * (SENT // 2))
            )
        reactor.callLater(0.2, proto.close if ending == "close" else proto.reset)
        return True

    return script


@pytest.mark.parametrize("ending", ["close", "reset"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_http1_response_cut_short_ends_the_client_connection(
    edge, tls, framing, ending
):
    """HTTP/1.1: the client gets the bytes sent, then the end of the
    connection, so that it sees a short body; it is not left waiting."""
    stack = edge(ScriptedUpstream(cut_short(framing, ending)), tls=tls)
    context = stack.client_tls() if tls else None

    def run():
        with Conn(stack.port, tls=context, timeout=PROMPTLY + 5) as conn:
            conn.send(get(b"/_matrix/client/v3/cut"))
            head = conn.head()
            return head, conn.until_eof(PROMPTLY), conn.buf

    head, ended, body = await deferToThread(run)
    assert head.status == 200
    assert ended, "the client connection is still open"
    if framing == "length":
        assert head.header(b"content-length") == b"100000"
        assert body == b"a" * SENT
    else:
        payload, last_chunk = dechunk(body)
        assert not last_chunk
        assert payload == b"a" * SENT


@pytest.mark.parametrize("ending", ["close", "reset"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest_twisted.ensureDeferred
async def test_http2_response_cut_short_resets_its_stream(edge, framing, ending):
    """HTTP/2: the stream is reset (RST_STREAM), never ended as if whole."""
    stack = edge(ScriptedUpstream(cut_short(framing, ending)), tls=True)

    def run():
        client = H2Client(stack.port)
        try:
            assert client.alpn == "h2"
            stream_id = client.start(b"GET", b"/_matrix/client/v3/cut")
            stream = client.streams[stream_id]
            with contextlib.suppress(TimeoutError):
                client.until(lambda: stream.ended or stream.reset, timeout=PROMPTLY)
            return stream
        finally:
            client.close()

    stream = await deferToThread(run)
    assert stream.status == 200
    assert not stream.ended
    assert stream.reset, "no RST_STREAM for the cut response"
    assert stream.received <= SENT


# Item 6: answers that are not HTTP/1.1 ---------------------------------------------


def raw_answer(data: bytes):
    """A script: ``data`` as the answer, the connection left open."""

    def script(proto: ScriptedProtocol, rec: Recorded, nth: int) -> bool:
        proto.write(data)
        return True

    return script


BROKEN = {
    "status-line-without-code": b"HTTP/1.1 OK\r\nContent-Length: 2\r\n\r\n{}",
    "status-line-not-http": b"HTTX/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    "status-line-garbage": b"\x00\x01garbage\r\n\r\n",
    "status-negative": b"HTTP/1.1 -20 Negative\r\nContent-Length: 2\r\n\r\n{}",
    "status-two-digits": b"HTTP/1.1 20 Short\r\nContent-Length: 2\r\n\r\n{}",
    "duplicate-content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    ),
    "101-with-upgrade": (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n"
    ),
    "101-bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    "space-in-header-name": (
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\n{}"
    ),
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\n{}",
    "content-length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("name", list(BROKEN))
@pytest_twisted.ensureDeferred
async def test_broken_upstream_answer_is_a_502(edge, tracebacks, name):
    stack = edge(ScriptedUpstream(raw_answer(BROKEN[name])))

    def run():
        with Conn(stack.port, timeout=PROMPTLY + 5) as conn:
            conn.send(get(b"/_matrix/client/v3/broken"))
            return conn.response(timeout=PROMPTLY)

    answer = await deferToThread(run)
    assert_json_error(answer, 502)
    assert tracebacks == []


@pytest_twisted.ensureDeferred
async def test_bare_lf_response_head_does_not_hang(edge, tracebacks):
    """Line ends of a bare LF: read leniently (200 and the body) or refused
    (502) at once; never a wait for the upstream to close."""
    stack = edge(
        ScriptedUpstream(
            raw_answer(
                b"HTTP/1.1 200 OK\nContent-Type: application/json\n"
                b"Content-Length: 2\n\n{}"
            )
        )
    )

    def run() -> Resp | None:
        with Conn(stack.port, timeout=PROMPTLY + 5) as conn:
            conn.send(get(b"/_matrix/client/v3/lf"))
            try:
                return conn.response(timeout=PROMPTLY)
            except AssertionError:
                return None

    answer = await deferToThread(run)
    assert answer is not None, "no answer while the upstream keeps its connection"
    if answer.status == 200:
        assert answer.body == b"{}"
    else:
        assert_json_error(answer, 502)
    assert tracebacks == []


# Item 8: Synapse back after a restart ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_single_upstream_back_is_tried_before_the_next_check(edge):
    """The last health check saw Synapse down; it is up again, and the next
    check has not run yet. With no other process to send the request to, the
    request is tried, and answered."""
    port = free_port()
    stack = edge(upstream_port=port)
    clock = Clock()  # moved by hand: no check runs but the first
    watch = UpstreamWatch(clock, stack.main, stack.config.upstream_check)
    watch.startService()
    try:
        clock.advance(0)
        await until(lambda: stack.main.healthy is False)
        assert stack.main.known_down

        synapse = ScriptedUpstream()
        edge.listen(synapse, port)

        def run():
            with Conn(stack.port) as conn:
                conn.send(get(b"/_matrix/client/v3/after-restart"))
                return conn.response()

        answer = await deferToThread(run)
        assert answer.status == 200, answer
        assert [r.target for r in synapse.requests] == [
            b"/_matrix/client/v3/after-restart"
        ]
    finally:
        watch.stopService()


# Item 9: a worker restarts under pooled keep-alive connections ---------------------

POOLED = 3


def _workers(worker_port: int) -> dict:
    return {
        "pools": {"client_reader": {"addresses": [f"http://127.0.0.1:{worker_port}"]}}
    }


async def _concurrent_gets(port: int, count: int, target: bytes) -> list[Resp]:
    def one(i: int) -> Resp:
        with Conn(port) as conn:
            conn.send(get(target + b"?n=%d" % i))
            return conn.response()

    return await gatherResults([deferToThread(one, i) for i in range(count)])


def restarting_worker(ending: str):
    """A script: answers late while warming up (so that each concurrent
    request gets a connection of its own); once ``restarted``, a connection
    from before drops the next request it gets without a word, as a process
    that went away as the request arrived."""
    state = {"restarted": False}

    def script(proto: ScriptedProtocol, rec: Recorded, nth: int) -> bool:
        if not state["restarted"]:
            reactor.callLater(0.3, UpstreamProtocol._answer, proto, rec)
            return True
        if nth > 0:
            (proto.close if ending == "close" else proto.reset)()
            return True
        return False

    return script, state


@pytest.mark.parametrize("ending", ["close", "reset"])
@pytest.mark.parametrize("where", ["main", "worker"])
@pytest_twisted.ensureDeferred
async def test_stale_pooled_connection_is_retried_on_a_fresh_one(
    edge, tracebacks, where, ending
):
    """A GET sent on a pooled connection that closes before any byte of the
    response: sent again on a new connection, the client never sees 502."""
    script, state = restarting_worker(ending)
    process = ScriptedUpstream(script)
    if where == "main":
        stack = edge(process)
    else:
        worker_port = edge.listen(process).getHost().port
        stack = edge(workers=_workers(worker_port))
    target = b"/_matrix/client/versions"
    warm = await _concurrent_gets(stack.port, POOLED, target)
    assert [a.status for a in warm] == [200] * POOLED
    assert len(process.open_protocols()) == POOLED
    state["restarted"] = True
    answers = await _concurrent_gets(stack.port, POOLED, target)
    assert [a.status for a in answers] == [200] * POOLED, answers
    assert len(process.requests) == 3 * POOLED  # each tried again, once
    if where == "worker":
        assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_worker_restart_loses_no_request(edge, tracebacks):
    """A worker process stops (its connections closed) and starts again on
    the same port: the requests after it are all answered."""
    script, _ = restarting_worker("close")
    old = ScriptedUpstream(script)
    listening = edge.listen(old)
    worker_port = listening.getHost().port
    stack = edge(workers=_workers(worker_port))
    target = b"/_matrix/client/versions"
    warm = await _concurrent_gets(stack.port, POOLED, target)
    assert [a.status for a in warm] == [200] * POOLED
    for proto in old.open_protocols():
        proto.close()
    await maybeDeferred(listening.stopListening)
    new = ScriptedUpstream()
    edge.listen(new, worker_port)
    answers = await _concurrent_gets(stack.port, POOLED, target)
    assert [a.status for a in answers] == [200] * POOLED, answers
    assert len(new.requests) == POOLED
    assert stack.upstream.requests == []


# Bytes after a complete response, on a pooled connection -------------------------

STRAY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nSTRAY"


def stray_after(when: str, stray: bytes):
    """A script: the first request is answered whole, then ``stray`` bytes
    follow (in the same write, or a moment later); the next ones are
    answered as usual."""

    def script(proto: ScriptedProtocol, rec: Recorded, nth: int) -> bool:
        if rec.target != b"/_matrix/client/v3/first":
            return False
        body = b'{"first": true}'
        proto.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (len(body), body)
            + (stray if when == "same-write" else b"")
        )
        if when == "later":
            reactor.callLater(0.1, proto.write, stray)
        return True

    return script


@pytest.mark.parametrize("stray", [STRAY, b"junk\r\n"], ids=["response", "junk"])
@pytest.mark.parametrize("when", ["same-write", "later"])
@pytest_twisted.ensureDeferred
async def test_bytes_after_a_complete_response_are_never_relayed(
    edge, tracebacks, when, stray
):
    """The first response is relayed whole; the connection it came on is
    not used again, and the next request (on the same client connection
    and on a new one) gets its own answer, never the stray bytes."""
    upstream = ScriptedUpstream(stray_after(when, stray))
    stack = edge(upstream)

    def run():
        with Conn(stack.port, timeout=PROMPTLY) as conn:
            conn.send(get(b"/_matrix/client/v3/first"))
            first = conn.response()
            time.sleep(0.3)  # the stray bytes are out by now
            conn.send(get(b"/_matrix/client/v3/second"))
            second = conn.response()
            left = conn.buf
        with Conn(stack.port, timeout=PROMPTLY) as conn:
            conn.send(get(b"/_matrix/client/v3/third"))
            third = conn.response()
        return first, second, third, left

    first, second, third, left = await deferToThread(run)
    assert first.status == 200 and first.body == b'{"first": true}'
    for answer, target in ((second, b"second"), (third, b"third")):
        assert answer.status == 200, answer
        assert b"STRAY" not in answer.body and b"junk" not in answer.body
        assert answer.json()["target"] == "/_matrix/client/v3/" + target.decode()
    assert left == b""
    first_rec, *later = upstream.requests
    assert all(r.connection_id != first_rec.connection_id for r in later)
    await until(lambda: first_rec.connection_id in upstream.lost)
    assert tracebacks == []


# A flood of interim responses --------------------------------------------------


def interim_flood(count: int | None):
    """A script: ``count`` 103 Early Hints before the final 200, written as
    fast as the edge takes them; None: 1xx without end."""
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"

    def script(proto: ScriptedProtocol, rec: Recorded, nth: int) -> bool:
        if count is not None:
            proto.write(
                interim
                * count
                + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )
            return True

        def more() -> None:
            if proto.transport is not None and proto.connection_id not in (
                proto.factory.lost
            ):
                proto.write(interim * 100)
                reactor.callLater(0.001, more)

        more()
        return True

    return script


@pytest.mark.parametrize("count", [1, 50, 20_000, None], ids=str)
@pytest_twisted.ensureDeferred
async def test_a_flood_of_interim_responses_is_bounded(edge, tracebacks, count):
    """1xx responses before the final one are not relayed: a few pass, a
    flood is either passed or cut off with a 502, promptly, and the
    upstream connection that sent an endless one is closed."""
    upstream = ScriptedUpstream(interim_flood(count))
    stack = edge(upstream)

    def run():
        with Conn(stack.port, timeout=PROMPTLY) as conn:
            conn.send(get(b"/_matrix/client/v3/hints"))
            return conn.response(timeout=PROMPTLY)

    answer = await deferToThread(run)
    if count is not None and count <= 50:
        assert answer.status == 200 and answer.body == b"{}", answer
    elif answer.status != 200:
        assert_json_error(answer, 502)
    if count is None:
        assert answer.status == 502
        [rec] = upstream.requests
        await until(lambda: rec.connection_id in upstream.lost)
    assert tracebacks == []


# Transfer codings the edge cannot relay --------------------------------------------


@pytest.mark.parametrize(
    "coding", [b"chunked, chunked", b"gzip, chunked", b"gzip", b"chunked, identity"]
)
@pytest_twisted.ensureDeferred
async def test_transfer_coding_the_edge_cannot_relay(edge, tracebacks, coding):
    """The edge re-frames what it relays and sends no transfer coding but
    chunked: a response coded otherwise (RFC 9112 section 6.1; chunked
    twice is not even allowed) cannot be relayed as it is meant: 502."""
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (7, b"<hello>")
    stack = edge(
        ScriptedUpstream(
            raw_answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%s" % (coding, body)
            )
        )
    )

    def run():
        with Conn(stack.port, timeout=PROMPTLY + 5) as conn:
            conn.send(get(b"/_matrix/client/v3/coded"))
            return conn.response(timeout=PROMPTLY)

    assert_json_error(await deferToThread(run), 502)


@pytest_twisted.ensureDeferred
async def test_nul_in_the_reason_phrase_is_a_502(edge, tracebacks):
    """RFC 9112 section 4: a reason phrase is HTAB, SP, VCHAR or obs-text;
    a status line with a NUL is not HTTP/1.1, as in BROKEN above."""
    stack = edge(
        ScriptedUpstream(
            raw_answer(b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\n{}")
        )
    )

    def run():
        with Conn(stack.port, timeout=PROMPTLY + 5) as conn:
            conn.send(get(b"/_matrix/client/v3/nul"))
            return conn.response(timeout=PROMPTLY)

    assert_json_error(await deferToThread(run), 502)
