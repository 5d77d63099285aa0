"""Assembling the running proxy: the listening sockets, the generation
serving them, reloading, and the processes."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import Sequence
from typing import Any

from prometheus_client.registry import CollectorRegistry
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger

from matrix_edge import twisted_private
from matrix_edge.acme.service import AcmeService
from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerConfig, ListenerType
from matrix_edge.expiry import ExpiryWarnings
from matrix_edge.generation import Generation
from matrix_edge.listening import ListenerKey, ListenerService, bind_all
from matrix_edge.metrics.aggregate import Aggregator
from matrix_edge.metrics.collector import EdgeCollector, Sources
from matrix_edge.metrics.registry import ProcessMetrics
from matrix_edge.metrics.resource import MetricsSite, local_exposition
from matrix_edge.processes import METRICS_HOST, InheritedSocket, ProcessSupervisor
from matrix_edge.reload import Reloader
from matrix_edge.tls import SighupService

log = Logger()


class EdgeService(MultiService):
    """The edge's service tree: the listening sockets, the generation they
    hand connections to (L{matrix_edge.generation}), and the generations a
    reload replaced that are still finishing their requests.

    Stopping it stops gracefully: the listeners stop accepting (and child
    processes are told to stop, which they do the same way), open client
    connections drain (idle ones close, HTTP/2 clients get GOAWAY, requests
    in flight are answered) for up to ``timeouts.drain``, and only then
    does the rest stop."""

    def __init__(self, reactor: Any, generation: Generation):
        super().__init__()
        self._reactor = reactor
        self.generation = generation
        generation.setServiceParent(self)
        self.retiring: list[Generation] = []
        self.listeners: dict[ListenerKey, ListenerService] = {}
        """The listening sockets, by what makes them."""
        self.first_to_stop: list[IService] = []
        """Stopped at once, with the listeners: the child processes."""
        self.counts: ProcessMetrics | None = None
        self.sources: Sources | None = None
        self.acme: AcmeService | None = None
        """Certificates from the ACME CA (first process only)."""

    @property
    def config(self) -> EdgeConfig:
        return self.generation.config

    def add_listener(self, service: ListenerService) -> None:
        self.listeners[service.key] = service
        service.setServiceParent(self)

    def remove_listener(self, key: ListenerKey) -> None:
        service = self.listeners.pop(key)
        service.disownServiceParent()

    def replace_generation(self, generation: Generation) -> None:
        """Serve new connections from ``generation``; the one it replaces
        retires and stops once its last connection has closed (those still
        idle when ``timeouts.drain`` is up are closed then)."""
        old, self.generation = self.generation, generation
        generation.setServiceParent(self)
        if self.sources is not None:
            generation.describe_to(self.sources)
        self.retiring.append(old)
        deadline = self._reactor.callLater(
            old.config.timeouts.drain, lambda: old.drain()
        )

        def retired(_: object) -> None:
            if deadline.active():
                deadline.cancel()
            self.retiring.remove(old)
            if old.parent is self:
                old.disownServiceParent()

        old.retire().addBoth(retired)

    def _generations(self) -> list[Generation]:
        return [self.generation, *self.retiring]

    def stopService(self) -> Deferred[None]:
        first = [
            maybeDeferred(service.stopService)
            for service in [*self.listeners.values(), *self.first_to_stop]
            if service.running
        ]
        drain_seconds = self.config.timeouts.drain
        open_now = sum(g.open_connections() for g in self._generations())
        if open_now:
            log.info(
                "Stopping: {count} client connection(s) drain for up to {seconds}s",
                count=open_now,
                seconds=drain_seconds,
            )
        generations = self._generations()
        drained = gatherResults([g.drain() for g in generations])
        deadline = self._reactor.callLater(drain_seconds, self._time_up, generations)
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

    def _time_up(self, generations: list[Generation]) -> None:
        left = sum(g.open_connections() for g in generations)
        log.warn(
            "Drain time ({seconds}s) is up: closing {count} client connection(s)",
            seconds=self.config.timeouts.drain,
            count=left,
        )
        for generation in generations:
            generation.abort()


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
) -> EdgeService:
    """Build the service tree for ``config``.

    Raises L{ConfigError} for problems only visible when loading files
    (certificates that do not parse, keys that do not match), and
    L{ListenError} for an address that cannot be bound: the listening
    sockets are bound here, before twistd daemonises. With
    ``config_path``, SIGHUP re-reads that file and applies it
    (L{matrix_edge.reload}), and ``processes`` > 1 starts workers. A worker
    passes the ``inherited`` sockets it got from the first process, its
    index as ``process``, and the socket to serve its metrics on as
    ``metrics_fd``.
    """
    counts = ProcessMetrics(reactor) if metrics_enabled(config) else None
    top = EdgeService(
        reactor, Generation(config, reactor, counts, prepare_acme=inherited is None)
    )
    top.counts = counts
    generation = top.generation
    reuse_port = config.processes > 1
    for i, listener in enumerate(config.listeners):
        if listener.type is ListenerType.METRICS:
            continue
        adopted = None
        if inherited is not None:
            adopted = {s.address: s.fd for s in inherited if s.listener == i}
        top.add_listener(
            ListenerService(
                reactor,
                listener,
                generation.factories[i],
                adopted,
                reuse_port=reuse_port and inherited is None,
                index=i,
            )
        )

    reloader = SighupService(reactor)
    if config_path is not None:
        reloader.add_callback(
            Reloader(top, config_path, reactor, reuse_port, child=inherited is not None)
        )
    else:
        reloader.add_callback(lambda: top.generation.reload_files())
    reloader.setServiceParent(top)

    supervisor = None
    if config.processes > 1 and inherited is None and config_path is not None:

        def bound_sockets() -> list[tuple[int, str, socket.socket]]:
            return [
                (service.index, address, sock)
                for service in top.listeners.values()
                if service.listener.type is not ListenerType.METRICS
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

    binding = list(top.listeners.values())
    if inherited is None:
        # A new certificate is put in service as SIGHUP would: in this
        # process, then in the others.
        top.acme = AcmeService(reactor, config, on_issued=reloader.reload_all)
        top.acme.setServiceParent(top)
        ExpiryWarnings(reactor, lambda: top.generation.tls.values()).setServiceParent(
            top
        )
        if top.acme.http01 is not None:
            binding.append(top.acme.http01)
    if counts is not None:
        sources = top.sources = Sources(process, counts)
        generation.describe_to(sources)
        sources.reloader = reloader
        for metrics_service in metrics_services(
            reactor, config, sources, supervisor, inherited, metrics_fd
        ):
            if inherited is None:
                top.add_listener(metrics_service)
            else:
                metrics_service.setServiceParent(top)
            binding.append(metrics_service)
    bind_all(binding)
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
