"""A raw HTTP/2 client over TLS, for conformance tests: frames go out
exactly as built, valid or not (the h2 library refuses to send invalid
ones), and what the server sends back is read frame by frame. Blocking;
run it in a thread."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Sequence

import h2.errors
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65535

Header = tuple[bytes, bytes]

# Frame types and flags, for frames built byte by byte.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One frame, byte by byte: no check on what it says."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream_id)
        + payload
    )


def settings_payload(*pairs: tuple[int, int]) -> bytes:
    """A SETTINGS payload, in this order, repeats allowed."""
    return b"".join(struct.pack(">HI", key, value) for key, value in pairs)


_NAMES = {
    DATA: "DATA",
    HEADERS: "HEADERS",
    PRIORITY: "PRIORITY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PUSH_PROMISE: "PUSH_PROMISE",
    PING: "PING",
    GOAWAY: "GOAWAY",
    WINDOW_UPDATE: "WINDOW_UPDATE",
    CONTINUATION: "CONTINUATION",
}


def describe(frame: Frame) -> str:
    """A frame as a short line for failure messages."""
    name = _NAMES.get(frame.type, f"type {frame.type}")
    parts = [f"stream {frame.stream_id}"]
    if frame.flags:
        parts.append("|".join(sorted(frame.flags)))
    if isinstance(frame, (RstStreamFrame, GoAwayFrame)):
        parts.append(error_name(frame.error_code))
    if isinstance(frame, DataFrame):
        parts.append(f"{len(frame.data)} bytes")
    if isinstance(frame, PingFrame):
        parts.append(repr(bytes(frame.opaque_data)))
    return f"{name}({', '.join(parts)})"


def error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return hex(code)


class RawH2:
    """One TLS connection (ALPN h2) and the frames read from it."""

    def __init__(self, port: int, timeout: float = 3.0):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.alpn = self.sock.selected_alpn_protocol()
        self.timeout = timeout
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.server_settings: dict[int, int] = {}
        self.received: list[Frame] = []
        """Every frame read, in order."""
        self.responses: dict[int, list[Header]] = {}
        """Decoded header blocks the server sent, by stream."""
        self.closed = False
        self.mark = 0
        """Where the frames after the handshake start in ``received``."""
        self._buffer = b""
        self._block = b""

    def close(self) -> None:
        self.sock.close()

    # Sending -------------------------------------------------------------------

    def send(self, *items: Frame | bytes) -> None:
        data = b"".join(i if isinstance(i, bytes) else i.serialize() for i in items)
        # The server may close while frames are still going out; what it
        # sent before that is still read.
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def encode(self, headers: Iterable[Header]) -> bytes:
        """An HPACK block, in this connection's compression context."""
        return self.encoder.encode(list(headers))

    def headers(
        self,
        stream_id: int,
        headers: Sequence[Header],
        *flags: str,
    ) -> HeadersFrame:
        return HeadersFrame(stream_id, self.encode(headers), flags=flags)

    def continuation(
        self, stream_id: int, headers: Sequence[Header], *flags: str
    ) -> ContinuationFrame:
        return ContinuationFrame(stream_id, self.encode(headers), flags=flags)

    def handshake(self, *settings: tuple[int, int]) -> None:
        """Preface and SETTINGS both ways, each side's acknowledged."""
        pairs = settings or ((SettingsFrame.INITIAL_WINDOW_SIZE, DEFAULT_WINDOW),)
        self.send(PREFACE, raw_frame(SETTINGS, 0, 0, settings_payload(*pairs)))
        theirs = ours = False
        deadline = time.monotonic() + self.timeout
        while not (theirs and ours):
            frame = self.next_frame(deadline)
            if frame is None:
                raise ConnectionError("no SETTINGS exchange with the server")
            if isinstance(frame, SettingsFrame):
                if "ACK" in frame.flags:
                    ours = True
                else:
                    theirs = True
        self.mark = len(self.received)

    # Receiving -----------------------------------------------------------------

    def next_frame(self, deadline: float) -> Frame | None:
        """The next frame; None if the connection closed (``closed`` is
        set) or nothing came before ``deadline``."""
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if len(self._buffer) >= 9 + length:
                    header, body = self._buffer[:9], self._buffer[9 : 9 + length]
                    self._buffer = self._buffer[9 + length :]
                    frame, _ = Frame.parse_frame_header(memoryview(header))
                    frame.parse_body(memoryview(body))
                    self._received(frame)
                    return frame
            if self.closed:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
            self._buffer += data

    def _received(self, frame: Frame) -> None:
        self.received.append(frame)
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.server_settings.update(frame.settings)
            self.send(SettingsFrame(0, flags=["ACK"]))
        elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
            self._block += frame.data
            if "END_HEADERS" in frame.flags:
                block, self._block = self._block, b""
                self.responses[frame.stream_id] = self.decoder.decode(block, raw=True)

    def wait_for(
        self, wanted: Callable[[Frame], bool], timeout: float | None = None
    ) -> Frame | None:
        """Read until a frame is ``wanted``; None if the connection closed
        or the time ran out first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self.next_frame(deadline)
            if frame is None or wanted(frame):
                return frame

    def since_handshake(self) -> list[str]:
        """What the server sent after the handshake, for failure messages."""
        return [describe(f) for f in self.received[self.mark :]]
