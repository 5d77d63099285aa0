"""The ``workers`` section: pools, routes of the config and the whoami
cache, with errors that name the key."""

from __future__ import annotations

import pytest

from matrix_edge.config._base import ConfigError
from matrix_edge.config.edge import parse_config
from matrix_edge.config.routes import MAIN, Policy
from matrix_edge.config.workers import PoolConfig, WhoamiCacheConfig
from matrix_edge.pools.table import effective_table, shipped_table

SYNC = "http://127.0.0.1:8083"
SYNC2 = "http://127.0.0.1:8084"


def _config(**workers):
    return parse_config(
        {
            "listeners": [{"port": 8080}],
            "upstream": "http://127.0.0.1:8008",
            "workers": workers,
        }
    )


def _error(**workers) -> str:
    with pytest.raises(ConfigError) as e:
        _config(**workers)
    return str(e.value)


def _route(**entry):
    route = {
        "name": "mine",
        "pool": "synchrotron",
        "policy": "user",
        "patterns": ["^/_matrix/client/v3/mine$"],
    }
    route.update(entry)
    return route


# Pools


def test_no_workers_section():
    config = parse_config({"listeners": [{"port": 8080}], "upstream": "http://h:8008"})
    assert not config.workers.enabled
    assert config.workers.routes == ()
    assert config.workers.whoami_cache == WhoamiCacheConfig()


def test_short_form_is_a_list_of_addresses():
    config = _config(pools={"synchrotron": [SYNC, SYNC2, "unix:/run/synapse/s.sock"]})
    assert config.workers.enabled
    pool = config.workers.pools["synchrotron"]
    assert [str(a) for a in pool.addresses] == [SYNC, SYNC2, "unix:/run/synapse/s.sock"]
    assert pool == PoolConfig(addresses=pool.addresses)
    assert (pool.balance, pool.max_concurrent, pool.queue, pool.queue_timeout) == (
        None,
        0,
        0,
        5.0,
    )


def test_long_form():
    config = _config(
        pools={
            "client_reader": {
                "addresses": [SYNC],
                "balance": "round_robin",
                "max_concurrent": 500,
                "queue": 100,
                "queue_timeout": "2500ms",
            }
        }
    )
    pool = config.workers.pools["client_reader"]
    assert [str(a) for a in pool.addresses] == [SYNC]
    assert pool.balance is Policy.ROUND_ROBIN
    assert (pool.max_concurrent, pool.queue, pool.queue_timeout) == (500, 100, 2.5)


def test_long_form_defaults():
    pool = _config(pools={"client_reader": {"addresses": [SYNC]}}).workers.pools[
        "client_reader"
    ]
    assert pool == PoolConfig(addresses=pool.addresses)


