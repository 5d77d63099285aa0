"""Holding the edge's resources (report items 2 and 7): junk written after
an error, over TLS, must not be read into memory; a request body trickled
slowly must not hold its upstream connection past a deadline."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import ssl
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.adversarial.test_upstream_faults import until
from tests.adversarial.wire import Conn, read_response
from tests.http1_messages import Resp, assert_json_error, parse_head
from tests.pki import make_pki
from tests.processes import (
    free_port,
    memory_kib,
    start_edge,
    start_upstream,
    write_config,
)

MIB = 1024 * 1024

# Item 2: junk after an error ------------------------------------------------------


def _blast_after_error(port: int, context: ssl.SSLContext | None) -> dict:
    """Send a head the edge cannot parse, then junk for as long as the
    connection takes it (at most 256 MiB or 15 s) without reading; then
    what came back."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=1.0)
    sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
    started = time.monotonic()
    sent = 0
    ended_by = "limit"
    try:
        sock.sendall(b"\x00\x01GARBAGE\r\n\r\n")
        block = b"A" * 65536
        while sent < 256 * MIB and time.monotonic() - started < 15:
            try:
                sent += sock.send(block)
            except TimeoutError:
                continue  # not read: try the same bytes again
            except (OSError, ssl.SSLError):
                ended_by = "closed"
                break
        seconds = time.monotonic() - started
        answer = b""
        sock.settimeout(5.0)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (OSError, ssl.SSLError):
            pass
    finally:
        sock.close()
    return {"sent": sent, "ended_by": ended_by, "seconds": seconds, "answer": answer}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_junk_after_an_error_is_not_buffered(tmp_path: Path, tls: bool) -> None:
    """After its 400 the edge stops reading and closes: the client's
    writes stop being taken, the connection ends within a few seconds, and
    the edge's memory stays flat (the report measured +88 MB over TLS)."""
    port, context, edge, upstream = _edge_process(tmp_path, {}, tls)
    try:
        # A first TLS connection and answer, so that what they cost once is
        # in the baseline.
        with Conn(port, tls=context) as conn:
            conn.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
            assert conn.response().status == 200
        before = memory_kib(edge.pid)["VmRSS"]
        outcome = _blast_after_error(port, context)
        after = memory_kib(edge.pid)
    finally:
        edge.stop()
        upstream.stop()
    assert outcome["ended_by"] == "closed", outcome | {"answer": b"..."}
    assert outcome["seconds"] < 12, outcome["seconds"]
    growth = max(after["VmRSS"], after["VmHWM"]) - before
    assert growth < 32 * 1024, f"edge grew {growth} KiB; {outcome['sent']} B sent"
    if outcome["answer"]:
        parsed = parse_head(outcome["answer"])
        assert parsed is not None and parsed[0].status == 400


# Item 7: a slow request body ------------------------------------------------------


def _trickle(port: int, length: int, every: float, limit: float) -> tuple:
    """Send a POST head announcing ``length`` body bytes, then one byte
    every ``every`` seconds, until an answer comes (or ``limit`` seconds)."""
    with Conn(port, timeout=limit) as conn:
        conn.send(
            b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n"
            b"Content-Length: %d\r\n\r\n" % length
        )
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < limit and sent < length:
            readable, _, _ = select.select([conn.sock], [], [], every)
            if readable:
                return conn.response(), time.monotonic() - started, sent
            try:
                conn.send(b"x")
                sent += 1
            except OSError:
                break
        try:
            return conn.response(timeout=1.0), time.monotonic() - started, sent
        except AssertionError:
            return None, time.monotonic() - started, sent


@pytest_twisted.ensureDeferred
async def test_trickled_request_body_gets_408_and_frees_the_upstream(edge):
    """A body that keeps moving, one byte at a time, well inside
    ``body_idle``: ``timeouts.request_body`` bounds it as a whole; then the
    client gets 408 and the upstream connection it held is closed."""
    stack = edge(timeouts={"request_body": "2s", "body_idle": "60s"})
    answer, seconds, sent = await deferToThread(_trickle, stack.port, 1000, 0.5, 15)
    assert answer is not None, f"no answer after {seconds:.1f}s ({sent} bytes)"
    assert isinstance(answer, Resp)
    assert_json_error(answer, 408)
    assert seconds < 10
    [rec] = stack.upstream.requests
    assert not rec.complete
    # The edge answers the client and closes the upstream connection in one
    # turn; the upstream, in this reactor, sees the close on a later one.
    await until(lambda: rec.connection_id in stack.upstream.lost)


# Slowloris: a head trickled ----------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_slowloris_head_gets_408_at_the_header_deadline(edge, tls):
    """A head that keeps trickling, a byte at a time: at
    ``timeouts.request_headers`` the client gets 408 and the connection
    ends; nothing reaches the upstream."""
    stack = edge(tls=tls, timeouts={"request_headers": "1s"})
    context = stack.client_tls() if tls else None

    def run():
        head = (
            b"GET /_matrix/client/v3/slow HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"a" * 500
        )
        with Conn(stack.port, tls=context, timeout=15) as conn:
            started = time.monotonic()
            # 3 s of trickling (past the 1 s deadline), then the answer.
            for byte in head[:30]:
                time.sleep(0.1)
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    break
            answer, how = read_response(conn, timeout=5.0)
            return answer, how, conn.until_eof(5.0), time.monotonic() - started

    answer, how, ended, seconds = await deferToThread(run)
    assert answer is not None, (how, seconds)
    assert_json_error(answer, 408)
    assert ended
    assert seconds < 10, seconds
    assert stack.upstream.requests == []


