"""A blocking client for the adversarial probes (run it in a thread): it
sends exact bytes, plain or over TLS, and reads responses off the wire
without trusting their framing."""

from __future__ import annotations

import socket
import ssl
import time

from tests.http1_messages import Resp, parse_head


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body, and whether its last chunk came."""
    body = b""
    while True:
        line, sep, after = data.partition(b"\r\n")
        if not sep:
            return body, False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return body, True
        if len(after) < size + 2:
            return body + after[:size], False
        body += after[:size]
        data = after[size + 2 :]


def chunked_end(data: bytes) -> tuple[bytes, int | None]:
    """The payload of a chunked body at the front of ``data``, and where
    the body ends (after its trailers), or None while it has not."""
    body = b""
    at = 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return body, None
        size = int(data[at:end].split(b";")[0], 16)
        at = end + 2
        if size == 0:
            trailers_end = data.find(b"\r\n\r\n", at - 2)
            return body, None if trailers_end < 0 else trailers_end + 4
        body += data[at : at + size]
        if len(data) < at + size + 2:
            return body, None
        at += size + 2


def read_response(
    conn: Conn, method: bytes = b"GET", timeout: float = 10.0
) -> tuple[Resp | None, str]:
    """The next final response (interim ones are skipped) and how it
    ended: "complete"; "cut" (the connection ended before the end its
    framing announced; ``body`` holds what came); "eof" (ended before a
    head); "timeout" (with what came of the response so far, if any)."""
    deadline = time.monotonic() + timeout
    resp: Resp | None = None

    def fill() -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        conn.sock.settimeout(remaining)
        conn._fill()

    try:
        while True:
            while (parsed := parse_head(conn.buf)) is None:
                if conn.eof:
                    return None, "eof"
                fill()
            resp, conn.buf = parsed
            if not 100 <= resp.status < 200:
                break
        if resp.status in (204, 304) or method == b"HEAD":
            return resp, "complete"
        chunked = (resp.header(b"transfer-encoding") or b"").lower() == b"chunked"
        length = resp.header(b"content-length")
        while True:
            if chunked:
                resp.body, end = chunked_end(conn.buf)
                if end is not None:
                    conn.buf = conn.buf[end:]
                    return resp, "complete"
            elif length is not None:
                resp.body = conn.buf[: int(length)]
                if len(conn.buf) >= int(length):
                    conn.buf = conn.buf[int(length) :]
                    return resp, "complete"
            else:
                resp.body = conn.buf
            if conn.eof:
                if chunked or length is not None:
                    conn.buf = b""
                    return resp, "cut"
                conn.buf = b""
                return resp, "complete"
            fill()
    except TimeoutError:
        return resp, "timeout"


class Conn:
    def __init__(
        self,
        port: int,
        tls: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = (
            tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        )
        self.buf = b""
        self.eof = False

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            self.eof = True
        self.buf += chunk

    def head(self, timeout: float = 10.0) -> Resp:
        """The next response head; what follows it stays in ``buf``."""
        deadline = time.monotonic() + timeout
        while (parsed := parse_head(self.buf)) is None:
            assert not self.eof, f"closed before a response head: {self.buf[:200]!r}"
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no response head in time"
            self.sock.settimeout(remaining)
            self._fill()
        resp, self.buf = parsed
        return resp

    def response(self, method: bytes = b"GET", timeout: float = 10.0) -> Resp:
        """The next whole response, framed by Content-Length or chunks."""
        resp = self.head(timeout)
        if resp.status < 200 or resp.status in (204, 304) or method == b"HEAD":
            return resp
        deadline = time.monotonic() + timeout
        chunked = (resp.header(b"transfer-encoding") or b"").lower() == b"chunked"
        length = resp.header(b"content-length")
        while True:
            if chunked:
                body, ended = dechunk(self.buf)
                if ended:
                    resp.body = body
                    self.buf = self.buf.partition(b"0\r\n\r\n")[2]
                    return resp
            elif length is not None and len(self.buf) >= int(length):
                resp.body, self.buf = self.buf[: int(length)], self.buf[int(length) :]
                return resp
            assert not self.eof, f"closed mid-response: {resp}"
            remaining = deadline - time.monotonic()
            assert remaining > 0, "response incomplete in time"
            self.sock.settimeout(remaining)
            self._fill()

    def until_eof(self, timeout: float) -> bool:
        """Read until the server ends the connection: True if it does
        within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                self._fill()
            except TimeoutError:
                return False
        return True

    def closed(self, timeout: float = 2.0) -> bool:
        """True when the server ends the connection with nothing more."""
        before = len(self.buf)
        return self.until_eof(timeout) and len(self.buf) == before

    def close(self) -> None:
        self.sock.close()
