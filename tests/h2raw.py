"""A raw HTTP/2 client over TLS, frame by frame, for attacks and abuse
tests: what is sent is exactly what the caller builds (invalid frames
included, which the h2 library would refuse to send); what the edge sends
is parsed just enough to see GOAWAY, RST_STREAM, status, data, window
updates and the end of streams. The client acknowledges the edge's SETTINGS
at once, and gives window back 32 KiB at a time as browsers do.

Used by tests/integration/test_h2_attacks.py and bench/h2_attacks.py."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

HOST = "127.0.0.1"
KiB = 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SMALL_PATH = b"/_matrix/client/versions"


def header_block(
    encoder: hpack.Encoder,
    path: bytes = SMALL_PATH,
    method: bytes = b"GET",
    extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    return encoder.encode(
        [
            (b":method", method),
            (b":path", path),
            (b":scheme", b"https"),
            (b":authority", b"matrix.test"),
            *extra,
        ]
    )


class RawH2:
    """A TLS connection speaking HTTP/2 frame by frame: what is sent is
    exactly what the attack builds; what the edge sends is parsed just enough
    to see GOAWAY, RST_STREAM, response status, data and the end of streams."""

    def __init__(
        self,
        port: int,
        settings: dict[int, int] | None = None,
        connection_window: int = 0,
    ):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection((HOST, port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder(max_header_list_size=1 << 30)
        self.decoder.max_allowed_table_size = 2**32 - 1
        self.started = time.monotonic()
        self.buffer = b""
        self.goaway: int | None = None
        self.goaway_at: float | None = None
        self.goaway_last_stream: int | None = None
        self.closed_at: float | None = None
        """The edge's TLS close_notify (or a TCP error) was seen."""
        self.tcp_closed_at: float | None = None
        """A write or read failed at the TCP level (reset, broken pipe)."""
        self.resets: dict[int, int] = {}
        self.status: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.ended: set[int] = set()
        self.credit = True
        """Give back window for the data received (a reading client)."""
        self.next_stream = 1
        self.edge_settings = False
        self.pings_acked = 0
        self.owed: dict[int, int] = {}
        self.ack_every_frame = False
        self.send_window: dict[int, int] = {0: 65535}
        """What the edge's WINDOW_UPDATEs granted, per stream (0: the
        connection), on top of the initial windows."""
        self.edge_initial_window = 65535
        """One WINDOW_UPDATE per DATA frame, as some clients send them."""
        settings_frame = SettingsFrame(0)
        settings_frame.settings = settings or {}
        first = PREFACE + settings_frame.serialize()
        if connection_window:
            first += WindowUpdateFrame(
                0, window_increment=connection_window
            ).serialize()
        self.send(first)
        # The edge's SETTINGS, acknowledged now: an acknowledgement sent
        # later could fall inside a header block the attack leaves open.
        self.wait(lambda: self.edge_settings, 5.0)

    @property
    def closed(self) -> bool:
        """The edge closed the connection (TLS or TCP)."""
        return self.closed_at is not None

    # Sending.

    def send(self, data: bytes, timeout: float = 10.0, after_eof: bool = False) -> bool:
        """Write everything; False when the edge closed or stopped reading
        for ``timeout`` seconds. ``after_eof`` keeps writing after the
        edge's TLS close_notify, until the TCP connection itself fails."""
        if self.tcp_closed_at is not None or (
            self.closed_at is not None and not after_eof
        ):
            return False
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError):
            self._closed()
            self.tcp_closed_at = time.monotonic()
            return False
        return True

    def new_stream(self) -> int:
        stream_id = self.next_stream
        self.next_stream += 2
        return stream_id

    def request(
        self,
        path: bytes = SMALL_PATH,
        method: bytes = b"GET",
        extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> tuple[int, bytes]:
        """A new stream's HEADERS frame (not sent)."""
        stream_id = self.new_stream()
        frame = HeadersFrame(stream_id, header_block(self.encoder, path, method, extra))
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return stream_id, frame.serialize()

    # Receiving.

    def poll(self, timeout: float = 0.0, limit: int = 1 << 20) -> int:
        """Read and parse what the edge sent, waiting up to ``timeout`` for
        the first bytes; returns the bytes read."""
        if self.closed_at is not None:
            return 0
        total = 0
        self.sock.settimeout(timeout if timeout > 0 else 0.0001)
        try:
            while total < limit:
                data = self.sock.recv(256 * KiB)
                if not data:
                    self._closed()
                    break
                total += len(data)
                self._parse(data)
                self.sock.settimeout(0.0001)
        except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
            pass
        except (OSError, ssl.SSLError):
            self._closed()
            self.tcp_closed_at = time.monotonic()
        return total

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if self.closed_at is not None or time.monotonic() > deadline:
                return done()
            self.poll(0.05)
        return True

    def drained(self, timeout: float = 30.0) -> bool:
        """Send a PING and wait for its ACK: the edge has read everything
        sent before it."""
        self.pings_acked = 0
        self.send(PingFrame(0, opaque_data=b"drained!").serialize())
        return self.wait(lambda: self.pings_acked > 0, timeout)

    def wait_closed(self, timeout: float) -> bool:
        return self.wait(lambda: self.closed_at is not None, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()

    def _parse(self, data: bytes) -> None:
        self.buffer += data
        replies = b""
        while len(self.buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
            if len(self.buffer) < 9 + length:
                break
            frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
            self.buffer = self.buffer[9 + length :]
            replies += self._frame(frame)
        if replies:
            self.send(replies, timeout=1.0)

    def _frame(self, frame: Frame) -> bytes:
        if isinstance(frame, GoAwayFrame):
            if self.goaway is None:
                self.goaway = frame.error_code
                self.goaway_at = time.monotonic()
                self.goaway_last_stream = frame.last_stream_id
        elif isinstance(frame, RstStreamFrame):
            self.resets[frame.stream_id] = frame.error_code
        elif isinstance(frame, WindowUpdateFrame):
            self.send_window[frame.stream_id] = (
                self.send_window.get(frame.stream_id, 0) + frame.window_increment
            )
        elif isinstance(frame, PingFrame) and "ACK" in frame.flags:
            if frame.opaque_data == b"drained!":
                self.pings_acked += 1
        elif isinstance(frame, HeadersFrame):
            for name, value in self.decoder.decode(frame.data, raw=True):
                if name == b":status":
                    self.status[frame.stream_id] = int(value)
            if "END_STREAM" in frame.flags:
                self.ended.add(frame.stream_id)
        elif isinstance(frame, DataFrame):
            self.received[frame.stream_id] = self.received.get(
                frame.stream_id, 0
            ) + len(frame.data)
            if "END_STREAM" in frame.flags:
                self.ended.add(frame.stream_id)
            if self.credit and frame.flow_controlled_length:
                return self._give_back(frame.stream_id, frame.flow_controlled_length)
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.edge_settings = True
            self.edge_initial_window = frame.settings.get(
                SettingsFrame.INITIAL_WINDOW_SIZE, self.edge_initial_window
            )
            return SettingsFrame(0, flags=["ACK"]).serialize()
        return b""

    def _give_back(self, stream_id: int, size: int) -> bytes:
        """WINDOW_UPDATEs for data received, 32 KiB at a time, as browsers
        and nghttp2 send them (not one per DATA frame)."""
        out = b""
        self.owed[0] = self.owed.get(0, 0) + size
        self.owed[stream_id] = self.owed.get(stream_id, 0) + size
        threshold = 1 if self.ack_every_frame else 32 * KiB
        for key in (0, stream_id):
            if self.owed[key] >= threshold:
                out += WindowUpdateFrame(
                    key, window_increment=self.owed[key]
                ).serialize()
                self.owed[key] = 0
        return out
