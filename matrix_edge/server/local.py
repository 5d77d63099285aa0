"""What a listener answers itself: ``/health``, ``/ready`` and the
``.well-known`` delegation documents, found by exact raw path."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import attrs

from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerConfig, ListenerType
from matrix_edge.errors import CORS_HEADERS, MatrixError, error_headers
from matrix_edge.pools.dispatch import Dispatcher
from matrix_edge.server.fields import Field
from matrix_edge.server.router import admin_allowed
from matrix_edge.upstream.client import Upstream

if TYPE_CHECKING:
    from matrix_edge.server.request import EdgeRequest

_NO_CACHE = (b"Cache-Control", b"no-cache, no-store, must-revalidate")
_JSON = (b"Content-Type", b"application/json")

# Clients and servers cache delegation; an hour is what Synapse's own
# deployment charts serve.
WELL_KNOWN_CACHE = (b"Cache-Control", b"public, max-age=3600")

_STATES = {True: "up", False: "down", None: "unknown"}


@attrs.frozen
class LocalAnswer:
    code: int
    headers: list[Field]
    body: bytes


class LocalResource(Protocol):
    def answer(self, request: EdgeRequest) -> LocalAnswer: ...


def method_not_allowed(allowed: bytes) -> LocalAnswer:
    """405 with ``Allow``, and the Matrix spec's M_UNRECOGNIZED."""
    error = MatrixError(405, "M_UNRECOGNIZED", "Unrecognized request")
    return LocalAnswer(405, [*error_headers(error), (b"Allow", allowed)], error.body())


class Health:
    """200 ``OK`` as text/plain, like Synapse's own ``/health``, so load
    balancers and monitoring can probe the edge the same way."""

    def answer(self, request: EdgeRequest) -> LocalAnswer:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(b"GET, HEAD")
        headers = [(b"Content-Type", b"text/plain; charset=utf-8"), _NO_CACHE]
        return LocalAnswer(200, headers, b"OK")


class Ready:
    """``/ready``: 200 while every upstream's last check passed, 503
    otherwise; the body names each upstream's state either way.

    Worker pools are reported but do not make the edge unready: every edge
    shares them, so a load balancer taking edges out over a worker's
    failure would take them all out. Pools with no member up are listed
    under ``degraded``. Member addresses are internal, and shown only to
    clients the listener's ``admin_allow`` lets in.
    """

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        dispatcher: Dispatcher | None = None,
        show_members: Callable[[EdgeRequest], bool] = lambda request: False,
    ):
        self._upstreams = upstreams
        self._dispatcher = dispatcher
        self._show_members = show_members

    def answer(self, request: EdgeRequest) -> LocalAnswer:
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(b"GET, HEAD")
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
            body["status"] = "ready"
        else:
            body.update(errcode="M_UNKNOWN", error="An upstream is not answering")
        headers = [_JSON, _NO_CACHE, *CORS_HEADERS]
        return LocalAnswer(200 if ready else 503, headers, json.dumps(body).encode())


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


class WellKnown:
    """One fixed JSON document, with the CORS headers browser clients need
    to read it."""

    def __init__(self, body: bytes):
        self._body = body

    def answer(self, request: EdgeRequest) -> LocalAnswer:
        if request.method == b"OPTIONS":
            return LocalAnswer(204, [*CORS_HEADERS], b"")
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(b"GET, HEAD, OPTIONS")
        headers = [_JSON, WELL_KNOWN_CACHE, *CORS_HEADERS]
        return LocalAnswer(200, headers, self._body)


def local_resources(
    listener: ListenerConfig,
    config: EdgeConfig,
    upstreams: dict[str, Upstream],
    dispatcher: Dispatcher | None = None,
) -> dict[bytes, LocalResource]:
    """The paths a listener answers itself, by exact raw path."""
    local: dict[bytes, LocalResource] = {
        b"/health": Health(),
        b"/ready": Ready(
            upstreams,
            dispatcher,
            lambda request: admin_allowed(request.client_ip, listener),
        ),
    }
    if listener.type is ListenerType.CLIENT:
        documents = {
            b"server": config.well_known.server,
            b"client": config.well_known.client,
            b"support": config.well_known.support,
        }
        for name, body in documents.items():
            if body is not None:
                local[b"/.well-known/matrix/" + name] = WellKnown(body)
    return local
