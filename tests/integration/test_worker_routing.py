"""Worker pools over real loopback sockets: recording upstreams stand in
for Synapse's main process and its workers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from matrix_edge.config.edge import EdgeConfig, parse_config
from matrix_edge.pools.dispatch import Dispatcher, make_dispatcher
from matrix_edge.server.site import EdgeSite
from matrix_edge.upstream.client import Upstream
from tests.rawhttp import connect, exchange, read_response
from tests.recording_upstream import RecordingUpstreamFactory


@attrs.define
class WorkerStack:
    port: int
    main: RecordingUpstreamFactory
    workers: dict[str, list[RecordingUpstreamFactory]]
    listeners: dict[int, Any]
    dispatcher: Dispatcher
    config: EdgeConfig

    def landed(self, marker: bytes) -> str:
        """Which process saw the request whose target has ``marker``."""
        places = [
            name
            for name, factory in self._everyone()
            for rec in factory.requests
            if marker in rec.target
        ]
        assert len(places) == 1, places
        return places[0]

    def _everyone(self) -> Iterator[tuple[str, RecordingUpstreamFactory]]:
        yield "main", self.main
        for pool, factories in self.workers.items():
            for i, factory in enumerate(factories):
                yield f"{pool}{i + 1}", factory


@pytest.fixture
def worker_stack() -> Iterator[Any]:
    ports: list[Any] = []
    upstreams: list[Upstream] = []

    def listen() -> tuple[RecordingUpstreamFactory, Any]:
        factory = RecordingUpstreamFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        ports.append(port)
        return factory, port

    def make(
        pools: dict[str, int],
        limits: dict[str, dict[str, Any]] | None = None,
        listener: dict[str, Any] | None = None,
        **workers_extra: Any,
    ) -> WorkerStack:
        """Pools of that many recording workers each; ``limits`` adds the
        long form's keys to a pool."""
        main, main_port = listen()
        workers: dict[str, list[RecordingUpstreamFactory]] = {}
        listeners: dict[int, Any] = {}
        addresses: dict[str, list[str]] = {}
        for name, count in pools.items():
            for _ in range(count):
                factory, port = listen()
                workers.setdefault(name, []).append(factory)
                listeners[id(factory)] = port
                addresses.setdefault(name, []).append(
                    f"http://127.0.0.1:{port.getHost().port}"
                )
        config = parse_config(
            {
                "listeners": [
                    {
                        "port": 1,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "client",
                        **(listener or {}),
                    }
                ],
                "upstream": f"http://127.0.0.1:{main_port.getHost().port}",
                "workers": {
                    "pools": {
                        name: {"addresses": pool, **(limits or {}).get(name, {})}
                        for name, pool in addresses.items()
                    },
                    **workers_extra,
                },
            }
        )
        made: dict[Any, Upstream] = {}

        def upstream_for(address: Any) -> Upstream:
            if address not in made:
                made[address] = Upstream(
                    reactor, address, config.upstream_pool, config.timeouts
                )
                upstreams.append(made[address])
            return made[address]

        main_upstream = upstream_for(config.upstream)
        dispatcher = make_dispatcher(
            config.workers, reactor, main_upstream, upstream_for
        )
        site = EdgeSite(
            config.listeners[0], config, main_upstream, reactor, dispatcher=dispatcher
        )
        bound: list[Any] = []
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site).addBoth(
            bound.append
        )
        ports.append(bound[0])
        return WorkerStack(
            bound[0].getHost().port, main, workers, listeners, dispatcher, config
        )

    yield make
    for upstream in upstreams:
        pytest_twisted.blockon(upstream.close())
    for port in ports:
        pytest_twisted.blockon(maybeDeferred(port.stopListening))


def _request(
    method: bytes, target: bytes, token: bytes | None = None, extra: bytes = b""
) -> bytes:
    auth = b"Authorization: Bearer " + token + b"\r\n" if token else b""
    body = b"Content-Length: 2\r\n\r\n{}" if method in (b"PUT", b"POST") else b"\r\n"
    return (
        method + b" " + target + b" HTTP/1.1\r\nHost: hs.test\r\n" + auth + extra + body
    )


async def _send(stack: WorkerStack, method: bytes, target: bytes, **kw: Any) -> Any:
    return await deferToThread(exchange, stack.port, _request(method, target, **kw))


@pytest_twisted.ensureDeferred
async def test_requests_land_where_the_table_says(worker_stack):
    stack = worker_stack(
        {"synchrotron": 2, "client_reader": 1, "event_creator": 1, "typing": 1}
    )
    cases = [
        (b"GET", b"/_matrix/client/v3/sync?since=s1&m=sync1", "synchrotron"),
        (b"GET", b"/_matrix/client/v3/rooms/!r%3Ahs/messages?m=msg1", "client_reader1"),
        (
            b"PUT",
            b"/_matrix/client/v3/rooms/!r%3Ahs/send/m.room.message/m=send1",
            "event_creator1",
        ),
        (
            b"PUT",
            b"/_matrix/client/v3/rooms/!r%3Ahs/typing/%40a%3Ahs?m=typ1",
            "typing1",
        ),
        (b"GET", b"/_matrix/client/v3/pushrules/?m=push1", "client_reader1"),
        (b"PUT", b"/_matrix/client/v3/pushrules/global/x?m=push2", "main"),
        (b"GET", b"/_matrix/client/versions?m=versions1", "client_reader1"),
        (b"GET", b"/_matrix/client/v3/login/sso/redirect?m=sso1", "main"),
        (b"POST", b"/_matrix/client/v3/keys/upload?m=keys1", "client_reader1"),
    ]
    for method, target, expected in cases:
        response = await _send(stack, method, target, token=b"tok-alice-D1")
        assert response.status == 200, (target, response.body)
        marker = target.rpartition(b"m=")[2]
        assert stack.landed(b"m=" + marker).startswith(expected), target


