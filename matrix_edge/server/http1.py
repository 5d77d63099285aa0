"""HTTP/1.1 client connections, parsed by llhttp (``httptools``).

llhttp is Node's parser, strict about framing: it refuses what request
smuggling is made of (two ``Content-Length`` headers, ``Content-Length``
beside ``Transfer-Encoding``, bad chunk sizes, bare line feeds). On top of
it this module refuses what the edge cannot forward faithfully: a transfer
coding other than ``chunked`` alone, an upgrade that carries a body, heads
beyond the size limits.

One request is answered at a time. Requests a client pipelines behind the
one being answered are parsed (llhttp parses whatever it is given) and held,
with the little body that came in the same read, while reading from the
socket pauses; each starts when the one before it is done.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, cast

import httptools
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge import errors
from matrix_edge.errors import MatrixError, closing_response
from matrix_edge.server.fields import Field, HeaderFields
from matrix_edge.server.request import EdgeRequest
from matrix_edge.server.sockets import ClientTransport, set_no_delay
from matrix_edge.twisted_private import write_eagerly

if TYPE_CHECKING:
    from matrix_edge.server.site import EdgeSite

# The most a request head may take, all fields together, and any one field:
# nginx's default buffers allow 32 KiB and 8 KiB. Beyond them: 431.
MAX_HEAD_SIZE = 64 * 1024
MAX_FIELD_SIZE = 16 * 1024
MAX_FIELDS = 256
# Longer targets get 414 here already; routing's own limit is lower.
MAX_TARGET_SIZE = 16 * 1024

# Response bytes held before they are written: the head waits for the first
# body bytes, and what one read of Synapse's response brought goes out in
# one write, unless it is more than this.
HOLD_LIMIT = 64 * 1024

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
HTTP11 = b"HTTP/1.1"
_VERSIONS = {"1.1": HTTP11, "1.0": b"HTTP/1.0"}
_HEAD = b"HEAD"

log = Logger()


class _Refused(Exception):
    """Raised in a parser callback: the head cannot be taken."""

    def __init__(self, error: MatrixError):
        self.error = error


class _Ignored(Exception):
    """Raised in a parser callback: what follows is not read."""


def _too_large(what: str) -> _Refused:
    return _Refused(MatrixError(431, "M_UNKNOWN", f"{what} too large"))


class _Queued:
    """A request parsed while another is answered, and what came of its
    body meanwhile."""

    __slots__ = ("chunks", "ended", "expects_continue", "keep_alive", "request")

    def __init__(self, request: EdgeRequest, keep_alive: bool, expects: bool):
        self.request = request
        self.keep_alive = keep_alive
        self.expects_continue = expects
        self.chunks: list[bytes] = []
        self.ended = False


# Why reading from the client is paused: requests parsed ahead wait, the
# upstream cannot take more body, the input cannot be parsed.
_PIPELINE, _BODY, _BROKEN = 1, 2, 4

# Where the parser is in the message it reads.
_BETWEEN, _HEAD_PART, _BODY = range(3)


class HTTP11Connection(Protocol):
    """One client connection; see the module docstring. It is also the
    client side (L{matrix_edge.server.request.ClientSide}) of the request
    it is answering."""

    lingers = True
    _out: ClientTransport
    """The transport, typed for what is used of it."""

    def __init__(self, site: EdgeSite):
        self._site = site
        self._parser = httptools.HttpRequestParser(self)
        self._peer = ""
        self._state = _BETWEEN
        self._target = b""
        self._fields: list[Field] = []
        self._lower: list[bytes] = []
        self._head_size = 0
        self._head_received = 0
        self._advancing = False
        self._request: EdgeRequest | None = None
        """The request being answered."""
        self._keep_alive = True
        """Whether the connection goes on after the current response."""
        self._retired = False
        """Whether a reload has made the next response the last."""
        self._parsing: _Queued | None = None
        """A pipelined request whose body is being parsed, while another is
        answered."""
        self._queue: deque[_Queued] | None = None
        """Requests parsed ahead; made when a client first pipelines."""
        self._closing = False
        """No further request is read: the last one said so, or the input
        is broken."""
        self._broken: MatrixError | None = None
        """The answer to input that could not be parsed, due once the
        requests before it are answered."""
        self._paused_for = 0
        """The reasons reading is paused for (_PIPELINE, _BODY, _BROKEN)."""
        self._chunked = False
        self._framed = False
        self._held: list[bytes] = []
        self._held_size = 0

    # Connection events -------------------------------------------------------

    def connectionMade(self) -> None:
        out = self._out = cast(ClientTransport, self.transport)
        set_no_delay(out)
        write_eagerly(out)
        self._site.connections.add(self)
        self._site.idle.start(self)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._state != _BODY and self._request is None:
            # A request head is arriving with nothing else going on: it
            # must be complete in time.
            site = self._site
            site.idle.stop(self)
            site.header_deadlines.start(self)
        while data:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # A head that asked for an upgrade (h2c, websocket) is an
                # ordinary request to the edge (Upgrade is hop-by-hop, and
                # such heads carry no body): parsing starts again after it.
                self._parser = httptools.HttpRequestParser(self)
                data = data[upgrade.args[0] :]
                if self._closing:
                    return
                continue
            except httptools.HttpParserCallbackError as failed:
                stopped = failed.__context__
                if isinstance(stopped, _Refused):
                    self._unparseable(stopped.error)
                elif not isinstance(stopped, _Ignored):
                    raise
            except httptools.HttpParserError as failed:
                self._unparseable(
                    errors.bad_request(f"Malformed HTTP request ({failed})")
                )
            break
        if self._state == _HEAD_PART and not self._closing:
            # llhttp holds an unfinished field without bound: the head's
            # size is also counted as it arrives.
            self._head_received += len(data)
            if self._head_received > MAX_HEAD_SIZE:
                self._unparseable(_too_large("The request head").error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        site = self._site
        site.connections.remove(self)
        site.header_deadlines.stop(self)
        site.idle.stop(self)
        self._closing = True
        self._queue = None
        self._parsing = None
        request, self._request = self._request, None
        if request is not None:
            request.connection_lost(reason)

    def headers_too_slow(self) -> None:
        """The header deadline passed: see Deadlines."""
        if self._closing:
            return
        log.info(
            "Closing a connection from {peer}: no complete request headers in "
            "{seconds}s",
            peer=self._peer,
            seconds=self._site.config.timeouts.request_headers,
        )
        self._close_with(MatrixError(408, "M_UNKNOWN", "Request headers took too long"))

    def drain(self) -> None:
        """The edge is stopping: no further request is read; the one being
        answered is the last (``Connection: close``), or, with none, the
        connection closes now."""
        self._keep_alive = False
        if self._request is None:
            self._close()

    def retire(self) -> None:
        """A reload replaced the listener's configuration: the response
        being sent, or else the next one, says ``Connection: close`` and is
        the last. An idle connection is not closed under a client that may
        be sending a request at this very moment; its idle timeout, or that
        last response, closes it."""
        # Said in the head of that response (see send_head): a response
        # whose head is already out goes on as announced, and the next one
        # says close.
        self._retired = True

    def idle_too_long(self) -> None:
        """No request for ``timeouts.client_idle``: the connection closes."""
        self._close()

    # llhttp's callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closing or self._site.connections.draining:
            # After a request that closes the connection, nothing more is
            # parsed, let alone forwarded.
            raise _Ignored()
        self._state = _HEAD_PART
        self._target = b""
        self._fields = []
        self._lower = []
        self._head_size = 0

    def on_url(self, part: bytes) -> None:
        self._target += part
        if len(self._target) > MAX_TARGET_SIZE:
            raise _Refused(MatrixError(414, "M_UNKNOWN", "Request target too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_size += size
        if size > MAX_FIELD_SIZE:
            raise _too_large("A header field")
        if self._head_size > MAX_HEAD_SIZE:
            raise _too_large("The request head")
        if len(self._fields) >= MAX_FIELDS:
            raise _Refused(MatrixError(431, "M_UNKNOWN", "Too many header fields"))
        self._fields.append((name, value))
        self._lower.append(name.lower())

    def on_headers_complete(self) -> None:
        self._head_received = 0
        site = self._site
        site.header_deadlines.stop(self)
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Refused(
                MatrixError(505, "M_UNKNOWN", "Only HTTP/1.1 and HTTP/1.0 are served")
            )
        fields = HeaderFields(self._fields, self._lower)
        length = self._body_length(fields)
        if length != 0 and parser.should_upgrade():
            raise _Refused(errors.bad_request("An upgrade request cannot carry a body"))
        # Only now is this head a request whose body follows: a head
        # refused above, pipelined behind a request in flight, is answered
        # after that request, not taken for a break in its body.
        self._state = _BODY
        if not self._peer:
            # Known by now behind a PROXY protocol header too.
            self._peer = getattr(self._out.getPeer(), "host", "")
        if version != HTTP11 and b"host" not in fields:
            fields.add(b"Host", self._default_host())
        request = EdgeRequest(
            site,
            self,
            parser.get_method(),
            self._target,
            version,
            fields,
            length,
            self._peer,
        )
        keep_alive = parser.should_keep_alive()
        expects = (
            length != 0
            and version == HTTP11
            and (fields.first(b"expect") or b"").lower() == b"100-continue"
        )
        if self._request is None:
            self._request = request
            self._keep_alive = keep_alive
            self._begin(request, expects)
        else:
            queued = self._parsing = _Queued(request, keep_alive, expects)
            if self._queue is None:
                self._queue = deque()
            self._queue.append(queued)
            self._pause(_PIPELINE)

    def on_body(self, data: bytes) -> None:
        queued = self._parsing
        if queued is not None:
            queued.chunks.append(data)
        elif self._request is not None:
            self._request.body_chunk(data)

    def on_message_complete(self) -> None:
        self._state = _BETWEEN
        queued = self._parsing
        if queued is not None:
            queued.ended = True
            self._parsing = None
        elif self._request is not None:
            self._request.body_ended()
        if not self._parser.should_keep_alive():
            # Whatever follows is not read: the connection closes after
            # the response.
            self._closing = True

    # The request's client side ---------------------------------------------------

    def send_head(
        self, code: int, phrase: bytes, headers: list[Field], length: int | None
    ) -> None:
        request = self._request
        assert request is not None
        http11 = request.clientproto == HTTP11
        parts = [request.clientproto, b" %d " % code, phrase, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        bodiless = request.method == _HEAD or code in (204, 304) or code < 200
        self._chunked = False
        if length is not None:
            if code != 204:
                parts.append(b"Content-Length: %d\r\n" % length)
        elif not bodiless:
            if http11:
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self._chunked = True
            else:
                # Delimited by the connection's end.
                self._keep_alive = False
        self._framed = self._chunked or length is not None or bodiless
        if self._retired and not self._queue:
            self._keep_alive = False
        if not self._keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        self._held = [head]
        self._held_size = len(head)

    def send_data(self, data: bytes) -> None:
        if not data:
            return
        held = self._held
        if self._chunked:
            held.append(b"%x\r\n" % len(data))
            held.append(data)
            held.append(b"\r\n")
        else:
            held.append(data)
        self._held_size += len(data)
        if self._held_size > HOLD_LIMIT:
            self.flush()

    def send_end(self) -> None:
        if self._chunked:
            self._held.append(_LAST_CHUNK)
        self.flush()

    def flush(self) -> None:
        """Write what the response holds."""
        held = self._held
        if held:
            self._out.write(held[0] if len(held) == 1 else b"".join(held))
            self._held = []
            self._held_size = 0

    def done(self) -> None:
        self._request = None
        # Back-pressure on its body ends with the request.
        self._resume(_BODY)
        self._after_request()

    def register_producer(self, producer: IPushProducer) -> None:
        self._out.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        self._out.unregisterProducer()

    def pause_reading(self) -> None:
        self._pause(_BODY)

    def resume_reading(self) -> None:
        self._resume(_BODY)

    def close_after_response(self) -> None:
        self._keep_alive = False

    def stop_lingering(self) -> None:
        self._close()

    def abort(self) -> None:
        self._closing = True
        self._out.abortConnection()

    def cut_short(self) -> None:
        # A framed response (chunked, or with a length) cut short by an
        # orderly close keeps what was sent readable, and is visibly
        # incomplete; an unframed one needs a reset, or its end would look
        # like the end of the body.
        if self._framed:
            self._close()
        else:
            self.abort()

    # Internals -------------------------------------------------------------------

    def _begin(self, request: EdgeRequest, expects_continue: bool) -> None:
        request.start()
        if expects_continue and request.wants_body and not request.started_writing:
            self._out.write(_CONTINUE)

    def _after_request(self) -> None:
        """Go on after a request is done: close, start the next request
        parsed ahead, or wait for one. A loop rather than recursion: a
        request started here may be done at once (a refusal), and a client
        may have pipelined hundreds."""
        if self._advancing:
            return  # the loop below, further up the stack, goes on
        self._advancing = True
        try:
            while self._request is None:
                if not self._keep_alive:
                    self._close()
                elif self._queue:
                    self._next(self._queue.popleft())
                    continue
                elif self._broken is not None:
                    self._close_with(self._broken)
                elif self._closing:
                    self._close()
                else:
                    self._site.idle.start(self)
                return
        finally:
            self._advancing = False

    def _next(self, queued: _Queued) -> None:
        """Start a request that waited behind the one just done."""
        request = self._request = queued.request
        self._keep_alive = queued.keep_alive
        if self._parsing is queued:
            self._parsing = None
        if not self._queue:
            self._resume(_PIPELINE)
        self._begin(request, queued.expects_continue)
        for chunk in queued.chunks:
            if self._request is not request:
                return
            request.body_chunk(chunk)
        if queued.ended and self._request is request:
            request.body_ended()

    def _body_length(self, fields: HeaderFields) -> int | None:
        """The body's length from the framing headers (None: chunked),
        refusing what the edge will not forward."""
        if b"transfer-encoding" in fields:
            codings = fields.values(b"transfer-encoding")
            if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
                raise _Refused(
                    errors.bad_request("Only Transfer-Encoding: chunked is accepted")
                )
            return None
        length = fields.first(b"content-length")
        if length is None:
            return 0
        # llhttp accepted it: digits only, and only one.
        return int(length)

    def _default_host(self) -> bytes:
        """A Host header for HTTP/1.0 requests sent without one: the address
        the client connected to."""
        host = self._out.getHost()
        address = getattr(host, "host", "localhost")
        if ":" in address:
            address = f"[{address}]"
        return f"{address}:{getattr(host, 'port', 0)}".encode("ascii")

    def _unparseable(self, error: MatrixError) -> None:
        """The input cannot be parsed further: nothing more is read, and
        ``error`` is the answer once the requests before it are answered."""
        was_closing, self._closing = self._closing, True
        self._site.header_deadlines.stop(self)
        self._pause(_BROKEN)
        if was_closing:
            # Bytes after a request that ended the connection: not read.
            return
        ahead = self._parsing
        if ahead is not None:
            # A request parsed ahead whose body broke: it never starts.
            assert self._queue is not None
            self._queue.remove(ahead)
            self._parsing = None
        request = self._request
        if request is None:
            self._close_with(error)
        elif self._state == _BODY and ahead is None:
            # The body of the request being answered is broken: it cannot
            # be forwarded whole, so its exchange ends here.
            answered = request.started_writing
            request.connection_lost(Failure(ConnectionError(error.msg)))
            self._request = None
            if answered:
                self.abort()
            else:
                self._close_with(error)
        else:
            self._broken = error

    def _close_with(self, error: MatrixError) -> None:
        self._out.write(closing_response(error, self._site.server_header))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.flush()
        self._out.loseConnection()

    def _pause(self, reason: int) -> None:
        if not self._paused_for:
            self._out.pauseProducing()
        self._paused_for |= reason

    def _resume(self, reason: int) -> None:
        if self._paused_for & reason:
            self._paused_for &= ~reason
            if not self._paused_for:
                self._out.resumeProducing()
