"""``GET /metrics``: the text exposition format, for a ``type: metrics``
listener and for a child process's own metrics socket.

It is twisted.web's server, not the edge's own HTTP code: nothing here is
on the path of a Matrix request, and a scrape every few seconds needs none
of that code's economies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

log = Logger()

METRICS_PATH = b"/metrics"

Exposition = Callable[[], Deferred[bytes]]
"""Makes one answer: the text of every metric family."""


class FixedFamilies:
    """A collector of families already made (to render merged ones)."""

    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(families: Iterable[Metric]) -> bytes:
    """The text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FixedFamilies(families))
    return generate_latest(registry)


def local_exposition(registry: CollectorRegistry) -> Exposition:
    """This process's metrics alone."""
    return lambda: succeed(generate_latest(registry))


class MetricsResource(Resource):
    """Answers ``GET /metrics`` (and HEAD) with ``exposition()``; any other
    path gets a plain 404."""

    isLeaf = True

    def __init__(self, exposition: Exposition):
        super().__init__()
        self._exposition = exposition

    def render_GET(self, request: Request) -> bytes | int:
        if request.path != METRICS_PATH:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"Not found: metrics are at /metrics\n"

        def answer(text: bytes) -> None:
            if request.finished or request._disconnected:
                return
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.setHeader(b"Cache-Control", b"no-store")
            request.write(text)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("Making the metrics failed", failure)
            if request.finished or request._disconnected:
                return
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.write(b"The metrics could not be made; see the log.\n")
            request.finish()

        self._exposition().addCallbacks(answer, failed)
        return NOT_DONE_YET


class MetricsSite(Site):
    """The site of a metrics endpoint: quiet, with no access log (a scrape
    every few seconds would fill it)."""

    noisy = False

    def __init__(self, exposition: Exposition):
        super().__init__(MetricsResource(exposition))

    def log(self, request: http.Request) -> None:
        pass
