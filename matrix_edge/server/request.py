"""One client request, HTTP/1.1 or HTTP/2, from its complete head to the
last byte of its answer.

The protocol that parsed the head hands it over once, complete and checked,
with the client side it came on; then body chunks and the body's end, or
the loss of the client. The request decides, from the head and before any
body byte, whether it is forwarded to Synapse, answered by the edge's own
resources, or refused; and it writes the answer back through the same
client side, which frames it for its protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.python.failure import Failure

from matrix_edge import errors
from matrix_edge.errors import MatrixError, error_headers, reason_phrase
from matrix_edge.server.accesslog import redact_target
from matrix_edge.server.fields import Field, HeaderFields
from matrix_edge.server.forward import Forwarding
from matrix_edge.server.headers import client_address, is_trusted
from matrix_edge.server.request_id import request_id_for
from matrix_edge.server.router import LOCAL, Forward
from matrix_edge.target import split_target

if TYPE_CHECKING:
    from matrix_edge.config.listeners import ListenerConfig
    from matrix_edge.server.local import LocalResource
    from matrix_edge.server.site import EdgeSite

# After an early answer, how long the rest of an unwanted upload is read and
# dropped before the connection is closed. Closing at once, with unread data
# in the socket, makes the kernel reset the connection and the client may
# never see the answer.
LINGER_SECONDS = 5.0

# The most request body the edge's own resources (/health, /ready,
# .well-known) read, none of which takes one.
LOCAL_BODY_LIMIT = 64 * 1024


class ClientSide(Protocol):
    """The client end of one request: an HTTP/1.1 connection while the
    request is its current one, or one HTTP/2 stream."""

    lingers: bool
    """Whether a complete response waits for the rest of the request body
    before the request is done (HTTP/1.1, where an unread body is in the
    way of the next request); an HTTP/2 stream is done at once."""

    def send_head(
        self, code: int, phrase: bytes, headers: list[Field], length: int | None
    ) -> None:
        """Send the response head; ``length`` is the body's, when known.
        The side adds its own framing."""

    def send_data(self, data: bytes) -> None: ...

    def send_end(self) -> None:
        """The response is complete."""

    def flush(self) -> None:
        """Write what the side holds of the response: the end of one read
        of Synapse's response."""

    def done(self) -> None:
        """The request is over, both ways: the connection may go on to
        its next request."""

    def register_producer(self, producer: IPushProducer) -> None:
        """Pause ``producer`` (Synapse's connection) while the client
        cannot take more of the response."""

    def unregister_producer(self) -> None: ...

    def pause_reading(self) -> None:
        """Stop taking request body from the client (back-pressure)."""

    def resume_reading(self) -> None: ...

    def close_after_response(self) -> None:
        """Make this the last response on the connection, where that is
        how an unread request body is disposed of."""

    def stop_lingering(self) -> None:
        """Give up on a request body that the client is still sending after
        its complete answer."""

    def abort(self) -> None:
        """Drop the exchange at once; the client sees it failed."""

    def cut_short(self) -> None:
        """End a response that cannot be completed, so that the client
        cannot take it for a whole one."""


