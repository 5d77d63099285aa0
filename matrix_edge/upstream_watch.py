"""Tells the operator whether Synapse answers, at start-up and on change."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.config.upstream import UpstreamAddress

log = Logger()

CHECK_INTERVAL = 10.0


class UpstreamWatch(TimerService):
    """Opens a connection to the upstream every few seconds and logs when it
    starts or stops accepting them, so that a newcomer whose Synapse is not
    running yet reads why requests get 502 instead of guessing."""

    def __init__(
        self, reactor: Any, address: UpstreamAddress, timeouts: TimeoutsConfig
    ):
        super().__init__(CHECK_INTERVAL, self.check)
        self.clock = reactor
        self._address = address
        timeout = max(1, round(timeouts.upstream_connect))
        if address.is_unix:
            self._endpoint: Any = UNIXClientEndpoint(
                reactor, address.unix_path, timeout=timeout
            )
        else:
            self._endpoint = HostnameEndpoint(
                reactor, address.host, address.port, timeout=timeout
            )
        self.reachable: bool | None = None

    def check(self) -> Deferred[None]:
        d = self._endpoint.connect(Factory.forProtocol(Protocol))

        def up(protocol: Protocol) -> None:
            assert protocol.transport is not None
            protocol.transport.loseConnection()
            if self.reachable is not True:
                log.info("Synapse answers at {address}", address=str(self._address))
            self.reachable = True

        def down(failure: Failure) -> None:
            if self.reachable is not False:
                log.warn(
                    "No Synapse answers at {address} ({reason}); requests will "
                    "get 502 until it does. Start Synapse, or set `upstream` "
                    "to its HTTP listener.",
                    address=str(self._address),
                    reason=failure.getErrorMessage(),
                )
            self.reachable = False

        return d.addCallbacks(up, down)