def test_balance_overrides_only_in_the_pool():
    pools = _config(
        pools={
            "client_reader": {"addresses": [SYNC, SYNC2], "balance": "source_ip"},
            "synchrotron": [SYNC],
        }
    ).workers.pools
    assert pools["client_reader"].balance is Policy.SOURCE_IP
    assert pools["synchrotron"].balance is None


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        (
            {"synchrotron": {"addresses": [SYNC], "weight": 2}},
            "workers.pools.synchrotron.weight: unknown key (expected one of: "
            "addresses, balance, max_concurrent, queue, queue_timeout)",
        ),
        (
            {"synchrotron": [SYNC, "https://127.0.0.1:8084"]},
            "workers.pools.synchrotron[1]: expected http://HOST:PORT or unix:",
        ),
        (
            {"synchrotron": [SYNC, "http://127.0.0.1:8084/_matrix"]},
            "workers.pools.synchrotron[1]: give the address only",
        ),
        (
            {"synchrotron": [SYNC, "unix:relative.sock"]},
            "workers.pools.synchrotron[1]: a unix socket needs an absolute path",
        ),
        (
            {"client_reader": {"addresses": [SYNC, 8084]}},
            "workers.pools.client_reader.addresses[1]: expected a non-empty string",
        ),
        (
            {"synchrotron": [SYNC, SYNC]},
            "workers.pools.synchrotron[1]: http://127.0.0.1:8083 is listed twice",
        ),
        ({"synchrotron": []}, "workers.pools.synchrotron: list at least one address"),
        (
            {"synchrotron": SYNC},
            "workers.pools.synchrotron: expected a mapping, got a string",
        ),
        (
            {"client_reader": {"balance": "round_robin"}},
            "workers.pools.client_reader.addresses: required",
        ),
        (
            {"client_reader": {"addresses": [SYNC], "balance": "least_conn"}},
            "workers.pools.client_reader.balance: unknown policy 'least_conn'",
        ),
        (
            {"client_reader": {"addresses": [SYNC], "max_concurrent": -1}},
            "workers.pools.client_reader.max_concurrent: must be at least 0",
        ),
        (
            {"client_reader": {"addresses": [SYNC], "queue": "lots"}},
            "workers.pools.client_reader.queue: expected an integer",
        ),
        (
            {"client_reader": {"addresses": [SYNC], "queue_timeout": "soon"}},
            "workers.pools.client_reader.queue_timeout: expected a duration",
        ),
        ({"Synchrotron": [SYNC]}, "workers.pools.Synchrotron: use lower case"),
        ({"sync-hrotron": [SYNC]}, "workers.pools.sync-hrotron: use lower case"),
        (
            {MAIN: [SYNC]},
            "workers.pools.main: `main` is Synapse's main process: set `upstream`",
        ),
        # A typo: no route sends anything there.
        (
            {"synchrotrons": [SYNC]},
            "workers.pools.synchrotrons: no route sends requests to this pool",
        ),
        # Stream writers and SSO are single processes.
        (
            {"typing": [SYNC, SYNC2]},
            "workers.pools.typing: route typing needs a single process here (a "
            "Synapse stream writer, or SSO), got 2",
        ),
        (
            {"sso": {"addresses": [SYNC, SYNC2]}},
            "workers.pools.sso: route sso needs a single",
        ),
        (
            {"client_reader": {"addresses": [SYNC, SYNC2], "balance": "single"}},
            "workers.pools.client_reader.balance: `single` needs exactly one address, got 2",
        ),
    ],
)
def test_pool_errors_name_the_key(pools, message):
    assert message in _error(pools=pools)


def test_the_unused_pool_error_lists_the_known_pools():
    message = _error(pools={"synchrotrons": [SYNC]})
    assert "the shipped table's pools are: " in message
    assert "synchrotron," in message
    assert "add one under workers.routes" in message


def test_a_pool_only_a_config_route_uses():
    config = _config(
        pools={"bridges": [SYNC]},
        routes=[_route(name="bridge-sending", pool="bridges", policy="room")],
    )
    assert set(config.workers.pools) == {"bridges"}


def test_a_single_writer_pool():
    config = _config(
        pools={
            "typing": [SYNC],
            "client_reader": {"addresses": [SYNC2], "balance": "single"},
        }
    )
    assert len(config.workers.pools["typing"].addresses) == 1
    assert config.workers.pools["client_reader"].balance is Policy.SINGLE


# Routes of the config


def test_config_route_parsed():
    config = _config(
        pools={"synchrotron": [SYNC]},
        routes=[
            _route(
                methods=["GET", "HEAD"],
                query={"since": None, "set_presence": "offline"},
                sticky=True,
                fallback=False,
                patterns=["^/_matrix/client/v3/mine$", "^/_matrix/client/r0/mine$"],
            )
        ],
    )
    [route] = config.workers.routes
    assert route.name == "mine"
    assert route.pools == ("synchrotron",)
    assert route.policy is Policy.USER
    assert route.methods == frozenset({b"GET", b"HEAD"})
    assert route.query == ((b"since", None), (b"set_presence", b"offline"))
    assert route.sticky and not route.fallback
    assert [p.pattern for p in route.patterns] == [
        b"^/_matrix/client/v3/mine$",
        b"^/_matrix/client/r0/mine$",
    ]


