"""Which configuration keys differ between two loads of the file."""

from __future__ import annotations

from typing import Any

import attrs

from matrix_edge.config.upstream import UpstreamAddress

# Values parsed from one string of the file (an upstream URL): named whole.
_SCALARS = (UpstreamAddress,)


def changed_keys(old: object, new: object, path: str = "") -> list[str]:
    """The keys whose values differ between ``old`` and ``new`` (two
    configurations, or parts of them), as dotted paths in the file's terms:
    ``upstream``, ``listeners[0].port``, ``timeouts.drain``. A list that
    grew or shrank is named whole."""
    if old == new:
        return []
    if (
        attrs.has(type(old))
        and type(old) is type(new)
        and not isinstance(old, _SCALARS)
    ):
        kind: Any = type(old)
        found = []
        for field in attrs.fields(kind):
            if field.eq:
                key = f"{path}.{field.name}" if path else field.name
                found += changed_keys(
                    getattr(old, field.name), getattr(new, field.name), key
                )
        return found or [path]
    if isinstance(old, tuple) and isinstance(new, tuple) and len(old) == len(new):
        found = []
        for index, (before, after) in enumerate(zip(old, new, strict=True)):
            found += changed_keys(before, after, f"{path}[{index}]")
        return found or [path]
    return [path]