@pytest_twisted.ensureDeferred
async def test_syncs_stick_to_the_user_not_the_token(worker_stack):
    stack = worker_stack({"synchrotron": 3})
    where: dict[str, set[str]] = {}
    users = [f"u{i}" for i in range(12)]
    for user in users:
        for device in range(3):
            token = f"tok-{user}-D{device}".encode()
            marker = f"{user}d{device}".encode()
            await _send(
                stack,
                b"GET",
                b"/_matrix/client/v3/sync?since=s&m=" + marker,
                token=token,
            )
            where.setdefault(user, set()).add(stack.landed(b"m=" + marker))
    assert all(len(places) == 1 for places in where.values()), where
    assert len(set().union(*where.values())) == 3
    # One lookup per token, then the cache answers.
    assert stack.main.whoami_lookups == len(users) * 3
    for user in users[:3]:
        await _send(
            stack,
            b"GET",
            b"/_matrix/client/v3/sync?since=t",
            token=f"tok-{user}-D0".encode(),
        )
    assert stack.main.whoami_lookups == len(users) * 3


@pytest_twisted.ensureDeferred
async def test_initial_syncs_prefer_their_own_pool(worker_stack):
    stack = worker_stack({"synchrotron": 1, "initial_sync": 1})
    await _send(stack, b"GET", b"/_matrix/client/v3/sync?m=i1", token=b"tok-a-D")
    await _send(
        stack,
        b"GET",
        b"/_matrix/client/v3/sync?since=x&full_state=true&m=i2",
        token=b"tok-a-D",
    )
    await _send(
        stack, b"GET", b"/_matrix/client/v3/sync?since=x&m=i3", token=b"tok-a-D"
    )
    assert stack.landed(b"m=i1") == "initial_sync1"
    assert stack.landed(b"m=i2") == "initial_sync1"
    assert stack.landed(b"m=i3") == "synchrotron1"


@pytest_twisted.ensureDeferred
async def test_a_stopped_worker_loses_no_request(worker_stack):
    stack = worker_stack({"synchrotron": 2})
    factory = stack.workers["synchrotron"][0]
    await stack.listeners[id(factory)].stopListening()
    for i in range(10):
        response = await _send(
            stack,
            b"GET",
            b"/_matrix/client/v3/sync?since=s&m=f%d" % i,
            token=b"tok-u%d-D" % i,
        )
        assert response.status == 200
        assert stack.landed(b"m=f%d" % i) == "synchrotron2"


@pytest_twisted.ensureDeferred
async def test_no_worker_left_falls_back_to_main_but_not_for_media(worker_stack):
    stack = worker_stack({"synchrotron": 1, "media_repository": 1})
    for factory in stack.workers["synchrotron"] + stack.workers["media_repository"]:
        await stack.listeners[id(factory)].stopListening()
    response = await _send(
        stack, b"GET", b"/_matrix/client/v3/sync?since=s&m=g1", token=b"tok-a-D"
    )
    assert response.status == 200
    assert stack.landed(b"m=g1") == "main"
    # Main cannot serve media that a media worker holds: 503, try later.
    response = await _send(stack, b"GET", b"/_matrix/media/v3/download/hs/abc")
    assert response.status == 503
    assert response.header("Retry-After") == "5"
    assert json.loads(response.body)["errcode"] == "M_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_federation_send_is_balanced_by_origin(worker_stack):
    stack = worker_stack({"federation_inbound": 3})
    seen: dict[str, set[str]] = {}
    for origin in ("a.example", "b.example", "c.example", "d.example"):
        for txn in range(3):
            marker = f"{origin}-{txn}".encode()
            auth = (
                b'Authorization: X-Matrix origin="%s",destination="hs.test",'
                b'key="ed25519:a",sig="xyz"\r\n' % origin.encode()
            )
            await _send(
                stack, b"PUT", b"/_matrix/federation/v1/send/" + marker, extra=auth
            )
            seen.setdefault(origin, set()).add(stack.landed(marker))
    assert all(len(places) == 1 for places in seen.values()), seen


