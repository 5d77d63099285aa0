"""Worker pools on Twisted's in-memory reactor: rendezvous hashing, the
keys requests are balanced by, the whoami cache, per-member limits and the
dispatcher that puts them together."""

from __future__ import annotations

import json
from collections import Counter
from hashlib import blake2b

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from matrix_edge.config.edge import parse_config
from matrix_edge.config.routes import MAIN, Policy
from matrix_edge.config.timeouts import TimeoutsConfig
from matrix_edge.config.upstream import UpstreamAddress, UpstreamPoolConfig
from matrix_edge.config.workers import PoolConfig, WhoamiCacheConfig
from matrix_edge.errors import MatrixError
from matrix_edge.pools import hashing
from matrix_edge.pools.dispatch import (
    Dispatcher,
    Refused,
    RequestFacts,
    make_dispatcher,
    refused_error,
)
from matrix_edge.pools.keys import access_token, room_key, xmatrix_origin
from matrix_edge.pools.pool import Lease, PoolFull, WorkerPool
from matrix_edge.pools.whoami import (
    FAILED_LOOKUP_TTL,
    LOOKUP_TIMEOUT,
    UNKNOWN_TOKEN_TTL,
    WHOAMI_PATH,
    WhoamiCache,
    token_digest,
)
from matrix_edge.server.fields import HeaderFields
from matrix_edge.upstream.client import Upstream

# Rendezvous hashing


MEMBERS = [(b"http://10.0.0.%d:8083" % i, i) for i in range(1, 5)]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (b"@alice:example.org", 2),
        (b"@bob:example.org", 4),
        (b"!room:example.org", 2),
        (b"remote.example", 1),
        (b"@u1:hs", 4),
        (b"", 3),
    ],
)
def test_choice_is_fixed_for_a_key(key, expected):
    """The same members give the same choice in every process and release:
    a change here moves users between workers on upgrade, and edges of
    different versions would disagree."""
    assert hashing.choose(key, MEMBERS) == expected
    assert hashing.score(b"@alice:example.org", b"http://10.0.0.1:8083") == (
        3708635424265294324
    )


def test_choice_does_not_depend_on_member_order():
    for i in range(200):
        key = b"@user%d:hs" % i
        assert hashing.choose(key, MEMBERS) == hashing.choose(key, MEMBERS[::-1])


def test_choose_needs_members():
    with pytest.raises(ValueError):
        hashing.choose(b"k", [])


KEYS = [b"@user%d:example.org" % i for i in range(10_000)]


def _placement(members):
    return {key: hashing.choose(key, members) for key in KEYS}


def test_removing_a_member_moves_only_its_keys():
    before = _placement(MEMBERS)
    counts = Counter(before.values())
    assert set(counts) == {1, 2, 3, 4}
    assert all(1_500 < n < 3_500 for n in counts.values()), counts
    for gone in (1, 2, 3, 4):
        after = _placement([m for m in MEMBERS if m[1] != gone])
        moved = {key for key in KEYS if after[key] != before[key]}
        assert moved == {key for key in KEYS if before[key] == gone}


def test_adding_a_member_moves_keys_only_to_it():
    before = _placement(MEMBERS)
    after = _placement([*MEMBERS, (b"http://10.0.0.5:8083", 5)])
    moved = [key for key in KEYS if after[key] != before[key]]
    assert {after[key] for key in moved} == {5}
    assert after == {k: 5 if k in set(moved) else before[k] for k in KEYS}
    # About a fifth of the keys: its fair share, taken from every member.
    assert 1_600 < len(moved) < 2_400, len(moved)
    assert {before[key] for key in moved} == {1, 2, 3, 4}


# The keys requests are balanced by


def _headers(*authorization: bytes) -> HeaderFields:
    return HeaderFields([(b"Authorization", value) for value in authorization])


@pytest.mark.parametrize(
    ("authorization", "query", "expected"),
    [
        ([b"Bearer syt_YWxpY2U_abc_123"], b"", b"syt_YWxpY2U_abc_123"),
        ([b"bearer   syt_abc  "], b"", b"syt_abc"),
        ([b"BEARER syt_abc"], b"since=s1", b"syt_abc"),
        # The legacy query parameter, %xx-decoded as Synapse reads it.
        ([], b"since=s1&access_token=syt_abc", b"syt_abc"),
        ([], b"access_token=syt%2Fa%2Bb%3D", b"syt/a+b="),
        ([], b"access_token=a&access_token=b", b"a"),
        # The header comes first.
        ([b"Bearer from_header"], b"access_token=from_query", b"from_header"),
        ([b'X-Matrix origin="a.example",key="k",sig="s"', b"Bearer tok"], b"", b"tok"),
        # None at all
        ([], b"", None),
        ([], b"since=s1", None),
        ([], b"access_token=", None),
        ([], b"not_access_token=x", None),
        ([b"Bearer"], b"", None),
        ([b"Bearer a b"], b"", None),
        ([b"Basic YWxpY2U6cGFzcw=="], b"", None),
        ([b'X-Matrix origin="a.example",key="k",sig="s"'], b"", None),
    ],
)
def test_access_token(authorization, query, expected):
    assert access_token(_headers(*authorization), query) == expected


