"""Which Matrix user an access token belongs to, asked of Synapse and
remembered for a while.

Syncs are balanced by user, and tokens are opaque: those of Matrix
Authentication Service carry no user ID, and a user's devices each have
their own token. ``/account/whoami`` answers for any of them. Tokens are
kept only as digests, and never logged.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from hashlib import blake2b

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge.config.workers import WhoamiCacheConfig
from matrix_edge.upstream.client import Upstream, UpstreamExchange, describe_failure
from matrix_edge.upstream.protocol import HeaderList

log = Logger()

WHOAMI_PATH = b"/_matrix/client/v3/account/whoami"
LOOKUP_TIMEOUT = 5.0
MAX_ANSWER = 64 * 1024

# How long a token Synapse does not know stays known as such: not long, as
# the answer costs Synapse little and a token may be in the middle of being
# issued. A lookup that failed (no answer, an error) is not retried for as
# long either, so that a struggling Synapse is not asked again per request.
UNKNOWN_TOKEN_TTL = 30.0
FAILED_LOOKUP_TTL = 10.0

# Lookups in flight at once; beyond this, requests balance by the token.
MAX_LOOKUPS = 256


def token_digest(token: bytes) -> bytes:
    return blake2b(token, digest_size=16, person=b"matrix-edge-tok").digest()


class WhoamiCache:
    """A bounded, expiring map of token digest to user ID, filled by
    asking Synapse; concurrent lookups of one token share one request."""

    def __init__(
        self, clock: IReactorTime, upstream: Upstream, config: WhoamiCacheConfig
    ):
        self._clock = clock
        self._upstream = upstream
        self._size = config.size
        self._ttl = config.ttl
        self._entries: OrderedDict[bytes, tuple[bytes | None, float]] = OrderedDict()
        self._waiting: dict[bytes, list[Deferred[bytes | None]]] = {}
        self.hits = 0
        self.misses = 0
        """Answers of L{cached}, for metrics."""

    def cached(self, digest: bytes) -> tuple[bool, bytes | None]:
        """(known, user ID) for a token digest, without asking Synapse."""
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return False, None
        user, expires = entry
        if self._clock.seconds() >= expires:
            del self._entries[digest]
            self.misses += 1
            return False, None
        self._entries.move_to_end(digest)
        self.hits += 1
        return True, user

    def lookup(
        self,
        token: bytes,
        digest: bytes,
        forwarded_for: bytes,
        forwarded_proto: bytes = b"https",
    ) -> Deferred[bytes | None]:
        """The user ID for ``token``: None if Synapse does not know it or
        cannot say. The forwarded headers are the client's, as on the
        request that needs the answer, so that Synapse records the user's
        real address and has nothing to warn about."""
        d: Deferred[bytes | None] = Deferred()
        waiting = self._waiting.get(digest)
        if waiting is not None:
            waiting.append(d)
            return d
        self._waiting[digest] = [d]
        answer = _WhoamiAnswer()
        headers = [
            (b"Host", b"localhost"),
            (b"Authorization", b"Bearer " + token),
            (b"X-Forwarded-For", forwarded_for),
            (b"X-Forwarded-Proto", forwarded_proto),
            (b"User-Agent", b"matrix-edge"),
        ]
        exchange = self._upstream.request(b"GET", WHOAMI_PATH, headers, None, answer)
        timer = self._clock.callLater(LOOKUP_TIMEOUT, answer.time_out, exchange)
        answer.done.addCallback(self._answered, digest, timer)
        return d

    @property
    def busy(self) -> bool:
        """Whether as many lookups as allowed are in flight."""
        return len(self._waiting) >= MAX_LOOKUPS

    def _answered(
        self,
        outcome: tuple[int, bytes | None, str],
        digest: bytes,
        timer: IDelayedCall,
    ) -> None:
        if timer.active():
            timer.cancel()
        code, user, reason = outcome
        if user is not None:
            self._store(digest, user, self._ttl)
        elif code in (401, 403):
            self._store(digest, None, min(self._ttl, UNKNOWN_TOKEN_TTL))
        else:
            self._store(digest, None, min(self._ttl, FAILED_LOOKUP_TTL))
            log.info(
                "Could not look up a token's user ({reason}); balancing "
                "by the token instead",
                reason=reason,
            )
        for d in self._waiting.pop(digest, ()):
            d.callback(user)

    def _store(self, digest: bytes, user: bytes | None, ttl: float) -> None:
        self._entries[digest] = (user, self._clock.seconds() + ttl)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class _WhoamiAnswer:
    """Hears the whoami exchange; ``done`` fires with (status, user ID or
    None, reason)."""

    def __init__(self) -> None:
        self.done: Deferred[tuple[int, bytes | None, str]] = Deferred()
        self._code = 0
        self._body: list[bytes] = []
        self._size = 0

    def response_head(
        self, code: int, phrase: bytes, headers: HeaderList, length: int | None
    ) -> None:
        self._code = code

    def response_data(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= MAX_ANSWER:
            self._body.append(data)

    def response_flush(self) -> None:
        pass

    def response_end(self, complete: bool, reason: str) -> None:
        if not complete or self._size > MAX_ANSWER:
            self._settle(None, f"answer broken off or too large: {reason}")
        elif self._code != 200:
            self._settle(None, f"whoami answered {self._code}")
        else:
            self._settle(_user_id(b"".join(self._body)), "whoami gave no user_id")

    def upstream_failed(self, reason: Failure, timed_out: bool = False) -> None:
        self._settle(None, describe_failure(reason))

    def time_out(self, exchange: UpstreamExchange) -> None:
        exchange.cancel()
        self._settle(None, f"no answer in {LOOKUP_TIMEOUT:g}s")

    def _settle(self, user: bytes | None, reason: str) -> None:
        if not self.done.called:
            self.done.callback((self._code, user, reason))


def _user_id(body: bytes) -> bytes | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    user = document.get("user_id") if isinstance(document, dict) else None
    if isinstance(user, str) and user.startswith("@"):
        return user.encode("utf-8")
    return None
