"""A pool of Synapse worker processes of one role: which members are
healthy, and how many requests each may have in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from matrix_edge.config.workers import PoolConfig
from matrix_edge.pools.hashing import Chooser
from matrix_edge.upstream.client import Upstream


class PoolFull(Exception):
    """A queued request waited for a slot longer than the pool allows."""

    def __init__(self, retry_after: float):
        super().__init__(f"no slot within {retry_after:g}s")
        self.retry_after = retry_after


class Lease:
    """The right to send one request to ``upstream``; released when the
    exchange is over, so the next request may take the slot."""

    __slots__ = ("_member", "pool", "route", "upstream")

    def __init__(
        self,
        upstream: Upstream,
        pool: str,
        member: Member | None = None,
        route: str | None = None,
    ) -> None:
        self.upstream = upstream
        self.pool = pool
        self._member = member
        self.route = pool if route is None else route
        """The route of the table that placed the request (its name), or,
        for a request no route took, the pool: ``main``, ``fallback``."""

    def release(self) -> None:
        member, self._member = self._member, None
        if member is not None:
            member.release()


class Member:
    """One worker process of a pool."""

    def __init__(self, pool: WorkerPool, upstream: Upstream):
        self.pool = pool
        self.upstream = upstream
        self.name = str(upstream.address).encode("utf-8")
        """What rendezvous hashing scores: the configured address."""

        self.in_flight = 0
        self.waiting: deque[_Waiter] = deque()

    @property
    def available(self) -> bool:
        return not self.upstream.known_down

    def release(self) -> None:
        self.in_flight -= 1
        while self.waiting:
            waiter = self.waiting.popleft()
            self.pool.queued -= 1
            if waiter.take():
                self.in_flight += 1
                waiter.deferred.callback(
                    Lease(self.upstream, self.pool.name, self, waiter.route)
                )
                return

    def lease(self, route: str | None = None) -> Lease | Deferred[Lease] | None:
        """A lease now, one once a slot frees up, or None when the pool can
        queue no more requests. ``route`` names what placed the request."""
        limit = self.pool.config.max_concurrent
        if not limit or self.in_flight < limit:
            self.in_flight += 1
            return Lease(self.upstream, self.pool.name, self, route)
        return self.pool.enqueue(self, route)


class _Waiter:
    def __init__(self, member: Member, route: str | None):
        self.member = member
        self.route = route
        self.timer: IDelayedCall | None = None
        self.deferred: Deferred[Lease] = Deferred(self._cancel)
        self.done = False

    def take(self) -> bool:
        if self.done:
            return False
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        return True

    def expire(self) -> None:
        if self.take():
            self._leave()
            self.deferred.errback(PoolFull(self.member.pool.config.queue_timeout))

    def _cancel(self, d: Deferred[Lease]) -> None:
        if self.take():
            self._leave()

    def _leave(self) -> None:
        try:
            self.member.waiting.remove(self)
        except ValueError:
            return
        self.member.pool.queued -= 1


class WorkerPool:
    """The members of one pool, in configured order."""

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        upstreams: Sequence[Upstream],
        clock: IReactorTime,
    ):
        self.name = name
        self.config = config
        self.members = [Member(self, upstream) for upstream in upstreams]
        self.chooser = Chooser([(m.name, m) for m in self.members])
        """Rendezvous hashing over the members, by their names."""

        self.queued = 0
        self._clock = clock
        self._next = 0

    def available(self, exclude: Collection[Upstream] = ()) -> list[Member]:
        """The members not known to be down, nor excluded, in order: when
        that is all of them, ``members`` itself, which is not to be
        changed."""
        members = self.members
        if exclude:
            return [m for m in members if m.available and m.upstream not in exclude]
        for member in members:
            if member.upstream.known_down:
                return [m for m in members if not m.upstream.known_down]
        return members

    def next_round_robin(self, members: Sequence[Member]) -> Member:
        self._next = (self._next + 1) % (1 << 30)
        return members[self._next % len(members)]

    def enqueue(
        self, member: Member, route: str | None = None
    ) -> Deferred[Lease] | None:
        if self.queued >= self.config.queue:
            return None
        waiter = _Waiter(member, route)
        waiter.timer = self._clock.callLater(self.config.queue_timeout, waiter.expire)
        member.waiting.append(waiter)
        self.queued += 1
        return waiter.deferred
