"""``/.well-known/matrix/*``: delegation documents from the configuration."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

from matrix_edge.http.errors import CORS_HEADERS, refuse_method

# Clients and servers cache delegation; an hour is what Synapse's own
# deployment charts serve.
CACHE_CONTROL = b"public, max-age=3600"


class WellKnownResource(Resource):
    """Serves one fixed JSON document with the CORS headers browser clients
    need to read it."""

    isLeaf = True

    def __init__(self, body: bytes):
        super().__init__()
        self._body = body

    def render(self, request: Request) -> bytes:
        for name, value in CORS_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            return b""
        if request.method not in (b"GET", b"HEAD"):
            return refuse_method(request, b"GET, HEAD, OPTIONS")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", CACHE_CONTROL)
        return self._body
