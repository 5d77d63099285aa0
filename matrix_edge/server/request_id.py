"""Request IDs that join the edge's log lines to Synapse's.

Synapse takes its request ID from a header when its listener sets
``request_id_header``; the edge sends one on every forwarded request and
returns it to the client, so a user's report can be traced through both.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence

# What an ID taken from a trusted proxy may look like: short, and safe to
# put in a log line and a header.
_ACCEPTABLE = re.compile(rb"\A[A-Za-z0-9._:/+=-]{1,128}\Z")


# IDs need to be unique, not secret: a generator seeded from the system's
# randomness costs a fraction of a system call per request. Each process
# the edge forks gets a seed of its own.
_random = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(16)))


def new_request_id() -> str:
    return f"{_random.getrandbits(64):016x}"


def request_id_for(values: Sequence[bytes] | None, trusted: bool) -> str:
    """The ID of a request: the one a trusted proxy in front sent, if it is
    well formed, or a new one. Clients cannot choose their own."""
    if trusted and values and len(values) == 1 and _ACCEPTABLE.match(values[0]):
        return values[0].decode("ascii")
    return new_request_id()
