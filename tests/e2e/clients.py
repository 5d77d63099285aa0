"""The test side of client_driver.py: start it in the suite's virtualenv and
call its operations, each with a time bound."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.processes import Process, ProcessGroup

DRIVER = Path(__file__).resolve().parent / "client_driver.py"
DEFAULT_TIMEOUT = 120.0


class ClientError(AssertionError):
    """An operation the homeserver refused, or that broke."""

    def __init__(self, op: str, answer: dict[str, Any]):
        self.op = op
        self.answer = answer
        self.errcode = answer.get("errcode")
        self.status = answer.get("status")
        super().__init__(f"{op} failed: {answer.get('error')}")


class Clients:
    """A running client_driver.py and its named Matrix clients."""

    def __init__(self, group: ProcessGroup, python: Path, ca_file: Path):
        self.process: Process = group.start(
            "matrix-nio-clients",
            [str(python), str(DRIVER), str(ca_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._answers: queue.Queue[bytes] = queue.Queue()
        self._next_id = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        stdout = self.process.popen.stdout
        assert stdout is not None
        for line in stdout:
            self._answers.put(line)
        self._answers.put(b"")

    def call(self, op: str, timeout: float = DEFAULT_TIMEOUT, **args: Any) -> Any:
        """Run ``op`` and return its result; raise ClientError if it failed."""
        answer = self.try_call(op, timeout, **args)
        if not answer["ok"]:
            raise ClientError(op, answer)
        return answer["result"]

    def try_call(
        self, op: str, timeout: float = DEFAULT_TIMEOUT, **args: Any
    ) -> dict[str, Any]:
        """Run ``op`` and return the whole answer, failed or not."""
        with self._lock:
            self._next_id += 1
            command_id = self._next_id
            stdin = self.process.popen.stdin
            assert stdin is not None
            self.process.check_running()
            stdin.write(
                json.dumps({"id": command_id, "op": op, "args": args}).encode() + b"\n"
            )
            stdin.flush()
            deadline = time.monotonic() + timeout
            while True:
                try:
                    line = self._answers.get(
                        timeout=max(0.0, deadline - time.monotonic())
                    )
                except queue.Empty:
                    raise AssertionError(
                        f"client operation {op} gave no answer within {timeout:.0f}s"
                    ) from None
                if not line:
                    self.process.popen.wait(10)
                    self.process.check_running()
                answer: dict[str, Any] = json.loads(line)
                # Skip the late answer of an earlier call that timed out.
                if answer["id"] == command_id:
                    return answer