class EdgeRequest:
    """A request, and its answer: see the module docstring."""

    def __init__(
        self,
        site: EdgeSite,
        side: ClientSide,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: HeaderFields,
        length: int | None,
        peer: str,
    ):
        self.site = site
        self.side = side
        self.method = method
        self.uri = target
        """The request target, byte for byte as the client sent it."""
        self.path = split_target(target)[0]
        self.clientproto = version
        self.headers = headers
        self.length = length
        """The declared body length; None for a body of unannounced length."""
        self.peer = peer
        self.client_ip = peer
        self.request_id = ""
        self.code = 0
        self.started_writing = False
        self.sent_length = 0
        """Response body bytes sent."""
        self.received_length = 0
        """Request body bytes received."""
        self.body_complete = False
        self.finished = False
        self.is_disconnected = False
        self.started_at = site.clock.seconds()
        self._local: LocalResource | None = None
        self._local_body = 0
        self.forwarding: Forwarding | None = None
        """The exchange with Synapse (or the fallback web server), once the
        request is forwarded."""
        self._answer: MatrixError | None = None
        self._response_done = False
        self._linger: IDelayedCall | None = None

    # From the protocol -------------------------------------------------------

    def start(self, head_error: MatrixError | None = None) -> None:
        """The head is complete: decide what happens to the request, and
        start it. ``head_error`` is the protocol's own refusal of the head,
        answered like a refusal by routing (with a request ID, logged)."""
        site = self.site
        headers = self.headers
        peer = self.peer
        trusted = site.trusted_proxies
        if trusted:
            self.client_ip = client_address(
                peer, headers.values(b"x-forwarded-for"), trusted
            )
            from_proxy = is_trusted(peer, trusted)
        else:
            self.client_ip = client_address(peer, None, trusted)
            from_proxy = False
        self.request_id = request_id_for(
            headers.values(site.request_id_lower), trusted=from_proxy
        )
        metrics = site.metrics
        if metrics is not None:
            metrics.in_flight += 1

        decision = head_error or site.router.route(
            self.method, self.uri, self.path, headers, self.client_ip, self.length
        )
        if decision is LOCAL:
            if self.length is None or self.length <= LOCAL_BODY_LIMIT:
                self._local = site.local[self.path]
                return
            decision = errors.too_large(LOCAL_BODY_LIMIT)
        if isinstance(decision, Forward):
            self.forwarding = Forwarding(
                self,
                decision.placed,
                site.clock,
                site.config.timeouts,
                decision.body_limit,
                decision.replace,
            )
            self.forwarding.start(self.length, self.client_ip)
        else:
            assert isinstance(decision, MatrixError)
            self.answer_early(decision)

    @property
    def wants_body(self) -> bool:
        """Whether the request body is read for a purpose (forwarded, or
        within a local resource's limit) rather than only dropped: what
        ``Expect: 100-continue`` is answered by."""
        return self._answer is None and not self._response_done

    def body_chunk(self, data: bytes) -> None:
        self.received_length += len(data)
        if self._local is not None:
            self._local_body += len(data)
            if self._local_body > LOCAL_BODY_LIMIT:
                # A body of unannounced length grew past what a local
                # resource takes: answered now, the rest dropped.
                self._local = None
                self.answer_early(errors.too_large(LOCAL_BODY_LIMIT))
        elif self.forwarding is not None and not self._response_done:
            self.forwarding.body_chunk(data)
        # Otherwise the body is unwanted and dropped as it arrives.

    def body_ended(self) -> None:
        self.body_complete = True
        if self._local is not None:
            local, self._local = self._local, None
            self._answer_locally(local)
            return
        if self._answer is not None and not self.started_writing:
            self._write_answer()
        if self.forwarding is not None:
            self.forwarding.body_complete()
        self._maybe_finish()

    def connection_lost(self, reason: Failure) -> None:
        """The client is gone (or its stream reset): nothing more can be
        sent, and Synapse's work on its behalf is stopped."""
        if self.is_disconnected:
            return
        self.is_disconnected = True
        self._cancel_linger()
        if not self.finished:
            if self.forwarding is not None:
                self.forwarding.client_gone(reason)
            self._ended()

    # The response --------------------------------------------------------------

    def respond(
        self, code: int, phrase: bytes, headers: list[Field], length: int | None
    ) -> None:
        """Send the response head: Synapse's, or the edge's own."""
        if self.started_writing or self.finished or self.is_disconnected:
            return
        self.code = code
        self.started_writing = True
        headers.append((self.site.request_id_header, self.request_id.encode()))
        self.side.send_head(code, phrase, headers, length)

    def write(self, data: bytes) -> None:
        if self.finished or self.is_disconnected:
            return
        self.sent_length += len(data)
        self.side.send_data(data)

    def flush(self) -> None:
        if not self.is_disconnected:
            self.side.flush()

    def register_producer(self, producer: IPushProducer) -> None:
        if not self.is_disconnected:
            self.side.register_producer(producer)

    def unregister_producer(self) -> None:
        if not self.is_disconnected:
            self.side.unregister_producer()

    def response_complete(self) -> None:
        if self._response_done:
            return
        self._response_done = True
        if not self.is_disconnected:
            self.side.send_end()
        self._maybe_finish()

    def answer_early(self, error: MatrixError) -> None:
        """Answer with ``error`` instead of Synapse's response.

        When a request body is still arriving, the answer goes out at once
        and the connection closes after it, the rest of the body unread.
        """
        if self.started_writing:
            # Part of a response is already out: only closing the connection
            # tells the client it is incomplete.
            self.abort()
            return
        self._answer = error
        if self.finished or self.is_disconnected:
            return
        if self.body_complete:
            self._write_answer()
        elif self.length != 0:
            self.close_after_response()
            self._write_answer()
        # Otherwise the (empty) body's end is moments away: body_ended
        # writes the answer.

    def close_after_response(self) -> None:
        self.side.close_after_response()

    def break_off(self) -> None:
        """End a response that cannot be completed, so that the client sees
        it is incomplete."""
        if not self.is_disconnected:
            self.side.cut_short()

    def abort(self) -> None:
        """Drop the client connection without completing the response."""
        if not self.is_disconnected:
            self.side.abort()

    # For the forwarding and the access log -------------------------------------

    @property
    def listener(self) -> ListenerConfig:
        return self.site.listener

    @property
    def request_id_header(self) -> bytes:
        return self.site.request_id_header

    @property
    def log_method(self) -> str:
        return self.method.decode("ascii", "backslashreplace")

    @property
    def log_target(self) -> str:
        return redact_target(self.uri)

    @property
    def upstream_seconds(self) -> float | None:
        """Time until Synapse's response headers, for forwarded requests."""
        return self.forwarding.upstream_seconds if self.forwarding else None

    @property
    def worker(self) -> tuple[str, str] | None:
        """The pool and Synapse process a forwarded request went to, when
        the deployment has worker pools."""
        forwarding = self.forwarding
        if forwarding is None or forwarding.upstream is None:
            return None
        pool = forwarding.pool
        if pool is None or (pool == "main" and not self.site.has_workers):
            return None
        return pool, str(forwarding.upstream.address)

    def elapsed_seconds(self) -> float:
        return self.site.clock.seconds() - self.started_at

    # Internals -------------------------------------------------------------------

    def _answer_locally(self, local: LocalResource) -> None:
        answer = local.answer(self)
        headers = [*answer.headers, *self.site.own_headers()]
        self.respond(answer.code, reason_phrase(answer.code), headers, len(answer.body))
        if self.method != b"HEAD":
            self.write(answer.body)
        self.response_complete()

    def _write_answer(self) -> None:
        error = self._answer
        assert error is not None
        body = error.body()
        headers = [*error_headers(error), *self.site.own_headers()]
        self.respond(error.code, reason_phrase(error.code), headers, len(body))
        if self.method != b"HEAD":
            self.write(body)
        self.response_complete()

    def _maybe_finish(self) -> None:
        if self.finished or self.is_disconnected or not self._response_done:
            return
        if self.body_complete or not self.side.lingers:
            self._cancel_linger()
            self.finished = True
            self._ended()
            self.side.done()
        elif self._linger is None:
            self._linger = self.site.clock.callLater(
                LINGER_SECONDS, self._stop_lingering
            )

    def _ended(self) -> None:
        """The request is over, answered or not: counted, and logged. Each
        request that started comes here exactly once."""
        site = self.site
        metrics = site.metrics
        if metrics is not None:
            metrics.request_ended(self)
        site.access_log.log(self)

    def _stop_lingering(self) -> None:
        self._linger = None
        if not self.is_disconnected:
            self.side.stop_lingering()

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
