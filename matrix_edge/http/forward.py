"""Forwarding one client request to Synapse and its response back.

The request target goes upstream byte for byte. The body is streamed as it
arrives and the response is streamed as Synapse produces it, each side
pausing the other when it cannot keep up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.http import errors
from matrix_edge.http.body import ClientReading, RequestBody
from matrix_edge.http.headers import filter_headers, upstream_request_headers
from matrix_edge.http.upstream import Upstream

if TYPE_CHECKING:
    from matrix_edge.http.site import EdgeRequest

log = Logger()


class Forwarding:
    """One proxied exchange, from the client's headers to the last byte of
    Synapse's response.

    Timers: while the request body arrives and the response body leaves,
    ``body_idle`` bounds any stall; between the end of the request and the
    response headers, ``upstream_response`` bounds Synapse's answer.
    """

    def __init__(
        self,
        request: EdgeRequest,
        upstream: Upstream,
        clock: IReactorTime,
        timeouts: TimeoutsConfig,
        max_body_size: int,
    ):
        self._request = request
        self._upstream = upstream
        self._clock = clock
        self._timeouts = timeouts
        self._max_body_size = max_body_size
        self._body: RequestBody | None = None
        self._body_size = 0
        self._response_d: Deferred[IResponse] | None = None
        self._relay: ResponseRelay | None = None
        self._response_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._timed_out = False
        self._abandoned = False
        self._started_at = 0.0
        self.upstream_seconds: float | None = None

    def start(self, length: int | None, forwarded_for: str) -> None:
        """Send the request line and headers upstream now; the body follows
        through L{body_chunk}."""
        request = self._request
        headers = upstream_request_headers(
            request.requestHeaders,
            forwarded_for.encode("ascii"),
            request.listener.scheme,
            request_id=(request.request_id_header, request.request_id.encode()),
        )
        if length != 0:
            client = request.client_side
            reading = ClientReading(client.pause_reading, client.resume_reading)
            self._body = RequestBody(length, reading)
            self._arm_idle_timer()
        self._started_at = self._clock.seconds()
        d = self._upstream.request(request.method, request.uri, headers, self._body)
        self._response_d = d
        d.addCallbacks(self._got_response, self._upstream_failed)
        d.addErrback(self._unexpected)
        request.notifyFinish().addErrback(self._client_gone)

    def body_chunk(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self._max_body_size:
            self._abandon_upstream()
            self._request.answer_early(errors.too_large(self._max_body_size))
            return
        if self._body is not None:
            self._body.write(data)
        self._touch()

    def body_complete(self) -> None:
        if self._body is not None:
            self._body.finish()
        if self._relay is None and self._response_d is not None:
            self._stop_idle_timer()
            self._arm_response_timer()

    # Upstream response -------------------------------------------------

    def _got_response(self, response: IResponse) -> None:
        self._response_d = None
        self._upstream.mark(True)
        self._cancel(self._response_timer)
        self.upstream_seconds = self._clock.seconds() - self._started_at
        request = self._request
        if request.finished or request.is_disconnected:
            return
        request.setResponseCode(response.code, response.phrase)
        headers = filter_headers(response.headers.getAllRawHeaders(), ())
        if response.length is not None and response.length is not UNKNOWN_LENGTH:
            headers.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        for name, values in headers.getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, values)
        if not request.body_complete:
            # Synapse answered before the upload ended (a 401, a 413): the
            # rest of the body is read and dropped, and the connection is
            # closed after the response.
            request.close_after_response()
        self._relay = ResponseRelay(self)
        self._arm_idle_timer()
        response.deliverBody(self._relay)

    def _upstream_failed(self, failure: Failure) -> None:
        self._response_d = None
        self._cancel(self._response_timer)
        self._stop_idle_timer()
        request = self._request
        if self._abandoned or request.finished or request.is_disconnected:
            return
        if failure.check(ConnectError):
            # Passive detection: the active check confirms recovery.
            self._upstream.mark(False, _describe(failure))
        if self._timed_out or failure.check(ConnectTimeoutError):
            log.warn(
                "Upstream {upstream} timed out for {method} {target}",
                upstream=str(self._upstream.address),
                method=request.log_method,
                target=request.log_target,
            )
            error = errors.gateway_timeout()
        else:
            log.warn(
                "Upstream {upstream} failed for {method} {target}: {reason}",
                upstream=str(self._upstream.address),
                method=request.log_method,
                target=request.log_target,
                reason=_describe(failure),
            )
            error = errors.bad_gateway()
        request.answer_early(error)

    def _unexpected(self, failure: Failure) -> None:
        log.failure("Unexpected error while forwarding", failure)
        self._request.abort()

    # Response body ------------------------------------------------------

    def response_data(self, data: bytes) -> None:
        self._request.write(data)
        self._touch()

    def response_ended(self, reason: Failure) -> None:
        self._relay = None
        self._stop_idle_timer()
        request = self._request
        if request.is_disconnected:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            request.response_complete()
        else:
            # The response cannot be completed. Close the client connection
            # without the final chunk, so no client takes a truncated
            # response for a whole one.
            log.warn(
                "Upstream {upstream} broke off the response to {method} "
                "{target}: {reason}",
                upstream=str(self._upstream.address),
                method=request.log_method,
                target=request.log_target,
                reason=_describe(reason),
            )
            request.break_off()

    # Cancellation and timers --------------------------------------------

    def _client_gone(self, reason: Failure) -> None:
        """The client disconnected: stop Synapse's work on its behalf."""
        if self._body is not None:
            self._body.fail(reason)
        self._abandon_upstream()

    def _abandon_upstream(self) -> None:
        self._abandoned = True
        self._cancel(self._response_timer)
        self._stop_idle_timer()
        if self._response_d is not None:
            d, self._response_d = self._response_d, None
            # Cancel unconditionally: the Deferred already counts as called
            # once connected, and cancelling still aborts the connection.
            d.cancel()
        if self._relay is not None:
            self._relay.stop()

    def _arm_response_timer(self) -> None:
        # Armed once, when the request is complete (body_complete).
        assert self._response_timer is None
        self._response_timer = self._clock.callLater(
            self._timeouts.upstream_response, self._response_timed_out
        )

    def _response_timed_out(self) -> None:
        self._response_timer = None
        if self._response_d is not None:
            self._timed_out = True
            self._response_d.cancel()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is None:
            self._idle_timer = self._clock.callLater(
                self._timeouts.body_idle, self._body_stalled
            )

    def _touch(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.reset(self._timeouts.body_idle)

    def _stop_idle_timer(self) -> None:
        self._cancel(self._idle_timer)
        self._idle_timer = None

    def _body_stalled(self) -> None:
        self._idle_timer = None
        request = self._request
        log.info(
            "No body data moved for {seconds}s on {method} {target}; abandoning it",
            seconds=self._timeouts.body_idle,
            method=request.log_method,
            target=request.log_target,
        )
        self._abandon_upstream()
        request.abort()

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


class ResponseRelay(Protocol):
    """Receives Synapse's response body and writes it to the client.

    Registered as the client request's producer, the upstream connection
    stops being read while the client's socket cannot take more.
    """

    def __init__(self, forwarding: Forwarding):
        self._forwarding = forwarding

    def connectionMade(self) -> None:
        self._forwarding._request.registerProducer(self.transport, True)

    def stop(self) -> None:
        """Abandon the response: closes the upstream connection."""
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._forwarding.response_data(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        request = self._forwarding._request
        if not request.is_disconnected:
            request.unregisterProducer()
        self._forwarding.response_ended(reason)


def _describe(failure: Failure) -> str:
    """A one-line reason, unwrapping Twisted's aggregate client failures."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_describe(r) for r in reasons)
    if failure.check(CancelledError, ConnectingCancelledError):
        return "cancelled"
    return f"{type(failure.value).__name__}: {failure.value}"
