"""Fixtures for tests over real loopback sockets: a recording upstream and a
matrix-edge site in front of it, in the test process's reactor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint

from matrix_edge.config.edge import EdgeConfig, parse_config
from matrix_edge.server.site import EdgeSite
from matrix_edge.server.tls import HTTPSOnlyFactory
from matrix_edge.tls import ServerTLS
from matrix_edge.upstream.client import Upstream
from tests.pki import make_pki
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
def make_stack(tmp_path: Path) -> Iterator[Any]:
    """Start an upstream and an edge; ``make_stack(**config_overrides)``,
    with ``tls=True`` for a TLS listener (HTTP/2 offered)."""
    ports: list[Any] = []
    upstreams: list[Upstream] = []

    def make(tls: bool = False, **overrides: Any) -> Stack:
        if tls:
            pki = make_pki(tmp_path / "pki")
            listener = overrides.setdefault("listener", {})
            listener["tls"] = {
                "certificate_path": str(pki.chain_path),
                "private_key_path": str(pki.key_path),
            }
        factory = RecordingUpstreamFactory()
        upstream_listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(upstream_listener)
        upstream_port = upstream_listener.getHost().port
        config = build_config(upstream_port, **overrides)
        upstream = Upstream(
            reactor, config.upstream, config.upstream_pool, config.timeouts
        )
        upstreams.append(upstream)
        listener = config.listeners[0]
        fallback = None
        if listener.fallback is not None:
            fallback = Upstream(
                reactor, listener.fallback, config.upstream_pool, config.timeouts
            )
            upstreams.append(fallback)
        site = EdgeSite(listener, config, upstream, reactor, fallback=fallback)
        edge_factory: Any = site
        if listener.tls is not None:
            context = ServerTLS(
                listener.tls.certificate_path,
                listener.tls.private_key_path,
                alpn_protocols=listener.alpn_protocols,
            )
            edge_factory = HTTPSOnlyFactory(context, site, reactor, site.server_header)
        endpoint: Any = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        if listener.proxy_protocol:
            endpoint = proxyEndpoint(endpoint)
        # TCP endpoints bind before listen() returns.
        bound: list[Any] = []
        endpoint.listen(edge_factory).addBoth(bound.append)
        edge_listener = bound[0]
        ports.append(edge_listener)
        return Stack(factory, upstream_port, edge_listener.getHost().port, site, config)

    def make_upstream() -> tuple[RecordingUpstreamFactory, int]:
        """Another recording upstream, e.g. for a fallback site."""
        factory = RecordingUpstreamFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return factory, port.getHost().port

    make.upstream = make_upstream  # type: ignore[attr-defined]

    yield make
    for upstream in upstreams:
        pytest_twisted.blockon(upstream.close())
    for port in ports:
        pytest_twisted.blockon(port.stopListening())
