"""The Matrix concepts requests are balanced by, read from raw requests.

Nothing here is verified: Synapse checks tokens and signatures. A forged
value can only choose which worker does that checking.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from matrix_edge.server.fields import HeaderFields
from matrix_edge.target import parse_query

# The path segment naming a room (or a room alias, or a user for profiles).
_ROOM_SEGMENT = re.compile(rb"/(?:rooms|join|knock|profile)/([^/?]+)")
_BEARER = re.compile(rb"\A\s*Bearer\s+(\S+)\s*\Z", re.IGNORECASE)
_X_MATRIX = re.compile(rb"\A\s*X-Matrix\s+", re.IGNORECASE)
# Parameter names are case-insensitive (RFC 7235), as Synapse reads them.
_ORIGIN = re.compile(
    rb'(?:\A|,)\s*origin\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))', re.IGNORECASE
)
_QUOTED_PAIR = re.compile(rb"\\(.)")


def access_token(headers: HeaderFields, query: bytes) -> bytes | None:
    """The request's access token, from ``Authorization: Bearer`` or the
    legacy ``access_token`` query parameter."""
    for value in headers.values(b"authorization") or ():
        m = _BEARER.match(value)
        if m:
            return m.group(1)
    if query:
        # Parsed, not searched: the name may be escaped (`access%5Ftoken`),
        # and Synapse would still read it.
        token = parse_query(query).get(b"access_token")
        if token:
            return token
    return None


def room_key(path: bytes) -> bytes | None:
    """The room ID or alias in a raw path, the same escaped or not."""
    m = _ROOM_SEGMENT.search(path)
    if m is None:
        return None
    return unquote_to_bytes(m.group(1))


def xmatrix_origin(authorization: Sequence[bytes] | None) -> bytes | None:
    """The ``origin`` server name of an ``Authorization: X-Matrix`` header,
    given the header's values: the server that signed a federation
    request. The signature itself is never kept."""
    for value in authorization or ():
        prefix = _X_MATRIX.match(value)
        if prefix is None:
            continue
        m = _ORIGIN.search(value[prefix.end() :])
        if m is not None:
            origin = m.group(1) if m.group(1) is not None else m.group(2)
            if origin:
                if b"\\" not in origin:
                    return origin
                return _QUOTED_PAIR.sub(rb"\1", origin)
    return None
