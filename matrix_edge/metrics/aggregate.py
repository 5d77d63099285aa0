"""One answer for every process (``processes: N``).

The metrics listener lives in the first process. Each child serves its own
exposition on a loopback socket that the first process bound for it (see
L{matrix_edge.processes}); at each scrape the first process fetches every
live child's text, at once and with a short timeout, parses it, and puts
its families together with its own. Each process labels its series with
``process``, so the merge only has to put each family's samples under one
``# HELP``/``# TYPE``. A child that does not answer in time is left out of
that answer and counted in ``matrix_edge_metrics_scrape_errors_total``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge.metrics.registry import ProcessMetrics
from matrix_edge.metrics.resource import METRICS_PATH, render

log = Logger()

CHILD_TIMEOUT = 2.0
"""How long a child may take to answer, well within Prometheus's default
scrape timeout (10 s)."""

Children = Callable[[], Iterable[tuple[int, tuple[str, int]]]]
"""The live children, each with its index and the address of its metrics
socket."""


class Aggregator:
    """Makes the first process's answer: its own families and every live
    child's."""

    def __init__(
        self,
        reactor: Any,
        registry: CollectorRegistry,
        counts: ProcessMetrics,
        children: Children,
        timeout: float = CHILD_TIMEOUT,
    ):
        self._reactor = reactor
        self._registry = registry
        self._counts = counts
        counts.scrape_errors = 0
        self._children = children
        self._timeout = timeout

    def exposition(self) -> Deferred[bytes]:
        children = list(self._children())
        fetches = [self._fetch(index, address) for index, address in children]
        done: Deferred[list[tuple[bool, Any]]] = DeferredList(
            fetches, consumeErrors=True
        )
        return done.addCallback(self._merge, [index for index, _ in children])

    def _fetch(self, index: int, address: tuple[str, int]) -> Deferred[str]:
        host, port = address
        endpoint = TCP4ClientEndpoint(self._reactor, host, port, timeout=1)
        fetch = _Fetch()
        connected = endpoint.connect(_OneFetch(fetch))
        d = fetch.done
        d.addTimeout(self._timeout, self._reactor)

        def give_up(failure: Failure) -> Failure:
            connected.cancel()
            if fetch.transport is not None:
                fetch.transport.abortConnection()  # type: ignore[attr-defined]
            return failure

        connected.addErrback(fetch.failed)
        return d.addErrback(give_up)

    def _merge(self, results: list[tuple[bool, Any]], indexes: list[int]) -> bytes:
        texts = []
        for index, (ok, result) in zip(indexes, results, strict=True):
            if ok:
                texts.append((index, result))
            else:
                self._child_failed(index, result.getErrorMessage())
        merged: dict[str, Metric] = {}
        children: list[list[Metric]] = []
        for index, text in texts:
            try:
                children.append(list(text_string_to_metric_families(text)))
            except ValueError as e:
                self._child_failed(index, f"unparseable answer: {e}")
        # Own families last collected, so that this scrape's errors count.
        for family in self._registry.collect():
            merged[family.name] = family
        for families in children:
            for family in families:
                mine = merged.get(family.name)
                if mine is None:
                    merged[family.name] = family
                elif mine.type == family.type:
                    mine.samples.extend(family.samples)
        return render(merged.values())

    def _child_failed(self, index: int, reason: str) -> None:
        assert self._counts.scrape_errors is not None
        self._counts.scrape_errors += 1
        log.warn(
            "Child {index} did not give its metrics ({reason}); left out of "
            "this scrape",
            index=index,
            reason=reason,
        )


class _Fetch(Protocol):
    """``GET /metrics`` in HTTP/1.0 on a child's socket: the answer ends
    when the child closes the connection. ``done`` fires with the body."""

    def __init__(self) -> None:
        self.done: Deferred[str] = Deferred()
        self._received: list[bytes] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET %s HTTP/1.0\r\n\r\n" % METRICS_PATH)

    def dataReceived(self, data: bytes) -> None:
        self._received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        head, _, body = b"".join(self._received).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split(b" ")
        if len(status) < 2 or status[1] != b"200":
            self.done.errback(ValueError(f"answered {head[:40]!r}"))
            return
        self.done.callback(body.decode("utf-8", "replace"))

    def failed(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)


class _OneFetch(Factory):
    """The factory of one L{_Fetch}, quiet: one per child per scrape would
    otherwise log its start and stop."""

    noisy = False

    def __init__(self, fetch: _Fetch):
        self._fetch = fetch

    def buildProtocol(self, addr: IAddress | None) -> _Fetch:
        return self._fetch
