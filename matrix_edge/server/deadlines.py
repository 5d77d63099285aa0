"""Deadlines of client connections, kept by one timer per site and kind.

A site keeps two: from a request's first byte to the end of its headers
(a client trickling its headers, slowloris, is bounded by it), and the
idle time between requests on a keep-alive connection. One timer for all
connections, rather than one set and cancelled per request, keeps the cost
per request to two dict updates each.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

T = TypeVar("T", bound=Hashable)


class Deadlines(Generic[T]):
    """Calls ``expired(connection)`` for each connection started and not
    stopped within ``seconds``."""

    def __init__(
        self, clock: IReactorTime, seconds: float, expired: Callable[[T], None]
    ):
        self._clock = clock
        self._seconds = seconds
        self._expired = expired
        # Insertion order is start order: the oldest comes first.
        self._started: dict[T, float] = {}
        self._timer: IDelayedCall | None = None

    def start(self, connection: T) -> None:
        if connection in self._started:
            return
        self._started[connection] = self._clock.seconds()
        if self._timer is None:
            self._timer = self._clock.callLater(self._seconds, self._sweep)

    def stop(self, connection: T) -> None:
        self._started.pop(connection, None)

    def _sweep(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        while self._started:
            connection, since = next(iter(self._started.items()))
            if now - since < self._seconds:
                self._timer = self._clock.callLater(
                    since + self._seconds - now, self._sweep
                )
                return
            del self._started[connection]
            self._expired(connection)

    def __len__(self) -> int:
        return len(self._started)
