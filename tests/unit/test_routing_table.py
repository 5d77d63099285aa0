"""The shipped routing table: every pattern routes to its documented role,
method- and query-specific routes included, and deployments that configure
only some pools get the routes they have."""

from __future__ import annotations

import pytest

from matrix_edge.config.routes import Policy, Route, parse_route
from matrix_edge.pools.table import effective_table, shipped_table
from matrix_edge.target import parse_query
from tests.route_examples import (
    UNRESTRICTED_METHODS,
    Example,
    UnknownPattern,
    examples,
    pattern_paths,
)

SHIPPED = shipped_table()

SYNCS = ("initial_sync", "synchrotron")

# Each route's pools and policy, from the roles of Synapse's docs/workers.md.
ROUTES: dict[str, tuple[tuple[str, ...], Policy]] = {
    "typing": (("typing",), Policy.SINGLE),
    "to-device": (("to_device",), Policy.SINGLE),
    "account-data": (("account_data",), Policy.SINGLE),
    "receipts": (("receipts",), Policy.ROOM),
    "presence": (("presence",), Policy.SINGLE),
    "push-rules": (("push_rules",), Policy.SINGLE),
    "device-lists": (("device_lists",), Policy.USER),
    "thread-subscriptions": (("thread_subscriptions",), Policy.SINGLE),
    "sso": (("sso",), Policy.SINGLE),
    "media": (("media_repository",), Policy.ROUND_ROBIN),
    "initial-sync": (SYNCS, Policy.USER),
    "initial-sync-full-state": (SYNCS, Policy.USER),
    "initial-sync-events": (SYNCS, Policy.USER),
    "initial-sync-rooms": (SYNCS, Policy.USER),
    "sync": (("synchrotron",), Policy.USER),
    "federation-send": (("federation_inbound",), Policy.ORIGIN),
    "federation-reader": (("federation_reader",), Policy.URI),
    "user-directory": (("user_dir", "client_reader"), Policy.ROUND_ROBIN),
    "create-room": (("event_creator",), Policy.USER),
    "event-sending": (("event_creator",), Policy.ROOM),
    "room-messages": (("client_reader",), Policy.ROOM),
    "client-reader": (("client_reader",), Policy.ROUND_ROBIN),
    "client-reader-get": (("client_reader",), Policy.ROUND_ROBIN),
}

# Patterns that an earlier route takes first, on purpose: the endpoints of a
# stream writer, repeated for client_reader when no writer is configured.
FALLBACKS: dict[tuple[str, str], str] = {
    ("client-reader", "^/_matrix/client/(r0|v3)/delete_devices$"): "device-lists",
    (
        "client-reader",
        "^/_matrix/client/(api/v1|r0|v3|unstable)/devices(/|$)",
    ): "device-lists",
    ("client-reader", "^/_matrix/client/(r0|v3|unstable)/keys/upload"): "device-lists",
    (
        "client-reader",
        "^/_matrix/client/(api/v1|r0|v3|unstable)/keys/device_signing/upload$",
    ): "device-lists",
    (
        "client-reader",
        "^/_matrix/client/(api/v1|r0|v3|unstable)/keys/signatures/upload$",
    ): "device-lists",
    (
        "client-reader-get",
        "^/_matrix/client/(api/v1|r0|v3|unstable)/pushrules/",
    ): "push-rules",
    ("client-reader-get", "^/_matrix/client/(r0|v3|unstable)/.*/tags"): "account-data",
    (
        "client-reader-get",
        "^/_matrix/client/(r0|v3|unstable)/.*/account_data",
    ): "account-data",
    (
        "client-reader-get",
        "^/_matrix/client/(api/v1|r0|v3|unstable)/presence/",
    ): "presence",
}


def name(route: Route | None) -> str | None:
    return None if route is None else route.name


def match(table, example: Example) -> Route | None:
    return table.match(example.method, example.path, example.query)


def route_patterns() -> list[tuple[Route, str]]:
    return [
        (route, pattern.pattern.decode())
        for route in SHIPPED.routes
        for pattern in route.patterns
    ]


