"""The listening sockets: bound before twistd daemonises or drops
privileges, handed between processes, and kept across reloads (each hands
its connections to whatever generation serves now)."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure

from matrix_edge.config.listeners import ListenerConfig

log = Logger()


ListenerKey = tuple[int, tuple[str, ...], bool]
"""What makes a listener's sockets: port, addresses, PROXY protocol. A
reload keeps the sockets of a listener whose key it keeps."""


def listener_key(listener: ListenerConfig) -> ListenerKey:
    return (listener.port, listener.bind_addresses, listener.proxy_protocol)


class _Switch(Factory):
    """The factory a listening port is given: it hands each connection to
    the current generation's factory, which a reload changes."""

    noisy = False

    def __init__(self, current: IProtocolFactory):
        self.current = current

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # type: ignore[override]
        return self.current.buildProtocol(addr)  # type: ignore[return-value]


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
        self._factory = _Switch(factory)
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

    @property
    def listener(self) -> ListenerConfig:
        return self._listener

    @property
    def factory(self) -> IProtocolFactory:
        """Where new connections go now."""
        return self._factory.current

    @property
    def key(self) -> ListenerKey:
        return listener_key(self._listener)

    def use(
        self, factory: IProtocolFactory, listener: ListenerConfig, index: int
    ) -> None:
        """Hand new connections to ``factory`` from now on (a reload's new
        generation); connections already made stay where they are."""
        self._factory.current = factory
        self._listener = listener
        self.index = index

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


def bind_all(services: Sequence[ListenerService]) -> None:
    """Bind every service's sockets, or none: on a L{ListenError} the ones
    already bound are closed before it is raised."""
    try:
        for service in services:
            service.bind()
    except ListenError:
        for service in services:
            service.close()
        raise
