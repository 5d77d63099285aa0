"""``/ready``: whether the upstreams answer, for load balancers that should
send traffic elsewhere while this edge's Synapse is down."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request

from matrix_edge.http.errors import CORS_HEADERS, refuse_method
from matrix_edge.http.upstream import Upstream
from matrix_edge.pools.dispatch import Dispatcher

_STATES = {True: "up", False: "down", None: "unknown"}


class ReadyResource(Resource):
    """200 while every upstream's last check passed, 503 otherwise; the
    body names each upstream's state either way.

    Worker pools are reported but do not make the edge unready: every edge
    shares them, so a load balancer taking edges out over a worker's
    failure would take them all out. Pools with no member up are listed
    under ``degraded``. Member addresses are internal, and shown only to
    clients the listener's ``admin_allow`` lets in.
    """

    isLeaf = True

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        dispatcher: Dispatcher | None = None,
        show_members: Callable[[Request], bool] = lambda request: False,
    ):
        super().__init__()
        self._upstreams = upstreams
        self._dispatcher = dispatcher
        self._show_members = show_members

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
            pools = _pools(self._dispatcher, self._show_members(request))
            body["pools"] = pools
            body["degraded"] = [name for name, pool in pools.items() if not pool["up"]]
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


def _pools(dispatcher: Dispatcher, members: bool) -> dict[str, dict[str, object]]:
    report: dict[str, dict[str, object]] = {}
    for name, pool in dispatcher.pools.items():
        entry: dict[str, object] = {
            "up": sum(1 for m in pool.members if m.upstream.healthy),
            "size": len(pool.members),
        }
        if members:
            entry["members"] = {
                str(m.upstream.address): _STATES[m.upstream.healthy]
                for m in pool.members
            }
            entry["in_flight"] = sum(m.in_flight for m in pool.members)
            entry["queued"] = pool.queued
        report[name] = entry
    return report
