"""A lean HTTP/1.1 client connection to Synapse.

It writes the request line from the client's bytes, frames the body as it
streams, and parses the response just far enough to relay it: status,
headers, and where the body ends (length, chunks or close). One exchange
at a time; the connection is kept for the next one when both sides allow.
Twisted's generic client does the same job with several Deferreds, a
state-machine dispatcher and a producer proxy per request; on the forwarding
path that overhead was a large part of the edge's CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol as TypingProtocol
from typing import cast

import httptools
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from matrix_edge.server.body import RequestBody
from matrix_edge.server.sockets import set_no_delay
from matrix_edge.twisted_private import write_eagerly

HeaderList = list[tuple[bytes, bytes]]

# A response head larger than this is refused: Synapse sends a few hundred
# bytes.
MAX_HEAD_SIZE = 64 * 1024
_NO_BODY_CODES = frozenset({204, 304})


class ResponseHandler(TypingProtocol):
    """What an exchange reports to: one head, data, then one end; or, if no
    response came, one failure."""

    def response_head(
        self, code: int, phrase: bytes, headers: HeaderList, length: int | None
    ) -> None: ...

    def response_data(self, data: bytes) -> None: ...

    def response_flush(self) -> None:
        """One read of the response has been relayed, and more is to come:
        what the client side holds of it should go out now."""

    def response_end(self, complete: bool, reason: str) -> None: ...

    def upstream_failed(self, reason: Failure, timed_out: bool = False) -> None: ...


def _well_formed(head: bytes, line_count: int) -> bool:
    """Whether a request head has line breaks only where its lines end."""
    return (
        head.count(b"\n") == line_count
        and head.count(b"\r") == line_count
        and b"\0" not in head
    )


class _Malformed(Exception):
    """Raised from a parser callback: a response the edge must not relay
    (the upstream exchange fails with a 502)."""


# RFC 9110 section 5.5: control characters other than HTAB do not belong
# in a reason phrase either; llhttp lets them through.
_CONTROL = frozenset(range(0x20)) - {0x09} | {0x7F}


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp where it is."""


class UpstreamError(Exception):
    """Synapse's connection broke, or it answered something that is not
    HTTP/1.1, before the response could start."""

    cause = "malformed_response"
    """Why, in a word, for metrics."""


class UpstreamClosedEarly(UpstreamError):
    """The connection closed before a response began."""

    cause = "closed_early"


class UnsafeRequestHead(UpstreamError):
    """The request head was not sent: a field would have split it."""

    cause = "unsafe_request"


