"""A blocking HTTP/2 client on the h2 library, for tests that need to
steer streams one by one: several at once on one connection, and flow
control withheld from some of them. Run it in a thread."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

import attrs
import h2.config
import h2.connection
import h2.events


@attrs.define
class Stream:
    headers: dict[bytes, bytes] = attrs.Factory(dict)
    received: int = 0
    body: bytearray = attrs.Factory(bytearray)
    ended: bool = False
    reset: bool = False
    keep_body: bool = True
    withhold_credit: bool = False
    """Acknowledge this stream's data to the connection only, so the stream's
    own window closes and the server must stop sending on it."""

    @property
    def status(self) -> int:
        return int(self.headers[b":status"])


class H2Client:
    def __init__(
        self, port: int, host: str = "127.0.0.1", server_hostname: str = "localhost"
    ):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection((host, port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=server_hostname)
        self.alpn = self.sock.selected_alpn_protocol()
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.streams: dict[int, Stream] = {}
        self.closed = False
        self._flush()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()

    def start(
        self,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]] = (),
        end_stream: bool = True,
        **stream_options,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.streams[stream_id] = Stream(**stream_options)
        self.conn.send_headers(
            stream_id,
            [
                (b":method", method),
                (b":path", path),
                (b":scheme", b"https"),
                (b":authority", b"matrix.test"),
                *headers,
            ],
            end_stream=end_stream,
        )
        self._flush()
        return stream_id

    def send_body(
        self, stream_id: int, size: int, between: Callable[[int], None] | None = None
    ) -> None:
        """Send ``size`` bytes on a stream as flow control allows, then end
        it; ``between(sent_so_far)`` runs after every frame."""
        block = b"u" * self.conn.max_outbound_frame_size
        sent = 0
        while sent < size:
            n = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
                size - sent,
            )
            if n <= 0:
                self._read_once()
                continue
            self.conn.send_data(stream_id, block[:n])
            self._flush()
            sent += n
            if between is not None:
                between(sent)
        self.conn.end_stream(stream_id)
        self._flush()

    def grant(self, stream_id: int) -> None:
        """Stop withholding flow control from a stream."""
        stream = self.streams[stream_id]
        stream.withhold_credit = False
        owed = stream.received - 0
        if owed and not stream.ended:
            self.conn.increment_flow_control_window(
                min(owed, 2**31 - 1 - 65535), stream_id
            )
            self._flush()

    def until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("HTTP/2 condition not reached")
            if self.closed:
                raise ConnectionError("connection closed")
            self._read_once()

    def request(self, method: bytes, path: bytes, **options) -> Stream:
        stream_id = self.start(method, path, **options)
        self.until(
            lambda: self.streams[stream_id].ended or self.streams[stream_id].reset
        )
        return self.streams[stream_id]

    def _read_once(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and stream:
                stream.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived) and stream:
                stream.received += len(event.data)
                if stream.keep_body:
                    stream.body += event.data
                if stream.withhold_credit:
                    self.conn.increment_flow_control_window(
                        event.flow_controlled_length
                    )
                else:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, h2.events.StreamEnded) and stream:
                stream.ended = True
            elif isinstance(event, h2.events.StreamReset) and stream:
                stream.reset = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)
