"""The counts behind the metrics: plain numbers, kept in one object per
process and one per listener.

A request is counted once, when it ends (L{ListenerMetrics.request_ended}):
a dictionary increment for its counter, a bisection for each histogram
bucket, a few additions. prometheus_client's own metric objects would take
a lock and a label lookup per call, several times that, on a path where
every microsecond shows. What can be read when Prometheus scrapes (open
connections, upstream health, certificates, the whoami cache) is not kept
here at all; L{matrix_edge.metrics.collector} reads it then.

Labels are kept raw (the request's method and protocol as bytes, the status
as an integer) and made text at scrape time; every one of them is bounded:
methods outside the common seven count as ``other``, routes are the route
table's names, statuses are three digits.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime

if TYPE_CHECKING:
    from matrix_edge.server.request import EdgeRequest

BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds of the duration histograms, in seconds: from a small
answer to the edge's own 60 s timeouts (+Inf is implied)."""

METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"})
OTHER_METHOD = b"other"

LOCAL = "local"
"""The route of a request the edge answered itself (health, well-known,
refusals, errors before it was forwarded)."""

CLIENT_GONE = 499
"""The status of a request whose client went away before any response, as
in the access log (nginx's)."""

Histogram = list[float]
"""Counts per bucket of L{BUCKETS}, then +Inf, not cumulative; then the
sum of the values observed."""


def new_histogram() -> Histogram:
    return [0] * (len(BUCKETS) + 1) + [0.0]


def observe(histogram: Histogram, value: float) -> None:
    histogram[bisect_left(BUCKETS, value)] += 1
    histogram[-1] += value


class ProcessMetrics:
    """This process's counts: those of each listener, and those of the
    upstreams, which requests from every listener share."""

    def __init__(self, clock: IReactorTime):
        self.clock = clock
        self.listeners: list[ListenerMetrics] = []
        self.upstream_durations: dict[str, Histogram] = {}
        """Time from sending a request upstream to its response head, by
        upstream (``main``, a pool, ``fallback``)."""
        self.upstream_errors: dict[tuple[str, int, str], int] = {}
        """The edge's own 502 and 504 answers, by (upstream, status,
        cause)."""
        self.scrape_errors: int | None = None
        """Child processes that did not answer a scrape; None in a process
        that gathers no others."""

    def listener(self, tag: str) -> ListenerMetrics:
        """The counts of the listener tagged ``tag``: the same ones for the
        generations a reload makes, so that its counters only ever grow."""
        for counts in self.listeners:
            if counts.tag == tag:
                return counts
        counts = ListenerMetrics(tag, self)
        self.listeners.append(counts)
        return counts

    def upstream_error(self, upstream: str, status: int, cause: str) -> None:
        key = (upstream, status, cause)
        errors = self.upstream_errors
        errors[key] = errors.get(key, 0) + 1


class ListenerMetrics:
    """The request counts of one listener."""

    __slots__ = (
        "_clock",
        "_process",
        "_upstream_durations",
        "durations",
        "in_flight",
        "received_bytes",
        "requests",
        "sent_bytes",
        "tag",
    )

    def __init__(self, tag: str, process: ProcessMetrics):
        self.tag = tag
        self._process = process
        self._clock = process.clock
        self._upstream_durations = process.upstream_durations
        self.requests: dict[tuple[bytes, bytes, str, int], int] = {}
        """Requests ended, by (protocol as in the request line, method,
        route, status)."""
        self.durations: dict[str, Histogram] = {}
        """Request start to response end, by route."""
        self.received_bytes = 0
        self.sent_bytes = 0
        self.in_flight = 0
        """Requests started (the request does this) and not yet ended."""

    def request_ended(self, request: EdgeRequest) -> None:
        """Count a request that is over, answered or not; called once per
        request, by the request."""
        self.in_flight -= 1
        elapsed = self._clock.seconds() - request.started_at
        route = LOCAL
        forwarding = request.forwarding
        if forwarding is not None:
            lease = forwarding.lease
            if lease is not None:
                route = lease.route
                upstream_seconds = forwarding.upstream_seconds
                if upstream_seconds is not None:
                    upstream = self._upstream_durations.get(lease.pool)
                    if upstream is None:
                        upstream = self._upstream_durations[lease.pool] = (
                            new_histogram()
                        )
                    upstream[bisect_left(BUCKETS, upstream_seconds)] += 1
                    upstream[-1] += upstream_seconds
        method = request.method
        if method not in METHODS:
            method = OTHER_METHOD
        key = (
            request.clientproto,
            method,
            route,
            request.code if request.started_writing else CLIENT_GONE,
        )
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        duration = self.durations.get(route)
        if duration is None:
            duration = self.durations[route] = new_histogram()
        duration[bisect_left(BUCKETS, elapsed)] += 1
        duration[-1] += elapsed
        self.received_bytes += request.received_length
        self.sent_bytes += request.sent_length

    def upstream_error(self, upstream: str, status: int, cause: str) -> None:
        """An answer of the edge's own (502, 504) for want of an upstream."""
        self._process.upstream_error(upstream, status, cause)
