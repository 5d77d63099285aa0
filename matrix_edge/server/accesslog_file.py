"""An access log file of its own, written in batches.

Through twisted.logger every line is formatted as an event and written and
flushed on its own, which costs more than the rest of a small request's
logging. Here lines are timestamped from a per-second cache (JSON records
carry their own time and are written as they are) and written together when
64 KiB have gathered or a second has passed, as nginx's
``access_log ... buffer= flush=`` does.

SIGHUP reopens the file at its path (L{AccessLogFile.reopen}), which is
what logrotate's ``postrotate`` step asks for.
"""

from __future__ import annotations

import time
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger()

FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 1.0


class AccessLogFile(Service):
    def __init__(self, clock: Any, path: str):
        self._clock = clock
        self.path = path
        self._file: IO[str] | None = None
        self._lines: list[str] = []
        self._size = 0
        self._timer: IDelayedCall | None = None
        self._second = -1
        self._stamp = ""

    def startService(self) -> None:
        super().startService()
        self._open()

    def stopService(self) -> None:
        super().stopService()
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def write_line(self, line: str) -> None:
        """Add C{line} after the time, as twistd's log lines have it."""
        now = self._clock.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        self._append(f"{self._stamp} {line}\n")

    def write_record(self, line: str) -> None:
        """Add C{line}, a JSON object with its own time, as it is: the file
        is then JSON Lines."""
        self._append(line + "\n")

    def _append(self, entry: str) -> None:
        self._lines.append(entry)
        self._size += len(entry)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._lines or self._file is None:
            return
        lines, self._lines, self._size = self._lines, [], 0
        try:
            self._file.write("".join(lines))
            self._file.flush()
        except OSError as e:
            log.error("Cannot write the access log {path}: {e}", path=self.path, e=e)

    def reopen(self) -> bool:
        """Start a new file at the same path (after logrotate moved it)."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        return self._open()

    def _open(self) -> bool:
        try:
            # Line-oriented appends: several processes may share the file.
            self._file = open(self.path, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
        except OSError as e:
            log.error("Cannot open the access log {path}: {e}", path=self.path, e=e)
            return False
        return True
