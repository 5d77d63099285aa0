"""Assembling the running proxy: listeners, the upstream, reloading."""

from __future__ import annotations

import errno
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from matrix_edge.config._base import ConfigError
from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerConfig
from matrix_edge.http.site import EdgeSite
from matrix_edge.http.upstream import Upstream
from matrix_edge.tls import ServerTLS, SighupService, TLSConfigError
from matrix_edge.upstream_watch import UpstreamWatch

log = Logger()


class ListenerService(Service):
    """Binds one listener on each of its addresses.

    Binding happens in ``privilegedStartService``, so that ports below 1024
    can be bound before twistd drops privileges (``--uid``). As in Synapse,
    failing to bind 0.0.0.0 is tolerated when ``::`` is bound as well: on a
    dual-stack host the IPv6 wildcard already covers IPv4.
    """

    def __init__(
        self, reactor: Any, listener: ListenerConfig, factory: IProtocolFactory
    ):
        self._reactor = reactor
        self._listener = listener
        self._factory = factory
        self.ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        listener = self._listener
        for address in listener.bind_addresses:
            try:
                port = self._reactor.listenTCP(
                    listener.port, self._factory, backlog=511, interface=address
                )
            except CannotListenError as e:
                if _is_tolerated_bind_error(e, address, listener.bind_addresses):
                    log.info(
                        "{address} port {port} is already covered by '::'",
                        address=address,
                        port=listener.port,
                    )
                    continue
                raise SystemExit(
                    f"matrix-edge: cannot listen on {address} port "
                    f"{listener.port} ({listener.tag}): {_reason(e)}"
                ) from None
            self.ports.append(port)
            log.info(
                "Listening on {address} port {port} ({tag}, {scheme})",
                address=address,
                port=port.getHost().port,
                tag=listener.tag,
                scheme=listener.scheme.decode(),
            )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        ports, self.ports = self.ports, []
        return gatherResults(
            [maybeDeferred(p.stopListening) for p in ports]
        ).addCallback(lambda _: None)


def _is_tolerated_bind_error(
    error: CannotListenError, address: str, addresses: tuple[str, ...]
) -> bool:
    return (
        address == "0.0.0.0"
        and "::" in addresses
        and getattr(error.socketError, "errno", None) == errno.EADDRINUSE
    )


def _reason(error: CannotListenError) -> str:
    return str(getattr(error.socketError, "strerror", None) or error.socketError)


class UpstreamService(Service):
    """Closes the idle upstream connections at shutdown."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.upstream.close()


def load_tls(config: EdgeConfig) -> dict[int, ServerTLS]:
    """The TLS context of each TLS listener, by listener index; listeners
    with the same files and protocols share one. Load errors become
    L{ConfigError}s that name the listener's key."""
    shared: dict[tuple[str, str, tuple[bytes, ...]], ServerTLS] = {}
    out: dict[int, ServerTLS] = {}
    for i, listener in enumerate(config.listeners):
        if listener.tls is None:
            continue
        key = (
            listener.tls.certificate_path,
            listener.tls.private_key_path,
            listener.alpn_protocols,
        )
        if key not in shared:
            try:
                shared[key] = ServerTLS(key[0], key[1], alpn_protocols=key[2])
            except TLSConfigError as e:
                raise ConfigError(("listeners", i, "tls"), str(e)) from e
        out[i] = shared[key]
    return out


def make_service(config: EdgeConfig, reactor: Any) -> MultiService:
    """Build the service tree for ``config``.

    Raises L{ConfigError} for problems only visible when loading files
    (certificates that do not parse, keys that do not match).
    """
    tls = load_tls(config)
    top = MultiService()
    upstream = Upstream(reactor, config.upstream, config.upstream_pool, config.timeouts)
    UpstreamService(upstream).setServiceParent(top)
    UpstreamWatch(reactor, config.upstream, config.timeouts).setServiceParent(top)

    for i, listener in enumerate(config.listeners):
        site: IProtocolFactory = EdgeSite(listener, config, upstream, reactor)
        if i in tls:
            site = TLSMemoryBIOFactory(tls[i], False, site)
        ListenerService(reactor, listener, site).setServiceParent(top)

    reloader = SighupService(reactor)
    for context in {id(t): t for t in tls.values()}.values():
        reloader.add_callback(context.reload)
    reloader.setServiceParent(top)
    return top
