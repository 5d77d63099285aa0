"""Routes to Synapse worker pools: the schema shared by the shipped table
and by ``workers.routes`` in the config."""

from __future__ import annotations

import enum
import re

import attrs

from matrix_edge.config._base import (
    KeyPath,
    fail,
    read_bool,
    read_mapping,
    read_sequence,
    read_str,
)

MAIN = "main"
"""The pool that is Synapse's main process, ``upstream``."""

POOL_NAME = re.compile(r"\A[a-z][a-z0-9_]*\Z")
_ROUTE_NAME = re.compile(r"\A[a-z0-9][a-z0-9-]*\Z")
_METHOD = re.compile(r"\A[A-Z]+\Z")
_GROUP_REFERENCE = re.compile(r"\(\?P[<=]|\\[1-9]|\(\?\(")


class Policy(enum.Enum):
    """How a request picks one member of a pool."""

    USER = "user"
    """The Matrix user behind the access token."""

    ROOM = "room"
    """The room ID or alias in the path."""

    ORIGIN = "origin"
    """The sending server of a federation request."""

    URI = "uri"
    """The whole request target."""

    SOURCE_IP = "source_ip"
    ROUND_ROBIN = "round_robin"

    SINGLE = "single"
    """A pool of exactly one process: stream writers, SSO."""


@attrs.frozen
class Route:
    """Requests matching ``patterns`` (and ``methods``, ``query``) go to the
    first of ``pools`` with a healthy member."""

    name: str
    pools: tuple[str, ...]
    policy: Policy
    patterns: tuple[re.Pattern[bytes], ...]
    methods: frozenset[bytes] | None = None
    """None: any method."""

    query: tuple[tuple[bytes, bytes | None], ...] = ()
    """Parameters that must be absent or empty (None), or have exactly this
    value."""

    sticky: bool = False
    """The policy is needed for correctness, not just efficiency: a pool's
    ``balance`` does not override it."""

    fallback: bool = True
    """When no pool has a healthy member, main takes the request."""


_ROUTE_KEYS = ("name", "pool", "policy", "patterns", "methods", "query")
_ROUTE_FLAGS = ("sticky", "fallback")


def parse_route(value: object, path: KeyPath) -> Route:
    data = read_mapping(value, path, _ROUTE_KEYS + _ROUTE_FLAGS)
    for required in ("name", "pool", "policy", "patterns"):
        if required not in data:
            fail((*path, required), "required")
    name = read_str(data["name"], (*path, "name"))
    if not _ROUTE_NAME.match(name):
        fail((*path, "name"), f"use lower case, digits and '-', got {name!r}")
    return Route(
        name=name,
        pools=_parse_pools(data["pool"], (*path, "pool")),
        policy=parse_policy(data["policy"], (*path, "policy")),
        patterns=_parse_patterns(data["patterns"], (*path, "patterns")),
        methods=_parse_methods(data.get("methods"), (*path, "methods")),
        query=_parse_query(data.get("query"), (*path, "query")),
        sticky=read_bool(data.get("sticky", False), (*path, "sticky")),
        fallback=read_bool(data.get("fallback", True), (*path, "fallback")),
    )


def parse_policy(value: object, path: KeyPath) -> Policy:
    text = read_str(value, path)
    try:
        return Policy(text)
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        fail(path, f"unknown policy {text!r} (expected one of: {choices})")


def parse_pool_name(value: object, path: KeyPath) -> str:
    name = read_str(value, path)
    if not POOL_NAME.match(name):
        fail(path, f"use lower case, digits and '_', got {name!r}")
    return name


def _parse_pools(value: object, path: KeyPath) -> tuple[str, ...]:
    if isinstance(value, str):
        return (parse_pool_name(value, path),)
    items = read_sequence(value, path)
    if not items:
        fail(path, "name at least one pool")
    return tuple(parse_pool_name(item, (*path, i)) for i, item in enumerate(items))


def _parse_patterns(value: object, path: KeyPath) -> tuple[re.Pattern[bytes], ...]:
    items = read_sequence(value, path)
    if not items:
        fail(path, "give at least one pattern")
    patterns = []
    for i, item in enumerate(items):
        text = read_str(item, (*path, i))
        if _GROUP_REFERENCE.search(text):
            # Patterns are joined into one expression, which renumbers groups.
            fail((*path, i), "named groups and back-references are not supported")
        try:
            patterns.append(re.compile(text.encode("utf-8")))
        except re.error as e:
            fail((*path, i), f"not a valid regular expression: {e}")
        try:
            # Joined, each pattern is a group, where global flags are errors.
            re.compile(b"(?:%s)" % text.encode("utf-8"))
        except re.error:
            fail(
                (*path, i),
                "global flags are not supported: use a scoped flag, such as (?i:...)",
            )
    return tuple(patterns)


def _parse_methods(value: object, path: KeyPath) -> frozenset[bytes] | None:
    if value is None:
        return None
    items = read_sequence(value, path)
    methods = set()
    for i, item in enumerate(items):
        method = read_str(item, (*path, i))
        if not _METHOD.match(method):
            fail((*path, i), f"expected a method such as GET, got {method!r}")
        methods.add(method.encode("ascii"))
    if not methods:
        fail(path, "list at least one method, or leave the key out")
    return frozenset(methods)


def _parse_query(
    value: object, path: KeyPath
) -> tuple[tuple[bytes, bytes | None], ...]:
    data = read_mapping(value, path)
    conditions = []
    for name, expected in data.items():
        if expected is not None and not isinstance(expected, str):
            fail(
                (*path, name),
                "expected a string to match, or null for an absent parameter",
            )
        conditions.append(
            (name.encode("utf-8"), None if expected is None else expected.encode())
        )
    return tuple(conditions)