def test_config_route_defaults_and_pool_chains():
    config = _config(
        pools={"synchrotron": [SYNC], "initial_sync": [SYNC2]},
        routes=[_route(pool=["initial_sync", "synchrotron", "main"])],
    )
    [route] = config.workers.routes
    assert route.pools == ("initial_sync", "synchrotron", MAIN)
    assert route.methods is None
    assert route.query == ()
    assert not route.sticky and route.fallback


def test_config_route_replaces_a_shipped_one_by_name():
    config = _config(
        pools={"synchrotron": [SYNC], "client_reader": [SYNC2]},
        routes=[
            _route(
                name="sync",
                pool="client_reader",
                policy="round_robin",
                patterns=["^/_matrix/client/v3/sync$"],
            )
        ],
    )
    [replacement] = config.workers.routes
    table = effective_table(
        shipped_table(), config.workers.routes, config.workers.pools
    )
    names = [r.name for r in table.routes]
    assert names.count("sync") == 1
    # In the shipped route's place, not in front of the table.
    assert names.index("sync") > names.index("initial-sync")
    assert table.routes[names.index("sync")] == replacement
    route = table.match(b"GET", b"/_matrix/client/v3/sync", b"since=s1")
    assert route == replacement


def test_replacing_the_only_route_of_a_pool_leaves_it_unused():
    message = _error(
        pools={"typing": [SYNC], "client_reader": [SYNC2]},
        routes=[_route(name="typing", pool="client_reader", policy="round_robin")],
    )
    assert message.startswith("workers.pools.typing: no route sends requests")


def test_replacing_a_writer_route_lifts_the_single_process_rule():
    config = _config(
        pools={"typing": [SYNC, SYNC2]},
        routes=[
            _route(
                name="typing",
                pool="typing",
                policy="room",
                patterns=["^/_matrix/client/v3/rooms/[^/]+/typing/"],
            )
        ],
    )
    assert len(config.workers.pools["typing"].addresses) == 2


def test_a_config_route_that_needs_a_single_process():
    message = _error(
        pools={"client_reader": [SYNC, SYNC2]},
        routes=[_route(pool="client_reader", policy="single")],
    )
    assert message.startswith(
        "workers.pools.client_reader: route mine needs a single process here"
    )


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        (
            [_route(patterns=["^/_matrix/(client"])],
            "workers.routes[0].patterns[0]: not a valid regular expression: ",
        ),
        (
            [_route(patterns=["^/ok$", "[z-a]"])],
            "workers.routes[0].patterns[1]: not a valid regular expression",
        ),
        (
            [_route(patterns=["^/ok$", "(?i)^/_matrix/client/v3/bridge"])],
            "workers.routes[0].patterns[1]: global flags are not supported: use a "
            "scoped flag, such as (?i:...)",
        ),
        (
            [_route(patterns=["^/rooms/(?P<room>[^/]+)$"])],
            "workers.routes[0].patterns[0]: named groups and back-references",
        ),
        (
            [_route(patterns=[])],
            "workers.routes[0].patterns: give at least one pattern",
        ),
        ([_route(patterns="^/x$")], "workers.routes[0].patterns: expected a list"),
        (
            [_route(policy="sticky_user")],
            "workers.routes[0].policy: unknown policy 'sticky_user' (expected one of: "
            "user, room, origin, uri, source_ip, round_robin, single)",
        ),
        (
            [_route(), _route(name="other", pool="synchrotrons")],
            "workers.routes[1].pool: no pool 'synchrotrons' in workers.pools",
        ),
        (
            [_route(pool=["initial_sync", "synchrotron"])],
            "workers.routes[0].pool[0]: no pool 'initial_sync' in workers.pools",
        ),
        ([_route(pool=[])], "workers.routes[0].pool: name at least one pool"),
        ([_route(pool="Sync")], "workers.routes[0].pool: use lower case"),
        ([_route(), _route()], "workers.routes[1].name: route 'mine' is given twice"),
        (
            [_route(name="My_Route")],
            "workers.routes[0].name: use lower case, digits and '-'",
        ),
        (
            [_route(methods=["GET", "get"])],
            "workers.routes[0].methods[1]: expected a method such as GET, got 'get'",
        ),
        (
            [_route(methods=[])],
            "workers.routes[0].methods: list at least one method, or leave the key out",
        ),
        ([_route(methods="GET")], "workers.routes[0].methods: expected a list"),
        (
            [_route(query={"since": 1})],
            "workers.routes[0].query.since: expected a string to match, or null",
        ),
        (
            [_route(query={"full_state": True})],
            "workers.routes[0].query.full_state: expected a string to match",
        ),
        ([_route(query=["since"])], "workers.routes[0].query: expected a mapping"),
        ([_route(sticky="yes")], "workers.routes[0].sticky: expected true or false"),
        ([_route(fallback=None)], "workers.routes[0].fallback: expected true or false"),
        ([_route(weight=1)], "workers.routes[0].weight: unknown key"),
        (
            [{"name": "x", "pool": "synchrotron", "policy": "user"}],
            "workers.routes[0].patterns: required",
        ),
        ({"name": "x"}, "workers.routes: expected a list"),
    ],
)
def test_route_errors_name_the_key(routes, message):
    assert message in _error(pools={"synchrotron": [SYNC]}, routes=routes)


