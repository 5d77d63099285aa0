"""``/ready``: whether the upstreams answer, for load balancers that should
send traffic elsewhere while this edge's Synapse is down."""

from __future__ import annotations

import json
from collections.abc import Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request

from matrix_edge.http.errors import CORS_HEADERS, refuse_method
from matrix_edge.http.upstream import Upstream


class ReadyResource(Resource):
    """200 while every upstream's last check passed, 503 otherwise; the
    body names each upstream's state either way."""

    isLeaf = True

    def __init__(self, upstreams: Mapping[str, Upstream]):
        super().__init__()
        self._upstreams = upstreams

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return refuse_method(request, b"GET, HEAD")
        states = {
            name: {True: "up", False: "down", None: "unknown"}[upstream.healthy]
            for name, upstream in self._upstreams.items()
        }
        ready = all(state == "up" for state in states.values())
        body: dict[str, object] = {"upstreams": states}
        if ready:
            request.setResponseCode(200)
            body["status"] = "ready"
        else:
            request.setResponseCode(503)
            body.update(errcode="M_UNKNOWN", error="An upstream is not answering")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
        for name, value in CORS_HEADERS:
            request.responseHeaders.setRawHeaders(name, [value])
        return json.dumps(body).encode()