def pattern_examples(route: Route, pattern: str) -> list[Example]:
    return [e for e in examples(route) if e.pattern == pattern]


def test_routes_and_their_roles():
    assert {r.name: (r.pools, r.policy) for r in SHIPPED.routes} == ROUTES
    assert SHIPPED.synapse_release


def test_correctness_flags():
    """Stream writers and SSO need their single process, pagination needs one
    process per room; media, SSO, typing and push rules never go to main."""
    assert {r.name for r in SHIPPED.routes if r.sticky} == {
        "typing",
        "to-device",
        "account-data",
        "presence",
        "push-rules",
        "thread-subscriptions",
        "sso",
        "room-messages",
    }
    # Synapse's main process raises on /typing and push rule changes unless
    # it is their writer.
    assert {r.name for r in SHIPPED.routes if not r.fallback} == {
        "sso",
        "media",
        "typing",
        "push-rules",
    }


@pytest.mark.parametrize(
    ("route", "pattern"),
    route_patterns(),
    ids=[f"{route.name}:{pattern}" for route, pattern in route_patterns()],
)
def test_every_pattern_routes_to_its_route(route, pattern):
    """Each alternative of the pattern, with each method and query the route
    accepts, reaches the route: first in the shipped table, unless it repeats
    a stream writer's pattern, and with only the route's own pools."""
    cases = pattern_examples(route, pattern)
    assert cases
    expected = FALLBACKS.get((route.name, pattern), route.name)
    shadowed = [
        f"{example} -> {name(match(SHIPPED, example))}"
        for example in cases
        if name(match(SHIPPED, example)) != expected
    ]
    assert not shadowed, f"not routed to {expected}: " + "; ".join(shadowed)

    alone = effective_table(SHIPPED, [], route.pools)
    lost = [
        f"{example} -> {name(match(alone, example))}"
        for example in cases
        if name(match(alone, example)) != route.name
    ]
    assert not lost, f"with only {route.pools} not routed to {route.name}: " + (
        "; ".join(lost)
    )


def test_fallbacks_repeat_the_writers_patterns():
    for (fallback, pattern), writer in FALLBACKS.items():
        routes = {r.name: r for r in SHIPPED.routes}
        assert pattern in [p.pattern.decode() for p in routes[fallback].patterns]
        assert pattern in [p.pattern.decode() for p in routes[writer].patterns]
        names = [r.name for r in SHIPPED.routes]
        assert names.index(writer) < names.index(fallback)


def test_every_alternative_is_exercised():
    """Each alternative of a group gives an example of its own."""
    assert pattern_paths("^/_matrix/client/(api/v1|r0|v3|unstable)/createRoom$") == [
        "/_matrix/client/api/v1/createRoom",
        "/_matrix/client/r0/createRoom",
        "/_matrix/client/v3/createRoom",
        "/_matrix/client/unstable/createRoom",
    ]
    assert pattern_paths("^/a/(b|c)/(d|e)$") == ["/a/b/d", "/a/b/e", "/a/c/d", "/a/c/e"]
    assert pattern_paths("^/_matrix/client/(r0|v3)/user/.*/filter(/|$)") == [
        "/_matrix/client/r0/user/%40alice%3Aexample.org/filter/0",
        "/_matrix/client/r0/user/%40alice%3Aexample.org/filter",
        "/_matrix/client/v3/user/%40alice%3Aexample.org/filter/0",
        "/_matrix/client/v3/user/%40alice%3Aexample.org/filter",
    ]
    delayed = (
        "^/_matrix/client/unstable/org.matrix.msc4140/delayed_events(/.*/restart)?$"
    )
    assert [p.rsplit("delayed_events", 1)[1] for p in pattern_paths(delayed)] == [
        "/syd_wlGAStYmBRRdjyOfaNYW/restart",
        "",
    ]


def test_wildcards_are_escaped_matrix_identifiers():
    [path] = pattern_paths("^/_matrix/client/v3/rooms/[^/]+/initialSync$")
    assert (
        path == "/_matrix/client/v3/rooms/!OGEhHVWSdvArJzumhm%3Aexample.org/initialSync"
    )
    [path] = pattern_paths("^/_matrix/client/v3/rooms/.*/send")
    assert path.endswith("%3Aexample.org/send/m.room.message/m1700000000000.1")


