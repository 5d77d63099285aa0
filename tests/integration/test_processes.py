"""``processes: 2``: workers share the listening sockets, take traffic,
get SIGHUP and stop with the first process."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from tests import processes
from tests.rawhttp import exchange


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def test_two_processes_share_the_listeners(tmp_path: Path) -> None:
    upstream_port = processes.free_port()
    port = processes.free_port()
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1", "::1"]}],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "processes": 2,
        },
    )
    upstream = processes.start_upstream(upstream_port, tmp_path / "upstream.log")
    edge = processes.start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
    try:
        _wait_for(lambda: "Started child 1" in edge.log())
        worker_pid = int(
            re.search(r"Started child 1 \(pid (\d+)\)", edge.log()).group(1)
        )
        _wait_for(
            lambda: (
                "[child-1 matrix_edge.listening#info] Listening on ::1" in edge.log()
            )
        )
        request = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"

        def served_by_both() -> bool:
            # New connections, so the kernel may hand them to either process.
            assert exchange(port, request).status == 200
            assert exchange(port, request, host="::1").status == 200
            log = edge.log()
            own = len(re.findall(r"\[matrix_edge\.access\.client-\d+#info\]", log))
            worker = len(
                re.findall(r"\[child-1 matrix_edge\.access\.client-\d+#info\]", log)
            )
            return own > 0 and worker > 0

        _wait_for(served_by_both)

        os.kill(edge.pid, signal.SIGHUP)
        _wait_for(
            lambda: re.search(
                r"\[child-1 matrix_edge\.tls#info\] Reloading", edge.log()
            )
        )

        edge.stop()
        _wait_for(lambda: not _alive(worker_pid))
        assert "Traceback" not in edge.log()
        # A worker's line is prefixed once, by the first process's log, with
        # the worker's own namespace and level.
        worker_lines = [line for line in edge.log().splitlines() if "child-1" in line]
        assert worker_lines
        for line in edge.log().splitlines():
            assert re.match(r"\S+ \[[^\]]+\] (?!\[)", line), line
    finally:
        edge.stop()
        upstream.stop()


def test_workers_write_json_lines_to_the_access_log_file(tmp_path: Path) -> None:
    upstream_port = processes.free_port()
    port = processes.free_port()
    access = tmp_path / "access.log"
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "processes": 2,
            "access_log": {"format": "json", "path": str(access)},
        },
    )
    upstream = processes.start_upstream(upstream_port, tmp_path / "upstream.log")
    edge = processes.start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
    try:
        _wait_for(
            lambda: "[child-1 matrix_edge.listening#info] Listening" in edge.log()
        )
        request = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"

        def twenty_written() -> bool:
            # A new connection each time: the kernel spreads them over both
            # processes, which append to the same file.
            assert exchange(port, request).status == 200
            if not access.exists():
                return False
            ids = {
                json.loads(line)["request_id"]
                for line in access.read_text().splitlines()
            }
            return len(ids) >= 20

        _wait_for(twenty_written)
    finally:
        edge.stop()
        upstream.stop()
    lines = access.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert {type(e["status"]) for e in entries} == {int}
    assert {e["status"] for e in entries} == {200}
    # Each line is whole: neither process's writes split the other's.
    assert all(line.startswith('{"time": ') and line.endswith("}") for line in lines)


def test_a_worker_that_dies_is_started_again(tmp_path: Path) -> None:
    port = processes.free_port()
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
            "upstream": "http://127.0.0.1:1",
            "processes": 2,
        },
    )
    edge = processes.start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
    try:
        _wait_for(lambda: "Started child 1" in edge.log())
        first = int(re.search(r"Started child 1 \(pid (\d+)\)", edge.log()).group(1))
        os.kill(first, signal.SIGKILL)
        _wait_for(
            lambda: len(re.findall(r"Started child 1 \(pid (\d+)\)", edge.log())) == 2
        )
        assert "Child 1 exited" in edge.log()
    finally:
        edge.stop()
