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
