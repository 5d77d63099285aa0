"""Choosing the Synapse process for a request: the route, then the pool
with a healthy member, then the member by the route's policy."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from matrix_edge import errors
from matrix_edge.config.routes import MAIN, Policy, Route
from matrix_edge.config.upstream import UpstreamAddress
from matrix_edge.config.workers import WorkersConfig
from matrix_edge.errors import MatrixError
from matrix_edge.pools.keys import access_token, room_key, xmatrix_origin
from matrix_edge.pools.pool import Lease, Member, PoolFull, WorkerPool
from matrix_edge.pools.table import RouteTable, effective_table, shipped_table
from matrix_edge.pools.whoami import WhoamiCache, token_digest
from matrix_edge.server.fields import HeaderFields
from matrix_edge.upstream.client import Upstream

Placed = Lease | Deferred[Lease] | MatrixError

# What an access token can be (RFC 6750's b64token, and then some): only
# such tokens are sent to whoami.
_LOOKUP_SAFE = re.compile(rb"\A[\x21-\x7e]{1,4096}\Z")


@attrs.frozen
class RequestFacts:
    """What the policies may look at, all raw."""

    method: bytes
    target: bytes
    path: bytes
    query: bytes
    headers: HeaderFields
    client_ip: str
    scheme: bytes = b"https"
    """How the client reached the edge, for X-Forwarded-Proto."""


@attrs.frozen
class Choice:
    """Where a request goes and why, for the dry run and the access log."""

    route: Route | None
    pool: str
    policy: Policy | None
    key: bytes | None
    member: Member | None
    fell_back: bool = False


class _Plan:
    """What placing a request on one route needs, worked out once: the
    pools of its chain before main, each with the policy it balances by,
    and whether main takes what none of them can."""

    __slots__ = ("main_lease", "name", "steps", "to_main")

    def __init__(self, route: Route, pools: Mapping[str, WorkerPool], main: Upstream):
        steps = []
        for name in route.pools:
            if name == MAIN:
                break
            pool = pools[name]
            balance = pool.config.balance
            policy = route.policy if balance is None or route.sticky else balance
            steps.append((pool, policy))
        self.steps: tuple[tuple[WorkerPool, Policy], ...] = tuple(steps)
        # A chain that names main reaches it, whatever `fallback` says.
        self.to_main = route.fallback or MAIN in route.pools
        self.name = route.name
        self.main_lease = Lease(main, MAIN, None, route.name)
        """Main's lease for this route's requests, which names the route."""


class Dispatcher:
    """The routing table of a deployment and its pools."""

    def __init__(
        self,
        table: RouteTable,
        pools: Mapping[str, WorkerPool],
        main: Upstream,
        whoami: WhoamiCache | None,
    ):
        self.pools = pools
        self.main = main
        self.table = table
        self.whoami = whoami
        self._main_lease = Lease(main, MAIN)

    @property
    def table(self) -> RouteTable:
        return self._table

    @table.setter
    def table(self, table: RouteTable) -> None:
        self._table = table
        self._plans = tuple(
            _Plan(route, self.pools, self.main) for route in table.routes
        )

    def place(self, facts: RequestFacts, exclude: Collection[Upstream] = ()) -> Placed:
        """A lease on the process for this request, one to come, or the
        error to answer with (no process available, pool full)."""
        return self.place_request(
            facts.method,
            facts.target,
            facts.path,
            facts.query,
            facts.headers,
            facts.client_ip,
            facts.scheme,
            exclude,
        )

    def place_request(
        self,
        method: bytes,
        target: bytes,
        path: bytes,
        query: bytes,
        headers: HeaderFields,
        client_ip: str,
        scheme: bytes = b"https",
        exclude: Collection[Upstream] = (),
    ) -> Placed:
        """``place``, given the facts one by one: what the request path
        calls, with nothing built for it."""
        i = self._table.match_index(method, path, query)
        if i is None:
            return self._main_lease
        plan = self._plans[i]
        for step in plan.steps:
            members = step[0].available(exclude)
            if members:
                pool, policy = step
                break
        else:
            if plan.to_main:
                return plan.main_lease
            trial = _trial_member(plan, exclude)
            if trial is None:
                return errors.unavailable(
                    "No server is available for this request at the moment", 5
                )
            return self._lease(trial.pool, trial, plan.name)
        route = plan.name
        if len(members) == 1 or policy is Policy.SINGLE:
            # No key can change the choice: no whoami lookup to wait for.
            return self._lease(pool, members[0], route)
        if policy is Policy.USER:
            user = self._user_key(headers, query, client_ip, scheme, True)
            if isinstance(user, Deferred):

                def looked_up(key: bytes) -> Lease | Deferred[Lease]:
                    # The members may have changed while whoami answered.
                    now = pool.available(exclude) or members
                    return _raise_errors(
                        self._lease(pool, pool.chooser.choose(key, now), route)
                    )

                return user.addCallback(looked_up)
            return self._lease(pool, pool.chooser.choose(user, members), route)
        key = _key(policy, target, path, headers, client_ip)
        if key is None:
            return self._lease(pool, pool.next_round_robin(members), route)
        return self._lease(pool, pool.chooser.choose(key, members), route)

    def explain(self, facts: RequestFacts, user: bytes | None = None) -> Choice:
        """Where ``facts`` would go now, without leasing anything; the user
        of a token is ``user``, as whoami would say."""
        route = self._table.match(facts.method, facts.path, facts.query)
        if route is None:
            return Choice(None, MAIN, None, None, None)
        pool, policy, members = self._pool_for(route, ())
        if pool is None:
            fell_back = route.pools[0] != MAIN
            return Choice(route, MAIN, None, None, None, fell_back=fell_back)
        key: bytes | Deferred[bytes] | None
        if policy is Policy.USER:
            key = user or self._user_key(
                facts.headers, facts.query, facts.client_ip, facts.scheme, False
            )
        else:
            key = _key(policy, facts.target, facts.path, facts.headers, facts.client_ip)
        assert not isinstance(key, Deferred)
        return Choice(route, pool.name, policy, key, _pick(pool, policy, key, members))

    def _pool_for(
        self, route: Route, exclude: Collection[Upstream]
    ) -> tuple[WorkerPool | None, Policy, list[Member]]:
        """The first pool of the route's chain with a member available, its
        policy and those members; no pool when main takes the request."""
        for name in route.pools:
            if name == MAIN:
                break
            pool = self.pools[name]
            members = pool.available(exclude)
            if members:
                balance = pool.config.balance
                if balance is None or route.sticky:
                    return pool, route.policy, members
                return pool, balance, members
        return None, route.policy, []

    def _user_key(
        self,
        headers: HeaderFields,
        query: bytes,
        client_ip: str,
        scheme: bytes,
        lookup: bool,
    ) -> bytes | Deferred[bytes]:
        """The user behind the request's token; with ``lookup`` false, the
        token's digest stands in for a user not already known."""
        token = access_token(headers, query)
        if token is None:
            return client_ip.encode()
        digest = token_digest(token)
        whoami = self.whoami
        if not lookup or whoami is None:
            return digest
        # Only tokens that may be looked up are ever cached, so the cache
        # is asked first: a token that is not one (line breaks, spaces) is
        # never there, and never sent anywhere: its digest is key enough.
        known, user = whoami.cached(digest)
        if known:
            return user or digest
        if not may_look_up(token) or self.main.known_down or whoami.busy:
            return digest
        d = whoami.lookup(token, digest, client_ip.encode(), scheme)
        return d.addCallback(lambda user: user or digest)

    @staticmethod
    def _lease(pool: WorkerPool, member: Member, route: str) -> Placed:
        lease = member.lease(route)
        if lease is None:
            return errors.limit_exceeded(pool.config.queue_timeout)
        return lease


