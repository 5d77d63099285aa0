"""Active checks of the upstreams, as relayd's ``check``: Synapse's
``/health`` is fetched every few seconds, so the edge can answer 502 at
once while Synapse is down and report its state at ``/ready``."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge.config.upstream import UpstreamCheckConfig
from matrix_edge.upstream.client import (
    Upstream,
    UpstreamExchange,
    describe_failure,
    is_local_shortage,
)
from matrix_edge.upstream.protocol import HeaderList

log = Logger()

# While an upstream is down it is checked this often, so it is seen back soon.
DOWN_INTERVAL = 1.0
CHECK_TIMEOUT = 5.0


class UpstreamWatch(Service):
    """Checks one upstream until stopped, and logs each change of state so
    that an operator whose Synapse is not running reads why requests get
    502 instead of guessing."""

    def __init__(
        self,
        clock: Any,
        upstream: Upstream,
        check: UpstreamCheckConfig,
        web_server: bool = False,
    ):
        """
        @param web_server: the upstream is a listener's fallback web server,
            not Synapse: it has no ``/health``, so it counts as up when it
            answers ``/`` with any HTTP response, as relayd's ``check tcp``
            would have it.
        """
        self._clock = clock
        self._upstream = upstream
        self._check = check
        self._web_server = web_server
        self._path = b"/" if web_server else check.path.encode("ascii")
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
        headers = [(b"Host", host.encode("ascii")), (b"User-Agent", b"matrix-edge")]
        outcome = _CheckOutcome(any_status=self._web_server)
        exchange = self._upstream.request(b"GET", self._path, headers, None, outcome)
        timeout = self._clock.callLater(CHECK_TIMEOUT, outcome.time_out, exchange)

        def judged(reason: str | None) -> None:
            if timeout.active():
                timeout.cancel()
            if reason is not INCONCLUSIVE:
                self._upstream.mark(reason is None, reason or "")

        return outcome.done.addCallback(judged)

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
        if self._web_server:
            if healthy:
                log.info(
                    "The fallback web server answers at {address}", address=address
                )
            else:
                log.warn(
                    "The fallback web server at {address} does not answer "
                    "({reason}); requests for it will get 502 until it does.",
                    address=address,
                    reason=reason,
                )
        elif self._upstream.pool is not None:
            if healthy:
                log.info(
                    "Synapse worker {address} ({pool}) answers",
                    address=address,
                    pool=self._upstream.pool,
                )
            else:
                log.warn(
                    "Synapse worker {address} ({pool}) does not answer "
                    "({reason}); its requests go to the rest of its pool, or "
                    "to main where Synapse allows.",
                    address=address,
                    pool=self._upstream.pool,
                    reason=reason,
                )
        elif healthy:
            log.info("Synapse answers at {address}", address=address)
        else:
            log.warn(
                "No Synapse answers at {address} ({reason}); requests will get "
                "502 until it does. Start Synapse, or set `upstream` to its HTTP "
                "listener.",
                address=address,
                reason=reason,
            )


INCONCLUSIVE = "inconclusive"


class _CheckOutcome:
    """Hears one check's exchange; ``done`` fires with None when the
    upstream is healthy, or with the reason it is not."""

    def __init__(self, any_status: bool = False) -> None:
        self.done: Deferred[str | None] = Deferred()
        self._code = 0
        self._any_status = any_status

    def response_head(
        self, code: int, phrase: bytes, headers: HeaderList, length: int | None
    ) -> None:
        self._code = code

    def response_data(self, data: bytes) -> None:
        pass

    def response_flush(self) -> None:
        pass

    def response_end(self, complete: bool, reason: str) -> None:
        if not complete:
            self._settle(f"response broken off: {reason}")
        elif self._any_status or 200 <= self._code < 300:
            self._settle(None)
        else:
            self._settle(f"health check answered {self._code}")

    def upstream_failed(self, reason: Failure, timed_out: bool = False) -> None:
        if is_local_shortage(reason):
            # Out of descriptors here: no news about the upstream.
            log.warn(
                "Cannot check the upstream: {reason}", reason=describe_failure(reason)
            )
            self._settle(INCONCLUSIVE)
            return
        self._settle(describe_failure(reason))

    def time_out(self, exchange: UpstreamExchange) -> None:
        exchange.cancel()
        self._settle(f"no answer in {CHECK_TIMEOUT:g}s")

    def _settle(self, reason: str | None) -> None:
        if not self.done.called:
            self.done.callback(reason)
