"""The routing table: which pool each request goes to, first match wins.

The shipped table (``synapse_routes.yaml``) holds the patterns of Synapse's
``docs/workers.md`` for one release, as data; the config may replace its
routes by name or add routes before it. Patterns run on the raw path, so
an escaped room ID routes like the one Synapse will see.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence
from importlib import resources

import attrs
import yaml

from matrix_edge.config._base import read_mapping, read_sequence, read_str
from matrix_edge.config.routes import MAIN, Route, parse_route
from matrix_edge.target import decode_query_component

SHIPPED_TABLE = "synapse_routes.yaml"


@attrs.frozen
class RouteTable:
    routes: tuple[Route, ...]
    synapse_release: str
    _any: re.Pattern[bytes] = attrs.field(init=False, repr=False)
    _each: tuple[re.Pattern[bytes], ...] = attrs.field(init=False, repr=False)
    _takes_all: tuple[bool, ...] = attrs.field(init=False, repr=False, eq=False)
    _query_names: frozenset[bytes] = attrs.field(init=False, repr=False, eq=False)
    _conditions: tuple[tuple[_Condition, ...], ...] = attrs.field(
        init=False, repr=False, eq=False
    )
    _after: dict[int, re.Pattern[bytes]] = attrs.field(init=False, repr=False, eq=False)
    _memo: dict[int, dict[bytes, int | None]] = attrs.field(
        init=False, repr=False, eq=False
    )

    MEMO_SIZE = 1024
    """Paths whose match is remembered, per expression; the memo is
    emptied when it holds more."""

    MAX_MEMO_PATH = 256
    """Longer paths are matched, never remembered."""

    def __attrs_post_init__(self) -> None:
        # Every route in one regular expression, a named group per route in
        # table order: one match() finds the first route whose path matches
        # (measured: 2 to 6 us, against 6 to 11 for a search per route).
        # Alternatives are tried in order, each to its end, so this is
        # first-match; unanchored patterns get a lazy prefix so that match()
        # finds them anywhere, as search() does.
        each = tuple(
            re.compile(b"|".join(_searching(p) for p in route.patterns))
            for route in self.routes
        )
        object.__setattr__(self, "_each", each)
        object.__setattr__(self, "_any", _joined(each, 0))
        # Routes that take every request their patterns match.
        plain = tuple(
            route.methods is None and not route.query for route in self.routes
        )
        object.__setattr__(self, "_takes_all", plain)
        names = frozenset(name for route in self.routes for name, _ in route.query)
        object.__setattr__(self, "_query_names", names)
        conditions = tuple(
            tuple(_Condition(name, expected) for name, expected in route.query)
            for route in self.routes
        )
        object.__setattr__(self, "_conditions", conditions)
        # For a route that may refuse its path match (for the method or the
        # query), the routes after it joined the same way: one more match()
        # finds the next candidate. _after[-1] is the whole table.
        after = {-1: self._any}
        for i, takes_all in enumerate(plain):
            if not takes_all:
                after[i] = _joined(each, i + 1)
        object.__setattr__(self, "_after", after)
        # The outcome of each expression for recent paths: the same paths
        # come again and again (/sync, /versions, a room's /messages), and
        # one that matches no route, or a route late in the table, costs
        # the expression a try of each of the table's patterns.
        object.__setattr__(self, "_memo", {i: {} for i in after})

    def match(self, method: bytes, path: bytes, query: bytes) -> Route | None:
        """The first route for this request, or None for main.

        ``path`` and ``query`` are the raw parts of the request target.
        """
        i = self.match_index(method, path, query)
        return None if i is None else self.routes[i]

    def match_index(self, method: bytes, path: bytes, query: bytes) -> int | None:
        """The index in ``routes`` of ``match``'s route, or None."""
        i = self._next(-1, path)
        params: dict[bytes, bytes] | None = None
        bounded: bytes | None = None
        while i is not None:
            if self._takes_all[i]:
                return i
            route = self.routes[i]
            # The first path match may be refused for its method or query;
            # the next route whose path matches is then tried.
            if route.methods is None or method in route.methods:
                if not route.query:
                    return i
                if bounded is None:
                    bounded = b"&" + query + b"&"
                    if b"%" in query or b"+" in query:
                        params = _query_values(query, self._query_names)
                for condition in self._conditions[i]:
                    if params is None:
                        # No escapes: the parameter is found as it is.
                        value = condition.value_in(bounded)
                    else:
                        value = params.get(condition.name)
                    if not _holds(value, condition.expected):
                        break
                else:
                    return i
            i = self._next(i, path)
        return None

    def _next(self, after: int, path: bytes) -> int | None:
        """The first route after the one at ``after`` whose patterns match
        ``path``."""
        memo = self._memo[after]
        i = memo.get(path, _UNKNOWN)
        if i is not _UNKNOWN:
            return i  # type: ignore[return-value]
        found = self._after[after].match(path)
        group = None if found is None else found.lastgroup
        i = None if group is None else int(group[1:])
        if len(path) <= self.MAX_MEMO_PATH:
            if len(memo) >= self.MEMO_SIZE:
                memo.clear()
            memo[path] = i
        return i


