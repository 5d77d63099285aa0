"""This process's metrics, as Prometheus metric families, made when
Prometheus scrapes.

The counters come from L{matrix_edge.metrics.registry}; gauges are read
now from what the edge holds anyway: its open client connections, the
health of each upstream, the certificates in service (so a reload shows at
the next scrape), the whoami cache and the TLS layers' counts. Every series
carries ``process``: 0 for the first process, N for child N, so that the
first process can put every process's series in one answer.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

import attrs
from prometheus_client import ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from matrix_edge.config.upstream import UpstreamAddress
from matrix_edge.metrics.registry import BUCKETS, Histogram, ProcessMetrics
from matrix_edge.pools.whoami import WhoamiCache
from matrix_edge.server.connections import ClientConnections
from matrix_edge.server.http1 import HTTP11Connection
from matrix_edge.server.tls import HTTPSOnlyFactory
from matrix_edge.tls import SighupService
from matrix_edge.upstream.client import Upstream
from matrix_edge.version import version

_PROTOCOLS = {b"HTTP/1.0": "1.0", b"HTTP/1.1": "1.1", b"HTTP/2": "2"}
_BOUNDS = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]


@attrs.define
class Sources:
    """What one process's metrics are read from."""

    process: int
    """0 for the first process, N for child N."""

    counts: ProcessMetrics
    connections: list[tuple[str, bool, ClientConnections]] = attrs.Factory(list)
    """Each Matrix listener's tag, whether it offers HTTP/2, and its open
    connections."""

    tls: list[tuple[str, HTTPSOnlyFactory]] = attrs.Factory(list)
    """Each TLS listener's tag and TLS layer."""

    upstreams: list[tuple[str, Upstream]] = attrs.Factory(list)
    """Each upstream process with the upstream it counts for: ``main``, a
    worker pool, ``fallback``."""

    whoami: WhoamiCache | None = None
    reloader: SighupService | None = None


def member_label(address: UpstreamAddress) -> str:
    """``host:port`` (``[v6]:port``), or the path of a unix socket."""
    if address.is_unix:
        return address.unix_path
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


