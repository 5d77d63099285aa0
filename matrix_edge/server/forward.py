"""Forwarding one client request to Synapse and its response back.

The request target goes upstream byte for byte. The body is streamed as it
arrives and the response is streamed as Synapse produces it, each side
pausing the other when it cannot keep up.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge import errors
from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.pools.dispatch import Placed, refused_error
from matrix_edge.pools.pool import Lease
from matrix_edge.server.body import ClientReading, RequestBody
from matrix_edge.server.headers import filter_headers, upstream_request_headers
from matrix_edge.upstream.client import (
    Upstream,
    UpstreamExchange,
    describe_failure,
    is_local_shortage,
)
from matrix_edge.upstream.protocol import HeaderList, UpstreamError

if TYPE_CHECKING:
    from matrix_edge.server.request import EdgeRequest

log = Logger()

UNPLACED = "unplaced"
"""The upstream of an error that came before any process was chosen."""


def failure_cause(reason: Failure) -> str:
    """Why an exchange failed before a response, in a word from a fixed
    few: the ``cause`` of the edge's 502 in metrics."""
    if reason.check(ConnectError):
        return "connect_failed"
    if isinstance(reason.value, UpstreamError):
        return reason.value.cause
    return "other"


class _Bound(enum.Enum):
    """What the exchange's one timer bounds."""

    IDLE = "body_idle"
    BODY = "request_body"
    RESPONSE = "upstream_response"


