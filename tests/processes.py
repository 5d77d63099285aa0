"""Running matrix-edge (and its test upstream) as real processes, the way
operators do, and reading their memory use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import attrs
import yaml

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    process: subprocess.Popen | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


@attrs.define
class Process:
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start(argv: Sequence[str], log_path: Path) -> Process:
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the child
    env = dict(os.environ, PYTHONPATH=str(REPO))
    popen = subprocess.Popen(
        list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env
    )
    log.close()
    return Process(popen, log_path)


def start_upstream(port: int, log_path: Path, name: str = "yes") -> Process:
    """A recording upstream (tests/recording_upstream.py) answering with
    ``X-Upstream: name``."""
    process = start(
        [sys.executable, "-m", "tests.recording_upstream", str(port), name],
        log_path,
    )
    wait_for_port(port, process=process.popen)
    return process


def run_command(*args: str) -> subprocess.CompletedProcess[str]:
    """``twistd -n --pidfile= matrix-edge ARGS`` run to its end, as an
    operator runs ``--check-config`` or a command (``revoke``, ``routes``),
    with what it prints."""
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "matrix-edge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def write_config(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


def start_edge(
    config_path: Path, log_path: Path, wait: tuple[str, int] | None = None
) -> Process:
    process = start(
        [TWISTD, "-n", "--pidfile=", "matrix-edge", "--config", str(config_path)],
        log_path,
    )
    if wait is not None:
        try:
            wait_for_port(wait[1], wait[0], process=process.popen)
        except Exception:
            process.stop()
            raise RuntimeError("matrix-edge did not start:\n" + process.log()) from None
    return process


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def wait_until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


@contextmanager
def edge_before_upstream(
    tmp_path: Path, **settings: object
) -> Iterator[tuple[int, Process]]:
    """An edge before a recording upstream, with ``settings`` in its config,
    stopped with the upstream on leaving; yields its port and process."""
    upstream_port = free_port()
    port = free_port()
    config = write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            **settings,
        },
    )
    upstream = start_upstream(upstream_port, tmp_path / "upstream.log")
    try:
        edge = start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
        try:
            yield port, edge
        finally:
            edge.stop()
    finally:
        upstream.stop()
