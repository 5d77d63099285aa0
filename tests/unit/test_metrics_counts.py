"""Metrics: the metrics listener's configuration, the counts kept per
request (each label, bounded), the histograms, and the families made from
them, on Twisted's in-memory reactor and transports."""

from __future__ import annotations

import random

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from matrix_edge.config._base import ConfigError
from matrix_edge.config.edge import parse_config
from matrix_edge.config.listeners import ListenerType
from matrix_edge.metrics.collector import EdgeCollector, Sources, add_histogram
from matrix_edge.metrics.registry import (
    BUCKETS,
    ProcessMetrics,
    new_histogram,
    observe,
)
from matrix_edge.server.site import EdgeSite
from matrix_edge.upstream.client import Upstream
from tests.unit.test_pools import W, deploy, facts

UPSTREAM = "http://127.0.0.1:8008"

# The metrics listener's configuration


def _listeners(*extra: dict) -> dict:
    return {"listeners": [{"port": 8443}, *extra], "upstream": UPSTREAM}


def test_metrics_listener_defaults_to_loopback():
    config = parse_config(_listeners({"port": 9000, "type": "metrics"}))
    metrics = config.listeners[1]
    assert metrics.type is ListenerType.METRICS
    assert metrics.bind_addresses == ("127.0.0.1", "::1")
    assert metrics.tls is None
    assert metrics.tag == "metrics-9000"
    assert not metrics.http2


def test_metrics_listener_addresses_and_tag_can_be_set():
    config = parse_config(
        _listeners(
            {
                "port": 9000,
                "type": "metrics",
                "bind_addresses": ["10.0.0.5"],
                "tag": "prometheus",
            }
        )
    )
    assert config.listeners[1].bind_addresses == ("10.0.0.5",)
    assert config.listeners[1].tag == "prometheus"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tls", {"certificate_path": "/x"}, "TLS is not supported"),
        ("http2", True, "not used by a metrics listener"),
        ("fallback", "http://127.0.0.1:8080", "not used by a metrics listener"),
        ("admin_allow", ["127.0.0.1/32"], "not used by a metrics listener"),
        ("proxy_protocol", True, "not used by a metrics listener"),
    ],
)
def test_metrics_listener_refuses_matrix_keys(key, value, message):
    with pytest.raises(ConfigError) as raised:
        parse_config(_listeners({"port": 9000, "type": "metrics", key: value}))
    assert raised.value.path == ("listeners", 1, key)
    assert message in str(raised.value)


def test_metrics_listener_addresses_are_checked():
    with pytest.raises(ConfigError) as raised:
        parse_config(
            _listeners({"port": 9000, "type": "metrics", "bind_addresses": ["x"]})
        )
    assert str(raised.value).startswith("listeners[1].bind_addresses[0]: ")


def test_metrics_alone_is_not_a_proxy():
    with pytest.raises(ConfigError) as raised:
        parse_config(
            {"listeners": [{"port": 9000, "type": "metrics"}], "upstream": UPSTREAM}
        )
    assert str(raised.value) == (
        "listeners: at least one client or federation listener is required"
    )


def test_unknown_type_names_metrics():
    with pytest.raises(ConfigError) as raised:
        parse_config(_listeners({"port": 9000, "type": "prometheus"}))
    assert "'metrics'" in str(raised.value)


# Histograms