class Forwarding:
    """One proxied exchange, from the client's headers to the last byte of
    Synapse's response.

    One timer, for whichever bound applies: while the request body arrives
    and the response body leaves, ``body_idle`` bounds any stall; between
    the end of the request and the response headers, ``upstream_response``
    bounds Synapse's answer. A small response, whose head and body come in
    one read, is never bounded by ``body_idle``: the timer armed when the
    request was complete is cancelled when it has been relayed, and is the
    only one the request costs.

    ``request_body`` bounds the whole request body, from the head on: while
    the body arrives, the same timer is set for the stall bound or for what
    is left of that deadline, whichever is sooner, and once the deadline is
    the sooner it stays set for it.
    """

    # Processes tried in turn for one request when each refuses the
    # connection: nothing was sent, so another may take it.
    MAX_PLACEMENTS = 3

    def __init__(
        self,
        request: EdgeRequest,
        placed: Lease | Deferred[Lease],
        clock: IReactorTime,
        timeouts: TimeoutsConfig,
        max_body_size: int,
        replace: Callable[[Collection[Upstream]], Placed] | None = None,
    ):
        self._request = request
        self._placed = placed
        self._replace = replace
        self._refused: list[Upstream] = []
        self.lease: Lease | None = None
        """The last process chosen; released once its exchange is over
        (releasing twice is harmless)."""
        self._waiting: Deferred[Lease] | None = None
        self._headers: HeaderList = []
        self._clock = clock
        self._timeouts = timeouts
        self._max_body_size = max_body_size
        self._body: RequestBody | None = None
        self._body_size = 0
        self._exchange: UpstreamExchange | None = None
        self._responding = False
        self._timer: IDelayedCall | None = None
        self._timer_bound: _Bound | None = None
        self._body_deadline: float | None = None
        """When the request body must have ended, while it arrives and no
        response has begun."""
        self._started_at = 0.0
        self.upstream_seconds: float | None = None

    def start(self, length: int | None, forwarded_for: str) -> None:
        """Send the request line and headers upstream now; the body follows
        through L{body_chunk}."""
        request = self._request
        headers = upstream_request_headers(
            request.headers,
            forwarded_for.encode("ascii"),
            request.listener.scheme,
            request_id=(request.request_id_header, request.request_id.encode()),
        )
        now = self._started_at = self._clock.seconds()
        if length != 0:
            client = request.side
            reading = ClientReading(client.pause_reading, client.resume_reading)
            self._body = RequestBody(length, reading)
            timeouts = self._timeouts
            self._body_deadline = now + timeouts.request_body
            if timeouts.request_body < timeouts.body_idle:
                self._set_timer(_Bound.BODY)
            else:
                self._set_timer(_Bound.IDLE)
        self._headers = headers
        self._place(self._placed)

    @property
    def upstream(self) -> Upstream | None:
        """The process the request went to, once chosen."""
        return self.lease.upstream if self.lease is not None else None

    @property
    def pool(self) -> str | None:
        """The pool of that process."""
        return self.lease.pool if self.lease is not None else None

    def _place(self, placed: Placed) -> None:
        if isinstance(placed, Lease):
            self._send(placed)
        elif isinstance(placed, Deferred):
            self._waiting = placed
            placed.addCallbacks(self._placed_later, self._not_placed)
        else:
            self._refuse(placed)

    def _placed_later(self, lease: Lease) -> None:
        self._waiting = None
        request = self._request
        if request.finished or request.is_disconnected:
            lease.release()
            return
        self._send(lease)

    def _not_placed(self, failure: Failure) -> None:
        self._waiting = None
        error = refused_error(failure)
        if error is not None:
            self._refuse(error)
        elif not failure.check(CancelledError):
            log.failure(
                "Placing {target} failed", failure, target=self._request.log_target
            )
            self._count_error(502, "other")
            self._refuse(errors.bad_gateway())

    def _refuse(self, error: errors.MatrixError) -> None:
        request = self._request
        self._stop_timer()
        self._drop_body()
        if not (request.finished or request.is_disconnected):
            request.answer_early(error)

    def _send(self, lease: Lease) -> None:
        self.lease = lease
        request = self._request
        self._exchange = lease.upstream.request(
            request.method, request.uri, self._headers, self._body, self
        )

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def body_chunk(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self._max_body_size:
            self._abandon_upstream()
            self._request.answer_early(errors.too_large(self._max_body_size))
            return
        if self._body is not None:
            self._body.write(data)
        self._touch_body()

    def body_complete(self) -> None:
        self._body_deadline = None
        if self._body is not None:
            self._body.finish()
        pending = self._exchange is not None or self._waiting is not None
        if pending and not self._responding:
            self._set_timer(_Bound.RESPONSE)

    # The upstream exchange's reports -------------------------------------

    def response_head(
        self, code: int, phrase: bytes, headers: HeaderList, length: int | None
    ) -> None:
        self._responding = True
        self._body_deadline = None
        self._stop_timer()
        self.upstream_seconds = self._clock.seconds() - self._started_at
        assert self.lease is not None
        self.lease.upstream.mark(True)
        request = self._request
        if request.finished or request.is_disconnected:
            return
        if not request.body_complete:
            # Synapse answered before the upload ended (a 401, a 413): the
            # rest of the body is read and dropped, and the connection is
            # closed after the response.
            request.close_after_response()
        request.respond(code, phrase, filter_headers(headers), length)
        assert self._exchange is not None
        producer = self._exchange.producer
        if producer is not None:
            request.register_producer(producer)

    def response_data(self, data: bytes) -> None:
        self._request.write(data)
        self._touch()

    def response_flush(self) -> None:
        # The response goes on past this read: from now on a stall counts.
        self._set_timer(_Bound.IDLE)
        self._request.flush()

    def response_end(self, complete: bool, reason: str) -> None:
        self._exchange = None
        self._release()
        self._stop_timer()
        request = self._request
        if request.is_disconnected:
            return
        request.unregister_producer()
        if complete:
            request.response_complete()
        else:
            # The response cannot be completed: the client must not take
            # what it got for the whole of it.
            log.warn(
                "Upstream {upstream} broke off the response to {method} "
                "{target}: {reason}",
                upstream=str(self.upstream.address if self.upstream else "-"),
                method=request.log_method,
                target=request.log_target,
                reason=reason,
            )
            request.break_off()

    def upstream_failed(self, reason: Failure, timed_out: bool = False) -> None:
        self._exchange = None
        self._release()
        upstream = self.upstream
        where = str(upstream.address) if upstream is not None else "(none chosen)"
        request = self._request
        if request.finished or request.is_disconnected:
            self._stop_timer()
            return
        if (
            upstream is not None
            and reason.check(ConnectError)
            and not is_local_shortage(reason)
        ):
            # Passive detection: the active check confirms recovery.
            upstream.mark(False, describe_failure(reason))
            if self._replace is not None and not timed_out:
                self._refused.append(upstream)
                if len(self._refused) < self.MAX_PLACEMENTS:
                    log.info(
                        "{upstream} refused {method} {target} ({reason}); "
                        "placing it again",
                        upstream=str(upstream.address),
                        method=request.log_method,
                        target=request.log_target,
                        reason=describe_failure(reason),
                    )
                    self._place(self._replace(self._refused))
                    return
        self._stop_timer()
        if timed_out or reason.check(ConnectTimeoutError):
            log.warn(
                "Upstream {upstream} timed out for {method} {target}",
                upstream=where,
                method=request.log_method,
                target=request.log_target,
            )
            error = errors.gateway_timeout()
            cause = "response_timeout" if timed_out else "connect_timeout"
        else:
            log.warn(
                "Upstream {upstream} failed for {method} {target}: {reason}",
                upstream=where,
                method=request.log_method,
                target=request.log_target,
                reason=describe_failure(reason),
            )
            error = errors.bad_gateway()
            cause = failure_cause(reason)
        self._drop_body()
        if not request.started_writing:
            self._count_error(error.code, cause)
        request.answer_early(error)

    def _count_error(self, status: int, cause: str) -> None:
        """Count an answer of the edge's own (502, 504) for the upstream
        that caused it."""
        metrics = self._request.site.metrics
        if metrics is not None:
            metrics.upstream_error(self.pool or UNPLACED, status, cause)

    # Cancellation and timers --------------------------------------------

    def client_gone(self, reason: Failure) -> None:
        """The client disconnected: stop Synapse's work on its behalf."""
        if self._body is not None:
            self._body.fail(reason)
        self._abandon_upstream()

    def _abandon_upstream(self) -> None:
        self._stop_timer()
        self._drop_body()
        self._release()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        if self._exchange is not None:
            exchange, self._exchange = self._exchange, None
            # Closing the connection lets Synapse cancel the request.
            exchange.cancel()

    def _drop_body(self) -> None:
        """No upstream will take the request body: what is still to come is
        read and dropped, and nothing held back waits for it."""
        if self._body is not None:
            self._body.stopProducing()

    def _set_timer(self, bound: _Bound) -> None:
        """Bound what happens next by ``bound``, from now."""
        if self._timer_bound is bound:
            return
        seconds = self._seconds(bound)
        self._timer_bound = bound
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self._clock.callLater(seconds, self._timer_fired)

    def _seconds(self, bound: _Bound) -> float:
        if bound is _Bound.IDLE:
            return self._timeouts.body_idle
        if bound is _Bound.BODY:
            assert self._body_deadline is not None
            return self._body_deadline - self._clock.seconds()
        return self._timeouts.upstream_response

    def _touch(self) -> None:
        """Body bytes moved: the stall bound starts again."""
        if self._timer_bound is _Bound.IDLE and self._timer is not None:
            self._timer.reset(self._timeouts.body_idle)

    def _touch_body(self) -> None:
        """Request body bytes moved: the stall bound starts again, unless
        the deadline of the whole body comes sooner, which it then bounds."""
        timer = self._timer
        if self._timer_bound is not _Bound.IDLE or timer is None:
            return
        idle = self._timeouts.body_idle
        deadline = self._body_deadline
        if deadline is not None:
            left = deadline - self._clock.seconds()
            if left < idle:
                self._timer_bound = _Bound.BODY
                timer.reset(max(left, 0.0))
                return
        timer.reset(idle)

    def _stop_timer(self) -> None:
        timer, self._timer, self._timer_bound = self._timer, None, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timer_fired(self) -> None:
        bound, self._timer, self._timer_bound = self._timer_bound, None, None
        if bound is _Bound.IDLE:
            self._body_stalled()
        elif bound is _Bound.BODY:
            self._body_too_slow()
        elif not self._responding and (
            self._exchange is not None or self._waiting is not None
        ):
            self._abandon_upstream()
            self.upstream_failed(Failure(CancelledError()), timed_out=True)

    def _body_stalled(self) -> None:
        request = self._request
        log.info(
            "No body data moved for {seconds}s on {method} {target}; abandoning it",
            seconds=self._timeouts.body_idle,
            method=request.log_method,
            target=request.log_target,
        )
        self._abandon_upstream()
        request.abort()

    def _body_too_slow(self) -> None:
        request = self._request
        log.info(
            "The body of {method} {target} did not end within {seconds}s; "
            "abandoning it",
            seconds=self._timeouts.request_body,
            method=request.log_method,
            target=request.log_target,
        )
        self._body_deadline = None
        # Synapse saw part of the body: its connection is closed, not reused.
        self._abandon_upstream()
        request.answer_early(errors.body_timeout(self._timeouts.request_body))
