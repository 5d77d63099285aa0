"""Assembling the running proxy: listeners, the upstream, reloading."""

from __future__ import annotations

import errno
import gc
import os
import socket
from collections.abc import Sequence
from typing import Any

from prometheus_client.registry import CollectorRegistry
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure

from matrix_edge import twisted_private
from matrix_edge.config._base import ConfigError
from matrix_edge.config.changes import changed_keys
from matrix_edge.config.edge import EdgeConfig, load_config
from matrix_edge.config.listeners import ListenerConfig, ListenerType
from matrix_edge.config.routes import MAIN
from matrix_edge.config.upstream import UpstreamAddress
from matrix_edge.metrics.aggregate import Aggregator
from matrix_edge.metrics.collector import EdgeCollector, Sources
from matrix_edge.metrics.registry import ProcessMetrics
from matrix_edge.metrics.resource import MetricsSite, local_exposition
from matrix_edge.pools.dispatch import Dispatcher, make_dispatcher
from matrix_edge.processes import METRICS_HOST, InheritedSocket, ProcessSupervisor
from matrix_edge.server.accesslog_file import AccessLogFile
from matrix_edge.server.router import LiveSettings
from matrix_edge.server.site import EdgeSite
from matrix_edge.server.tls import HTTPSOnlyFactory
from matrix_edge.tls import ServerTLS, SighupService, TLSConfigError
from matrix_edge.upstream.client import Upstream
from matrix_edge.upstream.health import UpstreamWatch

log = Logger()


class ListenError(Exception):
    """An address of a listener that cannot be bound: another process has
    the port, or this user may not bind it."""


class ListenerService(Service):
    """Listens on each of one listener's addresses.

    L{bind} binds the sockets; L{make_service} calls it, so that they are
    bound while twistd builds the service, before it daemonises: a port
    that is taken or not permitted then ends ``twistd`` at once, with the
    reason on its stderr, in daemon mode too (a daemon reports a failure
    to twistd's waiting parent only in part, see L{matrix_edge.tap}). This is
    also before twistd drops privileges (``--uid``), so ports below 1024
    can be bound. ``privilegedStartService`` starts accepting on them. As
    in Synapse, failing to bind 0.0.0.0 is tolerated when ``::`` is bound
    as well: on a dual-stack host the IPv6 wildcard already covers IPv4.
    """

    def __init__(
        self,
        reactor: Any,
        listener: ListenerConfig,
        factory: IProtocolFactory,
        inherited: dict[str, int] | None = None,
        reuse_port: bool = False,
        index: int = 0,
    ):
        """
        @param inherited: sockets already bound by another process, by
            address, as file descriptors (a worker's, see L{workers}).
        @param reuse_port: bind with SO_REUSEPORT, so that workers get
            sockets of their own on the same port (L{worker_sockets}).
        @param index: the listener's place in ``listeners``, for errors.
        """
        self._reactor = reactor
        self._listener = listener
        self._factory = factory
        self._inherited = inherited
        self._reuse_port = reuse_port
        self.index = index
        self._bound: list[tuple[str, int]] | None = None
        self.ports: list[tuple[str, IListeningPort]] = []

    def bind(self) -> None:
        """Bind and listen on every address, or raise L{ListenError} naming
        the listener and the reason. Connections wait in the backlog until
        the service starts."""
        if self._bound is not None:
            return
        listener = self._listener
        bound: list[tuple[str, int]] = []
        for address in listener.bind_addresses:
            if self._inherited is not None:
                # A worker: the first process has bound what it could.
                if address in self._inherited:
                    bound.append((address, self._inherited[address]))
                continue
            try:
                sock = listening_socket(address, listener.port, self._reuse_port)
            except OSError as e:
                if _is_tolerated_bind_error(e, address, listener.bind_addresses):
                    log.info(
                        "{address} port {port} is {reason}",
                        address=address,
                        port=listener.port,
                        reason="already covered by '::'"
                        if address == "0.0.0.0"
                        else "not bound: this host has no IPv6",
                    )
                    continue
                for _, fd in bound:
                    os.close(fd)
                raise ListenError(
                    f"cannot listen on {address} port {listener.port} "
                    f"(listeners[{self.index}], {listener.tag}): "
                    f"{_reason(e, listener.port)}"
                ) from None
            bound.append((address, sock.detach()))
        self._bound = bound

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()
        bound, self._bound = self._bound or [], []
        listener = self._listener
        for address, fd in bound:
            self.ports.append((address, self._adopt(address, fd)))
            log.info(
                "Listening on {address} port {port} ({tag}, {scheme})",
                address=address,
                port=listener.port,
                tag=listener.tag,
                scheme=listener.scheme.decode(),
            )

    def _adopt(self, address: str, fd: int) -> IListeningPort:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # The endpoint adopts a duplicate and closes the descriptor.
        endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(
            self._reactor, fd, family
        )
        if self._listener.proxy_protocol:
            # The PROXY header comes first on the wire, before TLS.
            endpoint = proxyEndpoint(endpoint)
        outcome: list[IListeningPort | Failure] = []
        endpoint.listen(self._factory).addBoth(outcome.append)
        # Adopting a socket completes before listen() returns.
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
                sock = listening_socket(address, self._listener.port, reuse_port=True)
            except OSError:
                fileno = port.fileno()  # type: ignore[attr-defined]
                sock = socket.socket(fileno=os.dup(fileno))
            out.append((address, sock))
        return out

    def close(self) -> None:
        """Close the sockets L{bind} bound, if the service never started."""
        bound, self._bound = self._bound or [], None
        for _, fd in bound:
            os.close(fd)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.close()
        ports, self.ports = self.ports, []
        return gatherResults(
            [maybeDeferred(p.stopListening) for _, p in ports]
        ).addCallback(lambda _: None)