def test_access_token_escaped_or_not_is_the_same_token():
    assert access_token(_headers(), b"access_token=syt%5Fabc") == access_token(
        _headers(b"Bearer syt_abc"), b""
    )


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/_matrix/client/v3/rooms/!r:hs/messages", b"!r:hs"),
        (b"/_matrix/client/v3/rooms/!r%3Ahs/messages", b"!r:hs"),
        (b"/_matrix/client/v3/rooms/%21r%3Ahs/messages", b"!r:hs"),
        (b"/_matrix/client/v3/rooms/%21r%3ahs/send/m.room.message/t1", b"!r:hs"),
        (b"/_matrix/client/v3/join/%23alias%3Ahs", b"#alias:hs"),
        (b"/_matrix/client/v3/join/#alias%3Ahs", b"#alias:hs"),
        (b"/_matrix/client/v3/join/#alias:hs", b"#alias:hs"),
        (b"/_matrix/client/v3/knock/!r%3Ahs", b"!r:hs"),
        (b"/_matrix/client/v3/profile/%40u%3Ahs/displayname", b"@u:hs"),
        (b"/_matrix/client/v3/rooms/!r%3Ahs", b"!r:hs"),
        (b"/_matrix/client/v3/sync", None),
        (b"/_matrix/client/v3/rooms/", None),
        (b"/_matrix/client/v3/joined_rooms", None),
    ],
)
def test_room_key(path, expected):
    assert room_key(path) == expected


def test_room_key_escaped_and_unescaped_are_equal():
    spellings = [
        b"/_matrix/client/v3/rooms/!OGEhHVWSdvArJzumhm:example.org/event/e",
        b"/_matrix/client/v3/rooms/!OGEhHVWSdvArJzumhm%3Aexample.org/event/e",
        b"/_matrix/client/v3/rooms/%21OGEhHVWSdvArJzumhm%3aexample.org/event/e",
    ]
    assert len({room_key(path) for path in spellings}) == 1


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (
            [b'X-Matrix origin="a.example",destination="hs",key="ed25519:1",sig="x"'],
            b"a.example",
        ),
        ([b"X-Matrix origin=a.example,key=ed25519:1,sig=x"], b"a.example"),
        (
            [b'X-Matrix key="ed25519:1", origin="b.example:8448" ,sig="x"'],
            b"b.example:8448",
        ),
        ([b'X-Matrix origin="we\\"ird\\\\name",key="k"'], b'we"ird\\name'),
        ([b'x-matrix origin="a.example",key="k"'], b"a.example"),
        ([b'X-MATRIX   origin="a.example"'], b"a.example"),
        # Parameter names are case-insensitive, as Synapse reads them.
        ([b'X-Matrix Origin="a.example",key="k"'], b"a.example"),
        ([b"Bearer tok", b'X-Matrix origin="c.example"'], b"c.example"),
        # None
        ([], None),
        ([b"Bearer tok"], None),
        ([b'X-Matrix key="k",sig="s"'], None),
        ([b'X-Matrix origin="",key="k"'], None),
        ([b'X-Matrix destination="hs",xorigin="evil"'], None),
        ([b'X-Matrixorigin="a.example"'], None),
    ],
)
def test_xmatrix_origin(authorization, expected):
    assert xmatrix_origin(authorization) == expected
    assert xmatrix_origin(_headers(*authorization).values(b"authorization")) == (
        expected
    )


def test_xmatrix_origin_of_no_header():
    assert xmatrix_origin(None) is None


# The whoami cache


@attrs.define
class FakeExchange:
    handler: object
    headers: list
    cancelled: bool = False

    def answer(self, code: int, body: bytes) -> None:
        self.handler.response_head(code, b"Whatever", [], len(body))
        self.handler.response_data(body)
        self.handler.response_end(True, "")

    def fail(self) -> None:
        self.handler.upstream_failed(Failure(ConnectionRefusedError("refused")))

    def cancel(self) -> None:
        self.cancelled = True


@attrs.define
class FakeUpstream:
    """Main, as far as whoami lookups go."""

    exchanges: list[FakeExchange] = attrs.Factory(list)
    targets: list = attrs.Factory(list)

    def request(self, method, target, headers, body, handler):
        assert (method, body) == (b"GET", None)
        self.targets.append(target)
        exchange = FakeExchange(handler, headers)
        self.exchanges.append(exchange)
        return exchange


def _user(name: str) -> bytes:
    return json.dumps({"user_id": name, "device_id": "D"}).encode()


def make_cache(size: int = 100, ttl: float = 600.0):
    clock = MemoryReactorClock()
    upstream = FakeUpstream()
    cache = WhoamiCache(clock, upstream, WhoamiCacheConfig(size=size, ttl=ttl))
    return clock, upstream, cache


def _lookup(cache, token: bytes) -> Deferred:
    return cache.lookup(token, token_digest(token), b"203.0.113.7")


def _result(d: Deferred):
    results: list = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0]


def test_lookup_asks_main_once_then_the_cache_answers():
    _clock, upstream, cache = make_cache()
    d = _lookup(cache, b"syt_alice")
    [exchange] = upstream.exchanges
    assert upstream.targets == [WHOAMI_PATH]
    headers = dict(exchange.headers)
    assert headers[b"Authorization"] == b"Bearer syt_alice"
    assert headers[b"X-Forwarded-For"] == b"203.0.113.7"
    assert cache.cached(token_digest(b"syt_alice")) == (False, None)
    exchange.answer(200, _user("@alice:hs"))
    assert _result(d) == b"@alice:hs"
    assert cache.cached(token_digest(b"syt_alice")) == (True, b"@alice:hs")
    assert len(upstream.exchanges) == 1
    # Tokens are kept as digests only.
    assert b"syt_alice" not in repr(cache._entries).encode()


