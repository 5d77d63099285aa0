"""A listener's open client connections, for a graceful stop or a reload."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from twisted.internet.defer import Deferred, succeed


class Drainable(Protocol):
    def drain(self) -> None:
        """Take no new request; close once those in progress are answered
        (at once, with none)."""

    def abort(self) -> None:
        """Close now, whatever is in progress."""


class ClientConnections:
    """The client connections of one listener whose protocol (HTTP/1.1 or
    HTTP/2) is running. Once draining, a connection that opens is told to
    drain at once."""

    def __init__(self) -> None:
        self._open: set[Drainable] = set()
        self._waiting: list[Deferred[None]] = []
        self.draining = False

    def add(self, connection: Drainable) -> None:
        self._open.add(connection)
        if self.draining:
            connection.drain()

    def remove(self, connection: Drainable) -> None:
        self._open.discard(connection)
        if not self._open and self._waiting:
            waiting, self._waiting = self._waiting, []
            for done in waiting:
                done.callback(None)

    def drain(self) -> Deferred[None]:
        """Drain every connection; fires when the last one has closed."""
        self.draining = True
        for connection in list(self._open):
            connection.drain()
        if not self._open:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiting.append(done)
        return done

    def abort(self) -> None:
        for connection in list(self._open):
            connection.abort()

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Drainable]:
        """The open connections, as they are now (for metrics)."""
        return iter(list(self._open))
