"""Rendezvous (highest random weight) hashing.

Every member gets a score from a hash of the key and its name; the highest
score wins. Any process with the same members picks the same one with no
shared state, and a member that leaves moves only the keys it held.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b
from typing import TypeVar

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