def test_histogram_buckets_are_inclusive_upper_bounds():
    histogram = new_histogram()
    for value in (0.0, 0.005, 0.0051, 0.7, 60.0, 61.0, 3600.0):
        observe(histogram, value)
    family = _family_of(histogram)
    buckets = {
        sample.labels["le"]: sample.value
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    assert buckets["0.005"] == 2
    assert buckets["0.01"] == 3
    assert buckets["0.5"] == 3
    assert buckets["1.0"] == 4
    assert buckets["60.0"] == 5
    assert buckets["+Inf"] == 7
    assert list(buckets) == [*(str(float(b)) for b in BUCKETS), "+Inf"]
    [total] = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(3721.7101)


def _family_of(histogram):
    from prometheus_client.metrics_core import HistogramMetricFamily

    family = HistogramMetricFamily("h", "h", labels=["x"])
    add_histogram(family, ["y"], histogram)
    return family


# Requests counted at their end


class Edge:
    """A listener on the in-memory reactor, counting into ``counts``."""

    def __init__(self, **overrides):
        document = {
            "listeners": [{"port": 8443, "bind_addresses": ["127.0.0.1"]}],
            "upstream": UPSTREAM,
            **overrides,
        }
        self.config = parse_config(document)
        self.clock = MemoryReactorClock()
        self.upstream = Upstream(
            self.clock,
            self.config.upstream,
            self.config.upstream_pool,
            self.config.timeouts,
            endpoint=TCP4ClientEndpoint(self.clock, "127.0.0.1", 8008),
        )
        self.counts = ProcessMetrics(self.clock)
        listener = self.config.listeners[0]
        self.listener = self.counts.listener(listener.tag)
        self.site = EdgeSite(
            listener, self.config, self.upstream, self.clock, metrics=self.listener
        )
        self.sources = Sources(0, self.counts)
        self.sources.connections.append((listener.tag, False, self.site.connections))
        self.sources.upstreams.append(("main", self.upstream))

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "203.0.113.7", 50000))
        client = StringTransport(
            peerAddress=IPv4Address("TCP", "203.0.113.7", 50000),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
        )
        channel.makeConnection(client)
        return channel, client

    def upstream_connection(self):
        host, port, factory, _timeout, _bind = self.clock.tcpClients.pop(0)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol

    def scrape(self) -> dict[str, list]:
        """Every sample of an exposition, by family."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(EdgeCollector(self.sources))
        text = generate_latest(registry).decode()
        return {
            family.name: family.samples
            for family in text_string_to_metric_families(text)
        }


def _requests(samples) -> dict[tuple[str, ...], float]:
    return {
        (
            s.labels["listener"],
            s.labels["protocol"],
            s.labels["method"],
            s.labels["route"],
            s.labels["status"],
        ): s.value
        for s in samples["matrix_edge_requests"]
    }


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def test_a_forwarded_request_is_counted_with_each_label():
    edge = Edge()
    channel, _client = edge.connect()
    channel.dataReceived(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"
    )
    assert edge.listener.in_flight == 1
    upstream = edge.upstream_connection()
    channel.dataReceived(b"hello")
    edge.clock.advance(0.03)
    upstream.dataReceived(OK)
    assert edge.listener.in_flight == 0
    samples = edge.scrape()
    assert _requests(samples) == {("client-8443", "1.1", "PUT", "main", "200"): 1}
    [received] = samples["matrix_edge_received_bytes"]
    [sent] = samples["matrix_edge_sent_bytes"]
    assert (received.value, sent.value) == (5, 2)
    durations = {
        s.labels["le"]: s.value
        for s in samples["matrix_edge_request_duration_seconds"]
        if s.name.endswith("_bucket")
    }
    assert durations["0.025"] == 0
    assert durations["0.05"] == 1
    upstream_durations = {
        (s.labels["upstream"], s.labels["le"]): s.value
        for s in samples["matrix_edge_upstream_response_duration_seconds"]
        if s.name.endswith("_bucket")
    }
    assert upstream_durations[("main", "0.025")] == 0
    assert upstream_durations[("main", "0.05")] == 1
    [in_flight] = samples["matrix_edge_requests_in_flight"]
    assert in_flight.value == 0
    assert all(s.labels["process"] == "0" for f in samples.values() for s in f)


def test_local_answers_and_refusals_are_local():
    edge = Edge()
    channel, _client = edge.connect()
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
    channel.dataReceived(b"HEAD /elsewhere HTTP/1.0\r\n\r\n")
    assert _requests(edge.scrape()) == {
        ("client-8443", "1.1", "GET", "local", "200"): 1,
        ("client-8443", "1.0", "HEAD", "local", "404"): 1,
    }


def test_odd_methods_count_as_other():
    edge = Edge()
    channel, _client = edge.connect()
    for method in (b"PROPFIND", b"MKCOL", b"TRACE", b"PATCH", b"OPTIONS"):
        channel.dataReceived(method + b" /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert _requests(edge.scrape()) == {
        ("client-8443", "1.1", "other", "local", "404"): 3,
        ("client-8443", "1.1", "PATCH", "local", "404"): 1,
        ("client-8443", "1.1", "OPTIONS", "local", "404"): 1,
    }


def test_a_client_gone_before_the_answer_is_499_and_not_in_flight():
    edge = Edge()
    channel, _client = edge.connect()
    channel.dataReceived(b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: h\r\n\r\n")
    edge.upstream_connection()
    assert edge.listener.in_flight == 1
    channel.connectionLost(Failure(ConnectionRefusedError()))
    samples = edge.scrape()
    assert _requests(samples) == {("client-8443", "1.1", "GET", "main", "499"): 1}
    [in_flight] = samples["matrix_edge_requests_in_flight"]
    assert in_flight.value == 0


def _errors(samples) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["upstream"], s.labels["status"], s.labels["cause"]): s.value
        for s in samples["matrix_edge_upstream_errors"]
    }


def test_upstream_refusing_is_a_counted_502():
    edge = Edge()
    channel, _client = edge.connect()
    channel.dataReceived(b"GET /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n\r\n")
    _host, _port, factory, _timeout, _bind = edge.clock.tcpClients.pop(0)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    samples = edge.scrape()
    assert _requests(samples) == {("client-8443", "1.1", "GET", "main", "502"): 1}
    assert _errors(samples) == {("main", "502", "connect_failed"): 1}
    [failures] = samples["matrix_edge_upstream_connect_failures"]
    assert failures.labels["member"] == "127.0.0.1:8008"
    assert failures.value == 1
    [up] = samples["matrix_edge_upstream_up"]
    assert up.value == 0


def test_no_response_in_time_is_a_counted_504():
    edge = Edge()
    channel, _client = edge.connect()
    channel.dataReceived(b"GET /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n\r\n")
    edge.upstream_connection()
    edge.clock.advance(edge.config.timeouts.upstream_response + 1)
    samples = edge.scrape()
    assert _requests(samples) == {("client-8443", "1.1", "GET", "main", "504"): 1}
    assert _errors(samples) == {("main", "504", "response_timeout"): 1}


def test_closed_before_a_response_and_a_malformed_one():
    edge = Edge()
    channel, _client = edge.connect()
    channel.dataReceived(b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n\r\n")
    edge.upstream_connection().connectionLost(Failure(ConnectionRefusedError()))
    channel, _client = edge.connect()
    channel.dataReceived(b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n\r\n")
    edge.upstream_connection().dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert _errors(edge.scrape()) == {
        ("main", "502", "closed_early"): 1,
        ("main", "502", "malformed_response"): 1,
    }


def test_a_known_down_upstream_is_counted_as_down():
    edge = Edge()
    edge.upstream.watched = True
    edge.upstream.mark(False, "refused")
    # The first request tries it all the same (the only upstream); the
    # next, while that one is trying, fails fast.
    for _ in range(2):
        channel, _client = edge.connect()
        channel.dataReceived(b"GET /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert _errors(edge.scrape()) == {("main", "502", "upstream_down"): 1}


def test_open_connections_are_read_at_scrape_time():
    edge = Edge()
    first, _ = edge.connect()
    edge.connect()
    [open_now] = edge.scrape()["matrix_edge_client_connections"]
    assert (open_now.labels["protocol"], open_now.value) == ("1.1", 2)
    first.connectionLost(Failure(ConnectionRefusedError()))
    [open_now] = edge.scrape()["matrix_edge_client_connections"]
    assert open_now.value == 1


def test_many_distinct_paths_and_methods_add_no_series():
    """1,000 requests with random paths and odd methods: the number of
    series stays what the first few made, and so does the memory held."""
    edge = Edge()
    rng = random.Random(12)
    methods = [b"GET", b"PROPFIND", b"MKCOL", b"LOCK", b"UNLOCK", b"PURGE"]

    def burst(count: int) -> None:
        channel, _client = edge.connect()
        for _ in range(count):
            path = b"/%x/%x" % (rng.getrandbits(64), rng.getrandbits(32))
            method = rng.choice(methods)
            channel.dataReceived(method + b" " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")

    def series() -> int:
        return sum(len(samples) for samples in edge.scrape().values())

    burst(len(methods) * 20)
    before = series()
    keys = len(edge.listener.requests)
    burst(1000)
    assert series() == before
    assert len(edge.listener.requests) == keys == 2
    assert sum(edge.listener.requests.values()) == len(methods) * 20 + 1000


# Routes by placement


def test_placement_names_the_route():
    d = deploy({"synchrotron": W[:2]})
    sync = d.dispatcher.place(facts(b"GET", b"/_matrix/client/v3/sync?since=s1"))
    assert (sync.pool, sync.route) == ("synchrotron", "sync")
    unmatched = d.dispatcher.place(facts(b"GET", b"/_matrix/client/versions"))
    assert (unmatched.pool, unmatched.route) == ("main", "main")


def test_a_route_whose_pool_is_down_keeps_its_name_on_main():
    d = deploy({"synchrotron": W[:1]})
    [worker] = d.dispatcher.pools["synchrotron"].members
    worker.upstream.watched = True
    worker.upstream.mark(False, "down")
    placed = d.dispatcher.place(facts(b"GET", b"/_matrix/client/v3/sync?since=s"))
    assert (placed.pool, placed.route) == ("main", "sync")


def test_a_queued_request_keeps_its_route():
    d = deploy({"synchrotron": {"addresses": W[:1], "max_concurrent": 1, "queue": 5}})
    sync = b"/_matrix/client/v3/sync?since=s"
    first = d.dispatcher.place(facts(b"GET", sync))
    waiting = d.dispatcher.place(facts(b"GET", sync))
    leased = []
    waiting.addCallback(leased.append)
    first.release()
    [lease] = leased
    assert (lease.pool, lease.route) == ("synchrotron", "sync")


def test_whoami_cache_hits_and_misses_are_counted():
    d = deploy({"synchrotron": W[:2]})
    cache = d.dispatcher.whoami
    digest = b"d" * 16
    assert cache.cached(digest) == (False, None)
    cache._store(digest, b"@alice:hs", 60)
    assert cache.cached(digest) == (True, b"@alice:hs")
    sources = Sources(0, ProcessMetrics(d.clock), whoami=cache)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(sources))
    families = {
        f.name: f
        for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    results = {
        s.labels["result"]: s.value
        for s in families["matrix_edge_whoami_cache_requests"].samples
    }
    assert results == {"hit": 1, "miss": 1}


def test_every_series_names_its_process():
    edge = Edge()
    edge.sources.process = 3
    samples = edge.scrape()
    assert "process_cpu_seconds" in samples
    assert "matrix_edge_build_info" in samples
    labels = [s.labels for family in samples.values() for s in family]
    assert labels
    assert all(label["process"] == "3" for label in labels)
