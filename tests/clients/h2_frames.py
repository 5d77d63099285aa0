"""An HTTP/2 client on the h2 library that can also shape the frames a
request travels in: a header block split over CONTINUATION frames, padded
HEADERS and DATA, request trailers, PRIORITY frames (RFC 7540 §5.3, still
on the wire from older clients) and PRIORITY_UPDATE (RFC 9218). Blocking;
run it in a thread."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence

import attrs
import h2.config
import h2.connection
import h2.events
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame

Headers = Sequence[tuple[bytes, bytes]]
PRIORITY_UPDATE = 0x10


@attrs.frozen
class Framing:
    """How one request's frames are shaped; the default is plain."""

    continuation: int = 0
    """Extra CONTINUATION frames the header block is split into."""
    pad: int = 0
    """Padding bytes on the HEADERS frame and on every DATA frame."""
    trailers: tuple[tuple[bytes, bytes], ...] = ()
    priority: bool = False
    """A PRIORITY frame before HEADERS, and priority fields in HEADERS."""
    priority_update: bytes | None = None
    """A PRIORITY_UPDATE frame with this field value, before HEADERS."""


@attrs.define
class Outgoing:
    method: bytes
    target: bytes
    authority: bytes
    headers: Headers
    body: bytes | None
    framing: Framing = Framing()


@attrs.define
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body: bytearray = attrs.Factory(bytearray)
    ended: bool = False
    reset: bool = False


class FrameClient:
    def __init__(self, port: int, server_hostname: str = "localhost"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname=server_hostname)
        self.alpn = self.sock.selected_alpn_protocol()
        # Headers go out as given: no cookie splitting, no lower-casing.
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, normalize_outbound_headers=False
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.responses: dict[int, Response] = {}
        self.closed = False
        self._flush()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()

    def exchange(
        self, requests: Sequence[Outgoing], parallel: bool, timeout: float = 120
    ) -> list[Response]:
        """Send ``requests`` on this connection, all at once or one after
        another, and wait for every response."""
        if parallel:
            ids = [self._open(r) for r in requests]
            for stream_id, request in zip(ids, requests, strict=True):
                self._finish(stream_id, request)
            self._until(lambda: all(self._done(i) for i in ids), timeout)
            return [self.responses[i] for i in ids]
        out = []
        for request in requests:
            stream_id = self._open(request)
            self._finish(stream_id, request)
            self._until(lambda s=stream_id: self._done(s), timeout)
            out.append(self.responses[stream_id])
        return out

    def _done(self, stream_id: int) -> bool:
        response = self.responses[stream_id]
        return response.ended or response.reset

    def _open(self, request: Outgoing) -> int:
        framing = request.framing
        stream_id = self.conn.get_next_available_stream_id()
        self.responses[stream_id] = Response()
        self._flush()
        if framing.priority_update is not None:
            payload = struct.pack(">I", stream_id) + framing.priority_update
            self.sock.sendall(
                struct.pack(">I", len(payload))[1:]
                + bytes([PRIORITY_UPDATE, 0])
                + struct.pack(">I", 0)
                + payload
            )
        if framing.priority:
            self.conn.prioritize(stream_id, weight=200, depends_on=0, exclusive=False)
            self._flush()
        headers = [
            (b":method", request.method),
            (b":path", request.target),
            (b":scheme", b"https"),
            (b":authority", request.authority),
            *request.headers,
        ]
        end = request.body is None and not framing.trailers
        if framing.priority:
            self.conn.send_headers(
                stream_id,
                headers,
                end_stream=end,
                priority_weight=32,
                priority_depends_on=0,
                priority_exclusive=True,
            )
        else:
            self.conn.send_headers(stream_id, headers, end_stream=end)
        block = self.conn.data_to_send()
        if framing.continuation or framing.pad:
            block = _reframe(block, framing.continuation, framing.pad)
        self.sock.sendall(block)
        return stream_id

    def _finish(self, stream_id: int, request: Outgoing) -> None:
        """Send the body and trailers, as flow control allows."""
        framing = request.framing
        body = request.body or b""
        sent = 0
        while sent < len(body):
            room = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size
                - (framing.pad + 1 if framing.pad else 0),
            )
            if room <= 0:
                self._read_once()
                continue
            piece = body[sent : sent + room]
            if framing.pad:
                self.conn.send_data(stream_id, piece, pad_length=framing.pad)
            else:
                self.conn.send_data(stream_id, piece)
            sent += len(piece)
            self._flush()
        if framing.trailers:
            self.conn.send_headers(stream_id, list(framing.trailers), end_stream=True)
        elif request.body is not None:
            self.conn.end_stream(stream_id)
        self._flush()

    def _until(self, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("HTTP/2 responses did not all arrive")
            if self.closed:
                raise ConnectionError("connection closed")
            self._read_once()

    def _read_once(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            response = self.responses.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and response:
                response.headers = list(event.headers)
                response.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived) and response:
                response.body += event.data
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            elif isinstance(event, h2.events.StreamEnded) and response:
                response.ended = True
            elif isinstance(event, h2.events.StreamReset) and response:
                response.reset = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)


def _reframe(data: bytes, continuations: int, pad: int) -> bytes:
    """The one header block in ``data`` (HEADERS, maybe CONTINUATIONs), sent
    again as padded HEADERS plus ``continuations`` CONTINUATION frames."""
    first: HeadersFrame | None = None
    fragment = b""
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        view = view[9 + length :]
        if isinstance(frame, HeadersFrame):
            first = frame
        fragment += frame.data
    assert first is not None
    pieces = continuations + 1
    size = -(-len(fragment) // pieces)
    parts = [fragment[i * size : (i + 1) * size] for i in range(pieces)]
    headers = HeadersFrame(first.stream_id, data=parts[0])
    for flag in first.flags:
        if flag != "END_HEADERS":
            headers.flags.add(flag)
    headers.depends_on = first.depends_on
    headers.stream_weight = first.stream_weight
    headers.exclusive = first.exclusive
    if pad:
        headers.flags.add("PADDED")
        headers.pad_length = pad
    frames: list[Frame] = [headers]
    for part in parts[1:]:
        frames.append(ContinuationFrame(first.stream_id, data=part))
    frames[-1].flags.add("END_HEADERS")
    return b"".join(f.serialize() for f in frames)