@pytest.mark.parametrize(
    "pattern",
    [
        r"^/_matrix/client/v3/sync\b",
        "^/_matrix/client/v3/(?:sync)$",
        "^/_matrix/client/v3/sync+$",
        "^/_matrix/client/v3/[a-z]+$",
        "^/_matrix/client/v3/rooms/.+/send",
        "^/_matrix/client/v3/(sync|events",
        "^/_matrix/client/v3/sync)",
        "^/_matrix/client/(v3|$)/sync",
        # no example values for this wildcard or open end
        "^/_matrix/client/v3/unknown/.*$",
        "^/_matrix/client/v3/unknown/",
    ],
)
def test_unknown_constructs_fail_loudly(pattern):
    with pytest.raises(UnknownPattern):
        pattern_paths(pattern)


def test_examples_carry_the_route_methods_and_query():
    routes = {r.name: r for r in SHIPPED.routes}
    assert {e.method for e in examples(routes["client-reader-get"])} == {b"GET"}
    assert {e.method for e in examples(routes["typing"])} == set(UNRESTRICTED_METHODS)
    assert {e.query for e in examples(routes["initial-sync"])} == {
        b"from=t47-1234_5678"
    }
    assert {e.query for e in examples(routes["initial-sync-full-state"])} == {
        b"full_state=true&since=s72594_4483_1934&from=t47-1234_5678"
    }
    assert {e.query for e in examples(routes["sync"])} == {
        b"since=s72594_4483_1934&from=t47-1234_5678"
    }


# Read-only endpoints of streams: GET on client_reader, writes to main.

GET_ONLY = next(r for r in SHIPPED.routes if r.name == "client-reader-get")
GET_ONLY_PATHS = [
    (pattern.pattern.decode(), path)
    for pattern in GET_ONLY.patterns
    for path in pattern_paths(pattern.pattern.decode())
]
WRITES = (b"PUT", b"POST", b"DELETE")


def test_get_only_without_stream_writers():
    table = effective_table(SHIPPED, [], {"client_reader"})
    for _, path in GET_ONLY_PATHS:
        assert name(table.match(b"GET", path.encode(), b"")) == "client-reader-get"
        assert name(table.match(b"HEAD", path.encode(), b"")) is None
        for method in WRITES:
            assert table.match(method, path.encode(), b"") is None, (method, path)


def test_stream_writers_take_every_method():
    writers = {"push_rules", "account_data", "presence"}
    for table in (
        SHIPPED,
        effective_table(SHIPPED, [], {"client_reader", *writers}),
    ):
        for pattern, path in GET_ONLY_PATHS:
            writer = FALLBACKS.get(("client-reader-get", pattern))
            for method in (b"GET", *WRITES):
                got = name(table.match(method, path.encode(), b""))
                if writer is None:
                    # No writer: the admin users API is GET-only on a worker.
                    assert got == ("client-reader-get" if method == b"GET" else None)
                else:
                    assert got == writer, (method, path)


def test_one_writer_configured():
    table = effective_table(SHIPPED, [], {"client_reader", "presence"})
    presence = b"/_matrix/client/v3/presence/%40alice%3Aexample.org/status"
    pushrules = b"/_matrix/client/v3/pushrules/global/"
    assert name(table.match(b"PUT", presence, b"")) == "presence"
    assert name(table.match(b"GET", presence, b"")) == "presence"
    assert name(table.match(b"GET", pushrules, b"")) == "client-reader-get"
    assert table.match(b"PUT", pushrules, b"") is None


# Real requests and the route each takes with every pool configured,
# written from Synapse's docs/workers.md, section by section.

R = "!OGEhHVWSdvArJzumhm%3Aexample.org"
U = "%40alice%3Aexample.org"
E = "%24Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"
A = "%23lounge%3Aexample.org"
C = "/_matrix/client"