class UpstreamConnection(Protocol):
    """One keep-alive connection; see the module docstring."""

    def __init__(
        self,
        on_idle: Callable[[UpstreamConnection], None],
        on_lost: Callable[[UpstreamConnection], None],
    ):
        self._on_idle = on_idle
        self._on_lost = on_lost
        self._handler: ResponseHandler | None = None
        self._method = b""
        self._state = "idle"
        """idle, head (request sent, response head awaited), body (response
        head relayed), done, or closed."""
        self._parser = httptools.HttpResponseParser(self)
        self._head_size = 0
        self._phrase = b""
        self._headers: HeaderList = []
        self._message_done = False
        self._until_close = False
        self._stopped = False
        self._keep_alive = True
        self._body: RequestBody | None = None
        self._body_done = True
        self._head_started = False
        self.reused = False
        """Whether this connection served an exchange before (a stale
        keep-alive connection may have been closed by Synapse meanwhile)."""

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        write_eagerly(self.transport)

    # Sending -----------------------------------------------------------

    def send(
        self,
        method: bytes,
        target: bytes,
        headers: HeaderList,
        body: RequestBody | None,
        handler: ResponseHandler,
    ) -> None:
        assert self._state == "idle" and self.transport is not None
        self._handler = handler
        self._method = method
        self._state = "head"
        self._head_started = False
        self._head_size = 0
        self._phrase = b""
        self._message_done = False
        self._until_close = False
        self._keep_alive = True
        lines = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        line_count = len(headers) + 2
        if body is None:
            if method in (b"POST", b"PUT", b"PATCH"):
                lines.append(b"Content-Length: 0\r\n")
                line_count += 1
            self._body_done = True
        else:
            if body.length is None:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                lines.append(b"Content-Length: %d\r\n" % body.length)
            line_count += 1
            self._body_done = False
        lines.append(b"\r\n")
        head = b"".join(lines)
        if not _well_formed(head, line_count):
            # A CR, LF or NUL inside a name or value would let bytes that
            # came from a client start a request of their own.
            self._state = "closed"
            self._handler = None
            self.abort()
            handler.upstream_failed(
                Failure(UnsafeRequestHead("refused to send a header with a line break"))
            )
            return
        self.transport.write(head)
        if body is not None:
            self._body = body
            _consumer(self).registerProducer(body, True)
            framing = _BodyFraming(self, body.length)
            body.startProducing(framing).addCallbacks(
                lambda _: framing.finish(), lambda _: self.abort()
            )

    def _body_written(self) -> None:
        self._body_done = True
        if self.transport is not None:
            _consumer(self).unregisterProducer()
        self._body = None
        self._maybe_release()

    # Receiving ---------------------------------------------------------
    #
    # llhttp (through httptools) parses the response: status line, header
    # fields, and every framing (length, chunks, none for 204/304, until
    # close), and refuses what is not strictly HTTP/1.1. Its callbacks only
    # record; what the response means is decided once a call to
    # feed_data returns, so that nothing is released to the pool while
    # llhttp may still be reading bytes that came after the response.

    def dataReceived(self, data: bytes) -> None:
        if self._state == "idle":
            # Nothing was asked: a server speaking out of turn is not
            # reusable.
            self.abort()
            return
        if self._state == "closed":
            return
        self._stopped = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("unexpected protocol switch")
            return
        except _Malformed as e:
            self._protocol_error(f"malformed response ({e})")
            return
        except (_Stop, httptools.HttpParserError) as e:
            # A callback's exception reaches here wrapped, or not,
            # depending on the callback: _stopped tells them apart.
            if not self._stopped:
                self._protocol_error(f"malformed response ({e})")
                return
        if self._state == "head":
            self._head_size += len(data)
            if self._head_size > MAX_HEAD_SIZE:
                self._protocol_error("response head too large")
        elif self._message_done:
            if self._method == b"HEAD":
                self._end_head_only(data)
            self._finish_response()
        elif self._handler is not None:
            self._handler.response_flush()

    def _end_head_only(self, data: bytes) -> None:
        """After the response to a HEAD: llhttp, which cannot be told the
        request was HEAD, waits for the body the head announced, so the
        next exchange needs a new parser. The connection is kept only when
        nothing followed the head: when this read ends with the head's
        blank line and holds no other."""
        if data.endswith(b"\r\n\r\n") and data.count(b"\r\n\r\n") == 1:
            self._parser = httptools.HttpResponseParser(self)
        else:
            self._keep_alive = False

    def on_message_begin(self) -> None:
        if self._message_done or self._state not in ("head", "body"):
            # Bytes after the whole response: the connection is not one
            # to trust again.
            self._keep_alive = False
            self._stop()
        self._headers = []

    def _stop(self) -> None:
        """Stop llhttp where it is, from inside one of its callbacks."""
        self._stopped = True
        raise _Stop()

    def on_status(self, phrase: bytes) -> None:
        if not _CONTROL.isdisjoint(phrase):
            raise _Malformed("control character in the reason phrase")
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == "head":
            self._headers.append((name, value))
        # Trailers, after the body, are not relayed (Synapse sends none).

    def on_headers_complete(self) -> None:
        code = self._parser.get_status_code()
        if 100 <= code < 200:
            # Interim responses (100 Continue, 103 Early Hints) are not
            # relayed: the client's own 100 came from the edge.
            self._headers = []
            self._phrase = b""
            return
        headers = self._headers
        declared: int | None = None
        codings = 0
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                declared = int(value)
            elif lower == b"transfer-encoding":
                # Only a single "chunked" can be relayed as the coding it
                # is (the client gets its own chunked framing); anything
                # else would reach the client as if it were the content.
                codings += 1
                if codings > 1 or value.strip().lower() != b"chunked":
                    raise _Malformed("a transfer coding the edge cannot relay")
        chunked = codings == 1
        self._head_started = True
        self._state = "body"
        head_only = self._method == b"HEAD"
        self._until_close = not (
            chunked or declared is not None or head_only or code in _NO_BODY_CODES
        )
        if not self._parser.should_keep_alive():
            self._keep_alive = False
        assert self._handler is not None
        # The length the client is told: a HEAD response keeps the one its
        # GET would have; a 204 has none.
        self._handler.response_head(
            code, self._phrase, headers, None if code == 204 else declared
        )
        if self._handler is None or self._state == "closed":
            self._stop()  # the handler gave up at once
        if head_only:
            self._message_done = True
            self._stop()

    def on_body(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.response_data(data)
        if self._state == "closed":
            self._stop()

    def on_message_complete(self) -> None:
        if self._state == "body":
            self._message_done = True

    def _finish_response(self) -> None:
        handler, self._handler = self._handler, None
        self._state = "done"
        if handler is not None:
            handler.response_end(True, "")
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._state != "done":
            return
        if not self._body_done:
            # Synapse answered before the request body was all sent: the
            # rest will not be, so this connection cannot be reused.
            self.abort()
        elif self._keep_alive and self.transport is not None:
            self._state = "idle"
            self.reused = True
            # The client may have paused us while relaying; we start clean.
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            self._on_idle(self)
        else:
            self.abort()

    # Endings -------------------------------------------------------------

    def _protocol_error(self, reason: str) -> None:
        self._fail(Failure(UpstreamError(reason)))

    def _fail(self, reason: Failure) -> None:
        handler, self._handler = self._handler, None
        self._keep_alive = False
        self._state = "closed"
        if handler is not None:
            if self._head_started:
                handler.response_end(False, reason.getErrorMessage())
            else:
                handler.upstream_failed(reason)
        self.abort()

    def abort(self) -> None:
        """Close at once, whatever is in flight; reported to no one."""
        self._handler = None
        self._state = "closed"
        if self._body is not None:
            self._body.stopProducing()
            self._body = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._body is not None:
            self._body.stopProducing()
            self._body = None
        handler, self._handler = self._handler, None
        state, self._state = self._state, "closed"
        self._on_lost(self)
        if handler is None:
            return
        if state == "body" and self._until_close:
            # Only an orderly close ends such a body; a reset cuts it.
            handler.response_end(
                reason is None or reason.check(ConnectionDone) is not None,
                "connection reset mid-response",
            )
        elif self._head_started:
            handler.response_end(False, "connection closed mid-response")
        else:
            handler.upstream_failed(
                Failure(UpstreamClosedEarly("connection closed before a response"))
            )

    @property
    def producer(self) -> IPushProducer:
        """The connection's transport, for the client side to pause."""
        assert self.transport is not None
        return self.transport  # type: ignore[return-value]


def _consumer(connection: UpstreamConnection) -> IConsumer:
    return cast(IConsumer, connection.transport)


@implementer(IConsumer)
class _BodyFraming:
    """The consumer a request body is produced into: writes each chunk to the
    connection, framed as the request head announced. (The body registers
    itself as the producer on the connection's transport directly.)"""

    def __init__(self, connection: UpstreamConnection, length: int | None):
        self._connection = connection
        self._chunked = length is None
        self._length = length
        self._written = 0
        self._transport = _consumer(connection)

    def write(self, data: bytes) -> None:
        if not data or self._connection._state == "closed":
            return
        self._written += len(data)
        if self._chunked:
            self._transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._transport.write(data)

    def finish(self) -> None:
        if self._connection._state == "closed":
            return
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")
        elif self._written != self._length:
            # The head announced another length: whatever the client side
            # let through, this connection now frames nothing reliably.
            self._connection._protocol_error(
                "request body does not match its Content-Length"
            )
            return
        self._connection._body_written()

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass
