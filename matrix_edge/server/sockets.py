"""What the edge's protocols use of their connections: the transport's
methods, and socket options."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet.interfaces import IAddress


class ClientTransport(Protocol):
    """What the client protocols use of Twisted's TCP transport and of the
    TLS layer in front of it."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Iterable[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def getHost(self) -> IAddress: ...


def set_no_delay(transport: object) -> None:
    """Turn off Nagle's algorithm on a TCP transport, through any TLS or
    PROXY-protocol wrapper (they pass attribute lookups down); a UNIX
    socket has nothing to turn off.

    Small writes (responses, HTTP/2 window updates) then go out at once;
    with Nagle they can wait for the peer's delayed ACK, 40 ms here."""
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is not None:
        with contextlib.suppress(OSError):
            set_option(True)
