"""Floors: what CPython and Twisted cost before matrix-edge does anything.

Two stand-ins that the suite can run beside the real proxies, throughput
scenarios only (``--proxies ...,raw-proxy,twisted-web``):

- ``raw-proxy``: the least a proxy on Twisted can be. One upstream
  connection per client connection; request heads go up and responses come
  back unchanged, found by ``\\r\\n\\r\\n`` and Content-Length alone. No
  header is rewritten, nothing is checked, logged or timed out, and request
  bodies are not supported.
- ``twisted-web``: twisted.web's HTTP server answering the small JSON (and
  the 64 KiB body) itself, proxying nothing: the floor of any proxy built on
  twisted.web's server.

Run as ``python floors.py KIND PORT TLS_PORT CERT KEY UPSTREAM_PORT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor, ssl
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

HOST = "127.0.0.1"


class _Upstream(Protocol):
    def __init__(self, client: _Client):
        self.client = client
        self.buffer = b""

    def connectionMade(self) -> None:
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15 : stop if stop >= 0 else None])
            whole = end + 4 + length
            if len(self.buffer) < whole:
                return
            assert self.client.transport is not None
            self.client.transport.write(self.buffer[:whole])
            self.buffer = self.buffer[whole:]

    def connectionLost(self, reason: object = None) -> None:
        if self.client.transport is not None:
            self.client.transport.loseConnection()


class _UpstreamFactory(ClientFactory):
    def __init__(self, client: _Client):
        self.client = client

    def buildProtocol(self, addr: object) -> _Upstream:
        return _Upstream(self.client)


class _Client(Protocol):
    upstream_port = 0

    def connectionMade(self) -> None:
        self.upstream: _Upstream | None = None
        self.pending = b""
        self.buffer = b""
        reactor.connectTCP(HOST, self.upstream_port, _UpstreamFactory(self))

    def upstream_ready(self, upstream: _Upstream) -> None:
        self.upstream = upstream
        if self.pending:
            assert upstream.transport is not None
            upstream.transport.write(self.pending)
            self.pending = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[: end + 4], self.buffer[end + 4 :]
            if self.upstream is None or self.upstream.transport is None:
                self.pending += head
            else:
                self.upstream.transport.write(head)

    def connectionLost(self, reason: object = None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


SMALL_BODY = b'{"versions":["v1.1","v1.2","v1.3","v1.4","v1.5"],"unstable_features":{}}'
LARGE_BODY = bytes(range(256)) * (64 * 1024 // 256)


class _Answers(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        if request.path.startswith(b"/_matrix/client/versions"):
            request.setHeader(b"content-type", b"application/json")
            return SMALL_BODY
        if request.path == b"/health":
            return b"OK"
        request.setHeader(b"content-type", b"application/octet-stream")
        return LARGE_BODY


def main() -> None:
    kind, port, tls_port, cert, key, upstream = sys.argv[1:7]
    if kind == "raw-proxy":
        _Client.upstream_port = int(upstream)
        factory: Factory = Factory.forProtocol(_Client)
    elif kind == "twisted-web":
        site = Site(_Answers())
        site.log = lambda request: None  # type: ignore[method-assign]
        factory = site
    else:
        raise SystemExit(f"floors.py: unknown kind {kind!r}")
    context = ssl.DefaultOpenSSLContextFactory(key, cert)
    reactor.listenTCP(int(port), factory, backlog=4096, interface=HOST)
    reactor.listenSSL(int(tls_port), factory, context, backlog=4096, interface=HOST)
    print(f"{kind} on {HOST}:{port} and {tls_port} (TLS)", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