@pytest_twisted.ensureDeferred
async def test_the_readiness_endpoint_reports_each_pool(worker_stack):
    """Pools are reported, their addresses only to admin_allow clients, and
    a pool with no member up leaves the edge ready (every edge shares it)."""
    stack = worker_stack({"synchrotron": 2, "media_repository": 1})
    for upstream in (
        stack.dispatcher.main,
        *(m.upstream for p in stack.dispatcher.pools.values() for m in p.members),
    ):
        upstream.mark(True)
    media = stack.dispatcher.pools["media_repository"].members[0].upstream
    media.mark(False)
    response = await _send(stack, b"GET", b"/ready")
    assert response.status == 200
    body = json.loads(response.body)
    assert body["pools"] == {
        "synchrotron": {"up": 2, "size": 2},
        "media_repository": {"up": 0, "size": 1},
    }
    assert body["degraded"] == ["media_repository"]
    assert "127.0.0.1" not in response.body.decode()
    stack.dispatcher.main.mark(False)
    response = await _send(stack, b"GET", b"/ready")
    assert response.status == 503


@pytest_twisted.ensureDeferred
async def test_the_readiness_endpoint_shows_members_to_admins(worker_stack):
    stack = worker_stack({"synchrotron": 2}, listener={"admin_allow": ["127.0.0.0/8"]})
    response = await _send(stack, b"GET", b"/ready")
    pool = json.loads(response.body)["pools"]["synchrotron"]
    assert len(pool["members"]) == 2
    assert pool["in_flight"] == 0 and pool["queued"] == 0


async def _until(condition: Any) -> None:
    """Let the reactor run until ``condition()`` holds."""
    for _ in range(4000):
        if condition():
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("the condition never held")


# A route of the config that carries the recording upstream's behaviours
# (/_matrix/hang never answers) to a pool.
SLOW_ROUTE = {
    "name": "slow",
    "pool": "client_reader",
    "policy": "uri",
    "patterns": ["^/_matrix/(hang|status)$"],
}


@pytest_twisted.ensureDeferred
async def test_a_full_pool_queues_then_answers_429(worker_stack):
    stack = worker_stack(
        {"client_reader": 1},
        limits={
            "client_reader": {"max_concurrent": 1, "queue": 1, "queue_timeout": "60s"}
        },
        routes=[SLOW_ROUTE],
    )
    worker = stack.workers["client_reader"][0]
    pool = stack.dispatcher.pools["client_reader"]
    holder = connect(stack.port)
    queued = connect(stack.port)
    try:
        holder.sendall(_request(b"GET", b"/_matrix/hang?m=h1"))
        await _until(lambda: len(worker.requests) == 1)
        assert pool.members[0].in_flight == 1
        queued.sendall(_request(b"GET", b"/_matrix/status?m=q1"))
        await _until(lambda: pool.queued == 1)
        # The slot is taken and the queue is full: 429 at once.
        response = await _send(stack, b"GET", b"/_matrix/status?m=q2")
        assert response.status == 429
        assert json.loads(response.body) == {
            "errcode": "M_LIMIT_EXCEEDED",
            "error": "Too many requests",
            "retry_after_ms": 60000,
        }
        assert response.header("Retry-After") == "60"
        # Other pools, and main, are not held up.
        response = await _send(stack, b"GET", b"/_matrix/client/v3/logout?m=main1")
        assert response.status == 200
        assert stack.landed(b"m=main1") == "main"
        # The client holding the slot goes: the queued request takes it.
        holder.close()
        response = await deferToThread(read_response, queued)
        assert response.status == 200
        assert [rec.target for rec in worker.requests] == [
            b"/_matrix/hang?m=h1",
            b"/_matrix/status?m=q1",
        ]
        await _until(lambda: pool.members[0].in_flight == 0)
        assert pool.queued == 0
    finally:
        holder.close()
        queued.close()


@pytest_twisted.ensureDeferred
async def test_the_access_log_names_pool_and_worker(worker_stack):
    stack = worker_stack({"synchrotron": 2})
    entries: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("matrix_edge.access."):
            entries.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        for i in range(4):
            await _send(
                stack,
                b"GET",
                b"/_matrix/client/v3/sync?since=s&m=log%d" % i,
                token=b"tok-user%d-D" % i,
            )
        await _send(stack, b"GET", b"/_matrix/client/versions?m=log-main")
        await _until(lambda: len(entries) == 5)
    finally:
        globalLogPublisher.removeObserver(observe)
    addresses = {
        f"synchrotron{i + 1}": f"http://127.0.0.1:{stack.listeners[id(f)].getHost().port}"
        for i, f in enumerate(stack.workers["synchrotron"])
    }
    by_marker = {e["access"]["target"].rpartition("m=")[2]: e for e in entries}
    for i in range(4):
        entry = by_marker[f"log{i}"]
        worker = addresses[stack.landed(b"m=log%d" % i)]
        assert (entry["access"]["pool"], entry["access"]["worker"]) == (
            "synchrotron",
            worker,
        )
        assert "(upstream " in entry["access_line"]
        assert f"sec via synchrotron {worker}) " in entry["access_line"]
        # The token never reaches the log.
        assert b"tok-user%d" % i not in repr(entry).encode()
    main = by_marker["log-main"]
    assert (main["access"]["pool"], main["access"]["worker"]) == (
        "main",
        str(stack.config.upstream),
    )
    assert f" via main {stack.config.upstream}) " in main["access_line"]
