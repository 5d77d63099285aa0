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

from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from matrix_edge.http.body import RequestBody
from matrix_edge.http.transport import set_no_delay

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

    def response_end(self, complete: bool, reason: str) -> None: ...

    def upstream_failed(self, reason: Failure, timed_out: bool = False) -> None: ...


def _well_formed(head: bytes, line_count: int) -> bool:
    """Whether a request head has line breaks only where its lines end."""
    return (
        head.count(b"\n") == line_count
        and head.count(b"\r") == line_count
        and b"\0" not in head
    )


class UpstreamError(Exception):
    """Synapse's connection broke, or it answered something that is not
    HTTP/1.1, before the response could start."""


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
        self._buffer = b""
        self._state = "idle"
        self._remaining = 0
        self._chunked = False
        self._keep_alive = True
        self._body: RequestBody | None = None
        self._body_done = True
        self._head_started = False
        self.reused = False
        """Whether this connection served an exchange before (a stale
        keep-alive connection may have been closed by Synapse meanwhile)."""

    def connectionMade(self) -> None:
        set_no_delay(self.transport)

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
                Failure(UpstreamError("refused to send a header with a line break"))
            )
            return
        self.transport.write(head)
        if body is not None:
            self._body = body
            _consumer(self).registerProducer(body, True)
            framing = _BodyFraming(self, chunked=body.length is None)
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

    def dataReceived(self, data: bytes) -> None:
        if self._state == "idle":
            # Nothing was asked: a server speaking out of turn is not
            # reusable.
            self.abort()
            return
        if self._state == "body" and not self._buffer and len(data) <= self._remaining:
            # The common case for bodies: relay the bytes as they came.
            self._remaining -= len(data)
            self._deliver(data)
            if self._remaining == 0 and self._state == "body":
                self._finish_response()
            return
        self._buffer += data
        while self._buffer and self._state not in ("idle", "closed"):
            if self._state == "head":
                if not self._parse_head():
                    return
            elif self._state == "body":
                self._read_counted()
            elif self._state == "chunk-size":
                if not self._read_chunk_size():
                    return
            elif self._state == "chunk-data":
                self._read_chunk_data()
            elif self._state == "chunk-crlf":
                if len(self._buffer) < 2:
                    return
                if self._buffer[:2] != b"\r\n":
                    self._protocol_error("bad chunk framing")
                    return
                self._buffer = self._buffer[2:]
                self._state = "chunk-size"
            elif self._state == "trailers":
                if not self._read_trailers():
                    return
            elif self._state == "until-close":
                data, self._buffer = self._buffer, b""
                self._deliver(data)

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self._buffer) > MAX_HEAD_SIZE:
                self._protocol_error("response head too large")
            return False
        self._head_started = True
        head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
        status_line, *header_lines = head.split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
            self._protocol_error(f"bad status line {status_line[:80]!r}")
            return False
        try:
            code = int(parts[1])
        except ValueError:
            self._protocol_error(f"bad status line {status_line[:80]!r}")
            return False
        phrase = parts[2] if len(parts) == 3 else b""
        headers: HeaderList = []
        for line in header_lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or line[:1] in b" \t":
                self._protocol_error(f"bad header line {line[:80]!r}")
                return False
            headers.append((name, value.strip(b" \t")))
        if 100 <= code < 200:
            if code == 101:
                self._protocol_error("unexpected protocol switch")
                return False
            # Interim responses (100 Continue, 103 Early Hints) are not
            # relayed: the client's own 100 came from the edge.
            return True
        return self._start_body(code, phrase, headers)

    def _start_body(self, code: int, phrase: bytes, headers: HeaderList) -> bool:
        chunked = False
        lengths = set()
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                lengths.add(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                if not chunked:
                    self._keep_alive = False
            elif lower == b"connection" and b"close" in value.lower():
                self._keep_alive = False
        declared: int | None = None
        if lengths and not chunked:
            if len(lengths) > 1 or not next(iter(lengths)).isdigit():
                self._protocol_error("bad Content-Length")
                return False
            declared = int(next(iter(lengths)))
        if self._method == b"HEAD" or code in _NO_BODY_CODES:
            mode = "none"
        elif chunked:
            mode = "chunk-size"
        elif declared is not None:
            mode = "body"
        else:
            # The body ends when the connection does.
            mode = "until-close"
            self._keep_alive = False
        assert self._handler is not None
        # The length the client is told: a HEAD response keeps the one its
        # GET would have; a 204 has none.
        self._handler.response_head(
            code, phrase, headers, None if code == 204 else declared
        )
        if self._state == "closed" or self._handler is None:
            return False  # the handler gave up at once
        if mode == "none" or (mode == "body" and declared == 0):
            self._finish_response()
        else:
            self._remaining = declared or 0
            self._state = mode
        return True

    def _read_counted(self) -> None:
        take = self._buffer[: self._remaining]
        self._buffer = self._buffer[len(take) :]
        self._remaining -= len(take)
        self._deliver(take)
        if self._remaining == 0 and self._state == "body":
            self._finish_response()

    def _read_chunk_size(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end == -1:
            if len(self._buffer) > 1024:
                self._protocol_error("bad chunk size")
            return False
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            self._protocol_error("bad chunk size")
            return False
        if size < 0:
            self._protocol_error("bad chunk size")
            return False
        if size == 0:
            self._state = "trailers"
        else:
            self._remaining = size
            self._state = "chunk-data"
        return True

    def _read_chunk_data(self) -> None:
        take = self._buffer[: self._remaining]
        self._buffer = self._buffer[len(take) :]
        self._remaining -= len(take)
        self._deliver(take)
        if self._remaining == 0 and self._state == "chunk-data":
            self._state = "chunk-crlf"

    def _read_trailers(self) -> bool:
        # Trailers are not relayed (Synapse sends none); read past them.
        end = self._buffer.find(b"\r\n")
        if end == -1:
            return False
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        if line == b"":
            self._finish_response()
        return True

    def _deliver(self, data: bytes) -> None:
        if data and self._handler is not None:
            self._handler.response_data(data)

    def _finish_response(self) -> None:
        handler, self._handler = self._handler, None
        self._state = "done"
        if self._buffer:
            # Bytes beyond the response: not a connection to trust again.
            self._keep_alive = False
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
            self._buffer = b""
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
        if state == "until-close":
            handler.response_end(True, "")
        elif self._head_started:
            handler.response_end(False, "connection closed mid-response")
        else:
            handler.upstream_failed(
                Failure(UpstreamError("connection closed before a response"))
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

    def __init__(self, connection: UpstreamConnection, chunked: bool):
        self._connection = connection
        self._chunked = chunked
        self._transport = _consumer(connection)

    def write(self, data: bytes) -> None:
        if not data or self._connection._state == "closed":
            return
        if self._chunked:
            self._transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._transport.write(data)

    def finish(self) -> None:
        if self._connection._state == "closed":
            return
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")
        self._connection._body_written()

    def registerProducer(self, producer: object, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass
