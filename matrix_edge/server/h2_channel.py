"""An HTTP/2 stream as the channel of the edge's request object.

The HTTP/2 protocol hands over one complete, checked request head; this
gives it to the same ``EdgeRequest`` that HTTP/1.1 requests are, through the
same three steps (headers with the body length, body chunks, end), and
carries the request's response back onto the stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from matrix_edge.http.errors import MatrixError
from matrix_edge.server.h2 import ErrorCodes, H2Stream
from matrix_edge.server.h2_head import RequestHead

if TYPE_CHECKING:
    from matrix_edge.http.site import EdgeRequest, EdgeSite

HTTP2 = b"HTTP/2"


class H2RequestChannel:
    """Handles one stream: the request's channel, as twisted.web's request
    class expects of one, and the stream's handler."""

    def __init__(self, stream: H2Stream, site: EdgeSite):
        self.stream = stream
        self.site = self.factory = site
        self.transport = None
        self.request: EdgeRequest | None = None
        self.method = b""
        self.target = b""

    # The stream's events ----------------------------------------------------

    def head_received(self, head: RequestHead, ended: bool) -> None:
        self.method, self.target = head.method, head.target
        request = self.request = self.site.requestFactory(self)
        headers = request.requestHeaders
        for name, value in head.headers:
            headers.addRawHeader(name, value)
        self._start(request, head.content_length, ended)

    def head_refused(
        self, method: bytes, target: bytes, error: MatrixError, ended: bool
    ) -> None:
        # The request object answers it, so that it is logged with its
        # request ID like any other refusal.
        self.method, self.target = method, target
        request = self.request = self.site.requestFactory(self)
        request.head_error = error
        self._start(request, 0 if ended else None, ended)

    def _start(self, request: EdgeRequest, length: int | None, ended: bool) -> None:
        """The request's first steps, as HTTP/1.1's channel takes them."""
        request.gotLength(length)
        if ended:
            request.requestReceived(self.method, self.target, HTTP2)

    def data_received(self, data: bytes) -> None:
        if self.request is not None:
            self.request.handleContentChunk(data)

    def ended(self) -> None:
        if self.request is not None:
            self.request.requestReceived(self.method, self.target, HTTP2)

    def reset(self, reason: Failure) -> None:
        request = self.request
        if request is not None and not request.finished:
            request.connectionLost(reason)

    # What the request needs of its channel ----------------------------------

    def getPeer(self) -> IAddress:
        return self.stream.getPeer()

    def getHost(self) -> IAddress:
        return self.stream.getHost()

    def isSecure(self) -> bool:
        # HTTP/2 is offered only over TLS.
        return True

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Headers
    ) -> None:
        self.stream.send_head(
            int(code),
            [
                (name.lower(), value)
                for name, values in headers.getAllRawHeaders()
                for value in values
            ],
        )

    def write(self, data: bytes) -> None:
        self.stream.send_data(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.stream.send_data(b"".join(data))

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.stream.register_producer(producer)

    def unregisterProducer(self) -> None:
        self.stream.unregister_producer()

    def requestDone(self, request: Any) -> None:
        self.stream.end()

    def loseConnection(self) -> None:
        self.stream.end()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Called by twisted.web's request for a body it cannot parse (a
        # form posted to a local resource).
        self.stream.reset(ErrorCodes.PROTOCOL_ERROR)
