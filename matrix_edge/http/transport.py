"""The typed view of a client connection's transport."""

from __future__ import annotations

from typing import Protocol, cast

from twisted.web.http import HTTPChannel


class ClientTransport(Protocol):
    """What the edge uses of a client connection's transport (TCP or TLS):
    writing, closing, and pausing reads for back-pressure."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


def client_transport(channel: HTTPChannel) -> ClientTransport:
    assert channel.transport is not None
    return cast(ClientTransport, channel.transport)