def _trial_member(plan: _Plan, exclude: Collection[Upstream]) -> Member | None:
    """With every member of the route's pools known down, and main not to
    take the request: one to try all the same rather than failing without
    trying (one request at a time each, until the next news of it), in the
    chain's order; None when each has a request trying it already."""
    for pool, _ in plan.steps:
        for member in pool.members:
            upstream = member.upstream
            if upstream not in exclude and upstream.try_while_down():
                return member
    return None


def may_look_up(token: bytes) -> bool:
    """Whether ``token`` may be sent to whoami: one with line breaks or
    spaces is not a token, and must not reach a request head."""
    return _LOOKUP_SAFE.match(token) is not None


def _key(
    policy: Policy, target: bytes, path: bytes, headers: HeaderFields, client_ip: str
) -> bytes | None:
    """The balancing key of a policy other than ``user``: None for round
    robin (and single)."""
    if policy is Policy.ROOM:
        return room_key(path) or target
    if policy is Policy.ORIGIN:
        return xmatrix_origin(headers.values(b"authorization")) or client_ip.encode()
    if policy is Policy.URI:
        return target
    if policy is Policy.SOURCE_IP:
        return client_ip.encode()
    return None


def _pick(
    pool: WorkerPool, policy: Policy, key: bytes | None, members: list[Member]
) -> Member:
    if len(members) == 1 or policy is Policy.SINGLE:
        return members[0]
    if key is None:
        return pool.next_round_robin(members)
    return pool.chooser.choose(key, members)


class Refused(Exception):
    """A placement decided after the headers: answer ``error``."""

    def __init__(self, error: MatrixError):
        super().__init__(error.msg)
        self.error = error


def _raise_errors(placed: Placed) -> Lease | Deferred[Lease]:
    if isinstance(placed, MatrixError):
        raise Refused(placed)
    return placed


def refused_error(failure: Failure) -> MatrixError | None:
    """The answer for a placement that failed; None if it was cancelled."""
    if failure.check(Refused):
        return failure.value.error  # type: ignore[union-attr]
    if failure.check(PoolFull):
        return errors.limit_exceeded(failure.value.retry_after)  # type: ignore[union-attr]
    return None


def make_dispatcher(
    config: WorkersConfig,
    reactor: IReactorTime,
    main: Upstream,
    upstream_for: Callable[[UpstreamAddress], Upstream],
) -> Dispatcher:
    """The worker pools of ``config`` and the table that routes to them.
    ``upstream_for`` gives each member its upstream, which the caller
    checks like main's."""
    pools = {}
    for name, pool in config.pools.items():
        members = [upstream_for(address) for address in pool.addresses]
        for member in members:
            # A process may serve several pools (one writer of two streams).
            member.pool = name if member.pool is None else f"{member.pool}, {name}"
        pools[name] = WorkerPool(name, pool, members, reactor)
    table = effective_table(shipped_table(), config.routes, pools)
    whoami = WhoamiCache(reactor, main, config.whoami_cache)
    return Dispatcher(table, pools, main, whoami)
