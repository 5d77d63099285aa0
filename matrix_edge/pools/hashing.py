"""Rendezvous (highest random weight) hashing.

Every member gets a score from a hash of the key and its name; the highest
score wins. Any process with the same members picks the same one with no
shared state, and a member that leaves moves only the keys it held.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b
from typing import Generic, TypeVar

T = TypeVar("T")


def score(key: bytes, member: bytes) -> int:
    # blake2b rather than hash(): Python salts str and bytes hashes per
    # process, and every edge replica must agree.
    digest = blake2b(member + b"\0" + key, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose(key: bytes, members: Sequence[tuple[bytes, T]]) -> T:
    """The member, among ``(name, member)`` pairs, that ``key`` goes to."""
    if not members:
        raise ValueError("no members to choose from")
    best = members[0]
    best_score = score(key, best[0])
    for candidate in members[1:]:
        candidate_score = score(key, candidate[0])
        if candidate_score > best_score:
            best, best_score = candidate, candidate_score
    return best[1]


class Chooser(Generic[T]):
    """``choose`` over a fixed list of members, for the request path: each
    name's prefix is built once, scores are compared as the big-endian
    digests they are, and the choice among all the members is remembered
    for recent keys (a subset, such as the members up, is scored afresh).
    It picks what ``choose`` picks, ties included: the first best."""

    __slots__ = ("_all", "_cache", "_prefixes")

    CACHE_SIZE = 1024
    """Keys remembered; the cache is emptied when it holds more."""

    MAX_CACHED_KEY = 256
    """Longer keys (whole URIs) are scored, never kept."""

    def __init__(self, members: Sequence[tuple[bytes, T]]):
        self._all = [m for _, m in members]
        self._prefixes = {id(m): name + b"\0" for name, m in members}
        self._cache: dict[bytes, T] = {}

    def choose(self, key: bytes, members: Sequence[T]) -> T:
        """The one of ``members`` (all given at creation, or some of them
        in the same order) that ``key`` goes to."""
        whole = len(members) == len(self._all)
        if whole:
            chosen = self._cache.get(key)
            if chosen is not None:
                return chosen
        prefixes = self._prefixes
        best = members[0]
        best_score = blake2b(prefixes[id(best)] + key, digest_size=8).digest()
        for candidate in members[1:]:
            candidate_score = blake2b(
                prefixes[id(candidate)] + key, digest_size=8
            ).digest()
            if candidate_score > best_score:
                best, best_score = candidate, candidate_score
        if whole and len(key) <= self.MAX_CACHED_KEY:
            cache = self._cache
            if len(cache) >= self.CACHE_SIZE:
                cache.clear()
            cache[key] = best
        return best
