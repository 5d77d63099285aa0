"""An HTTP/2 server that records each request exactly as a client sent it:
the decoded header list in order (pseudo-headers included, cookie crumbs
not joined), the body, trailers, and whether HEADERS ended the stream.
It also notes the frames each stream arrived in (type, flags, length),
to show that a frame-level shape really was on the wire. It answers every
request with 200 and a short body.

Tests point a client at it first to learn what that client really puts on
the wire, then build the HTTP/1.1 twin of the request from that. Blocking,
one thread per connection; run it beside the reactor, not in it.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import attrs
import h2.config
import h2.connection
import h2.events
import h2.settings

REPLY = b'{"captured": true}'
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, CONTINUATION, PRIORITY_UPDATE = 0x0, 0x1, 0x2, 0x9, 0x10
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20


@attrs.frozen
class Frame:
    type: int
    flags: int
    length: int


class _FrameTrace:
    """Splits a connection's inbound bytes into frames, by stream."""

    def __init__(self) -> None:
        self._buffer = b""
        self._preface = True
        self.by_stream: dict[int, list[Frame]] = {}

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self._preface:
            if len(self._buffer) < len(PREFACE):
                return
            self._buffer = self._buffer[len(PREFACE) :]
            self._preface = False
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                return
            frame_type, flags = self._buffer[3], self._buffer[4]
            stream_id = int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF
            payload = self._buffer[9 : 9 + length]
            self._buffer = self._buffer[9 + length :]
            if frame_type == PRIORITY_UPDATE and len(payload) >= 4:
                stream_id = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            frame = Frame(frame_type, flags, length)
            self.by_stream.setdefault(stream_id, []).append(frame)


@attrs.define
class Captured:
    """One request as an HTTP/2 client sent it."""

    connection: int
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytearray = attrs.Factory(bytearray)
    ended_with_headers: bool = False
    trailers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    complete: bool = False
    frames: list[Frame] = attrs.Factory(list)
    """The frames of this stream, and PRIORITY_UPDATEs naming it."""

    @property
    def header_block_size(self) -> int:
        """Bytes of HPACK in the request's HEADERS and CONTINUATIONs, before
        any trailers: small when the dynamic table was reused."""
        size = 0
        for frame in self.frames:
            if frame.type in (HEADERS, CONTINUATION):
                size += frame.length
                if frame.type == CONTINUATION and frame.flags & END_HEADERS:
                    break
                if frame.type == HEADERS and frame.flags & END_HEADERS:
                    break
            elif frame.type == DATA:
                break
        return size

    def count(self, frame_type: int, flag: int = 0) -> int:
        return sum(
            1
            for f in self.frames
            if f.type == frame_type and (not flag or f.flags & flag)
        )

    def pseudo(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def regular(self) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in self.headers if not k.startswith(b":")]


class CaptureServer:
    def __init__(self, cert_path: Path, key_path: Path) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert_path), str(key_path))
        context.set_alpn_protocols(["h2"])
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.requests: list[Captured] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._connections = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def close(self) -> None:
        self._stopping = True
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> CaptureServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self._connections += 1
                number = self._connections
            thread = threading.Thread(
                target=self._serve, args=(sock, number), daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _serve(self, raw: socket.socket, number: int) -> None:
        try:
            raw.settimeout(60)
            with self._context.wrap_socket(raw, server_side=True) as sock:
                sock.settimeout(0.2)
                self._speak(sock, number)
        except (ssl.SSLEOFError, ConnectionResetError):
            # A client that hangs up without close_notify or GOAWAY.
            pass
        except OSError as e:
            if not self._stopping:
                self.errors.append(e)
        except Exception as e:
            # An h2 protocol error: the client sent something invalid.
            self.errors.append(e)

    def _speak(self, sock: ssl.SSLSocket, number: int) -> None:
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            normalize_inbound_headers=False,
        )
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        # Room for large uploads without waiting on WINDOW_UPDATEs.
        conn.increment_flow_control_window(2**30)
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**30})
        sock.sendall(conn.data_to_send())
        streams: dict[int, Captured] = {}
        trace = _FrameTrace()
        while not self._stopping:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not data:
                return
            trace.feed(data)
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    captured = Captured(number, event.stream_id, list(event.headers))
                    captured.frames = trace.by_stream.setdefault(event.stream_id, [])
                    captured.ended_with_headers = event.stream_ended is not None
                    streams[event.stream_id] = captured
                    with self._lock:
                        self.requests.append(captured)
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id].body += event.data
                    conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.TrailersReceived):
                    streams[event.stream_id].trailers = list(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    captured = streams[event.stream_id]
                    captured.complete = True
                    conn.send_headers(
                        event.stream_id,
                        [
                            (b":status", b"200"),
                            (b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(REPLY)),
                        ],
                    )
                    if captured.pseudo(b":method") == b"HEAD":
                        conn.end_stream(event.stream_id)
                    else:
                        conn.send_data(event.stream_id, REPLY, end_stream=True)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    sock.sendall(conn.data_to_send())
                    return
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
