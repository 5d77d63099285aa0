"""Several processes serving the same listeners, to use every core.

The first process binds the listening sockets (as root, if it must), then
starts ``processes - 1`` children that inherit sockets bound to the same
ports with SO_REUSEPORT: the kernel spreads new connections evenly over
the processes. The first process
serves too, relays the children' logs into its own (each event once, marked
with the child, see L{matrix_edge.logs}), passes SIGHUP on, and stops them
when it stops, so one pidfile and one supervisor entry cover them all.

With metrics, each child also gets a loopback socket of its own, bound
here on a free port, where it serves its metrics for the first process to
gather (L{matrix_edge.metrics.aggregate}); L{ProcessSupervisor.children}
says which children run and where.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge.logs import relayed_event

log = Logger()

# A child that dies is started again after this long, doubling up to the
# maximum while it keeps dying.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
STOP_TIMEOUT = 10.0


@attrs.frozen
class InheritedSocket:
    """A listening socket handed to a child: which listener and address it
    is for, and its file descriptor in the child."""

    listener: int
    address: str
    fd: int

    def to_arg(self) -> str:
        return f"{self.listener}/{self.address}/{self.fd}"

    @classmethod
    def from_arg(cls, text: str) -> InheritedSocket:
        listener, address, fd = text.split("/")
        return cls(int(listener), address, int(fd))


METRICS_HOST = "127.0.0.1"


def metrics_socket() -> socket.socket:
    """A listening loopback socket on a free port, for a child's metrics."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((METRICS_HOST, 0))
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


class _Child(ProcessProtocol):
    def __init__(self, index: int, on_exit: Callable[[_Child, Failure], None]):
        self.index = index
        self._on_exit = on_exit
        self._log = Logger(namespace=f"matrix_edge.child.{index}")
        self._partial = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()
        self.metrics_address: tuple[str, int] | None = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """The child's log events on stdout, one JSON object a line, are
        published here as they were logged there; anything else it prints
        (a crash before its log is set up) is logged as text, at ERROR when
        it came on stderr."""
        *lines, self._partial[childFD] = (self._partial.get(childFD, b"") + data).split(
            b"\n"
        )
        for raw in lines:
            if not raw:
                continue
            line = raw.decode("utf-8", "replace")
            event = relayed_event(line, self.index) if childFD == 1 else None
            if event is not None:
                self._log.observer(event)
            elif childFD == 1:
                self._log.info("{line}", line=line)
            else:
                self._log.error("{line}", line=line)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self._on_exit(self, reason)


class ProcessSupervisor(Service):
    """Starts, restarts, signals and stops the child processes."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        config_path: str,
        sockets: Callable[[], Sequence[tuple[int, str, socket.socket]]],
        metrics: bool = False,
    ):
        """
        @param count: the number of children besides this process.
        @param sockets: called for each child started, once the listeners
            are bound, giving (listener index, address, listening socket)
            for the child; they are closed here once it has them.
        @param metrics: give each child a socket to serve its metrics on.
        """
        self._reactor = reactor
        self._count = count
        self._config_path = config_path
        self._sockets = sockets
        self._metrics = metrics
        self._workers: dict[int, _Child] = {}
        self._delays: dict[int, float] = {}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self._count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        inherited = []
        sockets = self._sockets()
        for n, (listener, address, sock) in enumerate(sockets):
            child_fds[3 + n] = sock.fileno()
            inherited.append(InheritedSocket(listener, address, 3 + n).to_arg())
        handed = [sock for _, _, sock in sockets]
        child = _Child(index, self._exited)
        extra = []
        if self._metrics:
            metrics = metrics_socket()
            handed.append(metrics)
            fd = 3 + len(sockets)
            child_fds[fd] = metrics.fileno()
            extra = ["--metrics-socket", str(fd)]
            child.metrics_address = (METRICS_HOST, metrics.getsockname()[1])
        args = [
            sys.executable,
            "-m",
            "matrix_edge.child",
            "--config",
            self._config_path,
            "--index",
            str(index),
            *(arg for socket in inherited for arg in ("--socket", socket)),
            *extra,
        ]
        try:
            transport = self._reactor.spawnProcess(
                child, sys.executable, args, env=os.environ.copy(), childFDs=child_fds
            )
        finally:
            # The child has its copies; a child's own sockets must close
            # with it, so that the kernel stops giving them connections.
            for sock in handed:
                sock.close()
        self._workers[index] = child
        log.info("Started child {index} (pid {pid})", index=index, pid=transport.pid)

    def _exited(self, child: _Child, reason: Failure) -> None:
        if self._workers.get(child.index) is child:
            del self._workers[child.index]
        if not self.running:
            return
        delay = self._delays.get(child.index, RESTART_DELAY)
        self._delays[child.index] = min(delay * 2, MAX_RESTART_DELAY)
        log.warn(
            "Child {index} exited ({reason}); starting it again in {delay}s",
            index=child.index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._reactor.callLater(delay, self._respawn, child.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self._workers:
            self._spawn(index)

    def children(self) -> list[tuple[int, tuple[str, int]]]:
        """The children running now, by index, with the address of their
        metrics socket (none without metrics)."""
        return [
            (index, child.metrics_address)
            for index, child in sorted(self._workers.items())
            if child.metrics_address is not None
        ]

    def signal_all(self, signum: int) -> None:
        for child in self._workers.values():
            if child.transport is not None:
                child.transport.signalProcess(signum)

    def reload(self) -> bool:
        """Pass SIGHUP on to every child."""
        self.signal_all(signal.SIGHUP)
        return True

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        children = list(self._workers.values())
        self.signal_all(signal.SIGTERM)
        ended = DeferredList([w.ended for w in children])

        def kill_stragglers() -> None:
            self.signal_all(signal.SIGKILL)

        call = self._reactor.callLater(STOP_TIMEOUT, kill_stragglers)

        def done(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        return ended.addBoth(done)
