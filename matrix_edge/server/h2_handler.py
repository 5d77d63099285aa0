"""An HTTP/2 stream as the client side of the edge's request object.

The HTTP/2 protocol hands over one complete, checked request head; this
makes it the same ``EdgeRequest`` that HTTP/1.1 requests are, feeds it the
body and its end, and carries its answer back onto the stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure

from matrix_edge.errors import MatrixError
from matrix_edge.server.fields import Field, HeaderFields
from matrix_edge.server.h2 import ErrorCodes, H2Stream
from matrix_edge.server.h2_head import RequestHead
from matrix_edge.server.request import EdgeRequest

if TYPE_CHECKING:
    from matrix_edge.server.site import EdgeSite

HTTP2 = b"HTTP/2"


class H2RequestHandler:
    """Handles one stream (see ``StreamHandler``), and is the client side
    of its request (see ``ClientSide``)."""

    lingers = False

    def __init__(self, stream: H2Stream, site: EdgeSite):
        self.stream = stream
        self._site = site
        self.request: EdgeRequest | None = None

    # The stream's events ----------------------------------------------------

    def head_received(self, head: RequestHead, ended: bool) -> None:
        self._start(head.method, head.target, head.headers, head.content_length, ended)

    def head_refused(
        self, method: bytes, target: bytes, error: MatrixError, ended: bool
    ) -> None:
        # The request object answers it, so that it is logged with its
        # request ID like any other refusal.
        self._start(method, target, [], 0 if ended else None, ended, error)

    def _start(
        self,
        method: bytes,
        target: bytes,
        headers: list[Field],
        length: int | None,
        ended: bool,
        error: MatrixError | None = None,
    ) -> None:
        peer = getattr(self.stream.getPeer(), "host", "")
        request = self.request = EdgeRequest(
            self._site,
            self,
            method,
            target,
            HTTP2,
            HeaderFields(headers),
            length,
            peer,
        )
        request.start(error)
        if ended:
            request.body_ended()

    def data_received(self, data: bytes) -> None:
        if self.request is not None:
            self.request.body_chunk(data)

    def ended(self) -> None:
        if self.request is not None:
            self.request.body_ended()

    def reset(self, reason: Failure) -> None:
        request = self.request
        if request is not None and not request.finished:
            request.connection_lost(reason)

    # The request's client side ----------------------------------------------

    def send_head(
        self, code: int, phrase: bytes, headers: list[Field], length: int | None
    ) -> None:
        fields = [(name.lower(), value) for name, value in headers]
        if length is not None and code != 204:
            fields.append((b"content-length", b"%d" % length))
        self.stream.send_head(code, fields)

    def send_data(self, data: bytes) -> None:
        self.stream.send_data(data)

    def send_end(self) -> None:
        self.stream.end()

    def flush(self) -> None:
        self.stream.flush()

    def done(self) -> None:
        pass

    def register_producer(self, producer: IPushProducer) -> None:
        self.stream.register_producer(producer)

    def unregister_producer(self) -> None:
        self.stream.unregister_producer()

    def pause_reading(self) -> None:
        self.stream.pause_reading()

    def resume_reading(self) -> None:
        self.stream.resume_reading()

    def close_after_response(self) -> None:
        # The stream ends by itself; other streams on the connection go on.
        pass

    def stop_lingering(self) -> None:
        self.stream.reset(ErrorCodes.NO_ERROR)

    def abort(self) -> None:
        self.stream.reset(ErrorCodes.CANCEL)

    def cut_short(self) -> None:
        # Without END_STREAM, an HTTP/2 response is never complete.
        self.stream.reset(ErrorCodes.INTERNAL_ERROR)