def test_cached_entries_expire_after_the_ttl():
    clock, upstream, cache = make_cache(ttl=60)
    digest = token_digest(b"syt_alice")
    d = _lookup(cache, b"syt_alice")
    upstream.exchanges[0].answer(200, _user("@alice:hs"))
    _result(d)
    clock.advance(59)
    assert cache.cached(digest) == (True, b"@alice:hs")
    clock.advance(1)
    assert cache.cached(digest) == (False, None)
    assert len(cache) == 0


def test_size_bound_evicts_the_least_recently_used():
    _clock, upstream, cache = make_cache(size=3)
    tokens = [b"tok%d" % i for i in range(4)]
    for i, token in enumerate(tokens[:3]):
        d = _lookup(cache, token)
        upstream.exchanges[-1].answer(200, _user(f"@u{i}:hs"))
        _result(d)
    # tok0 used again: tok1 is now the least recently used.
    assert cache.cached(token_digest(b"tok0")) == (True, b"@u0:hs")
    d = _lookup(cache, tokens[3])
    upstream.exchanges[-1].answer(200, _user("@u3:hs"))
    _result(d)
    assert len(cache) == 3
    assert cache.cached(token_digest(b"tok1")) == (False, None)
    for i in (0, 2, 3):
        assert cache.cached(token_digest(tokens[i])) == (True, b"@u%d:hs" % i)


def test_concurrent_lookups_of_one_token_share_one_request():
    _clock, upstream, cache = make_cache()
    waiting = [_lookup(cache, b"syt_alice") for _ in range(5)]
    other = _lookup(cache, b"syt_bob")
    assert len(upstream.exchanges) == 2
    upstream.exchanges[0].answer(200, _user("@alice:hs"))
    assert [_result(d) for d in waiting] == [b"@alice:hs"] * 5
    upstream.exchanges[1].answer(200, _user("@bob:hs"))
    assert _result(other) == b"@bob:hs"


def test_a_waiting_lookup_may_be_cancelled():
    _clock, upstream, cache = make_cache()
    first = _lookup(cache, b"syt_alice")
    second = _lookup(cache, b"syt_alice")
    first.cancel()
    assert _result(first).check(CancelledError)
    upstream.exchanges[0].answer(200, _user("@alice:hs"))
    assert _result(second) == b"@alice:hs"


def test_an_unknown_token_is_remembered_briefly():
    clock, upstream, cache = make_cache(ttl=600)
    digest = token_digest(b"syt_gone")
    d = _lookup(cache, b"syt_gone")
    upstream.exchanges[0].answer(
        401, b'{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown token"}'
    )
    assert _result(d) is None
    assert cache.cached(digest) == (True, None)
    clock.advance(UNKNOWN_TOKEN_TTL - 1)
    assert cache.cached(digest) == (True, None)
    clock.advance(1)
    assert cache.cached(digest) == (False, None)


def test_a_short_ttl_bounds_the_unknown_token_entries_too():
    clock, upstream, cache = make_cache(ttl=5)
    d = _lookup(cache, b"syt_gone")
    upstream.exchanges[0].answer(403, b"{}")
    assert _result(d) is None
    clock.advance(5)
    assert cache.cached(token_digest(b"syt_gone")) == (False, None)


@pytest.mark.parametrize(
    "fail",
    [
        lambda exchange: exchange.answer(500, b'{"errcode":"M_UNKNOWN"}'),
        lambda exchange: exchange.answer(502, b"Bad gateway"),
        lambda exchange: exchange.answer(200, b"not json"),
        lambda exchange: exchange.answer(200, b'{"user_id": 5}'),
        lambda exchange: exchange.answer(200, b'{"user_id": "alice"}'),
        lambda exchange: exchange.answer(200, b'["@alice:hs"]'),
        lambda exchange: exchange.fail(),
    ],
)
def test_failures_are_remembered_briefly(fail):
    """A failed lookup is not repeated per request while Synapse struggles,
    and is tried again soon after."""
    clock, upstream, cache = make_cache()
    d = _lookup(cache, b"syt_alice")
    fail(upstream.exchanges[0])
    assert _result(d) is None
    assert cache.cached(token_digest(b"syt_alice")) == (True, None)
    clock.advance(FAILED_LOOKUP_TTL)
    assert cache.cached(token_digest(b"syt_alice")) == (False, None)
    _lookup(cache, b"syt_alice")
    assert len(upstream.exchanges) == 2


def test_a_broken_off_answer_names_no_user():
    _clock, upstream, cache = make_cache()
    d = _lookup(cache, b"syt_alice")
    handler = upstream.exchanges[0].handler
    handler.response_head(200, b"OK", [], 100)
    handler.response_data(b'{"user_id": "@alice:hs"')
    handler.response_end(False, "connection lost")
    assert _result(d) is None
    assert cache.cached(token_digest(b"syt_alice")) == (True, None)


def test_no_answer_in_time_gives_none():
    clock, upstream, cache = make_cache()
    d = _lookup(cache, b"syt_alice")
    clock.advance(LOOKUP_TIMEOUT - 0.1)
    assert not d.called
    clock.advance(0.1)
    assert _result(d) is None
    assert upstream.exchanges[0].cancelled
    assert not clock.getDelayedCalls()
    # Remembered as failed for a while, then asked again.
    assert cache.cached(token_digest(b"syt_alice")) == (True, None)
    clock.advance(FAILED_LOOKUP_TTL)
    _lookup(cache, b"syt_alice")
    assert len(upstream.exchanges) == 2