class EdgeCollector:
    """A prometheus_client collector of one process's metrics."""

    def __init__(self, sources: Sources):
        self._sources = sources
        self._process_metrics = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        label = str(self._sources.process)
        yield from self._requests(label)
        yield from self._connections(label)
        yield from self._upstreams(label)
        yield from self._tls(label)
        yield from self._edge(label)
        for family in self._process_metrics.collect():
            yield with_label(family, "process", label)

    def _requests(self, process: str) -> Iterator[Metric]:
        counts = self._sources.counts
        requests = CounterMetricFamily(
            "matrix_edge_requests",
            "Requests answered (or whose client went away: status 499 before "
            "any response), by listener, HTTP version, method (other: any "
            "but the common seven), route (the route table's route, main, "
            "fallback, or local for the edge's own answers) and status.",
            labels=["process", "listener", "protocol", "method", "route", "status"],
        )
        durations = HistogramMetricFamily(
            "matrix_edge_request_duration_seconds",
            "Time from a request's complete head to the end of its response.",
            labels=["process", "listener", "route"],
        )
        received = CounterMetricFamily(
            "matrix_edge_received_bytes",
            "Request body bytes received from clients (heads and framing not counted).",
            labels=["process", "listener"],
        )
        sent = CounterMetricFamily(
            "matrix_edge_sent_bytes",
            "Response body bytes sent to clients (heads and framing not counted).",
            labels=["process", "listener"],
        )
        in_flight = GaugeMetricFamily(
            "matrix_edge_requests_in_flight",
            "Requests started and not yet ended.",
            labels=["process", "listener"],
        )
        for listener in counts.listeners:
            tag = listener.tag
            for (protocol, method, route, status), value in list(
                listener.requests.items()
            ):
                requests.add_metric(
                    [
                        process,
                        tag,
                        _PROTOCOLS.get(protocol) or protocol.decode("ascii", "replace"),
                        method.decode("ascii", "replace"),
                        route,
                        str(status),
                    ],
                    value,
                )
            for route, histogram in list(listener.durations.items()):
                add_histogram(durations, [process, tag, route], histogram)
            received.add_metric([process, tag], listener.received_bytes)
            sent.add_metric([process, tag], listener.sent_bytes)
            in_flight.add_metric([process, tag], listener.in_flight)
        yield from (requests, durations, received, sent, in_flight)

    def _connections(self, process: str) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "matrix_edge_client_connections",
            "Open client connections whose HTTP protocol runs (TLS "
            "handshakes in progress not counted), by HTTP version.",
            labels=["process", "listener", "protocol"],
        )
        for tag, http2, connections in self._sources.connections:
            http11 = total = 0
            for connection in connections:
                total += 1
                if isinstance(connection, HTTP11Connection):
                    http11 += 1
            family.add_metric([process, tag, "1.1"], http11)
            if http2:
                family.add_metric([process, tag, "2"], total - http11)
        yield family

    def _upstreams(self, process: str) -> Iterator[Metric]:
        sources = self._sources
        up = GaugeMetricFamily(
            "matrix_edge_upstream_up",
            "1 when the upstream's last health check (or request) succeeded, "
            "0 when it failed; absent until one has.",
            labels=["process", "upstream", "member"],
        )
        connect_failures = CounterMetricFamily(
            "matrix_edge_upstream_connect_failures",
            "Connections to an upstream that could not be made, for requests "
            "and health checks.",
            labels=["process", "upstream", "member"],
        )
        for name, upstream in sources.upstreams:
            member = member_label(upstream.address)
            if upstream.healthy is not None:
                up.add_metric([process, name, member], 1 if upstream.healthy else 0)
            connect_failures.add_metric(
                [process, name, member], upstream.connect_failures
            )
        durations = HistogramMetricFamily(
            "matrix_edge_upstream_response_duration_seconds",
            "Time from sending a request upstream to its response head.",
            labels=["process", "upstream"],
        )
        for name, histogram in list(sources.counts.upstream_durations.items()):
            add_histogram(durations, [process, name], histogram)
        errors = CounterMetricFamily(
            "matrix_edge_upstream_errors",
            "The edge's own 502 and 504 answers, by upstream (unplaced: "
            "before one was chosen) and cause: connect_failed, "
            "connect_timeout, response_timeout, closed_early, "
            "malformed_response, upstream_down (health check failing), "
            "unsafe_request, other.",
            labels=["process", "upstream", "status", "cause"],
        )
        for (name, status, cause), value in list(
            sources.counts.upstream_errors.items()
        ):
            errors.add_metric([process, name, str(status), cause], value)
        yield from (up, connect_failures, durations, errors)
        if sources.whoami is not None:
            whoami = CounterMetricFamily(
                "matrix_edge_whoami_cache_requests",
                "Look-ups of an access token's user in the whoami cache.",
                labels=["process", "result"],
            )
            whoami.add_metric([process, "hit"], sources.whoami.hits)
            whoami.add_metric([process, "miss"], sources.whoami.misses)
            yield whoami

    def _tls(self, process: str) -> Iterator[Metric]:
        handshakes = CounterMetricFamily(
            "matrix_edge_tls_handshakes",
            "TLS handshakes completed (ok) and ended by a TLS error (failed).",
            labels=["process", "listener", "result"],
        )
        expiry = GaugeMetricFamily(
            "matrix_edge_certificate_expiry_timestamp_seconds",
            "The notAfter of each certificate in service, in seconds since "
            "the epoch; follows reloads.",
            labels=["process", "listener", "certificate"],
        )
        for tag, factory in self._sources.tls:
            handshakes.add_metric([process, tag, "ok"], factory.handshakes_ok)
            handshakes.add_metric([process, tag, "failed"], factory.handshakes_failed)
            for path, not_after in factory.tls.expiry():
                expiry.add_metric([process, tag, path], not_after)
        yield from (handshakes, expiry)

    def _edge(self, process: str) -> Iterator[Metric]:
        sources = self._sources
        build = GaugeMetricFamily(
            "matrix_edge_build_info",
            "1, with matrix-edge's version and Python's.",
            labels=["process", "version", "python"],
        )
        build.add_metric([process, version(), platform.python_version()], 1)
        yield build
        if sources.reloader is not None:
            reloads = CounterMetricFamily(
                "matrix_edge_reloads",
                "SIGHUP reloads, by whether every part of them succeeded.",
                labels=["process", "result"],
            )
            reloads.add_metric([process, "ok"], sources.reloader.reloads[True])
            reloads.add_metric([process, "failed"], sources.reloader.reloads[False])
            yield reloads
        if sources.counts.scrape_errors is not None:
            scrape_errors = CounterMetricFamily(
                "matrix_edge_metrics_scrape_errors",
                "Child processes that did not answer the first process's "
                "scrape in time (their series are missing from that answer).",
                labels=["process"],
            )
            scrape_errors.add_metric([process], sources.counts.scrape_errors)
            yield scrape_errors


def add_histogram(
    family: HistogramMetricFamily, labels: list[str], histogram: Histogram
) -> None:
    """Add one histogram kept as in L{registry} to ``family``."""
    cumulative = 0.0
    buckets = []
    for bound, count in zip(_BOUNDS, histogram[:-1], strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    family.add_metric(labels, buckets, histogram[-1])


def with_label(family: Metric, name: str, value: str) -> Metric:
    """``family`` with one more label, first, on every sample."""
    out = Metric(family.name, family.documentation, family.type, family.unit)
    out.samples = [
        sample._replace(labels={name: value, **sample.labels})
        for sample in family.samples
    ]
    return out