DOCUMENTED: list[tuple[str, str | None]] = [
    # Stream writers
    (f"PUT {C}/v3/rooms/{R}/typing/{U}", "typing"),
    (f"PUT {C}/r0/rooms/{R}/typing/{U}", "typing"),
    (f"PUT {C}/v3/sendToDevice/m.room.encrypted/m1.1", "to-device"),
    (f"PUT {C}/v3/user/{U}/account_data/m.direct", "account-data"),
    (f"GET {C}/v3/user/{U}/account_data/m.direct", "account-data"),
    (f"PUT {C}/v3/user/{U}/rooms/{R}/account_data/m.fully_read", "account-data"),
    (f"GET {C}/v3/user/{U}/rooms/{R}/tags", "account-data"),
    (f"PUT {C}/v3/user/{U}/rooms/{R}/tags/m.favourite", "account-data"),
    (f"POST {C}/v3/rooms/{R}/receipt/m.read/{E}", "receipts"),
    (f"POST {C}/v3/rooms/{R}/read_markers", "receipts"),
    (f"PUT {C}/v3/presence/{U}/status", "presence"),
    (f"GET {C}/v3/presence/{U}/status", "presence"),
    (f"PUT {C}/v3/pushrules/global/override/.m.rule.master/enabled", "push-rules"),
    (f"GET {C}/v3/pushrules/", "push-rules"),
    (f"GET {C}/v3/devices", "device-lists"),
    (f"DELETE {C}/v3/devices/QBUAZIFURK", "device-lists"),
    (f"POST {C}/v3/delete_devices", "device-lists"),
    (f"POST {C}/v3/keys/upload", "device-lists"),
    (f"POST {C}/v3/keys/device_signing/upload", "device-lists"),
    (f"POST {C}/v3/keys/signatures/upload", "device-lists"),
    (
        f"PUT {C}/unstable/io.element.msc4306/rooms/{R}/thread/{E}/subscription",
        "thread-subscriptions",
    ),
    # SSO
    (f"GET {C}/v3/login/sso/redirect?redirectUrl=https%3A%2F%2Fapp.example", "sso"),
    (f"GET {C}/v3/login/sso/redirect/oidc-github?redirectUrl=https%3A%2F%2Fa", "sso"),
    (f"GET {C}/r0/login/cas/ticket?redirectUrl=x&ticket=ST-1", "sso"),
    ("GET /_synapse/client/pick_idp?redirectUrl=https%3A%2F%2Fapp.example", "sso"),
    ("GET /_synapse/client/pick_username/account", "sso"),
    ("POST /_synapse/client/pick_username/submit", "sso"),
    ("GET /_synapse/client/new_user_consent", "sso"),
    ("POST /_synapse/client/sso_register", "sso"),
    ("GET /_synapse/client/oidc/callback?code=c0de&state=st4te", "sso"),
    ("POST /_synapse/client/saml2/authn_response", "sso"),
    # Media
    ("GET /_matrix/media/v3/download/example.org/AbCd", "media"),
    ("GET /_matrix/media/r0/thumbnail/example.org/AbCd?width=96&height=96", "media"),
    ("POST /_matrix/media/v3/upload?filename=cat.png", "media"),
    (f"GET {C}/v1/media/download/example.org/AbCd", "media"),
    (f"GET {C}/v1/media/preview_url?url=https%3A%2F%2Fexample.org", "media"),
    ("GET /_matrix/federation/v1/media/thumbnail/AbCd?width=96", "media"),
    ("POST /_synapse/admin/v1/purge_media_cache?before_ts=1700000000000", "media"),
    (f"POST /_synapse/admin/v1/room/{R}/media/quarantine", "media"),
    (f"GET /_synapse/admin/v1/room/{R}/media", "media"),
    (f"POST /_synapse/admin/v1/user/{U}/media/quarantine", "media"),
    ("POST /_synapse/admin/v1/media/quarantine/example.org/AbCd", "media"),
    (f"POST /_synapse/admin/v1/quarantine_media/{R}", "media"),
    (f"GET /_synapse/admin/v1/users/{U}/media", "media"),
    # Syncs: initial ones (no `since`, full state) apart
    (f"GET {C}/v3/sync?since=s72594_4483_1934", "sync"),
    (f"GET {C}/r0/sync?since=s1&timeout=30000", "sync"),
    (f"GET {C}/v3/sync", "initial-sync"),
    (f"GET {C}/v3/sync?timeout=0&filter=0", "initial-sync"),
    (f"GET {C}/v3/sync?since=s1&full_state=true", "initial-sync-full-state"),
    (f"GET {C}/v3/sync?full_state=true", "initial-sync"),
    (f"GET {C}/v3/sync?since=s1&full_state=false", "sync"),
    (f"GET {C}/v3/events?from=s1", "sync"),
    (f"GET {C}/v3/events", "initial-sync-events"),
    (f"GET {C}/api/v1/events?timeout=30000", "initial-sync-events"),
    (f"GET {C}/v3/initialSync", "initial-sync-rooms"),
    (f"GET {C}/r0/rooms/{R}/initialSync", "initial-sync-rooms"),
    # Federation
    ("PUT /_matrix/federation/v1/send/1700000000000", "federation-send"),
    ("GET /_matrix/federation/v1/version", "federation-reader"),
    (f"GET /_matrix/federation/v1/event/{E}", "federation-reader"),
    (f"GET /_matrix/federation/v1/state_ids/{R}?event_id={E}", "federation-reader"),
    (f"GET /_matrix/federation/v1/backfill/{R}?v={E}&limit=10", "federation-reader"),
    (f"GET /_matrix/federation/v1/make_join/{R}/{U}?ver=10", "federation-reader"),
    (f"PUT /_matrix/federation/v2/send_join/{R}/{E}", "federation-reader"),
    (f"PUT /_matrix/federation/v2/invite/{R}/{E}", "federation-reader"),
    (
        "GET /_matrix/federation/v1/query/directory?room_alias=%23a%3Ahs",
        "federation-reader",
    ),
    (f"GET /_matrix/federation/v1/user/devices/{U}", "federation-reader"),
    (f"GET /_matrix/federation/v1/hierarchy/{R}", "federation-reader"),
    ("POST /_matrix/federation/v1/publicRooms", "federation-reader"),
    ("POST /_matrix/key/v2/query", "federation-reader"),
    # User directory
    (f"POST {C}/v3/user_directory/search", "user-directory"),
    # Event sending: by room, createRoom by user
    (f"POST {C}/v3/createRoom", "create-room"),
    (f"PUT {C}/v3/rooms/{R}/send/m.room.message/m1.2", "event-sending"),
    (f"PUT {C}/v3/rooms/{R}/redact/{E}/m1.3", "event-sending"),
    (f"PUT {C}/v3/rooms/{R}/state/m.room.name/", "event-sending"),
    (f"GET {C}/v3/rooms/{R}/state/m.room.member/{U}", "event-sending"),
    (f"POST {C}/v3/rooms/{R}/invite", "event-sending"),
    (f"POST {C}/v3/rooms/{R}/leave", "event-sending"),
    (f"POST {C}/v3/rooms/{R}/unban", "event-sending"),
    (f"POST {C}/v3/join/{A}?server_name=example.org", "event-sending"),
    (f"POST {C}/v3/knock/{R}", "event-sending"),
    (f"PUT {C}/v3/profile/{U}/displayname", "event-sending"),
    (f"GET {C}/v3/profile/{U}", "event-sending"),
    # Pagination, room-sticky
    (f"GET {C}/v3/rooms/{R}/messages?dir=b&from=t47-1234", "room-messages"),
    (f"GET {C}/r0/rooms/{R}/messages?dir=b", "room-messages"),
    # The rest of the generic worker's endpoints
    (f"GET {C}/versions", "client-reader"),
    (f"POST {C}/v3/publicRooms?server=example.org", "client-reader"),
    (f"GET {C}/v3/rooms/{R}/members?at=t1", "client-reader"),
    (f"GET {C}/v3/rooms/{R}/joined_members", "client-reader"),
    (f"GET {C}/v3/rooms/{R}/state", "client-reader"),
    (f"GET {C}/v3/rooms/{R}/context/{E}?limit=10", "client-reader"),
    (f"GET {C}/v3/rooms/{R}/event/{E}", "client-reader"),
    (f"GET {C}/v1/rooms/{R}/relations/{E}/m.thread", "client-reader"),
    (f"GET {C}/v1/rooms/{R}/threads", "client-reader"),
    (f"GET {C}/v1/rooms/{R}/hierarchy", "client-reader"),
    (f"GET {C}/v3/rooms/{R}/aliases", "client-reader"),
    (f"GET {C}/unstable/org.matrix.msc2432/rooms/{R}/aliases", "client-reader"),
    (f"GET {C}/v1/room_summary/{A}", "client-reader"),
    (f"GET {C}/v3/directory/room/{A}", "client-reader"),
    (f"GET {C}/v3/joined_rooms", "client-reader"),
    (f"POST {C}/v3/search?next_batch=b1", "client-reader"),
    (f"GET {C}/v3/account/whoami", "client-reader"),
    (f"GET {C}/v3/capabilities", "client-reader"),
    (f"GET {C}/v3/notifications?only=highlight", "client-reader"),
    (f"GET {C}/v3/voip/turnServer", "client-reader"),
    (f"POST {C}/v3/user/{U}/filter", "client-reader"),
    (f"GET {C}/v3/user/{U}/filter/0", "client-reader"),
    (f"POST {C}/v3/keys/query", "client-reader"),
    (f"GET {C}/v3/keys/changes?from=s1&to=s2", "client-reader"),
    (f"POST {C}/v3/keys/claim", "client-reader"),
    (f"GET {C}/v3/room_keys/version", "client-reader"),
    (f"PUT {C}/v3/room_keys/keys/{R}?version=1", "client-reader"),
    (f"GET {C}/v3/login", "client-reader"),
    (f"POST {C}/v3/login", "client-reader"),
    (f"POST {C}/v3/register?kind=guest", "client-reader"),
    (f"GET {C}/v3/register/available?username=alice", "client-reader"),
    (
        f"GET {C}/v1/register/m.login.registration_token/validity?token=t",
        "client-reader",
    ),
    (f"GET {C}/unstable/org.matrix.msc4140/delayed_events", "client-reader"),
    (f"GET /_synapse/admin/v1/rooms/{R}", "client-reader"),
    (f"GET /_synapse/admin/v2/users/{U}", "client-reader-get"),
    # Main: everything else
    (f"PUT /_synapse/admin/v2/users/{U}", None),
    (f"GET /_synapse/admin/v2/users/{U}/devices", None),
    (f"GET /_synapse/admin/v1/rooms/{R}/members", None),
    ("GET /_synapse/admin/v1/server_version", None),
    (f"POST {C}/v3/logout", None),
    (f"POST {C}/v3/account/password", None),
    (f"GET {C}/v3/pushers", None),
    (f"POST {C}/v3/rooms/{R}/upgrade", None),
    (f"GET {C}/v3/directory/list/room/{R}", None),
    (f"POST {C}/v3/user/{U}/openid/request_token", None),
    ("GET /_matrix/key/v2/server", None),
    ("GET /.well-known/matrix/client", None),
    ("GET /", None),
    # Raw and case-sensitive: what Synapse's own routing sees
    (f"GET {C}/V3/sync?since=s1", None),
    (f"GET {C}/v3/%73ync?since=s1", None),
    (f"GET {C}/v3/sync/?since=s1", None),
]