_UNKNOWN = object()

# What a parameter name must not hold to be found as it is in a query with
# no escapes: the separators, and what only an escape can give.
_NOT_PLAIN = re.compile(rb"[&=+%\s]")


class _Condition:
    """One parameter a route's ``query`` asks for, ready to be looked for
    in a query with no ``%`` or ``+``."""

    __slots__ = ("bare", "expected", "name", "with_value")

    def __init__(self, name: bytes, expected: bytes | None):
        self.name = name
        self.expected = expected
        # None: a name that such a query cannot hold.
        plain = not _NOT_PLAIN.search(name)
        self.with_value = b"&" + name + b"=" if plain else None
        self.bare = b"&" + name + b"&"

    def value_in(self, bounded: bytes) -> bytes | None:
        """``parse_query(query).get(name)``, for a query with no ``%`` or
        ``+``, given as ``b"&" + query + b"&"``."""
        with_value = self.with_value
        if with_value is None:
            return None
        at = bounded.find(with_value)
        bare = bounded.find(self.bare)
        if at < 0:
            return None if bare < 0 else b""
        if 0 <= bare < at:
            return b""
        start = at + len(with_value)
        return bounded[start : bounded.index(b"&", start)]


def _query_values(query: bytes, names: frozenset[bytes]) -> dict[bytes, bytes]:
    """``parse_query(query)``, for the parameters in ``names`` only."""
    if not names:
        return {}
    if b"%" not in query and b"+" not in query:
        # Only an escape could spell a name that is not there as it is.
        for name in names:
            if name in query:
                break
        else:
            return {}
    values: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        raw, _, value = part.partition(b"=")
        name = decode_query_component(raw)
        if name in names and name not in values:
            values[name] = decode_query_component(value)
    return values


def _joined(each: Sequence[re.Pattern[bytes]], start: int) -> re.Pattern[bytes]:
    """The patterns of ``each`` from ``start`` on as one expression, a group
    ``r<index>`` per route."""
    joined = b"|".join(
        b"(?P<r%d>%s)" % (i, each[i].pattern) for i in range(start, len(each))
    )
    return re.compile(joined or b"(?!)")


def _searching(pattern: re.Pattern[bytes]) -> bytes:
    """``pattern`` as an alternative that match() finds where search()
    would: as it is when anchored at the start, else after ``.*?``."""
    source = pattern.pattern
    if source.startswith(b"^") and not _top_level_alternation(source):
        return b"(?:%s)" % source
    return b"(?s:.*?)(?:%s)" % source


def _top_level_alternation(source: bytes) -> bool:
    depth = 0
    in_class = False
    escaped = False
    for byte in source:
        char = chr(byte)
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return True
    return False


def _holds(value: bytes | None, expected: bytes | None) -> bool:
    # An empty value counts as absent, as in the nginx map of workers.md
    # (``map $arg_since $sync { '' synapse_initial_sync; }``).
    if expected is None:
        return not value
    return value == expected


@functools.cache
def shipped_table() -> RouteTable:
    """The table that ships with matrix-edge, every route of it."""
    text = resources.files(__package__).joinpath(SHIPPED_TABLE).read_text("utf-8")
    data = read_mapping(
        yaml.safe_load(text), (SHIPPED_TABLE,), ("synapse_release", "routes")
    )
    release = read_str(data.get("synapse_release"), (SHIPPED_TABLE, "synapse_release"))
    routes = tuple(
        parse_route(entry, (SHIPPED_TABLE, "routes", i))
        for i, entry in enumerate(
            read_sequence(data.get("routes"), (SHIPPED_TABLE, "routes"))
        )
    )
    return RouteTable(routes, release)


def effective_table(
    shipped: RouteTable, extra: Sequence[Route], pools: Collection[str]
) -> RouteTable:
    """The table a deployment runs: ``extra`` routes replace shipped ones of
    the same name, or come first; shipped routes to pools that are not
    configured are left out, and so are such pools from a route's list."""
    replacements = {route.name: route for route in extra}
    added = [route for route in extra if route.name not in shipped_names(shipped)]
    merged = added + [replacements.get(r.name, r) for r in shipped.routes]
    routes = []
    for route in merged:
        configured = tuple(p for p in route.pools if p == MAIN or p in pools)
        if configured:
            routes.append(attrs.evolve(route, pools=configured))
    return RouteTable(tuple(routes), shipped.synapse_release)


def shipped_names(table: RouteTable) -> frozenset[str]:
    return frozenset(route.name for route in table.routes)
