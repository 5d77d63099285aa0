"""The per-listener site: the factory of client connections, and what the
listener's requests share (routing, local resources, access log,
deadlines)."""

from __future__ import annotations

import time
from email.utils import formatdate

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory

from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerConfig
from matrix_edge.metrics.registry import ListenerMetrics
from matrix_edge.pools.dispatch import Dispatcher
from matrix_edge.server.accesslog import AccessLog
from matrix_edge.server.accesslog_file import AccessLogFile
from matrix_edge.server.alpn import NegotiatedProtocol
from matrix_edge.server.connections import ClientConnections
from matrix_edge.server.deadlines import Deadlines
from matrix_edge.server.fields import Field
from matrix_edge.server.h2 import H2ServerProtocol, H2Settings
from matrix_edge.server.h2_handler import H2RequestHandler
from matrix_edge.server.http1 import HTTP11Connection
from matrix_edge.server.local import local_resources
from matrix_edge.server.router import Router
from matrix_edge.upstream.client import Upstream


class EdgeSite(ServerFactory):
    """The site for one listener."""

    noisy = False

    def __init__(
        self,
        listener: ListenerConfig,
        config: EdgeConfig,
        upstream: Upstream,
        clock: IReactorTime,
        fallback: Upstream | None = None,
        access_log_file: AccessLogFile | None = None,
        dispatcher: Dispatcher | None = None,
        metrics: ListenerMetrics | None = None,
    ):
        """
        @param metrics: where this listener's requests are counted; None
            when nothing serves metrics.
        """
        upstreams = {"synapse": upstream}
        if fallback is not None:
            upstreams["fallback"] = fallback
        self.local = local_resources(listener, config, upstreams, dispatcher)
        self.listener = listener
        self.config = config
        self.trusted_proxies = config.trusted_proxies
        self.request_id_header = config.request_id_header.encode("ascii")
        self.request_id_lower = self.request_id_header.lower()
        self.server_header: bytes | None = None
        """The Server header of the edge's own answers."""
        if config.server_header is not None:
            self.server_header = config.server_header.encode("ascii")
        self.upstream = upstream
        self.clock = clock
        self.has_workers = dispatcher is not None
        self.metrics = metrics
        self.router = Router(
            listener,
            config,
            upstream,
            fallback,
            frozenset(self.local),
            dispatcher,
            metrics,
        )
        self.access_log = AccessLog(listener.tag, config.access_log, access_log_file)
        self.header_deadlines: Deadlines[HTTP11Connection | H2ServerProtocol] = (
            Deadlines(
                clock,
                config.timeouts.request_headers,
                lambda connection: connection.headers_too_slow(),
            )
        )
        self.idle: Deadlines[HTTP11Connection] = Deadlines(
            clock,
            config.timeouts.client_idle,
            lambda connection: connection.idle_too_long(),
        )
        self._h2_settings = H2Settings()
        self.connections = ClientConnections()
        self._date_second = -1
        self._date = b""

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """HTTP/1.1 on a listener without HTTP/2; otherwise the protocol
        that ALPN chose, once TLS has negotiated it."""
        if not self.listener.http2:
            return HTTP11Connection(self)
        return NegotiatedProtocol(
            lambda: HTTP11Connection(self),
            self._http2_protocol,
            self.clock,
            self.config.timeouts.client_idle,
        )

    def _http2_protocol(self) -> H2ServerProtocol:
        return H2ServerProtocol(
            lambda stream: H2RequestHandler(stream, self),
            self.clock,
            self._h2_settings,
            self.config.timeouts.client_idle,
            self.config.timeouts.body_idle,
            self.header_deadlines,
            self.connections,
        )

    def drain(self) -> Deferred[None]:
        """Stop taking requests: idle connections close now, busy ones
        once their requests are answered (HTTP/2 clients get GOAWAY).
        Fires when the last connection has closed."""
        return self.connections.drain()

    def retire(self) -> Deferred[None]:
        """A reload replaced this site: each connection finishes what it
        has and closes (see L{ClientConnections.retire}). Fires when the
        last connection has closed."""
        return self.connections.retire()

    def own_headers(self) -> list[Field]:
        """Headers of the edge's own answers: ``Date``, as an origin server
        sends it, and the configured ``Server``, if any."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode("ascii")
        headers = [(b"Date", self._date)]
        if self.server_header is not None:
            headers.append((b"Server", self.server_header))
        return headers