@pytest.mark.parametrize(("request_line", "expected"), DOCUMENTED, ids=lambda v: v)
def test_documented_requests(request_line, expected):
    method, target = request_line.split(" ")
    path, _, query = target.partition("?")
    got = SHIPPED.match(method.encode(), path.encode(), query.encode())
    assert name(got) == expected


# Effective tables


def pools_of(table) -> dict[str, tuple[str, ...]]:
    return {r.name: r.pools for r in table.routes}


def config_route(**entry) -> Route:
    return parse_route(entry, ("workers", "routes", 0))


def test_unconfigured_pools_drop_routes_and_leave_chains():
    table = effective_table(SHIPPED, [], {"synchrotron"})
    assert pools_of(table) == {
        "initial-sync": ("synchrotron",),
        "initial-sync-full-state": ("synchrotron",),
        "initial-sync-events": ("synchrotron",),
        "initial-sync-rooms": ("synchrotron",),
        "sync": ("synchrotron",),
    }
    assert name(table.match(b"GET", b"/_matrix/client/v3/sync", b"")) == "initial-sync"
    assert table.match(b"GET", b"/_matrix/client/v3/versions", b"") is None
    assert table.synapse_release == SHIPPED.synapse_release

    table = effective_table(SHIPPED, [], {"client_reader"})
    assert pools_of(table) == {
        "user-directory": ("client_reader",),
        "room-messages": ("client_reader",),
        "client-reader": ("client_reader",),
        "client-reader-get": ("client_reader",),
    }
    # No synchrotron: syncs go to main.
    assert table.match(b"GET", b"/_matrix/client/v3/sync", b"since=s1") is None
    # No device_lists writer: the generic worker takes its endpoints.
    assert name(table.match(b"POST", b"/_matrix/client/v3/keys/upload", b"")) == (
        "client-reader"
    )

    assert effective_table(SHIPPED, [], set()).routes == ()
    assert effective_table(SHIPPED, [], {"unknown_pool"}).routes == ()


