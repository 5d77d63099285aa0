"""Active checks of the upstreams, as relayd's ``check``: Synapse's
``/health`` is fetched every few seconds, so the edge can answer 502 at
once while Synapse is down and report its state at ``/ready``."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from matrix_edge.config.upstream import UpstreamCheckConfig
from matrix_edge.http.upstream import Upstream

log = Logger()

# While an upstream is down it is checked this often, so it is seen back soon.
DOWN_INTERVAL = 1.0
CHECK_TIMEOUT = 5.0


class UpstreamWatch(Service):
    """Checks one upstream until stopped, and logs each change of state so
    that an operator whose Synapse is not running reads why requests get
    502 instead of guessing."""

    def __init__(self, clock: Any, upstream: Upstream, check: UpstreamCheckConfig):
        self._clock = clock
        self._upstream = upstream
        self._check = check
        self._call: IDelayedCall | None = None
        self._in_flight: Deferred[None] | None = None
        upstream.on_state_change.append(self._log_change)

    def startService(self) -> None:
        super().startService()
        if self._check.enabled:
            self._upstream.watched = True
            self._schedule(0)

    def stopService(self) -> None:
        super().stopService()
        self._upstream.watched = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if self._in_flight is not None:
            self._in_flight.cancel()

    def check(self) -> Deferred[None]:
        """Fetch the check path once and record the outcome."""
        address = self._upstream.address
        host = "localhost" if address.is_unix else address.host
        headers = Headers(
            {b"Host": [host.encode("ascii")], b"User-Agent": [b"matrix-edge"]}
        )
        d = self._upstream.request(
            b"GET", self._check.path.encode("ascii"), headers, None
        )
        d.addTimeout(CHECK_TIMEOUT, self._clock)

        def answered(response: IResponse) -> Deferred[None]:
            def judged(_: object) -> None:
                if 200 <= response.code < 300:
                    self._upstream.mark(True)
                else:
                    self._upstream.mark(
                        False, f"{self._check.path} answered {response.code}"
                    )

            done: Deferred[None] = Deferred()
            response.deliverBody(_Discard(done))
            return done.addCallback(judged)

        def failed(failure: Failure) -> None:
            self._upstream.mark(False, _reason(failure))

        return d.addCallback(answered).addErrback(failed)

    def _schedule(self, delay: float) -> None:
        self._call = self._clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._call = None
        d = self._in_flight = self.check()

        def next_check(_: object) -> None:
            self._in_flight = None
            if self.running:
                up = self._upstream.healthy
                self._schedule(self._check.interval if up else DOWN_INTERVAL)

        d.addBoth(next_check)

    def _log_change(self, healthy: bool, reason: str) -> None:
        address = str(self._upstream.address)
        if healthy:
            log.info("Synapse answers at {address}", address=address)
        else:
            log.warn(
                "No Synapse answers at {address} ({reason}); requests will get "
                "502 until it does. Start Synapse, or set `upstream` to its HTTP "
                "listener.",
                address=address,
                reason=reason,
            )


class _Discard(Protocol):
    """Reads a response body to its end and drops it, so the connection
    goes back to the pool."""

    def __init__(self, done: Deferred[None]):
        self._done = done

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(None)
        else:
            self._done.errback(reason)


def _reason(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_reason(r) for r in reasons)
    return failure.getErrorMessage() or type(failure.value).__name__
