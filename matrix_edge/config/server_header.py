"""The ``server_header`` key: the ``Server`` header of the edge's own
answers."""

from __future__ import annotations

import re

from matrix_edge.config._base import KeyPath, fail

DEFAULT_SERVER_HEADER = "matrix-edge"

# A field value of visible ASCII, with single spaces or tabs inside: what
# every client parses, and nothing that could end the header line.
_FIELD_VALUE = re.compile(r"\A[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*\Z")


def parse_server_header(value: object, path: KeyPath) -> str | None:
    """The header's value, or None for no ``Server`` header at all (``false``
    or an empty string). Nothing is filled in: a version is sent only if
    the operator writes one."""
    if value is False or value == "":
        return None
    if not isinstance(value, str):
        fail(
            path,
            f"expected a header value such as 'matrix-edge', or false for "
            f"none, got {value!r}",
        )
    if len(value) > 256:
        fail(path, f"at most 256 characters, got {len(value)}")
    if not _FIELD_VALUE.match(value):
        fail(
            path,
            f"not a valid header value (printable ASCII, spaces only between "
            f"words): {value!r}",
        )
    return value
