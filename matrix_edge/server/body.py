"""Streaming bodies through the proxy with back-pressure both ways."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

# Body bytes that may arrive before the upstream connection is ready to take
# them; beyond this the client socket stops being read.
PENDING_LIMIT = 64 * 1024


class ClientReading:
    """Pauses and resumes reading from the client's socket on behalf of more
    than one reason at a time (upstream back-pressure, a full pending
    buffer), reading again only once no reason remains."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]):
        self._pause = pause
        self._resume = resume
        self._reasons: set[str] = set()

    def hold(self, reason: str) -> None:
        if not self._reasons:
            self._pause()
        self._reasons.add(reason)

    def release(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons:
                self._resume()

    def release_all(self) -> None:
        if self._reasons:
            self._reasons.clear()
            self._resume()


@implementer(IPushProducer)
class RequestBody:
    """The client's request body, produced to the upstream connection as its
    chunks arrive instead of after the whole body has been read.

    The upstream transport pauses this producer when its send buffer fills;
    that stops reading the client's socket, so TCP slows the uploader down.
    """

    def __init__(self, length: int | None, reading: ClientReading):
        self.length = length
        """The Content-Length, or None for a chunked body."""
        self._reading = reading
        self._consumer: IConsumer | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._complete = False
        self._stopped = False
        self._done: Deferred[None] | None = None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        pending, self._pending, self._pending_size = self._pending, [], 0
        for chunk in pending:
            consumer.write(chunk)
        self._reading.release("pending")
        if self._complete:
            return succeed(None)
        self._done = Deferred()
        return self._done

    def write(self, data: bytes) -> None:
        """A chunk of the client's body arrived."""
        if self._stopped:
            return
        if self._consumer is None:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > PENDING_LIMIT:
                self._reading.hold("pending")
        else:
            self._consumer.write(data)

    def finish(self) -> None:
        """The client's body is complete: nothing more is held back for it."""
        self._complete = True
        self._reading.release_all()
        if self._done is not None:
            done, self._done = self._done, None
            done.callback(None)

    def fail(self, reason: Failure) -> None:
        """The client's body will never be complete (it went away)."""
        self.stopProducing()
        if self._done is not None:
            done, self._done = self._done, None
            done.errback(reason)

    def pauseProducing(self) -> None:
        self._reading.hold("upstream")

    def resumeProducing(self) -> None:
        self._reading.release("upstream")

    def stopProducing(self) -> None:
        # The upstream connection will take no more of the body (it
        # answered early, or failed): the rest of it is read and dropped.
        self._stopped = True
        self._pending = []
        self._reading.release_all()