def test_every_pool_configured_is_the_shipped_table():
    every = {pool for route in SHIPPED.routes for pool in route.pools}
    assert effective_table(SHIPPED, [], every) == SHIPPED


def test_config_routes_replace_by_name_in_place():
    replacement = config_route(
        name="sync", pool="client_reader", policy="round_robin", patterns=["^/x$"]
    )
    pools = {"synchrotron", "client_reader"}
    before = [r.name for r in effective_table(SHIPPED, [], pools).routes]
    table = effective_table(SHIPPED, [replacement], pools)
    assert [r.name for r in table.routes] == before
    assert table.routes[before.index("sync")] == replacement
    # The replaced route's patterns are gone with it.
    path = b"/_matrix/client/v3/sync"
    assert table.match(b"GET", path, b"since=s1") is None
    assert table.match(b"GET", b"/x", b"") == replacement


def test_replacement_can_drop_an_unconfigured_route():
    replacement = config_route(
        name="typing", pool="typing", policy="single", patterns=["^/typing$"]
    )
    table = effective_table(SHIPPED, [replacement], {"client_reader"})
    assert "typing" not in pools_of(table)


def test_new_config_routes_come_first():
    bridge = config_route(
        name="bridge-sending",
        pool="bridges",
        policy="room",
        patterns=["^/_matrix/client/v3/rooms/.*/send/"],
    )
    admin = config_route(
        name="admin-to-main", pool="main", policy="uri", patterns=["^/_synapse/admin/"]
    )
    table = effective_table(SHIPPED, [bridge, admin], {"bridges", "event_creator"})
    assert [r.name for r in table.routes] == [
        "bridge-sending",
        "admin-to-main",
        "create-room",
        "event-sending",
    ]
    send = b"/_matrix/client/v3/rooms/" + R.encode() + b"/send/m.room.message/t1"
    assert table.match(b"PUT", send, b"") == bridge
    redact = b"/_matrix/client/v3/rooms/" + R.encode() + b"/redact/e/t2"
    assert name(table.match(b"PUT", redact, b"")) == "event-sending"
    # `main` is always configured, so a route to it is kept: it ends the
    # search before the shipped table's media route.
    table = effective_table(SHIPPED, [admin], {"media_repository"})
    assert table.match(b"POST", b"/_synapse/admin/v1/purge_media_cache", b"") == admin


