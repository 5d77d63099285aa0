"""Holding the edge's resources (report items 2 and 7): junk written after
an error, over TLS, must not be read into memory; a request body trickled
slowly must not hold its upstream connection past a deadline."""

from __future__ import annotations

import select
import socket
import ssl
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.adversarial.wire import Conn, parse_head
from tests.http1_messages import Resp, assert_json_error
from tests.pki import make_pki
from tests.processes import free_port, memory_kib, start_edge, write_config

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
    port = free_port()
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
            "upstream": f"http://127.0.0.1:{free_port()}",
            "upstream_check": {"enabled": False},
        },
    )
    edge = start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
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
    assert rec.connection_id in stack.upstream.lost, "upstream connection still held"
