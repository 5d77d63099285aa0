"""SIGTERM stops the edge gracefully: it stops accepting, idle connections
close, and a request in flight (a /sync long-poll) is answered before the
process exits 0."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

from tests import processes
from tests.rawhttp import read_response

LONG_POLL = b"GET /_matrix/slow?s=2 HTTP/1.1\r\nHost: x\r\n\r\n"
VERSIONS = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"


def test_sigterm_lets_a_long_poll_finish_and_refuses_new_connections(
    tmp_path: Path,
) -> None:
    with processes.edge_before_upstream(tmp_path) as (port, edge):
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        idle.sendall(VERSIONS)
        assert read_response(idle).status == 200
        polling = socket.create_connection(("127.0.0.1", port), timeout=10)
        polling.sendall(LONG_POLL)
        time.sleep(0.5)  # the long-poll reaches the upstream
        started = time.monotonic()
        edge.popen.send_signal(signal.SIGTERM)
        processes.wait_until(lambda: "drain for up to" in edge.log())

        # The idle keep-alive connection is closed at once.
        assert idle.recv(1) == b""
        # New connections are refused.
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            raise AssertionError("a new connection was accepted while draining")
        except ConnectionRefusedError:
            pass
        # The long-poll completes, as the last response on its connection.
        answer = read_response(polling)
        assert answer.status == 200
        assert answer.body == b'{"slow": true}'
        assert answer.header("Connection") == "close"
        assert polling.recv(1) == b""
        assert edge.popen.wait(10) == 0
        assert time.monotonic() - started < 10
