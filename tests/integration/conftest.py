"""Fixtures for tests over real loopback sockets: a recording upstream and a
matrix-edge site in front of it, in the test process's reactor."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from matrix_edge.config.edge import EdgeConfig, parse_config
from matrix_edge.http.site import EdgeSite
from matrix_edge.http.upstream import Upstream
from tests.recording_upstream import RecordingUpstreamFactory


@attrs.define
class Stack:
    upstream: RecordingUpstreamFactory
    upstream_port: int
    port: int
    site: EdgeSite
    config: EdgeConfig


def build_config(upstream_port: int, **overrides: Any) -> EdgeConfig:
    document: dict[str, Any] = {
        "listeners": [{"port": 1, "bind_addresses": ["127.0.0.1"], "type": "client"}],
        "upstream": f"http://127.0.0.1:{upstream_port}",
    }
    listener_overrides = overrides.pop("listener", {})
    document["listeners"][0].update(listener_overrides)
    document.update(overrides)
    return parse_config(document)


@pytest.fixture
def make_stack() -> Iterator[Any]:
    """Start an upstream and an edge; ``make_stack(**config_overrides)``."""
    ports: list[Any] = []
    upstreams: list[Upstream] = []

    def make(**overrides: Any) -> Stack:
        factory = RecordingUpstreamFactory()
        upstream_listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(upstream_listener)
        upstream_port = upstream_listener.getHost().port
        config = build_config(upstream_port, **overrides)
        upstream = Upstream(
            reactor, config.upstream, config.upstream_pool, config.timeouts
        )
        upstreams.append(upstream)
        site = EdgeSite(config.listeners[0], config, upstream, reactor)
        edge_listener = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(edge_listener)
        return Stack(factory, upstream_port, edge_listener.getHost().port, site, config)

    yield make
    for upstream in upstreams:
        pytest_twisted.blockon(upstream.close())
    for port in ports:
        pytest_twisted.blockon(port.stopListening())