def test_new_route_to_an_unconfigured_pool_is_left_out():
    extra = config_route(name="extra", pool="nowhere", policy="uri", patterns=["^/"])
    table = effective_table(SHIPPED, [extra], {"client_reader"})
    assert "extra" not in pools_of(table)


# Query strings


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", {}),
        (b"since=s1&timeout=30000", {b"since": b"s1", b"timeout": b"30000"}),
        # %xx-decoded, names too
        (b"full%5Fstate=tru%65", {b"full_state": b"true"}),
        (
            b"url=https%3A%2F%2Fexample.org%2F%3Fa%3Db",
            {b"url": b"https://example.org/?a=b"},
        ),
        # the first value wins, as Synapse's parse_string takes it
        (b"since=a&since=b", {b"since": b"a"}),
        (b"since=&since=b", {b"since": b""}),
        # `+` is a space; an escaped plus is a plus
        (b"q=a+b&r=a%2Bb", {b"q": b"a b", b"r": b"a+b"}),
        # empty values and parameters without `=`
        (b"since=", {b"since": b""}),
        (b"since", {b"since": b""}),
        (b"a=1=2", {b"a": b"1=2"}),
        # empty parts are skipped
        (b"&&a=1&", {b"a": b"1"}),
        # bytes that are not UTF-8 stay bytes
        (b"k=%FF", {b"k": b"\xff"}),
    ],
)
def test_parse_query(query, expected):
    assert parse_query(query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"full%5Fstate=tru%65&since=s1", "initial-sync-full-state"),
        (b"since=s1&full_state=false&full_state=true", "sync"),
        (b"since=s1&full_state=TRUE", "sync"),
        (b"Since=s1", "initial-sync"),
        (b"access_token=syt_YWxpY2U_abc_123", "initial-sync"),
    ],
)
def test_query_conditions_on_decoded_values(query, expected):
    got = SHIPPED.match(b"GET", b"/_matrix/client/v3/sync", query)
    assert name(got) == expected


