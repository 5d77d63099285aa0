"""What one configuration builds to serve requests: a generation.

A generation holds everything the listeners hand connections to: the
upstream pools and their health checks, the Synapse worker pools, the access
log file, the TLS contexts, and a site per listener. The listening sockets
are not part of it (see L{matrix_edge.service}): a reload that changes the
configuration builds a new generation beside the running one, the sockets
switch to it, and the old one retires: its connections finish what they
have, then it stops. Nothing is cut, and no socket is closed and re-opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger

from matrix_edge.acme.challenges import TLSALPNResponder
from matrix_edge.acme.store import AcmeStore, StateDirectoryError
from matrix_edge.config._base import ConfigError
from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerType
from matrix_edge.config.routes import MAIN
from matrix_edge.config.upstream import UpstreamAddress
from matrix_edge.metrics.collector import Sources
from matrix_edge.metrics.registry import ProcessMetrics
from matrix_edge.pools.dispatch import Dispatcher, make_dispatcher
from matrix_edge.server.accesslog_file import AccessLogFile
from matrix_edge.server.site import EdgeSite
from matrix_edge.server.tls import HTTPSOnlyFactory
from matrix_edge.tls import ServerTLS, TLSConfigError
from matrix_edge.upstream.client import Upstream
from matrix_edge.upstream.health import UpstreamWatch

log = Logger()


class UpstreamService(Service):
    """Closes the idle upstream connections when its generation stops."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.upstream.close()


class Generation(MultiService):
    """The sites, upstreams and files built from one configuration.

    Raises L{ConfigError} for what only loading files shows (certificates
    that do not parse, keys that do not match). With C{prepare_acme} (the
    first process), placeholders are put in the ACME state directory for
    names with no certificate yet; the other processes load what it put
    there.
    """

    def __init__(
        self,
        config: EdgeConfig,
        reactor: Any,
        counts: ProcessMetrics | None = None,
        prepare_acme: bool = True,
    ):
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.tls = load_tls(config, prepare_acme)
        acme_tls = None
        if config.acme is not None:
            # Every TLS listener answers tls-alpn-01: the CA picks the port.
            acme_tls = TLSALPNResponder(AcmeStore(config.acme.state_directory))
        self._upstreams: dict[UpstreamAddress, Upstream] = {}
        self.synapse = self._upstream_for(config.upstream)
        self.dispatcher: Dispatcher | None = None
        if config.workers.enabled:
            self.dispatcher = make_dispatcher(
                config.workers, reactor, self.synapse, self._upstream_for
            )
        self.access_file: AccessLogFile | None = None
        if config.access_log.enabled and config.access_log.path is not None:
            self.access_file = AccessLogFile(reactor, config.access_log.path)
            self.access_file.setServiceParent(self)

        self.sites: dict[int, EdgeSite] = {}
        """Each Matrix listener's site, by its index in ``listeners``."""
        self.factories: dict[int, IProtocolFactory] = {}
        """What each Matrix listener's sockets hand connections to."""
        self._https: list[tuple[str, HTTPSOnlyFactory]] = []
        self._fallbacks: list[Upstream] = []
        for i, listener in enumerate(config.listeners):
            if listener.type is ListenerType.METRICS:
                continue
            fallback = None
            if listener.fallback is not None:
                fallback = self._upstream_for(listener.fallback, web_server=True)
                self._fallbacks.append(fallback)
            site = EdgeSite(
                listener,
                config,
                self.synapse,
                reactor,
                fallback=fallback,
                access_log_file=self.access_file,
                dispatcher=self.dispatcher,
                metrics=counts.listener(listener.tag) if counts is not None else None,
            )
            self.sites[i] = site
            self.factories[i] = site
            if i in self.tls:
                https = HTTPSOnlyFactory(
                    self.tls[i], site, reactor, site.server_header, acme=acme_tls
                )
                self.factories[i] = https
                self._https.append((listener.tag, https))

    def _upstream_for(
        self, address: UpstreamAddress, web_server: bool = False
    ) -> Upstream:
        upstream = self._upstreams.get(address)
        if upstream is None:
            config = self.config
            upstream = Upstream(
                self._reactor, address, config.upstream_pool, config.timeouts
            )
            self._upstreams[address] = upstream
            UpstreamService(upstream).setServiceParent(self)
            watch = UpstreamWatch(
                self._reactor, upstream, config.upstream_check, web_server
            )
            watch.setServiceParent(self)
        return upstream

    def reload_files(self) -> bool:
        """Re-read the certificates and re-open the access log, as SIGHUP
        does when the configuration itself has not changed (a renewal, a
        log rotation). Whether every certificate loaded."""
        loaded = True
        for context in {id(t): t for t in self.tls.values()}.values():
            loaded = context.reload() and loaded
        if self.access_file is not None:
            self.access_file.reopen()
        return loaded

    def describe_to(self, sources: Sources) -> None:
        """Point the metrics at this generation's connections, TLS layers
        and upstreams."""
        sources.connections = [
            (site.listener.tag, site.listener.http2, site.connections)
            for site in self.sites.values()
        ]
        sources.tls = list(self._https)
        sources.upstreams = upstream_members(
            self.synapse, self.dispatcher, self._fallbacks
        )
        sources.whoami = self.dispatcher.whoami if self.dispatcher is not None else None

    def open_connections(self) -> int:
        return sum(len(site.connections) for site in self.sites.values())

    def drain(self) -> Deferred[None]:
        """Stop taking requests: idle connections close now, busy ones once
        answered. Fires when the last connection has closed."""
        return _all([site.drain() for site in self.sites.values()])

    def retire(self) -> Deferred[None]:
        """Replaced by a reload: connections finish what they have and
        close, without cutting a request on its way in (see
        L{EdgeSite.retire}). Fires when the last connection has closed."""
        return _all([site.retire() for site in self.sites.values()])

    def abort(self) -> None:
        """Close every connection now, whatever is in progress."""
        for site in self.sites.values():
            site.connections.abort()


