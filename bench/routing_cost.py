"""CPU cost of routing one request, with and without worker pools.

A deterministic microbenchmark of ``Router.route``: no sockets, no reactor
running. The router and dispatcher are built as the service builds them
(``make_dispatcher`` over the shipped table), every member healthy, the
whoami cache warm, and a realistic mix of requests is routed in a loop:
syncs with tokens, room sends, federation transactions, media, versions.
Each lease taken is released, as the exchange would.

    .venv/bin/python bench/routing_cost.py [--repeat 7] [--number 20000]
    .venv/bin/python bench/routing_cost.py --profile   # cProfile, workers on

Prints microseconds per call (best of the repeats) per request kind and for
the mix, without workers, with them, and the difference.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import timeit
from collections.abc import Callable
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from matrix_edge.config.edge import EdgeConfig, parse_config
from matrix_edge.config.upstream import UpstreamAddress
from matrix_edge.pools.dispatch import Dispatcher, make_dispatcher
from matrix_edge.pools.pool import Lease
from matrix_edge.pools.whoami import token_digest
from matrix_edge.server.fields import HeaderFields
from matrix_edge.server.router import Forward, LiveSettings, Router
from matrix_edge.upstream.client import Upstream

POOLS = {
    "synchrotron": 4,
    "initial_sync": 2,
    "event_creator": 2,
    "federation_inbound": 3,
    "federation_reader": 2,
    "media_repository": 2,
    "client_reader": 3,
}

TOKENS = [b"syt_dXNlcg_%d_abcdefghijklmnop_0Ab1Cd" % i for i in range(8)]

ROOM = b"!OGEhHVWSdvArJzumhm%3Aexample.org"

X_MATRIX = (
    b'X-Matrix origin="remote.example.org",destination="hs.test",'
    b'key="ed25519:a_abcd",sig="dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZQ"'
)


def _config() -> EdgeConfig:
    port = 9000
    pools = {}
    for name, count in POOLS.items():
        pools[name] = [f"http://127.0.0.1:{port + i}" for i in range(count)]
        port += 10
    return parse_config(
        {
            "listeners": [{"port": 8008, "type": "client"}],
            "upstream": "http://127.0.0.1:8080",
            "workers": {"pools": pools},
        }
    )


def _routers() -> tuple[Router, Router, Dispatcher]:
    config = _config()
    clock = MemoryReactorClock()
    upstreams: dict[UpstreamAddress, Upstream] = {}

    def upstream_for(address: UpstreamAddress) -> Upstream:
        if address not in upstreams:
            upstream = Upstream(clock, address, config.upstream_pool, config.timeouts)
            # Watched and healthy, as with health checks on.
            upstream.watched = True
            upstream.mark(True)
            upstreams[address] = upstream
        return upstreams[address]

    main = upstream_for(config.upstream)
    dispatcher = make_dispatcher(config.workers, clock, main, upstream_for)
    assert dispatcher.whoami is not None
    for i, token in enumerate(TOKENS):
        # A warm cache: every token's user already known.
        dispatcher.whoami._store(token_digest(token), b"@user%d:hs.test" % i, 600.0)
    listener = config.listeners[0]
    local = frozenset({b"/health", b"/ready"})
    live = LiveSettings(config.maintenance)
    plain = Router(listener, config, live, main, None, local)
    workers = Router(listener, config, live, main, None, local, dispatcher)
    return plain, workers, dispatcher


Request = tuple[bytes, bytes, bytes, HeaderFields, str, int | None]


def _request(
    method: bytes,
    target: bytes,
    *,
    token: bytes | None = None,
    authorization: bytes | None = None,
    length: int | None = None,
) -> Request:
    headers = HeaderFields([(b"host", b"hs.test"), (b"user-agent", b"Element/1.11")])
    if token is not None:
        headers.add(b"authorization", b"Bearer " + token)
    if authorization is not None:
        headers.add(b"authorization", authorization)
    path = target.partition(b"?")[0]
    return (method, target, path, headers, "203.0.113.7", length)


def _mix() -> dict[str, list[Request]]:
    return {
        "sync": [
            _request(
                b"GET",
                b"/_matrix/client/v3/sync?filter=0&timeout=30000&since=s72594_4483_%d"
                % i,
                token=token,
            )
            for i, token in enumerate(TOKENS)
        ],
        "initial-sync": [
            _request(b"GET", b"/_matrix/client/v3/sync?timeout=0", token=TOKENS[1])
        ],
        "room-send": [
            _request(
                b"PUT",
                b"/_matrix/client/v3/rooms/%s/send/m.room.message/txn%d" % (ROOM, i),
                token=TOKENS[i],
                length=120,
            )
            for i in range(4)
        ],
        "federation-send": [
            _request(
                b"PUT",
                b"/_matrix/federation/v1/send/1700000000%d" % i,
                authorization=X_MATRIX,
                length=900,
            )
            for i in range(2)
        ],
        "federation-read": [
            _request(
                b"GET",
                b"/_matrix/federation/v1/event/$abcdefghijkl%d" % i,
                authorization=X_MATRIX,
            )
            for i in range(2)
        ],
        "messages": [
            _request(
                b"GET",
                b"/_matrix/client/v3/rooms/%s/messages?from=t1-2&dir=b&limit=30" % ROOM,
                token=TOKENS[2],
            )
        ],
        "media": [
            _request(
                b"GET",
                b"/_matrix/client/v1/media/download/hs.test/abcdefgh",
                token=TOKENS[3],
            )
        ],
        "versions": [_request(b"GET", b"/_matrix/client/versions")],
        "main": [
            _request(b"POST", b"/_matrix/client/v3/logout", token=TOKENS[4], length=2)
        ],
    }


def _runner(router: Router, requests: list[Request]) -> Callable[[], None]:
    route = router.route

    def run() -> None:
        for request in requests:
            decision = route(*request)
            assert isinstance(decision, Forward), decision
            placed = decision.placed
            assert isinstance(placed, Lease), placed
            placed.release()

    return run


def _per_call(run: Callable[[], None], calls: int, number: int, repeat: int) -> float:
    best = min(timeit.repeat(run, number=number, repeat=repeat))
    return best / number / calls * 1e6


def measure(number: int, repeat: int) -> None:
    plain, workers, _ = _routers()
    mix = _mix()
    everything = [request for requests in mix.values() for request in requests]
    rows: list[tuple[str, int]] = [(kind, len(reqs)) for kind, reqs in mix.items()]
    print(f"us per Router.route call, best of {repeat} x {number} loops")
    print(f"{'request':<18}{'n':>3}{'no workers':>12}{'workers':>10}{'added':>9}")
    for kind, n in rows:
        loops = max(1, number * len(everything) // (n * 4))
        a = _per_call(_runner(plain, mix[kind]), n, loops, repeat)
        b = _per_call(_runner(workers, mix[kind]), n, loops, repeat)
        print(f"{kind:<18}{n:>3}{a:>12.2f}{b:>10.2f}{b - a:>9.2f}")
    n = len(everything)
    a = _per_call(_runner(plain, everything), n, number, repeat)
    b = _per_call(_runner(workers, everything), n, number, repeat)
    print(f"{'mix':<18}{n:>3}{a:>12.2f}{b:>10.2f}{b - a:>9.2f}")


def profile(number: int, sort: str) -> None:
    _, workers, _ = _routers()
    mix = _mix()
    run: Any = _runner(workers, [r for reqs in mix.values() for r in reqs])
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(number):
        run()
    profiler.disable()
    pstats.Stats(profiler).sort_stats(sort).print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime")
    args = parser.parse_args()
    if args.profile:
        profile(args.number, args.sort)
    else:
        measure(args.number, args.repeat)


if __name__ == "__main__":
    main()