def listening_socket(
    address: str, port: int, reuse_port: bool = False
) -> socket.socket:
    """A bound, listening, non-blocking socket, made as Twisted's TCP ports
    make theirs (SO_REUSEADDR, IPv6 scope IDs understood) with a backlog of
    511. With ``reuse_port``, SO_REUSEPORT too: other processes of the same
    user may bind the same address and port, and the kernel balances new
    connections across them."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    flags = socket.AI_NUMERICHOST | socket.AI_PASSIVE
    sockaddr = socket.getaddrinfo(address, port, family, socket.SOCK_STREAM, 0, flags)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr[0][4])
        sock.listen(511)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _is_tolerated_bind_error(
    error: OSError, address: str, addresses: tuple[str, ...]
) -> bool:
    """Whether failing to bind ``address`` is expected: 0.0.0.0 taken by
    ``::`` on a dual-stack host, or ``::1`` on a host without IPv6 when
    127.0.0.1 is bound too (a metrics listener's default)."""
    if address == "0.0.0.0":
        return "::" in addresses and error.errno == errno.EADDRINUSE
    if address == "::1":
        return "127.0.0.1" in addresses and error.errno in _NO_IPV6
    return False


_NO_IPV6 = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def _reason(error: OSError, port: int) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.EACCES and port < 1024:
        reason += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    return reason


class EdgeService(MultiService):
    """The edge's service tree. Stopping it stops gracefully: the listeners
    stop accepting (and child processes are told to stop, which they do the
    same way), open client connections drain (idle ones close, HTTP/2
    clients get GOAWAY, requests in flight are answered) for up to
    ``timeouts.drain``, and only then does the rest stop."""

    def __init__(self, reactor: Any, drain_seconds: float):
        super().__init__()
        self._reactor = reactor
        self._drain_seconds = drain_seconds
        self.sites: list[EdgeSite] = []
        self.first_to_stop: list[IService] = []
        """Stopped at once: the listeners, the child processes."""

    def stopService(self) -> Deferred[None]:
        first = [
            maybeDeferred(service.stopService)
            for service in self.first_to_stop
            if service.running
        ]
        open_now = sum(len(site.connections) for site in self.sites)
        if open_now:
            log.info(
                "Stopping: {count} client connection(s) drain for up to {seconds}s",
                count=open_now,
                seconds=self._drain_seconds,
            )
        drained = gatherResults([site.drain() for site in self.sites])
        deadline = self._reactor.callLater(self._drain_seconds, self._time_up)
        done: Deferred[None] = Deferred()

        def stop_the_rest(_: object) -> None:
            if deadline.active():
                deadline.cancel()
            Service.stopService(self)
            rest = [
                maybeDeferred(service.stopService)
                for service in reversed(list(self))
                if service.running
            ]
            gatherResults(first + rest).addBoth(lambda _: done.callback(None))

        def drained_in_time(_: object) -> None:
            if deadline.active():
                # Everything in flight was answered: a clean exit.
                twisted_private.exit_cleanly(self._reactor)
            stop_the_rest(_)

        drained.addBoth(drained_in_time)
        return done

    def _time_up(self) -> None:
        left = sum(len(site.connections) for site in self.sites)
        log.warn(
            "Drain time ({seconds}s) is up: closing {count} client connection(s)",
            seconds=self._drain_seconds,
            count=left,
        )
        for site in self.sites:
            site.connections.abort()


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


def freeze_startup_objects() -> None:
    """Leave what start-up made (modules, configuration, route tables,
    listeners) out of the garbage collector's full collections from now
    on, as Synapse does: otherwise every full collection walks all of it,
    and those pauses were most of the edge's 99th-percentile latency
    (bench: p99 3.6x nginx's before, 2.0x after)."""
    gc.collect()
    gc.freeze()


def make_service(
    config: EdgeConfig,
    reactor: Any,
    config_path: str | None = None,
    inherited: Sequence[InheritedSocket] | None = None,
    process: int = 0,
    metrics_fd: int | None = None,
) -> MultiService:
    """Build the service tree for ``config``.

    Raises L{ConfigError} for problems only visible when loading files
    (certificates that do not parse, keys that do not match), and
    L{ListenError} for an address that cannot be bound: the listening
    sockets are bound here, before twistd daemonises. With
    ``config_path``, SIGHUP re-reads that file and applies what can change
    while running, and ``processes`` > 1 starts workers. A worker passes the
    ``inherited`` sockets it got from the first process, its index as
    ``process``, and the socket to serve its metrics on as ``metrics_fd``.
    """
    tls = load_tls(config)
    top = EdgeService(reactor, config.timeouts.drain)
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
    counts = ProcessMetrics(reactor) if metrics_enabled(config) else None
    sources = Sources(process, counts) if counts is not None else None
    access_file = None
    if config.access_log.enabled and config.access_log.path is not None:
        access_file = AccessLogFile(reactor, config.access_log.path)
        access_file.setServiceParent(top)
    listening_services: list[ListenerService] = []
    fallbacks: list[Upstream] = []
    for i, listener in enumerate(config.listeners):
        if listener.type is ListenerType.METRICS:
            continue
        fallback = None
        if listener.fallback is not None:
            fallback = upstream_for(listener.fallback, web_server=True)
            fallbacks.append(fallback)
        site = EdgeSite(
            listener,
            config,
            synapse,
            reactor,
            live,
            fallback,
            access_file,
            dispatcher,
            counts.listener(listener.tag) if counts is not None else None,
        )
        factory: IProtocolFactory = site
        if sources is not None:
            sources.connections.append((listener.tag, listener.http2, site.connections))
        if i in tls:
            https = HTTPSOnlyFactory(tls[i], site, reactor, site.server_header)
            factory = https
            if sources is not None:
                sources.tls.append((listener.tag, https))
        adopted = None
        if inherited is not None:
            adopted = {s.address: s.fd for s in inherited if s.listener == i}
        listening = ListenerService(
            reactor,
            listener,
            factory,
            adopted,
            reuse_port=config.processes > 1 and inherited is None,
            index=i,
        )
        listening.setServiceParent(top)
        listening_services.append(listening)
        top.sites.append(site)
        top.first_to_stop.append(listening)

    reloader = SighupService(reactor)
    for context in {id(t): t for t in tls.values()}.values():
        reloader.add_callback(context.reload)
    if access_file is not None:
        reloader.add_callback(access_file.reopen)
    if config_path is not None:
        reloader.add_callback(lambda: reload_settings(config_path, config, live))
    reloader.setServiceParent(top)

    supervisor = None
    if config.processes > 1 and inherited is None and config_path is not None:

        def bound_sockets() -> list[tuple[int, str, socket.socket]]:
            return [
                (service.index, address, sock)
                for service in listening_services
                for address, sock in service.worker_sockets()
            ]

        supervisor = ProcessSupervisor(
            reactor,
            config.processes - 1,
            config_path,
            bound_sockets,
            metrics=counts is not None,
        )
        supervisor.setServiceParent(top)
        top.first_to_stop.append(supervisor)
        reloader.add_callback(supervisor.reload)

    binding = list(listening_services)
    if sources is not None:
        sources.upstreams = upstream_members(synapse, dispatcher, fallbacks)
        sources.whoami = dispatcher.whoami if dispatcher is not None else None
        sources.reloader = reloader
        for metrics_service in metrics_services(
            reactor, config, sources, supervisor, inherited, metrics_fd
        ):
            metrics_service.setServiceParent(top)
            binding.append(metrics_service)
    try:
        for listening in binding:
            listening.bind()
    except ListenError:
        for listening in binding:
            listening.close()
        raise
    return top


def metrics_enabled(config: EdgeConfig) -> bool:
    """Whether requests are counted: a metrics listener is configured."""
    return any(listener.type is ListenerType.METRICS for listener in config.listeners)


def metrics_services(
    reactor: Any,
    config: EdgeConfig,
    sources: Sources,
    supervisor: ProcessSupervisor | None,
    inherited: Sequence[InheritedSocket] | None,
    metrics_fd: int | None,
) -> list[ListenerService]:
    """Where this process serves metrics: the first process on each
    ``type: metrics`` listener, for every process; a child on the socket
    the first process gave it, for itself."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(sources))
    if inherited is not None:
        if metrics_fd is None:
            return []
        port = socket.socket(fileno=os.dup(metrics_fd))
        own = ListenerConfig(
            port=port.getsockname()[1],
            type=ListenerType.METRICS,
            bind_addresses=(METRICS_HOST,),
            tag=f"metrics-child-{sources.process}",
        )
        port.close()
        site = MetricsSite(local_exposition(registry))
        return [ListenerService(reactor, own, site, {METRICS_HOST: metrics_fd})]
    exposition = local_exposition(registry)
    if supervisor is not None:
        exposition = Aggregator(
            reactor, registry, sources.counts, supervisor.children
        ).exposition
    site = MetricsSite(exposition)
    return [
        ListenerService(reactor, listener, site, index=i)
        for i, listener in enumerate(config.listeners)
        if listener.type is ListenerType.METRICS
    ]


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


def log_warnings(config_path: str, config: EdgeConfig) -> None:
    """Log each doubtful value of ``config``, read from ``config_path``."""
    for warning in config.warnings:
        log.warn("{path}: {warning}", path=config_path, warning=str(warning))


def reload_settings(config_path: str, running: EdgeConfig, live: LiveSettings) -> bool:
    """Re-read the configuration on SIGHUP and apply what can change while
    running (maintenance mode). Other changes wait for a restart, and the
    log says so; a file that no longer validates changes nothing."""
    try:
        fresh = load_config(config_path)
    except ConfigError as e:
        log.error("Not reloading {path}: {error}", path=config_path, error=str(e))
        return False
    if fresh != running:
        log_warnings(config_path, fresh)
    if fresh.maintenance != live.maintenance:
        live.maintenance = fresh.maintenance
        log.info(
            "Maintenance mode is now {state}",
            state="on" if fresh.maintenance.enabled else "off",
        )
    waiting = [
        key
        for key in changed_keys(running, fresh)
        if key != "maintenance" and not key.startswith("maintenance.")
    ]
    if waiting:
        log.warn(
            "{path}: changes to {keys} apply after a restart",
            path=config_path,
            keys=", ".join(waiting),
        )
    return True