def test_an_answer_in_time_cancels_the_timer():
    clock, upstream, cache = make_cache()
    _lookup(cache, b"syt_alice")
    assert len(clock.getDelayedCalls()) == 1
    upstream.exchanges[0].answer(200, _user("@alice:hs"))
    assert not clock.getDelayedCalls()
    assert not upstream.exchanges[0].cancelled


def _real_main():
    clock = MemoryReactorClock()
    upstream = Upstream(
        clock,
        UpstreamAddress(host="127.0.0.1", port=8008),
        UpstreamPoolConfig(),
        TimeoutsConfig(),
        endpoint=TCP4ClientEndpoint(clock, "127.0.0.1", 8008),
    )
    return clock, upstream


def _connect(clock):
    host, port, factory, _timeout, _bind = clock.tcpClients.pop(0)
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_the_lookup_on_the_wire():
    clock, main = _real_main()
    cache = WhoamiCache(clock, main, WhoamiCacheConfig())
    d = _lookup(cache, b"syt_alice")
    protocol, transport = _connect(clock)
    head = transport.value()
    assert head.endswith(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /_matrix/client/v3/account/whoami HTTP/1.1"
    assert b"Authorization: Bearer syt_alice" in lines
    assert b"X-Forwarded-For: 203.0.113.7" in lines
    body = _user("@alice:hs")
    protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert _result(d) == b"@alice:hs"


def test_tokens_never_reach_the_log():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock, main = _real_main()
        cache = WhoamiCache(clock, main, WhoamiCacheConfig())
        tokens = [b"syt_secret_%d" % i for i in range(5)]
        # Refused
        d = _lookup(cache, tokens[0])
        _host, _port, factory, _t, _b = clock.tcpClients.pop(0)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("no")))
        assert _result(d) is None
        # No answer in time
        d = _lookup(cache, tokens[1])
        clock.advance(LOOKUP_TIMEOUT)
        assert _result(d) is None
        clock.tcpClients.clear()
        # Errors and garbage
        for token, response in [
            (tokens[2], b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n{}"),
            (tokens[3], b"HTTP/1.1 401 No\r\nContent-Length: 2\r\n\r\n{}"),
            (tokens[4], b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n[1,2"),
        ]:
            d = _lookup(cache, token)
            protocol, transport = _connect(clock)
            assert token in transport.value()
            protocol.dataReceived(response)
            assert _result(d) is None
            transport.loseConnection()
            protocol.connectionLost(Failure(ConnectionRefusedError()))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("Could not look up a token's user" in formatEvent(e) for e in events)
    for event in events:
        text = formatEvent(event) + repr(event)
        for token in tokens:
            assert token.decode() not in text, text


def test_token_digests_are_keyed_to_matrix_edge():
    assert token_digest(b"syt_a") == token_digest(b"syt_a")
    assert token_digest(b"syt_a") != token_digest(b"syt_b")
    assert token_digest(b"syt_a") != blake2b(b"syt_a", digest_size=16).digest()
    assert len(token_digest(b"syt_a")) == 16


# Worker pools: limits per member, and the queue


def _upstream(clock, port: int) -> Upstream:
    return Upstream(
        clock,
        UpstreamAddress(host="127.0.0.1", port=port),
        UpstreamPoolConfig(),
        TimeoutsConfig(),
    )


def make_pool(members: int = 2, **config) -> tuple[MemoryReactorClock, WorkerPool]:
    clock = MemoryReactorClock()
    upstreams = [_upstream(clock, 8083 + i) for i in range(members)]
    pool_config = PoolConfig(addresses=tuple(u.address for u in upstreams), **config)
    return clock, WorkerPool("client_reader", pool_config, upstreams, clock)


def _leased(placed) -> Lease:
    assert isinstance(placed, Lease), placed
    return placed


def test_without_a_limit_leases_are_counted_and_never_wait():
    """/ready reports requests in flight for every pool."""
    _clock, pool = make_pool()
    member = pool.members[0]
    leases = [_leased(member.lease()) for _ in range(1000)]
    assert all(lease.upstream is member.upstream for lease in leases)
    assert leases[0].pool == "client_reader"
    assert member.in_flight == 1000
    for lease in leases:
        lease.release()
        lease.release()  # twice is harmless
    assert member.in_flight == 0


def test_max_concurrent_is_per_member():
    _clock, pool = make_pool(max_concurrent=2)
    a, b = pool.members
    first = [_leased(a.lease()), _leased(a.lease())]
    assert a.in_flight == 2
    # a is full, and with no queue the next request for it is refused...
    assert a.lease() is None
    # ...while b has slots of its own.
    _leased(b.lease())
    _leased(b.lease())
    assert b.lease() is None
    first[0].release()
    assert a.in_flight == 1
    _leased(a.lease())
    # A lease released twice frees one slot.
    first[1].release()
    first[1].release()
    assert a.in_flight == 1


def test_the_queue_is_pool_wide():
    _clock, pool = make_pool(max_concurrent=1, queue=2)
    a, b = pool.members
    _leased(a.lease())
    _leased(b.lease())
    waiting = [a.lease(), b.lease()]
    assert all(isinstance(d, Deferred) and not d.called for d in waiting)
    assert pool.queued == 2
    assert a.lease() is None
    assert b.lease() is None
    assert pool.queued == 2


def test_release_hands_the_slot_to_the_next_waiter_in_order():
    clock, pool = make_pool(members=1, max_concurrent=1, queue=3)
    [member] = pool.members
    holder = _leased(member.lease())
    waiting = [member.lease() for _ in range(3)]
    order: list[int] = []
    for i, d in enumerate(waiting):
        d.addCallback(lambda lease, i=i: (order.append(i), lease)[1])
    holder.release()
    assert order == [0]
    assert member.in_flight == 1
    assert pool.queued == 2
    lease = _result(waiting[0])
    assert isinstance(lease, Lease) and lease.upstream is member.upstream
    lease.release()
    assert order == [0, 1]
    _result(waiting[1]).release()
    _result(waiting[2]).release()
    assert order == [0, 1, 2]
    assert (member.in_flight, pool.queued) == (0, 0)
    # No timer is left behind.
    assert not clock.getDelayedCalls()


def test_queue_timeout_refuses_with_pool_full():
    clock, pool = make_pool(members=1, max_concurrent=1, queue=1, queue_timeout=5.0)
    [member] = pool.members
    holder = _leased(member.lease())
    d = member.lease()
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.1)
    assert _result(d).check(PoolFull)
    assert pool.queued == 0
    assert list(member.waiting) == []
    # The slot, when it frees, is not given to the waiter that gave up.
    holder.release()
    assert member.in_flight == 0
    # The queue has room again.
    _leased(member.lease())
    assert isinstance(member.lease(), Deferred)


def test_cancelling_a_waiting_lease_frees_its_queue_slot():
    clock, pool = make_pool(members=1, max_concurrent=1, queue=2)
    [member] = pool.members
    holder = _leased(member.lease())
    first, second = member.lease(), member.lease()
    assert member.lease() is None
    first.cancel()
    assert _result(first).check(CancelledError)
    assert pool.queued == 1
    third = member.lease()
    assert isinstance(third, Deferred)
    assert len(clock.getDelayedCalls()) == 2
    holder.release()
    # The cancelled waiter is skipped: the slot goes to the next in line.
    assert isinstance(_result(second), Lease)
    assert not third.called
    assert pool.queued == 1


def test_available_leaves_out_members_down_and_excluded():
    _clock, pool = make_pool(members=3)
    a, b, c = pool.members
    assert pool.available() == [a, b, c]
    # Down only counts when checks will see the member come back.
    b.upstream.mark(False, "refused")
    assert pool.available() == [a, b, c]
    b.upstream.watched = True
    assert pool.available() == [a, c]
    assert pool.available(exclude=[a.upstream]) == [c]
    b.upstream.mark(True)
    assert pool.available(exclude=[a.upstream]) == [b, c]


def test_members_are_named_by_their_configured_address():
    _clock, pool = make_pool(members=2)
    assert [m.name for m in pool.members] == [
        b"http://127.0.0.1:8083",
        b"http://127.0.0.1:8084",
    ]


# The dispatcher


R = b"!OGEhHVWSdvArJzumhm%3Aexample.org"


@attrs.define
class Deployment:
    clock: MemoryReactorClock
    dispatcher: Dispatcher
    upstreams: dict[str, Upstream]
    whoami: FakeUpstream

    def member(self, address: str) -> Upstream:
        return self.upstreams[address]

    def down(self, *addresses: str) -> None:
        for address in addresses:
            upstream = self.upstreams[address]
            upstream.watched = True
            upstream.mark(False, "refused")

    def address_of(self, placed) -> str:
        if isinstance(placed, Deferred):
            placed = _result(placed)
        assert isinstance(placed, Lease), placed
        return str(placed.upstream.address)


def deploy(pools, routes=(), **workers) -> Deployment:
    config = parse_config(
        {
            "listeners": [{"port": 8080}],
            "upstream": "http://127.0.0.1:8008",
            "workers": {"pools": pools, "routes": list(routes), **workers},
        }
    )
    clock = MemoryReactorClock()
    upstreams: dict[str, Upstream] = {}

    def upstream_for(address):
        return upstreams.setdefault(
            str(address),
            Upstream(clock, address, config.upstream_pool, config.timeouts),
        )

    dispatcher = make_dispatcher(
        config.workers, clock, upstream_for(config.upstream), upstream_for
    )
    whoami = FakeUpstream()
    dispatcher.whoami = WhoamiCache(clock, whoami, config.workers.whoami_cache)
    return Deployment(clock, dispatcher, upstreams, whoami)


def facts(
    method: bytes,
    target: bytes,
    *authorization: bytes,
    client_ip: str = "203.0.113.7",
) -> RequestFacts:
    path, _, query = target.partition(b"?")
    return RequestFacts(
        method, target, path, query, _headers(*authorization), client_ip
    )


MAIN_ADDRESS = "http://127.0.0.1:8008"
W = [f"http://127.0.0.1:{8081 + i}" for i in range(6)]


def test_unmatched_requests_go_to_main():
    d = deploy({"synchrotron": W[:2]})
    placed = d.dispatcher.place(facts(b"GET", b"/_matrix/client/v3/versions"))
    assert placed.upstream is d.dispatcher.main
    assert placed.pool == MAIN


def test_room_requests_stick_to_the_room_however_it_is_spelt():
    d = deploy({"client_reader": W[:4]})
    spellings = [
        b"/_matrix/client/v3/rooms/!OGEhHVWSdvArJzumhm%3Aexample.org/messages?dir=b",
        b"/_matrix/client/v3/rooms/%21OGEhHVWSdvArJzumhm%3aexample.org/messages",
        b"/_matrix/client/r0/rooms/!OGEhHVWSdvArJzumhm:example.org/messages?from=x",
    ]
    places = {d.address_of(d.dispatcher.place(facts(b"GET", t))) for t in spellings}
    assert len(places) == 1
    expected = hashing.choose(
        b"!OGEhHVWSdvArJzumhm:example.org", [(w.encode(), w) for w in W[:4]]
    )
    assert places == {expected}


def test_users_are_looked_up_once_then_placed_at_once():
    d = deploy({"synchrotron": W[:3]})
    sync = b"/_matrix/client/v3/sync?since=s1"
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_alice_1"))
    assert isinstance(placed, Deferred) and not placed.called
    [exchange] = d.whoami.exchanges
    exchange.answer(200, _user("@alice:hs"))
    expected = hashing.choose(b"@alice:hs", [(w.encode(), w) for w in W[:3]])
    assert d.address_of(placed) == expected
    # A second device of the same user goes to the same worker.
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_alice_2"))
    d.whoami.exchanges[-1].answer(200, _user("@alice:hs"))
    assert d.address_of(placed) == expected
    # Cached: no lookup, no waiting.
    placed = d.dispatcher.place(facts(b"GET", sync + b"&x=1", b"Bearer syt_alice_1"))
    assert isinstance(placed, Lease)
    assert d.address_of(placed) == expected
    assert len(d.whoami.exchanges) == 2


def test_users_without_whoami_are_balanced_by_token_then_by_address():
    d = deploy({"synchrotron": W[:3]})
    members = [(w.encode(), w) for w in W[:3]]
    sync = b"/_matrix/client/v3/sync?since=s1"
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_unknown"))
    d.whoami.exchanges[0].answer(401, b"{}")
    assert d.address_of(placed) == hashing.choose(token_digest(b"syt_unknown"), members)
    # Unknown tokens are remembered: no second lookup.
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_unknown"))
    assert isinstance(placed, Lease)
    assert len(d.whoami.exchanges) == 1
    # No token: the client's address.
    placed = d.dispatcher.place(facts(b"GET", sync, client_ip="198.51.100.9"))
    assert d.address_of(placed) == hashing.choose(b"198.51.100.9", members)


def test_federation_is_balanced_by_origin():
    d = deploy({"federation_inbound": W[:4]})
    members = [(w.encode(), w) for w in W[:4]]
    for origin in (b"a.example", b"b.example", b"c.example:8448"):
        auth = b'X-Matrix origin="%s",key="ed25519:a",sig="x"' % origin
        places = {
            d.address_of(
                d.dispatcher.place(
                    facts(
                        b"PUT",
                        b"/_matrix/federation/v1/send/%d" % txn,
                        auth,
                        client_ip=f"192.0.2.{txn}",
                    )
                )
            )
            for txn in range(5)
        }
        assert places == {hashing.choose(origin, members)}


def test_balance_overrides_the_policy_of_routes_that_are_not_sticky():
    d = deploy({"client_reader": {"addresses": W[:4], "balance": "source_ip"}})
    members = [(w.encode(), w) for w in W[:4]]
    # client-reader (round_robin) now goes by the client's address...
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        places = {
            d.address_of(d.dispatcher.place(facts(b"GET", target, client_ip=ip)))
            for target in (
                b"/_matrix/client/versions",
                b"/_matrix/client/v3/joined_rooms",
                b"/_matrix/client/v3/rooms/" + R + b"/members",
            )
        }
        assert places == {hashing.choose(ip.encode(), members)}
    # ...but room-messages is sticky: by room, whoever asks.
    places = {
        d.address_of(
            d.dispatcher.place(
                facts(
                    b"GET",
                    b"/_matrix/client/v3/rooms/" + R + b"/messages",
                    client_ip=ip,
                )
            )
        )
        for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4")
    }
    assert places == {hashing.choose(b"!OGEhHVWSdvArJzumhm:example.org", members)}
    choice = d.dispatcher.explain(facts(b"GET", b"/_matrix/client/versions"))
    assert (choice.route.name, choice.policy) == ("client-reader", Policy.SOURCE_IP)
    choice = d.dispatcher.explain(
        facts(b"GET", b"/_matrix/client/v3/rooms/" + R + b"/messages")
    )
    assert (choice.route.name, choice.policy) == ("room-messages", Policy.ROOM)


def test_balance_round_robin_skips_the_whoami_lookup():
    d = deploy({"synchrotron": {"addresses": W[:3], "balance": "round_robin"}})
    places = [
        d.address_of(
            d.dispatcher.place(
                facts(b"GET", b"/_matrix/client/v3/sync?since=s1", b"Bearer syt_alice")
            )
        )
        for _ in range(6)
    ]
    assert d.whoami.exchanges == []
    assert sorted(places) == sorted(W[:3] * 2)


def test_a_chain_takes_the_first_pool_with_a_member_up():
    d = deploy({"initial_sync": W[:1], "synchrotron": W[1:3]})
    initial = facts(b"GET", b"/_matrix/client/v3/sync", client_ip="198.51.100.1")
    assert d.address_of(d.dispatcher.place(initial)) == W[0]
    d.down(W[0])
    assert d.address_of(d.dispatcher.place(initial)) in W[1:3]
    choice = d.dispatcher.explain(initial)
    assert (choice.route.name, choice.pool) == ("initial-sync", "synchrotron")


def test_no_member_up_falls_back_to_main():
    d = deploy({"synchrotron": W[:2]})
    d.down(*W[:2])
    placed = d.dispatcher.place(
        facts(b"GET", b"/_matrix/client/v3/sync?since=s1", b"Bearer syt_alice")
    )
    assert placed.upstream is d.dispatcher.main
    # The user is not looked up for main.
    assert d.whoami.exchanges == []
    choice = d.dispatcher.explain(facts(b"GET", b"/_matrix/client/v3/sync?since=s1"))
    assert (choice.pool, choice.fell_back) == (MAIN, True)


def test_no_member_up_without_fallback_tries_one_at_a_time():
    """Every member of the route's pool known down, and no main to take the
    request: each member is tried by one request at a time rather than the
    request failing untried; the next check (or that request's outcome)
    lets the next one try."""
    d = deploy({"media_repository": W[:2], "sso": W[2:3]})
    d.down(*W[:3])
    media = facts(b"GET", b"/_matrix/media/v3/download/hs/abc")
    assert d.address_of(d.dispatcher.place(media)) == W[0]
    assert d.address_of(d.dispatcher.place(media)) == W[1]
    assert isinstance(d.dispatcher.place(media), MatrixError)
    d.down(W[1])  # news of W[1]: down still
    assert d.address_of(d.dispatcher.place(media)) == W[1]
    # Healthy members are chosen as ever once there is one.
    d.member(W[0]).mark(True)
    assert {d.address_of(d.dispatcher.place(media)) for _ in range(4)} == {W[0]}
    # A member refused by this request's own attempt is not tried again.
    d.down(W[0])
    error = d.dispatcher.place(media, exclude=[d.member(W[0]), d.member(W[1])])
    assert isinstance(error, MatrixError) and error.code == 503


def test_no_member_up_without_fallback_is_503_once_each_is_tried():
    d = deploy({"media_repository": W[:2], "sso": W[2:3]})
    d.down(*W[:3])
    for target in (
        b"/_matrix/media/v3/download/hs/abc",
        b"/_matrix/client/v3/login/sso/redirect?redirectUrl=x",
    ):
        while isinstance(d.dispatcher.place(facts(b"GET", target)), Lease):
            pass
        error = d.dispatcher.place(facts(b"GET", target))
        assert isinstance(error, MatrixError)
        assert (error.code, error.errcode, error.retry_after) == (503, "M_UNKNOWN", 5)
        assert json.loads(error.body()) == {
            "errcode": "M_UNKNOWN",
            "error": "No server is available for this request at the moment",
        }


def test_a_route_that_names_main_reaches_it_without_fallback():
    d = deploy(
        {"synchrotron": W[:1]},
        routes=[
            {
                "name": "admin-here",
                "pool": "main",
                "policy": "uri",
                "fallback": False,
                "patterns": ["^/_synapse/admin/"],
            },
            {
                "name": "sync-or-main",
                "pool": ["synchrotron", "main"],
                "policy": "user",
                "fallback": False,
                "patterns": ["^/_matrix/client/v3/sync$"],
            },
        ],
    )
    placed = d.dispatcher.place(facts(b"GET", b"/_synapse/admin/v1/server_version"))
    assert placed.upstream is d.dispatcher.main
    choice = d.dispatcher.explain(facts(b"GET", b"/_synapse/admin/v1/server_version"))
    assert (choice.route.name, choice.pool, choice.fell_back) == (
        "admin-here",
        MAIN,
        False,
    )
    d.down(W[0])
    placed = d.dispatcher.place(facts(b"GET", b"/_matrix/client/v3/sync?since=s"))
    assert placed.upstream is d.dispatcher.main


def test_a_full_member_is_429_with_retry_after():
    d = deploy(
        {
            "client_reader": {
                "addresses": W[:1],
                "max_concurrent": 2,
                "queue_timeout": "3s",
            }
        }
    )
    request = facts(b"GET", b"/_matrix/client/versions")
    leases = [d.dispatcher.place(request) for _ in range(2)]
    assert all(isinstance(lease, Lease) for lease in leases)
    error = d.dispatcher.place(request)
    assert isinstance(error, MatrixError)
    assert (error.code, error.errcode, error.retry_after) == (
        429,
        "M_LIMIT_EXCEEDED",
        3,
    )
    assert json.loads(error.body()) == {
        "errcode": "M_LIMIT_EXCEEDED",
        "error": "Too many requests",
        "retry_after_ms": 3000,
    }
    leases[0].release()
    assert isinstance(d.dispatcher.place(request), Lease)


def test_a_queued_request_that_waits_too_long_is_429():
    d = deploy(
        {
            "client_reader": {
                "addresses": W[:1],
                "max_concurrent": 1,
                "queue": 1,
                "queue_timeout": "2s",
            }
        }
    )
    request = facts(b"GET", b"/_matrix/client/versions")
    holder = d.dispatcher.place(request)
    waiting = d.dispatcher.place(request)
    assert isinstance(waiting, Deferred)
    d.clock.advance(2)
    failure = _result(waiting)
    error = refused_error(failure)
    assert (error.code, json.loads(error.body())["retry_after_ms"]) == (429, 2000)
    holder.release()


def _fill(pool) -> list[Lease]:
    """Take every slot of every member of ``pool``."""
    held = []
    for member in pool.members:
        while (lease := member.lease()) is not None and not isinstance(lease, Deferred):
            held.append(lease)
            if member.in_flight >= pool.config.max_concurrent:
                break
    return held


def test_a_lookup_then_a_full_member_is_refused_after_the_lookup():
    d = deploy({"synchrotron": {"addresses": W[:2], "max_concurrent": 1}})
    sync = b"/_matrix/client/v3/sync?since=s1"
    held = _fill(d.dispatcher.pools["synchrotron"])
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_alice"))
    d.whoami.exchanges[0].answer(200, _user("@alice:hs"))
    failure = _result(placed)
    assert failure.check(Refused)
    error = refused_error(failure)
    assert (error.code, error.errcode) == (429, "M_LIMIT_EXCEEDED")
    for lease in held:
        lease.release()


def test_a_lookup_then_a_queued_slot():
    d = deploy({"synchrotron": {"addresses": W[:2], "max_concurrent": 1, "queue": 1}})
    pool = d.dispatcher.pools["synchrotron"]
    sync = b"/_matrix/client/v3/sync?since=s1"
    held = _fill(pool)
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_alice"))
    got: list = []
    placed.addBoth(got.append)
    d.whoami.exchanges[0].answer(200, _user("@alice:hs"))
    assert got == []
    assert pool.queued == 1
    for lease in held:
        lease.release()
    [lease] = got
    alice = d.address_of(lease)
    assert alice in W[:2]
    # Cancelling while queued leaves the queue.
    lease.release()
    held = _fill(pool)
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_alice"))
    assert pool.queued == 1
    placed.cancel()
    assert pool.queued == 0
    for lease in held:
        lease.release()


def test_a_pool_of_one_needs_no_lookup():
    """Whoever the user is, there is one place to go: no whoami to wait
    for, even with main hung."""
    d = deploy({"synchrotron": W[:1]})
    sync = b"/_matrix/client/v3/sync?since=s1"
    placed = d.dispatcher.place(facts(b"GET", sync, b"Bearer syt_alice"))
    assert isinstance(placed, Lease)
    assert d.whoami.exchanges == []


def test_tokens_that_are_not_tokens_are_never_looked_up():
    """Line breaks or spaces in a token (from a decoded query parameter)
    would otherwise reach main inside the lookup's Authorization header."""
    d = deploy({"synchrotron": W[:2]})
    for token in (b"x%0D%0AGET%20/_synapse/admin%20HTTP/1.1", b"a%20b", b"%00"):
        target = b"/_matrix/client/v3/sync?since=s1&access_token=" + token
        placed = d.dispatcher.place(facts(b"GET", target))
        assert isinstance(placed, Lease)
    assert d.whoami.exchanges == []


def test_replacing_excludes_the_members_that_refused():
    d = deploy({"client_reader": W[:3]})
    request = facts(b"GET", b"/_matrix/client/v3/rooms/" + R + b"/messages")
    first = d.address_of(d.dispatcher.place(request))
    refused = [d.member(first)]
    second = d.address_of(d.dispatcher.place(request, exclude=refused))
    assert second != first
    refused.append(d.member(second))
    third = d.address_of(d.dispatcher.place(request, exclude=refused))
    assert {first, second, third} == set(W[:3])
    # The rest keep their places: the same room goes to the same survivor.
    assert d.address_of(d.dispatcher.place(request, exclude=refused[:1])) == second
    # Every member refused: main, as the route falls back.
    refused.append(d.member(third))
    placed = d.dispatcher.place(request, exclude=refused)
    assert placed.upstream is d.dispatcher.main


def test_replacing_moves_along_the_chain_and_stops_without_fallback():
    d = deploy(
        {"initial_sync": W[:1], "synchrotron": W[1:2], "media_repository": W[2:4]}
    )
    initial = facts(b"GET", b"/_matrix/client/v3/sync")
    assert d.address_of(d.dispatcher.place(initial, exclude=[d.member(W[0])])) == W[1]
    media = facts(b"GET", b"/_matrix/media/v3/download/hs/abc")
    first = d.address_of(d.dispatcher.place(media))
    other = d.address_of(d.dispatcher.place(media, exclude=[d.member(first)]))
    assert {first, other} == set(W[2:4])
    error = d.dispatcher.place(media, exclude=[d.member(W[2]), d.member(W[3])])
    assert isinstance(error, MatrixError) and error.code == 503


def test_single_pools_take_their_one_member():
    d = deploy({"typing": W[:1]})
    for i in range(5):
        placed = d.dispatcher.place(
            facts(b"PUT", b"/_matrix/client/v3/rooms/!r%d:hs/typing/%%40a%%3Ahs" % i)
        )
        assert d.address_of(placed) == W[0]


def test_an_escaped_parameter_name_still_names_the_token():
    headers = HeaderFields([])
    assert access_token(headers, b"since=s&access%5Ftoken=syt_x") == b"syt_x"


def test_the_dry_run_never_sends_a_token_that_is_not_one():
    from matrix_edge.commands.route import lookup_user

    d = deploy({"synchrotron": W[:2]})
    assert _result(lookup_user(d.dispatcher, "x\r\nGET /a HTTP/1.1")) is None
    assert d.whoami.exchanges == []
