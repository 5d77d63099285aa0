"""``/ready``: whether the upstreams answer, for load balancers that should
send traffic elsewhere while this edge's Synapse is down."""

from __future__ import annotations

import json
from collections.abc import Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request

from matrix_edge.http.errors import CORS_HEADERS, refuse_method
from matrix_edge.http.upstream import Upstream
from matrix_edge.pools.dispatch import Dispatcher

_STATES = {True: "up", False: "down", None: "unknown"}


class ReadyResource(Resource):
    """200 while every upstream's last check passed, and every worker pool
    has a member up (or main can stand in for it); 503 otherwise. The body
    names each upstream's and each pool member's state either way."""

    isLeaf = True

    def __init__(
        self, upstreams: Mapping[str, Upstream], dispatcher: Dispatcher | None = None
    ):
        super().__init__()
        self._upstreams = upstreams
        self._dispatcher = dispatcher

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return refuse_method(request, b"GET, HEAD")
        states = {
            name: _STATES[upstream.healthy]
            for name, upstream in self._upstreams.items()
        }
        ready = all(state == "up" for state in states.values())
        body: dict[str, object] = {"upstreams": states}
        if self._dispatcher is not None:
            pools, pools_ready = self._pools(self._dispatcher)
            body["pools"] = pools
            ready = ready and pools_ready
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

    @staticmethod
    def _pools(dispatcher: Dispatcher) -> tuple[dict[str, object], bool]:
        """Each pool's members; ready unless a pool that main cannot stand
        in for (media, SSO) has no member up."""
        needed = {
            pool
            for route in dispatcher.table.routes
            if not route.fallback
            for pool in route.pools
        }
        report: dict[str, object] = {}
        ready = True
        for name, pool in dispatcher.pools.items():
            up = sum(1 for member in pool.members if member.upstream.healthy)
            report[name] = {
                "up": up,
                "members": {
                    str(m.upstream.address): _STATES[m.upstream.healthy]
                    for m in pool.members
                },
                "in_flight": sum(m.in_flight for m in pool.members),
                "queued": pool.queued,
            }
            if up == 0 and name in needed:
                ready = False
        return report, ready
