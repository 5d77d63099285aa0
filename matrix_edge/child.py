"""Entry point of a child process (``processes`` > 1): serves the same
configuration on listening sockets inherited from the first process."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import suppress
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone, ReactorNotRunning
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from matrix_edge.config.edge import load_config
from matrix_edge.logs import child_log_observer
from matrix_edge.processes import InheritedSocket


@implementer(IReadDescriptor)
class _ParentWatch:
    """The first process holds our stdin open; when it goes, so do we."""

    def __init__(self) -> None:
        os.set_blocking(0, False)

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "parent"

    def doRead(self) -> Failure | None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        return None if data else Failure(ConnectionDone())

    def connectionLost(self, reason: Failure) -> None:
        the_reactor.removeReader(self)
        with suppress(ReactorNotRunning):
            the_reactor.stop()


the_reactor: Any = reactor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="matrix_edge.child")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--socket", action="append", default=[])
    parser.add_argument("--metrics-socket", type=int, default=None)
    args = parser.parse_args(argv)

    config = load_config(args.config)
    # Events go to the first process as JSON, which formats them once, in
    # its own log, as its own.
    globalLogBeginner.beginLoggingTo(
        [child_log_observer(sys.stdout, config.log_level)], redirectStandardIO=False
    )
    from matrix_edge.service import freeze_startup_objects, make_service

    inherited = [InheritedSocket.from_arg(text) for text in args.socket]
    service = make_service(
        config,
        the_reactor,
        args.config,
        inherited=inherited,
        process=args.index,
        metrics_fd=args.metrics_socket,
    )
    the_reactor.addReader(_ParentWatch())
    service.privilegedStartService()
    service.startService()
    the_reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    the_reactor.callWhenRunning(freeze_startup_objects)
    the_reactor.run()


if __name__ == "__main__":
    main()
