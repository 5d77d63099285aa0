"""The request path's shortcuts in worker routing give what the plain
definitions give: the remembered choices of rendezvous hashing, query
conditions looked up without parsing the query, remembered table matches."""

from __future__ import annotations

import itertools
import random

import pytest
from twisted.internet.testing import MemoryReactorClock

from matrix_edge.config.routes import parse_route
from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.config.upstream import UpstreamPoolConfig, parse_upstream
from matrix_edge.config.workers import PoolConfig
from matrix_edge.pools import hashing
from matrix_edge.pools.pool import WorkerPool
from matrix_edge.pools.table import RouteTable, _Condition, shipped_table
from matrix_edge.target import parse_query
from matrix_edge.upstream.client import Upstream

NAMES = [b"http://10.0.0.%d:8083" % i for i in range(1, 6)]


def test_chooser_picks_what_choose_picks_for_every_subset():
    chooser = hashing.Chooser([(name, name) for name in NAMES])
    keys = [b"@user%d:hs" % i for i in range(300)] + [b"", b"x" * 300]
    for _ in range(2):  # the second time from the cache, where it keeps
        for size in range(1, len(NAMES) + 1):
            for subset in itertools.combinations(NAMES, size):
                for key in keys[:40]:
                    expected = hashing.choose(key, [(n, n) for n in subset])
                    assert chooser.choose(key, list(subset)) == expected
        for key in keys:
            assert chooser.choose(key, NAMES) == hashing.choose(
                key, [(n, n) for n in NAMES]
            )


def test_chooser_cache_is_bounded():
    chooser = hashing.Chooser([(name, name) for name in NAMES])
    for i in range(3 * hashing.Chooser.CACHE_SIZE):
        chooser.choose(b"@user%d:hs" % i, NAMES)
    assert len(chooser._cache) <= hashing.Chooser.CACHE_SIZE


def test_chooser_ties_go_to_the_first_member():
    # Two members of the same name score the same for every key.
    a, b = object(), object()
    chooser = hashing.Chooser([(b"same", a), (b"same", b)])
    assert chooser.choose(b"k", [a, b]) is a
    assert chooser.choose(b"k", [b]) is b


PARTS = [b"since", b"from", b"full_state", b"s", b"=", b"&", b"x", b"true", b"e"]
CONDITION_NAMES = [b"since", b"from", b"full_state", b"a=b", b"a&b", b"a b", b"s"]


def test_conditions_read_a_query_as_parse_query_does():
    rng = random.Random(11)
    conditions = [_Condition(name, None) for name in CONDITION_NAMES]
    for _ in range(20000):
        query = b"".join(rng.choice(PARTS) for _ in range(rng.randint(0, 8)))
        params = parse_query(query)
        for condition in conditions:
            value = condition.value_in(b"&" + query + b"&")
            assert value == params.get(condition.name), (query, condition.name)


def _route(name: str, pattern: str, **extra: object):
    return parse_route(
        {"name": name, "pool": "p", "policy": "user", "patterns": [pattern], **extra},
        ("routes", 0),
    )


TABLE = RouteTable(
    (
        _route("initial", "^/sync$", query={"since": None}),
        _route("full", "^/sync$", query={"full_state": "true"}),
        _route("spaced", "^/sync$", query={"a b": "1"}),
        _route("gets", "^/r/", methods=["GET"]),
        _route("sync", "^/sync$"),
        _route("rest", "^/r/"),
    ),
    "test",
)


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        (b"GET", b"/sync", b"", "initial"),
        (b"GET", b"/sync", b"since=", "initial"),
        (b"GET", b"/sync", b"since=1", "sync"),
        (b"GET", b"/sync", b"since=1&full_state=true", "full"),
        (b"GET", b"/sync", b"since=1&full_state=tru%65", "full"),
        (b"GET", b"/sync", b"%73ince=1", "sync"),
        (b"GET", b"/sync", b"since&since=1", "initial"),
        (b"GET", b"/sync", b"since=1&a+b=1", "spaced"),
        (b"GET", b"/sync", b"since=1&a%20b=1", "spaced"),
        (b"GET", b"/sync", b"since=1&a=b=1", "sync"),
        (b"GET", b"/r/x", b"", "gets"),
        (b"PUT", b"/r/x", b"", "rest"),
        (b"PUT", b"/other", b"", None),
    ],
)
def test_constrained_routes_fall_through_to_the_next_match(
    method, path, query, expected
):
    for _ in range(2):  # then from what the table remembers
        route = TABLE.match(method, path, query)
        assert (route.name if route else None) == expected


def test_remembered_matches_are_bounded():
    table = shipped_table()
    for i in range(3 * RouteTable.MEMO_SIZE):
        table.match(b"GET", b"/_matrix/client/v3/rooms/!r%d:hs/messages" % i, b"")
        table.match(b"GET", b"/_matrix/client/v3/sync", b"since=%d" % i)
    assert all(len(memo) <= RouteTable.MEMO_SIZE for memo in table._memo.values())


def test_long_paths_are_not_remembered():
    table = RouteTable((_route("rest", "^/r/"),), "test")
    path = b"/r/" + b"x" * RouteTable.MAX_MEMO_PATH
    assert table.match(b"GET", path, b"").name == "rest"
    assert path not in table._memo[-1]


def test_available_is_the_member_list_while_all_are_up():
    clock = MemoryReactorClock()
    addresses = [
        parse_upstream(f"http://127.0.0.1:{8081 + i}", ("a",)) for i in range(3)
    ]
    upstreams = [
        Upstream(clock, address, UpstreamPoolConfig(), TimeoutsConfig())
        for address in addresses
    ]
    pool = WorkerPool("p", PoolConfig(tuple(addresses)), upstreams, clock)
    assert pool.available() is pool.members
    upstreams[1].watched = True
    upstreams[1].mark(False, "refused")
    assert pool.available() == [pool.members[0], pool.members[2]]
    assert pool.available() is not pool.members
