"""A listener's open client connections, for a graceful stop or a reload."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from twisted.internet.defer import Deferred, succeed


class Drainable(Protocol):
    def drain(self) -> None:
        """Take no new request; close once those in progress are answered
        (at once, with none)."""

    def retire(self) -> None:
        """A reload replaced this listener's configuration: finish what is
        in progress, then close, without cutting a request a client may be
        sending right now."""

    def abort(self) -> None:
        """Close now, whatever is in progress."""


class ClientConnections:
    """The client connections of one listener whose protocol (HTTP/1.1 or
    HTTP/2) is running. Once draining or retired, a connection that opens
    (its TLS handshake was under way) is told the same at once."""

    def __init__(self) -> None:
        self._open: set[Drainable] = set()
        self._waiting: list[Deferred[None]] = []
        self.draining = False
        self.retired = False

    def add(self, connection: Drainable) -> None:
        self._open.add(connection)
        if self.draining:
            connection.drain()
        elif self.retired:
            connection.retire()

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
        return self._all_closed()

    def retire(self) -> Deferred[None]:
        """Retire every connection; fires when the last one has closed.
        Connections that stay idle close at their idle timeout, or when a
        L{drain} follows."""
        self.retired = True
        for connection in list(self._open):
            connection.retire()
        return self._all_closed()

    def _all_closed(self) -> Deferred[None]:
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