# Process-level cases: memory read from /proc ------------------------------------------


def _edge_process(tmp_path: Path, timeouts: dict, tls: bool = False):
    """An edge process before a recording upstream process; returns the
    edge's port, a client TLS context (or None), both processes."""
    port = free_port()
    upstream_port = free_port()
    listener: dict = {"port": port, "bind_addresses": ["127.0.0.1"]}
    context = None
    if tls:
        pki = make_pki(tmp_path / "pki")
        listener["tls"] = {
            "certificate_path": str(pki.chain_path),
            "private_key_path": str(pki.key_path),
        }
        context = ssl.create_default_context(cafile=str(pki.ca_cert_path))
    config = write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [listener],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "upstream_check": {"enabled": False},
            "access_log": {"enabled": False},
            "timeouts": timeouts,
        },
    )
    upstream = start_upstream(upstream_port, tmp_path / "upstream.log")
    try:
        edge = start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
    except Exception:
        upstream.stop()
        raise
    return port, context, edge, upstream


def _io_written(pid: int) -> int:
    """Bytes a process has written to files and sockets (``wchar``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar")


def test_slow_reader_pauses_the_upstream_and_bounds_memory(tmp_path: Path) -> None:
    """A client asks for 512 MiB and stops reading after the first bytes:
    the edge stops reading the upstream (which stops writing, its socket
    full), and its memory stays within a few MiB of what it was."""
    port, _, edge, upstream = _edge_process(tmp_path, {})
    try:
        with Conn(port) as warm:
            warm.send(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n")
            assert warm.response().status == 200
        before = memory_kib(edge.pid)["VmRSS"]
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.connect(("127.0.0.1", port))
        raw.settimeout(10)
        try:
            raw.sendall(b"GET /_matrix/big?mb=512 HTTP/1.1\r\nHost: h\r\n\r\n")
            assert raw.recv(65536).startswith(b"HTTP/1.1 200")
            samples = []
            for _ in range(4):
                time.sleep(1.0)
                samples.append(_io_written(upstream.pid))
            after = memory_kib(edge.pid)
        finally:
            raw.close()
    finally:
        edge.stop()
        upstream.stop()
    # Written by the upstream once stalled: nothing more (a few KiB of
    # slack for anything else it writes, its log).
    assert samples[-1] - samples[-2] < 256 * 1024, samples
    assert samples[-1] < 96 * MIB, f"the upstream wrote {samples[-1]} bytes"
    growth = max(after["VmRSS"], after["VmHWM"]) - before
    assert growth < 24 * 1024, f"edge grew {growth} KiB"


def _open_many(port: int, count: int, context: ssl.SSLContext | None) -> list:
    socks = []
    hello = b""
    if context is not None:
        # Half of a real ClientHello.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        first = outgoing.read()
        hello = first[: len(first) // 2]
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if hello:
            sock.sendall(hello)
        socks.append(sock)
    return socks


def _all_closed(socks: list, timeout: float) -> int:
    """Wait until the edge has ended every connection; how many it has not."""
    open_ = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in open_:
        poller.register(fd, select.POLLIN)
    while open_ and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            try:
                data = open_[fd].recv(65536)
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                del open_[fd]
    return len(open_)


@pytest.mark.parametrize(
    ("kind", "count"), [("idle", 1000), ("half-tls-handshake", 300)]
)
def test_idle_and_half_open_floods_are_closed_and_bounded(
    tmp_path: Path, kind: str, count: int
) -> None:
    """Connections that send nothing (closed at ``timeouts.client_idle``)
    or half a TLS ClientHello (closed at ``timeouts.request_headers``):
    all are closed, in time, and while they are open each costs the edge
    a bounded amount of memory."""
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    tls = kind != "idle"
    port, context, edge, upstream = _edge_process(
        tmp_path, {"client_idle": "2s", "request_headers": "2s"}, tls=tls
    )
    socks: list = []
    try:
        with Conn(port, tls=context) as warm:
            warm.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
            assert warm.response().status == 200
        before = memory_kib(edge.pid)["VmRSS"]
        started = time.monotonic()
        socks = _open_many(port, count, context)
        time.sleep(0.5)
        during = memory_kib(edge.pid)["VmRSS"]
        left = _all_closed(socks, 30)
        seconds = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
        edge.stop()
        upstream.stop()
    assert left == 0, f"{left} of {count} connections still open after {seconds:.0f}s"
    assert seconds < 30
    per_connection = (during - before) / count
    assert per_connection < 64, f"{per_connection:.1f} KiB per connection"
