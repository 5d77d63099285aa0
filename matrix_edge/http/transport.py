"""What the edge does to a client connection, for HTTP/1.1 and HTTP/2.

An HTTP/1.1 request owns its TCP connection while it is handled; an HTTP/2
request is one stream among several on a connection. Pausing, closing and
aborting mean different things for each, and are kept here.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from matrix_edge import twisted_private
from matrix_edge.server.h2 import ErrorCodes
from matrix_edge.server.h2_channel import H2RequestChannel


class _Transport(Protocol):
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class ClientSide(Protocol):
    """The client end of one request."""

    def request_line(self) -> tuple[bytes, bytes, bytes]:
        """Method, raw target and version, known before the body arrives."""

    def pause_reading(self) -> None:
        """Stop taking request body from the client (back-pressure)."""

    def resume_reading(self) -> None: ...

    def close_after_response(self, request: Request) -> None:
        """Make this the last response on the connection, where that is
        how an unread request body is disposed of."""

    @property
    def lingers(self) -> bool:
        """Whether a complete response waits for the rest of the request
        body before it counts as finished (HTTP/1.1, where the body must be
        read off the connection); HTTP/2 ends the stream at once."""

    def stop_lingering(self) -> None:
        """Give up on a request body that the client is still sending after
        its complete answer."""

    def abort(self) -> None:
        """Drop the exchange at once; the client sees it failed."""

    def cut_short(self, framed: bool) -> None:
        """End a response that cannot be completed, so that the client
        cannot take it for a whole one."""


def transport_of(channel: HTTPChannel) -> _Transport:
    assert channel.transport is not None
    return cast(_Transport, channel.transport)


class HTTP11Side:
    lingers = True

    def __init__(self, channel: HTTPChannel):
        self._channel = channel

    def request_line(self) -> tuple[bytes, bytes, bytes]:
        return twisted_private.request_line(self._channel)

    def pause_reading(self) -> None:
        transport_of(self._channel).pauseProducing()

    def resume_reading(self) -> None:
        transport_of(self._channel).resumeProducing()

    def close_after_response(self, request: Request) -> None:
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        self._channel.persistent = False

    def stop_lingering(self) -> None:
        transport_of(self._channel).loseConnection()

    def abort(self) -> None:
        transport_of(self._channel).abortConnection()

    def cut_short(self, framed: bool) -> None:
        # A framed response (chunked, or with a length) cut short by an
        # orderly close keeps what was sent readable, and is visibly
        # incomplete; an unframed one needs a reset, or its end would look
        # like the end of the body.
        if framed:
            transport_of(self._channel).loseConnection()
        else:
            self.abort()


class HTTP2Side:
    """One HTTP/2 stream. Its methods act on the stream alone: pausing
    withholds flow-control credit, aborting sends RST_STREAM."""

    lingers = False

    def __init__(self, channel: H2RequestChannel):
        self._channel = channel
        self._stream = channel.stream

    def request_line(self) -> tuple[bytes, bytes, bytes]:
        return self._channel.method, self._channel.target, b"HTTP/2"

    def pause_reading(self) -> None:
        self._stream.pause_reading()

    def resume_reading(self) -> None:
        self._stream.resume_reading()

    def close_after_response(self, request: Request) -> None:
        # The stream ends by itself; other streams on the connection go on.
        pass

    def stop_lingering(self) -> None:
        self._stream.reset(ErrorCodes.NO_ERROR)

    def abort(self) -> None:
        self._stream.reset(ErrorCodes.CANCEL)

    def cut_short(self, framed: bool) -> None:
        # Without END_STREAM, an HTTP/2 response is never complete.
        self._stream.reset(ErrorCodes.INTERNAL_ERROR)


def client_side(channel: Any) -> ClientSide:
    if isinstance(channel, H2RequestChannel):
        return HTTP2Side(channel)
    return HTTP11Side(channel)