def _all(waiting: list[Deferred[None]]) -> Deferred[None]:
    return gatherResults(waiting).addCallback(lambda _: None)


def load_tls(config: EdgeConfig, prepare_acme: bool = True) -> dict[int, ServerTLS]:
    """The TLS context of each TLS listener, by listener index; listeners
    with the same certificates and protocols share one. ACME names come
    first, from the state directory (placeholders until the CA has issued,
    made here with C{prepare_acme}). Load errors become L{ConfigError}s that
    name the listener's key, down to the failing entry of ``certificates``
    or ``acme`` when several are given."""
    store = _acme_store(config, prepare_acme)
    shared: dict[tuple[tuple[tuple[str, str], ...], tuple[bytes, ...]], ServerTLS] = {}
    out: dict[int, ServerTLS] = {}
    for i, listener in enumerate(config.listeners):
        if listener.tls is None:
            continue
        names = listener.tls.acme_domains or ()
        from_acme = []
        for name in names:
            assert store is not None
            if prepare_acme:
                try:
                    store.ensure_servable(name)
                except OSError as e:
                    raise ConfigError(
                        ("acme", "state_directory"),
                        f"cannot write a placeholder certificate for {name}: {e}",
                    ) from e
            elif store.certificate(name) is None:
                continue  # --check-config before the first start.
            from_acme.append(store.certificate_files(name))
        files = tuple(from_acme) + tuple(
            (c.certificate_path, c.private_key_path) for c in listener.tls.certificates
        )
        if not files:
            continue
        key = (files, listener.alpn_protocols)
        if key not in shared:
            try:
                shared[key] = ServerTLS.from_certificates(
                    files, alpn_protocols=listener.alpn_protocols
                )
            except TLSConfigError as e:
                path: tuple[str | int, ...] = ("listeners", i, "tls")
                index = e.certificate_index
                acme_count = len(from_acme)
                if index is not None and index < acme_count:
                    path = (*path, "acme") + ((index,) if len(names) > 1 else ())
                elif index is not None and len(listener.tls.certificates) > 1:
                    path = (*path, "certificates", index - acme_count)
                raise ConfigError(path, str(e)) from e
        out[i] = shared[key]
    return out


def _acme_store(config: EdgeConfig, prepare: bool) -> AcmeStore | None:
    if config.acme is None:
        return None
    store = AcmeStore(config.acme.state_directory)
    if prepare:
        try:
            store.prepare()
        except StateDirectoryError as e:
            raise ConfigError(("acme", "state_directory"), str(e)) from e
    return store


def upstream_members(
    synapse: Upstream, dispatcher: Dispatcher | None, fallbacks: Sequence[Upstream]
) -> list[tuple[str, Upstream]]:
    """Each upstream process, with the upstream it counts for in metrics:
    ``main``, each worker pool it is in, ``fallback``."""
    members = [(MAIN, synapse)]
    if dispatcher is not None:
        for name, pool in dispatcher.pools.items():
            members.extend((name, member.upstream) for member in pool.members)
    members.extend(("fallback", fallback) for fallback in fallbacks)
    unique = {(name, id(upstream)): (name, upstream) for name, upstream in members}
    return list(unique.values())
