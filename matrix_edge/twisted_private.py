"""The private parts of Twisted the edge still relies on, in one place;
tests/unit/test_twisted_private.py fails if a Twisted release removes them.

Three remain: the send buffer of Twisted's TCP connections, which
L{write_eagerly} bypasses while it is empty; twistd's choice of log
observer, which ``log_level`` filters; and the signal twistd re-raises at
exit, which a graceful stop clears (L{exit_cleanly}).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp


def write_eagerly(transport: object) -> None:
    """Make a TCP connection send what it is given at once when nothing is
    waiting in its buffer, rather than on the reactor's next turn.

    Twisted's connection queues every write, asks epoll to report the
    socket writable, and sends on the next turn: two epoll_ctl calls and a
    turn for every response. Sending at once costs one send() and no epoll
    change; what the kernel does not take is queued the usual way, with
    producers paused as before. Other transports are left as they are.
    """
    if not isinstance(transport, tcp.Connection):
        return
    connection: Any = transport
    sock = connection.socket
    queue = connection.write

    def write(data: bytes) -> None:
        if (
            data
            and not connection._tempDataBuffer
            and connection.offset == len(connection.dataBuffer)
            and connection.connected
            and not connection.disconnecting
        ):
            try:
                sent = sock.send(data)
            except OSError:
                # EAGAIN, or an error the queued write reports in its turn.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        queue(data)

    def write_sequence(parts: Iterable[bytes]) -> None:
        write(b"".join(parts))

    connection.write = write
    connection.writeSequence = write_sequence


def exit_cleanly(reactor: Any) -> None:
    """Make twistd exit 0 after a SIGTERM or SIGINT that stopped the edge
    gracefully. The reactor records the signal that stopped it, and twistd
    kills itself with it once the reactor is done, so that its exit status
    says "killed by SIGTERM" even when every request was answered."""
    if hasattr(reactor, "_exitSignal"):
        reactor._exitSignal = None


def twistd_default_observer(server_options: Any) -> Any:
    """The log observer twistd builds when no ``--logger`` is given, by
    twistd's own code: stdout, the rotated ``--logfile`` (with its SIGUSR1
    handler) or syslog, and the same refusal of ``--logfile -`` when
    daemonising."""
    from twisted.scripts.twistd import _SomeApplicationRunner

    logger = _SomeApplicationRunner.loggerFactory(server_options)
    return logger._getLogObserver()
