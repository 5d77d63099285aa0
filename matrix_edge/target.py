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
# '.%2E', ... after a slash, and before a slash (raw, or encoded as '%2F':
# a server that decodes '%2F' before it resolves dot segments reads '..%2F'
# as '../') or the end of the path.
_DOT_SEGMENT = re.compile(rb"/(?:\.|%2e){1,2}(?=/|%2f|\Z)", re.IGNORECASE)
# The same for a target without '%', the usual case: raw dots only.
_RAW_DOT_SEGMENT = re.compile(rb"/\.{1,2}(?=/|\Z)")

# A percent sign not followed by two hex digits.
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")

# %00 to %1F and %7F: encoded control bytes. None belongs in a Matrix path;
# in the query only NUL is refused, since text parameters may carry newlines.
# One scan of the path's escapes finds those (group 1) and a dot segment
# after an encoded slash ('%2F..%2F', '%2f%2e%2e').
_PATH_ESCAPE = re.compile(
    rb"%(?:([01][0-9A-Fa-f]|7[Ff])|2[Ff](?:\.|%2[Ee]){1,2}(?=/|%2[Ff]|\Z))"
)
_ENCODED_NUL = re.compile(rb"%00")

_DOT_SEGMENT_FOUND = "The request path contains a dot segment"
_CONTROL_FOUND = "The request target contains an encoded control character"


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
    path, _, query = target.partition(b"?")
    # Bytes are tested as ints (0x25 '%', 0x2E '.'): several times faster
    # than as one-byte strings.
    if 0x25 not in target:
        # No escape to check: only raw dot segments can be there.
        if 0x2E in path and _RAW_DOT_SEGMENT.search(path):
            return _DOT_SEGMENT_FOUND
        return None
    if _DOT_SEGMENT.search(path):
        return _DOT_SEGMENT_FOUND
    if _BAD_ESCAPE.search(target):
        return "The request target contains a malformed percent-escape"
    escape = _PATH_ESCAPE.search(path)
    if escape is not None:
        return _DOT_SEGMENT_FOUND if escape.group(1) is None else _CONTROL_FOUND
    if query and _ENCODED_NUL.search(query):
        return _CONTROL_FOUND
    return None


# Where matrix-edge routes by the raw path: a path outside both as sent, but
# inside one as a normalising server reads it, is one of them in disguise.
MATRIX_NAMESPACES = (b"/_matrix", b"/_synapse")

# Runs of slashes, and backslashes, which some servers read as slashes.
_SLASH_RUN = re.compile(rb"[/\\]+")


def normalised_path(path: bytes) -> bytes:
    """``path`` as a server that normalises paths may read it: escapes
    decoded, backslashes read as slashes, runs of slashes merged, case
    ignored. For checks only: matrix-edge never forwards it."""
    if 0x25 in path:
        path = unquote_to_bytes(path)
    return _SLASH_RUN.sub(b"/", path).lower()


def disguised_matrix_path(path: bytes) -> bool:
    """Whether ``path``, which is outside ``/_matrix`` and ``/_synapse`` as
    sent, is inside one of them once normalised (``//_synapse/admin``,
    ``/%5fsynapse/admin``, ``/_synapse%2Fadmin``): a fallback web server
    that normalises would read it as that other path."""
    normal = normalised_path(path)
    return any(path_has_prefix(normal, prefix) for prefix in MATRIX_NAMESPACES)


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
