"""Fixtures for the adversarial probes: an edge on real loopback sockets in
the test's reactor (plain or TLS), in front of an upstream that records the
exact bytes it received and may be scripted to answer badly, plus a client
TLS context and the failures logged while a test runs."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from hypothesis import HealthCheck, settings
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint

from matrix_edge.config.edge import EdgeConfig, parse_config
from matrix_edge.pools.dispatch import make_dispatcher
from matrix_edge.server.site import EdgeSite
from matrix_edge.server.tls import HTTPSOnlyFactory
from matrix_edge.tls import ServerTLS
from matrix_edge.upstream.client import Upstream
from tests.pki import Pki, make_pki
from tests.recording_upstream import (
    Recorded,
    RecordingUpstreamFactory,
    UpstreamProtocol,
)

# The fuzzers' settings: reproducible in CI (derandomized, no example
# database), bounded, and patient with the examples that start edges.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

Script = Callable[["ScriptedProtocol", Recorded, int], bool]
"""Answers one request: (the connection, the request as received, how many
requests this connection had before it). Returns False to let the
recording upstream answer as usual."""


class ScriptedProtocol(UpstreamProtocol):
    """The recording upstream, answering as its factory's script says."""

    factory: ScriptedUpstream

    def connectionMade(self) -> None:
        super().connectionMade()
        self.served = 0
        self.factory.protocols.append(self)

    def _answer(self, rec: Recorded) -> None:
        nth, self.served = self.served, self.served + 1
        script = self.factory.script
        if script is None or not script(self, rec, nth):
            super()._answer(rec)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def reset(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class ScriptedUpstream(RecordingUpstreamFactory):
    protocol = ScriptedProtocol

    def __init__(self, script: Script | None = None) -> None:
        super().__init__()
        self.script = script
        self.protocols: list[ScriptedProtocol] = []

    def open_protocols(self) -> list[ScriptedProtocol]:
        return [
            p
            for p in self.protocols
            if p.transport is not None and p.connection_id not in self.lost
        ]


@attrs.define
class Stack:
    upstream: RecordingUpstreamFactory
    upstream_port: int
    port: int
    site: EdgeSite
    config: EdgeConfig
    main: Upstream
    members: dict[str, Upstream]
    pki: Pki | None
    fallback: RecordingUpstreamFactory | None = None

    def client_tls(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        assert self.pki is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert_path))
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


class Edge:
    """``edge(...)`` starts an upstream and an edge before it."""

    def __init__(self, tmp_path: Path):
        self._tmp_path = tmp_path
        self._ports: list[Any] = []
        self._upstreams: list[Upstream] = []

    def listen(self, factory: Any, port: int = 0) -> Any:
        """Serve ``factory`` on loopback (again on ``port``, to restart)."""
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
        self._ports.append(listening)
        return listening

    def __call__(
        self,
        upstream: RecordingUpstreamFactory | None = None,
        tls: bool = False,
        fallback: RecordingUpstreamFactory | None = None,
        upstream_port: int | None = None,
        **overrides: Any,
    ) -> Stack:
        """An edge before ``upstream`` (a recording one by default), or
        before whatever listens on ``upstream_port``; ``fallback`` is served
        as the listener's fallback web server; ``overrides`` go into the
        configuration (``listener`` into the listener's)."""
        if upstream is None:
            upstream = RecordingUpstreamFactory()
        if upstream_port is None:
            upstream_port = self.listen(upstream).getHost().port
        listener: dict[str, Any] = {
            "port": 1,
            "bind_addresses": ["127.0.0.1"],
            "type": "client",
            **overrides.pop("listener", {}),
        }
        pki = None
        if tls:
            pki = make_pki(self._tmp_path / "pki")
            listener["tls"] = {
                "certificate_path": str(pki.chain_path),
                "private_key_path": str(pki.key_path),
            }
        if fallback is not None:
            fallback_port = self.listen(fallback).getHost().port
            listener["fallback"] = f"http://127.0.0.1:{fallback_port}"
        config = parse_config(
            {
                "listeners": [listener],
                "upstream": f"http://127.0.0.1:{upstream_port}",
                **overrides,
            }
        )
        made: dict[Any, Upstream] = {}

        def upstream_for(address: Any) -> Upstream:
            if address not in made:
                made[address] = Upstream(
                    reactor, address, config.upstream_pool, config.timeouts
                )
                self._upstreams.append(made[address])
            return made[address]

        main = upstream_for(config.upstream)
        dispatcher = None
        if config.workers.enabled:
            dispatcher = make_dispatcher(config.workers, reactor, main, upstream_for)
        listener_config = config.listeners[0]
        fallback_upstream = None
        if listener_config.fallback is not None:
            fallback_upstream = upstream_for(listener_config.fallback)
        site = EdgeSite(
            listener_config,
            config,
            main,
            reactor,
            fallback=fallback_upstream,
            dispatcher=dispatcher,
        )
        factory: Any = site
        if listener_config.tls is not None:
            context = ServerTLS(
                listener_config.tls.certificate_path,
                listener_config.tls.private_key_path,
                alpn_protocols=listener_config.alpn_protocols,
            )
            factory = HTTPSOnlyFactory(context, site, reactor, site.server_header)
        bound: list[Any] = []
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addBoth(
            bound.append
        )
        self._ports.append(bound[0])
        members = {str(a): u for a, u in made.items() if u is not main}
        return Stack(
            upstream,
            upstream_port,
            bound[0].getHost().port,
            site,
            config,
            main,
            members,
            pki,
            fallback,
        )

    def close(self) -> None:
        for upstream in self._upstreams:
            pytest_twisted.blockon(upstream.close())
        for port in self._ports:
            pytest_twisted.blockon(maybeDeferred(port.stopListening))


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    made = Edge(tmp_path)
    yield made
    made.close()


@pytest.fixture(scope="module")
def module_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """``edge`` for a whole test module: the fuzzers and the HTTP/2 probes
    share one edge between their cases, as real clients do."""
    made = Edge(tmp_path_factory.mktemp("edge"))
    yield made
    made.close()
