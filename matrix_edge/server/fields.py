"""A request's header fields as the client sent them."""

from __future__ import annotations

from collections.abc import Iterable

Field = tuple[bytes, bytes]


class HeaderFields:
    """The fields of one request head, in order, names as sent.

    Looked up a handful of times per request (``host``, ``authorization``,
    ``x-forwarded-for``, ``user-agent``), so a list scanned on demand costs
    less than building a mapping for every request. Names given to the
    lookups are lower case.
    """

    __slots__ = ("_lower", "pairs")

    def __init__(self, pairs: list[Field], lower: list[bytes] | None = None):
        self.pairs = pairs
        """(name, value) in the client's order, names in the client's case."""
        self._lower = lower if lower is not None else [n.lower() for n, _ in pairs]

    def values(self, name: bytes) -> list[bytes]:
        """Every value of the field ``name`` (lower case), in order."""
        lower = self._lower
        count = lower.count(name)
        if count == 0:
            return []
        pairs = self.pairs
        if count == 1:
            return [pairs[lower.index(name)][1]]
        return [pairs[i][1] for i, n in enumerate(lower) if n == name]

    def first(self, name: bytes) -> bytes | None:
        """The first value of ``name`` (lower case), or None."""
        lower = self._lower
        if name not in lower:
            return None
        return self.pairs[lower.index(name)][1]

    def __contains__(self, name: bytes) -> bool:
        return name in self._lower

    def add(self, name: bytes, value: bytes) -> None:
        self.pairs.append((name, value))
        self._lower.append(name.lower())

    def lowered(self) -> Iterable[tuple[bytes, Field]]:
        """(lower-case name, (name, value)) for each field, in order."""
        return zip(self._lower, self.pairs, strict=False)

    def __repr__(self) -> str:
        return f"HeaderFields({self.pairs!r})"
