"""Assembling the running proxy: listeners, the upstream, reloading."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from matrix_edge.config._base import ConfigError
from matrix_edge.config.edge import EdgeConfig, load_config
from matrix_edge.config.listeners import ListenerConfig
from matrix_edge.config.upstream import UpstreamAddress
from matrix_edge.http.accesslog_file import AccessLogFile
from matrix_edge.http.routing import LiveSettings
from matrix_edge.http.site import EdgeSite
from matrix_edge.http.upstream import Upstream
from matrix_edge.pools.dispatch import make_dispatcher
from matrix_edge.tls import ServerTLS, SighupService, TLSConfigError
from matrix_edge.upstream_watch import UpstreamWatch
from matrix_edge.workers import InheritedSocket, WorkerSupervisor

log = Logger()


class ListenerService(Service):
    """Binds one listener on each of its addresses.

    Binding happens in ``privilegedStartService``, so that ports below 1024
    can be bound before twistd drops privileges (``--uid``). As in Synapse,
    failing to bind 0.0.0.0 is tolerated when ``::`` is bound as well: on a
    dual-stack host the IPv6 wildcard already covers IPv4.
    """

    def __init__(
        self,
        reactor: Any,
        listener: ListenerConfig,
        factory: IProtocolFactory,
        inherited: dict[str, int] | None = None,
        reuse_port: bool = False,
    ):
        """
        @param inherited: sockets already bound by another process, by
            address, as file descriptors (a worker's, see L{workers}).
        @param reuse_port: bind with SO_REUSEPORT, so that workers get
            sockets of their own on the same port (L{worker_sockets}).
        """
        self._reactor = reactor
        self._listener = listener
        self._factory = factory
        self._inherited = inherited
        self._reuse_port = reuse_port
        self.ports: list[tuple[str, IListeningPort]] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        listener = self._listener
        for address in listener.bind_addresses:
            if self._inherited is not None and address not in self._inherited:
                continue  # the first process could not bind it either
            try:
                port = self._listen(address)
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
            self.ports.append((address, port))
            log.info(
                "Listening on {address} port {port} ({tag}, {scheme})",
                address=address,
                port=listener.port,
                tag=listener.tag,
                scheme=listener.scheme.decode(),
            )

    def _listen(self, address: str) -> IListeningPort:
        endpoint: IStreamServerEndpoint
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        if self._inherited is not None and address in self._inherited:
            endpoint = AdoptedStreamServerEndpoint(
                self._reactor, self._inherited[address], family
            )
        elif self._reuse_port:
            try:
                sock = reuse_port_socket(address, self._listener.port)
            except OSError as e:
                raise CannotListenError(address, self._listener.port, e) from e
            # The endpoint adopts a duplicate and closes the descriptor.
            endpoint = AdoptedStreamServerEndpoint(self._reactor, sock.detach(), family)
        elif family == socket.AF_INET6:
            endpoint = TCP6ServerEndpoint(
                self._reactor, self._listener.port, backlog=511, interface=address
            )
        else:
            endpoint = TCP4ServerEndpoint(
                self._reactor, self._listener.port, backlog=511, interface=address
            )
        if self._listener.proxy_protocol:
            # The PROXY header comes first on the wire, before TLS.
            endpoint = proxyEndpoint(endpoint)
        outcome: list[IListeningPort | Failure] = []
        endpoint.listen(self._factory).addBoth(outcome.append)
        # TCP endpoints bind before listen() returns.
        [result] = outcome
        if isinstance(result, Failure):
            result.raiseException()
        assert not isinstance(result, Failure)
        return result

    def worker_sockets(self) -> list[tuple[str, socket.socket]]:
        """A listening socket per bound address for one worker: its own,
        on the same port with SO_REUSEPORT, so the kernel spreads new
        connections evenly over the processes; or, where that cannot be
        bound again (a port below 1024 after twistd gave up root), a
        duplicate of ours, whose connections go to whichever process
        accepts first."""
        out = []
        for address, port in self.ports:
            try:
                sock = reuse_port_socket(address, self._listener.port)
            except OSError:
                fileno = port.fileno()  # type: ignore[attr-defined]
                sock = socket.socket(fileno=os.dup(fileno))
            out.append((address, sock))
        return out

    def stopService(self) -> Deferred[None]:
        super().stopService()
        ports, self.ports = self.ports, []
        return gatherResults(
            [maybeDeferred(p.stopListening) for _, p in ports]
        ).addCallback(lambda _: None)


def reuse_port_socket(address: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT: other processes of the same
    user may bind the same address and port, and the kernel balances new
    connections across them."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(511)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


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
    with the same certificates and protocols share one. Load errors become
    L{ConfigError}s that name the listener's key, down to the failing entry
    of ``certificates`` when several are given."""
    shared: dict[tuple[tuple[tuple[str, str], ...], tuple[bytes, ...]], ServerTLS] = {}
    out: dict[int, ServerTLS] = {}
    for i, listener in enumerate(config.listeners):
        if listener.tls is None:
            continue
        files = tuple(
            (c.certificate_path, c.private_key_path) for c in listener.tls.certificates
        )
        key = (files, listener.alpn_protocols)
        if key not in shared:
            try:
                shared[key] = ServerTLS.from_certificates(
                    files, alpn_protocols=listener.alpn_protocols
                )
            except TLSConfigError as e:
                path: tuple[str | int, ...] = ("listeners", i, "tls")
                if len(files) > 1 and e.certificate_index is not None:
                    path = (*path, "certificates", e.certificate_index)
                raise ConfigError(path, str(e)) from e
        out[i] = shared[key]
    return out


def make_service(
    config: EdgeConfig,
    reactor: Any,
    config_path: str | None = None,
    inherited: Sequence[InheritedSocket] | None = None,
) -> MultiService:
    """Build the service tree for ``config``.

    Raises L{ConfigError} for problems only visible when loading files
    (certificates that do not parse, keys that do not match). With
    ``config_path``, SIGHUP re-reads that file and applies what can change
    while running, and ``processes`` > 1 starts workers. A worker passes the
    ``inherited`` sockets it got from the first process.
    """
    tls = load_tls(config)
    top = MultiService()
    upstreams: dict[UpstreamAddress, Upstream] = {}

    def upstream_for(address: UpstreamAddress, web_server: bool = False) -> Upstream:
        if address not in upstreams:
            upstream = Upstream(reactor, address, config.upstream_pool, config.timeouts)
            upstreams[address] = upstream
            UpstreamService(upstream).setServiceParent(top)
            watch = UpstreamWatch(reactor, upstream, config.upstream_check, web_server)
            watch.setServiceParent(top)
        return upstreams[address]

    synapse = upstream_for(config.upstream)
    dispatcher = None
    if config.workers.enabled:
        dispatcher = make_dispatcher(config.workers, reactor, synapse, upstream_for)
    live = LiveSettings(config.maintenance)
    access_file = None
    if config.access_log.enabled and config.access_log.path is not None:
        access_file = AccessLogFile(reactor, config.access_log.path)
        access_file.setServiceParent(top)
    listening_services: list[ListenerService] = []
    for i, listener in enumerate(config.listeners):
        fallback = None
        if listener.fallback is not None:
            fallback = upstream_for(listener.fallback, web_server=True)
        site = EdgeSite(
            listener,
            config,
            synapse,
            reactor,
            live,
            fallback,
            access_file,
            dispatcher,
        )
        factory: IProtocolFactory = site
        if i in tls:
            factory = TLSMemoryBIOFactory(tls[i], False, factory)
        adopted = None
        if inherited is not None:
            adopted = {s.address: s.fd for s in inherited if s.listener == i}
        listening = ListenerService(
            reactor,
            listener,
            factory,
            adopted,
            reuse_port=config.processes > 1 and inherited is None,
        )
        listening.setServiceParent(top)
        listening_services.append(listening)

    reloader = SighupService(reactor)
    for context in {id(t): t for t in tls.values()}.values():
        reloader.add_callback(context.reload)
    if access_file is not None:
        reloader.add_callback(access_file.reopen)
    if config_path is not None:
        reloader.add_callback(lambda: reload_settings(config_path, config, live))
    reloader.setServiceParent(top)

    if config.processes > 1 and inherited is None and config_path is not None:

        def bound_sockets() -> list[tuple[int, str, socket.socket]]:
            return [
                (i, address, sock)
                for i, service in enumerate(listening_services)
                for address, sock in service.worker_sockets()
            ]

        supervisor = WorkerSupervisor(
            reactor, config.processes - 1, config_path, bound_sockets
        )
        supervisor.setServiceParent(top)
        reloader.add_callback(supervisor.reload)
    return top


def reload_settings(config_path: str, running: EdgeConfig, live: LiveSettings) -> bool:
    """Re-read the configuration on SIGHUP and apply what can change while
    running (maintenance mode). Other changes wait for a restart, and the
    log says so; a file that no longer validates changes nothing."""
    try:
        fresh = load_config(config_path)
    except ConfigError as e:
        log.error("Not reloading {path}: {error}", path=config_path, error=str(e))
        return False
    if fresh.maintenance != live.maintenance:
        live.maintenance = fresh.maintenance
        log.info(
            "Maintenance mode is now {state}",
            state="on" if fresh.maintenance.enabled else "off",
        )
    if attrs.evolve(fresh, maintenance=running.maintenance) != running:
        log.warn(
            "{path} has changes other than `maintenance`; they apply after a restart",
            path=config_path,
        )
    return True
