"""An HTTP/2 connection to the edge on Twisted's in-memory reactor: an h2
client on one side, the edge's real site wiring in the middle, and in-memory
upstream connections whose exact bytes the tests read."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport

from matrix_edge.config.edge import parse_config
from matrix_edge.server.site import EdgeSite
from matrix_edge.upstream.client import Upstream
from tests.pki import Pki, make_pki

PEER = IPv4Address("TCP", "203.0.113.7", 50000)
HOST = IPv4Address("TCP", "127.0.0.1", 8443)


class TLSStringTransport(StringTransport):
    """An in-memory transport on which ALPN chose ``h2``."""

    negotiatedProtocol = b"h2"


@functools.cache
def _pki() -> Pki:
    """A certificate for the listener's config; no handshake happens."""
    return make_pki(Path(tempfile.mkdtemp(prefix="h2-harness-")))


class H2Harness:
    def __init__(self, **overrides: Any):
        document: dict[str, Any] = {
            "listeners": [
                {
                    "port": 8443,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": {
                        "certificate_path": str(_pki().chain_path),
                        "private_key_path": str(_pki().key_path),
                    },
                }
            ],
            "upstream": "http://127.0.0.1:8008",
        }
        document.update(overrides)
        self.config = config = parse_config(document)
        self.clock = MemoryReactorClock()
        upstream = Upstream(
            self.clock,
            config.upstream,
            config.upstream_pool,
            config.timeouts,
            endpoint=TCP4ClientEndpoint(self.clock, "127.0.0.1", 8008),
        )
        self.site = EdgeSite(config.listeners[0], config, upstream, self.clock)
        self.protocol = self.site.buildProtocol(PEER)
        self.transport = TLSStringTransport(peerAddress=PEER, hostAddress=HOST)
        self.protocol.makeConnection(self.transport)
        self.client = h2.connection.H2Connection(
            # An attacker's client: it sends what it is told to.
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.client.initiate_connection()
        self.upstreams: list[tuple[StringTransport, Any]] = []
        self.events: list[h2.events.Event] = []
        self.send()
        self.receive()

    # The client side ----------------------------------------------------------

    def send(self, raw: bytes = b"") -> None:
        """Send what the h2 client has queued, then ``raw`` bytes."""
        data = self.client.data_to_send() + raw
        if data:
            self.protocol.dataReceived(data)

    def receive(self) -> list[h2.events.Event]:
        """Read what the edge wrote; the client's automatic answers (SETTINGS
        ACK, PING ACK) go back at once. Responses are written at the end
        of the reactor's turn, which this ends."""
        self.clock.advance(0)
        data = self.transport.value()
        self.transport.clear()
        events = self.client.receive_data(data) if data else []
        self.events.extend(events)
        pending = self.client.data_to_send()
        if pending:
            self.protocol.dataReceived(pending)
        return events

    def request(
        self,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
        end: bool = True,
        authority: bytes = b"hs.example",
    ) -> int:
        stream_id = self.client.get_next_available_stream_id()
        block = [
            (b":method", method),
            (b":scheme", b"https"),
            (b":path", path),
            (b":authority", authority),
            *headers,
        ]
        self.client.send_headers(stream_id, block, end_stream=end and body is None)
        if body is not None:
            self.client.send_data(stream_id, body, end_stream=end)
        self.send()
        return stream_id

    def response(self, stream_id: int) -> tuple[int | None, bytes, bool, int | None]:
        """(status, body, ended, reset error code) of a stream so far."""
        status = None
        body = b""
        ended = False
        reset = None
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
            elif isinstance(event, h2.events.StreamReset):
                reset = event.error_code
        return status, body, ended, reset

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        for event in self.events:
            if isinstance(event, h2.events.ConnectionTerminated):
                return event
        return None

    # The upstream side --------------------------------------------------------

    def connect_upstream(self) -> StringTransport:
        """Complete the edge's oldest pending connection to Synapse."""
        host, port, factory, _timeout, _bind = self.clock.tcpClients.pop(0)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        self.upstreams.append((transport, protocol))
        return transport

    def upstream_says(self, data: bytes, index: int = -1) -> None:
        self.upstreams[index][1].dataReceived(data)
        self.receive()
