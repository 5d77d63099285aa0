"""Processes the suite starts: each one is recorded by PID, its output goes
to a log file, and all are stopped by PID when the suite ends."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs

T = TypeVar("T")

STOP_GRACE_SECONDS = 10.0


class ProcessDied(AssertionError):
    pass


class NotReady(AssertionError):
    pass


@attrs.define
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def check_running(self) -> None:
        if not self.running():
            raise ProcessDied(
                f"{self.name} (pid {self.pid}) exited with status "
                f"{self.popen.returncode}\n{tail(self.log_path)}"
            )


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"--- {path}: {e}"
    kept = text.splitlines()[-lines:]
    return f"--- last {len(kept)} lines of {path}:\n" + "\n".join(kept)


class ProcessGroup:
    """Starts processes and remembers them so that ``stop_all`` can end each
    one by its PID: SIGTERM first, SIGKILL after a grace period."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.processes: list[Process] = []
        self.extra_logs: list[Path] = []
        # The session fixture stops them; this is for an interpreter that
        # exits without running fixture finalizers.
        atexit.register(self.stop_all)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> Process:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=log if stdout is None else stdout,
                stderr=log,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                # Not in our process group, so a terminal's Ctrl-C reaches
                # only pytest; the finalizers then stop each one by PID.
                start_new_session=True,
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        """SIGTERM to each process still running, by PID; SIGKILL to those
        still there after the grace period. Safe to call more than once."""
        running = [p for p in reversed(self.processes) if p.running()]
        for process in running:
            os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in running:
            try:
                process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.popen.wait()

    def stop(self, process: Process, grace: float = STOP_GRACE_SECONDS) -> int:
        """Stop one process by its PID: SIGTERM, then SIGKILL if it is still
        there after ``grace`` seconds. Return its exit status."""
        if process.running():
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.popen.wait()
        return process.popen.returncode

    def logs(self) -> list[Path]:
        return [p.log_path for p in self.processes] + self.extra_logs

    def tails(self, lines: int = 40) -> str:
        return "\n".join(tail(path, lines) for path in self.logs())


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    watch: Sequence[Process] = (),
    interval: float = 0.1,
) -> T:
    """Call ``probe`` until it returns something other than None (exceptions
    count as not yet), failing at once if a watched process dies and after
    ``timeout`` seconds otherwise."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        for process in watch:
            process.check_running()
        try:
            result = probe()
        except Exception as e:
            last_error = e
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise NotReady(
                f"gave up waiting {timeout:.0f}s for {what}; last error: {last_error!r}"
            )
        time.sleep(interval)
