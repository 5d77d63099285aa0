"""A stand-in for Synapse that records the exact bytes each request arrived
with, and answers in the ways the proxy must cope with.

Paths it knows, also below /_matrix (anything else: 200 with a small JSON
body):
  /big?mb=N          N MiB body with Content-Length, produced as it is read
  /chunked           a chunked response in three parts
  /hang              never answers
  /die               promises 1000 bytes, sends 10, closes
  /early413          answers 413 at once, without reading the request body
  /status?code=N     answers with that status
  /_matrix/client/v3/account/whoami
                     {"user_id": "@alice:test"} for a Bearer token
                     "tok-alice-DEVICE", 401 M_UNKNOWN_TOKEN otherwise
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import parse_qs

import attrs
from twisted.internet import interfaces
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

CHUNK = 64 * 1024


@attrs.define
class Recorded:
    """One request as the upstream saw it."""

    head: bytes
    connection_id: int
    body_length: int = 0
    body_sha256: str = ""
    complete: bool = False

    @property
    def request_line(self) -> bytes:
        return self.head.split(b"\r\n", 1)[0]

    @property
    def target(self) -> bytes:
        return self.request_line.split(b" ")[1]

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:]

    def headers(self, name: bytes) -> list[bytes]:
        out = []
        for line in self.header_lines:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                out.append(value.strip())
        return out


@implementer(interfaces.IPullProducer)
class _Zeros:
    def __init__(self, transport: Any, remaining: int):
        self._transport = transport
        self._remaining = remaining
        self._chunk = b"\0" * CHUNK

    def resumeProducing(self) -> None:
        n = min(CHUNK, self._remaining)
        self._remaining -= n
        self._transport.write(self._chunk[:n])
        if self._remaining == 0:
            self._transport.unregisterProducer()

    def stopProducing(self) -> None:
        self._remaining = 0


class UpstreamProtocol(Protocol):
    factory: RecordingUpstreamFactory

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.connection_id = self.factory.connections
        self._buffer = b""
        self._current: Recorded | None = None
        self._remaining: int | None = 0
        self._chunked = False
        self._hash = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._current is None:
                head, sep, rest = self._buffer.partition(b"\r\n\r\n")
                if not sep:
                    return
                self._buffer = rest
                self._start(head)
                continue
            if not self._consume_body():
                return

    def _start(self, head: bytes) -> None:
        rec = Recorded(head=head, connection_id=self.connection_id)
        self.factory.requests.append(rec)
        self._current = rec
        self._hash = hashlib.sha256()
        lengths = rec.headers(b"content-length")
        self._chunked = (
            b"chunked" in b",".join(rec.headers(b"transfer-encoding")).lower()
        )
        self._remaining = int(lengths[0]) if lengths else (None if self._chunked else 0)
        if _route(rec.target) == b"/early413":
            self._respond(413, b'{"errcode":"M_TOO_LARGE","error":"no"}', close=True)

    def _consume_body(self) -> bool:
        """Eat body bytes from the buffer; True when the request completed."""
        rec = self._current
        assert rec is not None
        if self._chunked:
            while True:
                line, sep, rest = self._buffer.partition(b"\r\n")
                if not sep:
                    return False
                size = int(line.split(b";")[0], 16)
                if len(rest) < size + 2:
                    return False
                self._take(rest[:size])
                self._buffer = rest[size + 2 :]
                if size == 0:
                    break
        else:
            assert self._remaining is not None
            n = min(self._remaining, len(self._buffer))
            self._take(self._buffer[:n])
            self._buffer = self._buffer[n:]
            self._remaining -= n
            if self._remaining:
                return False
        rec.complete = True
        rec.body_sha256 = self._hash.hexdigest()
        self._current = None
        self._answer(rec)
        return True

    def _take(self, data: bytes) -> None:
        assert self._current is not None
        self._current.body_length += len(data)
        self._hash.update(data)

    def _answer(self, rec: Recorded) -> None:
        path = _route(rec.target)
        args = parse_qs(rec.target.partition(b"?")[2].decode())
        if path == b"/early413" or self.transport is None:
            return
        if path == b"/hang":
            return
        if path == b"/slow":
            # A long-poll: answered after ``s`` seconds.
            from twisted.internet import reactor

            seconds = float(args.get("s", ["1"])[0])
            reactor.callLater(seconds, self._respond, 200, b'{"slow": true}')  # type: ignore[attr-defined]
            return
        if path == b"/big":
            size = int(float(args["mb"][0]) * 1024 * 1024)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % size
            )
            self.transport.registerProducer(_Zeros(self.transport, size), False)
            return
        if path == b"/chunked":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
            )
            return
        if path == b"/die":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"
            )
            self.transport.loseConnection()
            return
        if path == b"/client/v3/account/whoami":
            self._whoami(rec)
            return
        code = int(args.get("code", ["200"])[0]) if path == b"/status" else 200
        body = json.dumps(
            {
                "target": rec.target.decode("latin-1"),
                "body_length": rec.body_length,
                "body_sha256": rec.body_sha256,
                "connection": rec.connection_id,
                "head": rec.head.decode("latin-1"),
            }
        ).encode()
        self._respond(code, body)

    def _whoami(self, rec: Recorded) -> None:
        self.factory.whoami_lookups += 1
        token = b"".join(rec.headers(b"authorization")).partition(b"Bearer ")[2]
        parts = token.split(b"-")
        if len(parts) == 3 and parts[0] == b"tok":
            user = b"@%s:test" % parts[1]
            self._respond(200, json.dumps({"user_id": user.decode()}).encode())
        else:
            self._respond(401, b'{"errcode": "M_UNKNOWN_TOKEN", "error": "?"}')

    def _respond(self, code: int, body: bytes, close: bool = False) -> None:
        assert self.transport is not None
        extra = b"Connection: close\r\n" if close else b""
        self.transport.write(
            b"HTTP/1.1 %d Whatever\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Keep-Alive: timeout=5\r\nX-Upstream: %s\r\n%s\r\n%s"
            % (code, len(body), self.factory.name, extra, body)
        )
        if close:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.open_connections -= 1
        self.factory.lost.append(self.connection_id)


def _route(target: bytes) -> bytes:
    """The behaviour a target asks for: its path without ``/_matrix``, so
    that ``/_matrix/hang`` (which the edge forwards) means ``/hang``."""
    path = target.partition(b"?")[0]
    return path[len(b"/_matrix") :] if path.startswith(b"/_matrix/") else path


class RecordingUpstreamFactory(Factory):
    protocol = UpstreamProtocol

    def __init__(self, name: bytes = b"yes") -> None:
        self.name = name
        """Sent back as ``X-Upstream``, to tell upstreams apart."""
        self.requests: list[Recorded] = []
        self.connections = 0
        self.open_connections = 0
        self.lost: list[int] = []
        self.whoami_lookups = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.open_connections += 1
        return super().buildProtocol(addr)


def main() -> None:
    """Serve on 127.0.0.1:PORT [NAME], for tests that run the edge as a
    process."""
    import sys

    from twisted.internet import reactor

    name = sys.argv[2].encode() if len(sys.argv) > 2 else b"yes"
    reactor.listenTCP(
        int(sys.argv[1]), RecordingUpstreamFactory(name), interface="127.0.0.1"
    )
    reactor.run()


if __name__ == "__main__":
    main()
