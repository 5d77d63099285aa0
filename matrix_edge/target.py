"""Checks on the raw request target, made before any routing decision.

matrix-edge forwards the target exactly as the client sent it, since
federation signatures cover those bytes. Anything a normalising proxy would
have to rewrite is refused instead.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

# Origin-form only: a slash, then visible ASCII. No spaces, controls, DEL,
# non-ASCII bytes or '#', which never belong in a request target.
_ORIGIN_FORM = re.compile(rb"\A/[\x21-\x22\x24-\x7e]*\Z")

# A dot segment, raw or percent-encoded in any case mix: '.', '..', '%2e',
# '.%2E', ... between slashes or at the end of the path.
_DOT_SEGMENT = re.compile(rb"/(?:\.|%2e){1,2}(?=/|\Z)", re.IGNORECASE)

# A percent sign not followed by two hex digits.
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")

# %00 to %1F and %7F: encoded control bytes. None belongs in a Matrix path;
# in the query only NUL is refused, since text parameters may carry newlines.
_ENCODED_CONTROL = re.compile(rb"%(?:[01][0-9A-Fa-f]|7[Ff])")
_ENCODED_NUL = re.compile(rb"%00")


def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """Split a target into its path and its query (None when there is no
    ``?``; an empty query is ``b""``)."""
    path, sep, query = target.partition(b"?")
    return path, (query if sep else None)


def check_target(method: bytes, target: bytes) -> str | None:
    """Return why ``target`` must be refused, or None when it may be
    forwarded as it is."""
    if method == b"CONNECT":
        return "CONNECT is not supported"
    if not target.startswith(b"/"):
        if b"://" in target:
            return "Absolute-form request targets are not accepted"
        return "The request target must start with '/'"
    if not _ORIGIN_FORM.match(target):
        return "The request target contains characters that are not allowed"
    path, query = split_target(target)
    if _DOT_SEGMENT.search(path):
        return "The request path contains a dot segment"
    if _BAD_ESCAPE.search(target):
        return "The request target contains a malformed percent-escape"
    if _ENCODED_CONTROL.search(path) or (query and _ENCODED_NUL.search(query)):
        return "The request target contains an encoded control character"
    return None


def path_has_prefix(path: bytes, prefix: bytes) -> bool:
    """True when ``path`` is ``prefix`` or lies below it (``/_matrix`` matches
    ``/_matrix/client`` but not ``/_matrixfoo``)."""
    return path == prefix or path.startswith(prefix + b"/")


def decode_query_component(raw: bytes) -> bytes:
    """A raw query parameter name or value as a server reads it: ``+`` a
    space, ``%xx`` a byte."""
    if b"%" not in raw and b"+" not in raw:
        return raw
    return unquote_to_bytes(raw.replace(b"+", b" "))


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """The first value of each parameter of a raw query string, decoded."""
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        params.setdefault(decode_query_component(name), decode_query_component(value))
    return params