def _reference_match(table, method, path, query):
    """First match the slow, obvious way: a search per pattern."""
    from matrix_edge.pools.table import _holds

    params = parse_query(query)
    for route in table.routes:
        if route.methods is not None and method not in route.methods:
            continue
        if not any(p.search(path) for p in route.patterns):
            continue
        if all(_holds(params.get(k), v) for k, v in route.query):
            return route
    return None


def test_the_joined_expression_agrees_with_a_search_per_pattern():
    """Unanchored patterns, top-level alternations and routes refused for
    their method or query all resolve as a search per pattern would."""
    extra = [
        parse_route(
            {
                "name": "anywhere",
                "pool": "client_reader",
                "policy": "uri",
                "patterns": ["/bridge/", "^/_matrix/x|/late-alternative$"],
            },
            ("t",),
        ),
        parse_route(
            {
                "name": "post-only",
                "pool": "client_reader",
                "policy": "uri",
                "methods": ["POST"],
                "query": {"mode": "x"},
                "patterns": ["^/_matrix/client/v3/sync$"],
            },
            ("t",),
        ),
    ]
    pools = {p for route in shipped_table().routes for p in route.pools}
    table = effective_table(shipped_table(), extra, pools)
    paths = [
        b"/_matrix/client/v3/sync",
        b"/_matrix/client/v3/rooms/!r%3Ahs/bridge/send/x",
        b"/_matrix/x",
        b"/something/late-alternative",
        b"/_matrix/client/v3/rooms/!r%3Ahs/messages",
        b"/_matrix/client/v3/logout",
        b"/_matrix/federation/v1/send/1",
        b"/_matrix/client/v3/pushrules/global/",
    ]
    for path in paths:
        for method in (b"GET", b"POST", b"PUT"):
            for query in (b"", b"since=s", b"mode=x&since=s", b"full_state=true"):
                assert table.match(method, path, query) == _reference_match(
                    table, method, path, query
                ), (method, path, query)


def test_no_shipped_pattern_has_two_open_wildcards():
    """A second ``.*`` before more literal text makes matching time grow
    with the square of the path's length; a trailing ``.*$`` does not."""
    for route in shipped_table().routes:
        for pattern in route.patterns:
            source = pattern.pattern
            open_wildcards = source.count(b".*") - source.count(b".*$")
            assert open_wildcards <= 1, (route.name, source)
