"""``/health``: answered by the edge on every listener, never forwarded."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

from matrix_edge.http.errors import refuse_method


class HealthResource(Resource):
    """200 ``OK`` as text/plain, like Synapse's own ``/health``, so load
    balancers and monitoring can probe the edge the same way."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return refuse_method(request, b"GET, HEAD")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
        return b"OK"