def test_scoped_flags_in_a_config_route():
    config = _config(
        pools={"synchrotron": [SYNC], "bridges": [SYNC2]},
        routes=[
            _route(
                name="bridges",
                pool="bridges",
                policy="uri",
                patterns=["(?i:^/_matrix/client/v3/bridge/)"],
            )
        ],
    )
    table = effective_table(
        shipped_table(), config.workers.routes, config.workers.pools
    )
    for path in (b"/_matrix/client/v3/bridge/x", b"/_matrix/CLIENT/v3/Bridge/x"):
        assert table.match(b"GET", path, b"").name == "bridges"
    assert table.match(b"GET", b"/x/_matrix/client/v3/bridge/", b"") is None


def test_a_route_to_main_needs_no_pool():
    config = _config(
        pools={"synchrotron": [SYNC]},
        routes=[
            _route(
                name="admin", pool="main", policy="uri", patterns=["^/_synapse/admin/"]
            )
        ],
    )
    assert config.workers.routes[0].pools == (MAIN,)


# The whoami cache


def test_whoami_cache():
    assert _config(pools={"synchrotron": [SYNC]}).workers.whoami_cache == (
        WhoamiCacheConfig(size=50_000, ttl=600.0)
    )
    config = _config(
        pools={"synchrotron": [SYNC]}, whoami_cache={"size": 10, "ttl": "90s"}
    )
    assert config.workers.whoami_cache == WhoamiCacheConfig(size=10, ttl=90.0)
    # A bare integer is milliseconds, as in Synapse.
    config = _config(pools={"synchrotron": [SYNC]}, whoami_cache={"ttl": 1500})
    assert config.workers.whoami_cache.ttl == 1.5


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"ttl": "0s"}, "workers.whoami_cache.ttl: must be greater than zero"),
        ({"ttl": "forever"}, "workers.whoami_cache.ttl: expected a duration"),
        ({"size": 0}, "workers.whoami_cache.size: must be at least 1"),
        ({"size": "big"}, "workers.whoami_cache.size: expected an integer"),
        ({"entries": 5}, "workers.whoami_cache.entries: unknown key"),
        ([], "workers.whoami_cache: expected a mapping"),
    ],
)
def test_whoami_cache_errors(cache, message):
    assert message in _error(pools={"synchrotron": [SYNC]}, whoami_cache=cache)


def test_unknown_workers_key():
    assert _error(pool={"synchrotron": [SYNC]}).startswith(
        "workers.pool: unknown key (expected one of: pools, routes, whoami_cache)"
    )
