"""Starting pinned processes, stopping them by PID, and reading their cost
from /proc.

Every process the suite starts is registered here, so that one call stops
them all on the way out, after an error or Ctrl-C as after a normal run.
Costs are read over a process's whole tree (an nginx master and its worker
count as one proxy).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Servers (the upstreams and the proxy under test) share CPU 0; the load
# generators get CPU 1, so that no proxy competes with the load it serves.
SERVER_CPU = "0"
CLIENT_CPU = "1"

# Enough descriptors for 10,000 parked connections on each side of a proxy.
OPEN_FILES = 65536

_started: list[subprocess.Popen[bytes]] = []


def raise_open_files_limit(limit: int = OPEN_FILES) -> None:
    """Raise RLIMIT_NOFILE for this process and the children it starts.

    The hard limit can only be raised as root; otherwise the soft limit goes
    as high as the hard one allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= limit:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(hard, limit)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def max_proxied_connections() -> int:
    """How many client connections a proxy can hold, each with its own
    upstream connection, within the open-files limit (a few descriptors are
    kept for listeners, logs and nginx's own accounting)."""
    return (open_files_limit() - 200) // 2


def start(
    argv: Sequence[str],
    log_path: Path,
    cpu: str = SERVER_CPU,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start C{argv} pinned to C{cpu}, output appended to C{log_path}.

    ``taskset`` execs the program, so the PID returned is the program's own.
    The child gets its own session: a Ctrl-C in the terminal reaches only
    this process, which then stops its children in order.
    """
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
    try:
        process = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            stdin=stdin,
            stdout=log if stdout is None else stdout,
            stderr=log,
            start_new_session=True,
        )
    finally:
        log.close()
    _started.append(process)
    return process


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop one started process and whatever it started, by PID."""
    if process.poll() is None:
        descendants = process_tree(process.pid)[1:]
        _signal(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(process.pid, signal.SIGKILL)
            process.wait(timeout)
        for pid in descendants:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
    if process in _started:
        _started.remove(process)


def stop_all() -> None:
    """Stop every process still registered, the most recent first."""
    for process in reversed(list(_started)):
        try:
            stop(process)
        except Exception as e:  # keep stopping the others
            print(f"bench: could not stop PID {process.pid}: {e}")


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_tree(pid: int) -> list[int]:
    """C{pid} and all of its descendants, parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(sorted(children.get(current, [])))
    return tree


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, so that field 0 is
    the state and field 1 the parent PID; None once the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User plus system CPU time of C{pid}'s tree (or of C{pid} alone), all
    threads included."""
    total = 0
    for member in process_tree(pid) if tree else [pid]:
        stat = _read_stat(member)
        if stat is not None:
            # utime and stime are fields 14 and 15 of stat(5), 12 and 13 here.
            total += int(stat[11]) + int(stat[12])
    return total / CLOCK_TICKS


def _kib_field(path: str, field: str) -> int:
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """Resident memory of C{pid}'s tree in KiB (``Rss`` of smaps_rollup)."""
    return sum(_kib_field(f"/proc/{p}/smaps_rollup", "Rss") for p in process_tree(pid))


def pss_kib(pid: int) -> int:
    """Proportional memory of C{pid}'s tree in KiB: pages shared between an
    nginx master and its worker are counted once."""
    return sum(_kib_field(f"/proc/{p}/smaps_rollup", "Pss") for p in process_tree(pid))


def peak_rss_kib(pid: int) -> int:
    """Sum over C{pid}'s tree of each process's peak resident memory
    (``VmHWM``) in KiB."""
    return sum(_kib_field(f"/proc/{p}/status", "VmHWM") for p in process_tree(pid))


def reset_peak_rss(pid: int) -> None:
    """Reset ``VmHWM`` to the current RSS for C{pid}'s tree (clear_refs 5),
    so that a later peak belongs to what ran in between."""
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{member}/clear_refs").write_text("5")


def wait_for(
    predicate: Callable[[], object], timeout: float, interval: float = 0.1
) -> bool:
    """Poll C{predicate} until it returns true or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
