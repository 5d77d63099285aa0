"""An HTTP/2 request's header block, checked as RFC 9113 section 8 asks and
turned into the head of the one HTTP/1.1 request it becomes upstream.

The h2 library has already refused what makes a header block invalid at the
protocol level (upper-case names, pseudo-headers out of place or repeated,
connection-specific fields, a ``host`` that contradicts ``:authority``);
those close the connection. What is checked here is what decides how the
request is framed and forwarded; a request that fails gets an error on its
own stream, and nothing of it reaches the upstream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from matrix_edge import errors
from matrix_edge.errors import MatrixError

Header = tuple[bytes, bytes]

# RFC 9110 section 5.6.2: a method is a token.
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")

# RFC 9113 section 8.2.2: fields that only mean something on one HTTP/1.1
# connection. h2 refuses them too; checked again here because forwarding
# one would let the client speak to the upstream connection itself.
_CONNECTION_SPECIFIC = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    }
)


# RFC 9110 section 5.5: control characters other than HTAB do not belong in
# a field value (h2 itself refuses NUL, CR and LF).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


@attrs.frozen
class RequestHead:
    """A checked request head, ready to be forwarded as HTTP/1.1."""

    method: bytes
    target: bytes
    """``:path``, exactly as the client sent it."""

    headers: list[Header]
    """The regular fields in the client's order, ``host`` first (from
    ``:authority``), cookie crumbs joined into one ``cookie`` field."""

    content_length: int | None
    """The declared body length, 0 when the HEADERS frame ended the stream,
    None for a body of unannounced length."""


def parse_request_head(
    block: Sequence[Header], end_stream: bool
) -> RequestHead | MatrixError:
    """Check a request's header block, in the order the client sent it.

    ``end_stream`` is whether the HEADERS frame carried END_STREAM, that is,
    whether the request has no body.
    """
    method = target = authority = None
    host: bytes | None = None
    lengths: list[bytes] = []
    cookies: list[bytes] = []
    cookie_at = -1
    regular: list[Header] = []
    for name, value in block:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b":authority":
                authority = value
            elif name != b":scheme":
                return errors.bad_request("Unknown pseudo-header field")
            continue
        if name == b"content-length":
            lengths.append(value)
        elif name == b"host":
            host = value
        elif name == b"cookie":
            # RFC 9113 section 8.2.3: crumbs become one field for HTTP/1.1.
            if cookie_at < 0:
                cookie_at = len(regular)
                regular.append((name, b""))
            cookies.append(value)
        elif name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
            return errors.bad_request("Connection-specific header field in HTTP/2")
        elif name != b"te":
            if _CONTROL.search(value):
                return errors.bad_request("Control character in a header field value")
            regular.append((name, value))

    if method is None or not _TOKEN.match(method):
        return errors.bad_request("Malformed :method")
    if method == b"CONNECT":
        return MatrixError(405, "M_UNRECOGNIZED", "CONNECT is not supported")
    if not target:
        return errors.bad_request("Missing :path")
    if authority is not None and host is not None and host != authority:
        return errors.bad_request("Host and :authority disagree")
    if authority is None and host is None:
        return errors.bad_request("Missing :authority")
    if cookie_at >= 0:
        regular[cookie_at] = (b"cookie", b"; ".join(cookies))

    content_length = _content_length(lengths, end_stream)
    if isinstance(content_length, MatrixError):
        return content_length
    host_value = authority if authority is not None else host
    assert host_value is not None
    return RequestHead(
        method, target, [(b"host", host_value), *regular], content_length
    )


def _content_length(lengths: list[bytes], end_stream: bool) -> int | MatrixError | None:
    """The body length the request declares, where it agrees with how the
    stream is framed (RFC 9113 section 8.1.1)."""
    if not lengths:
        return 0 if end_stream else None
    if len(lengths) > 1:
        # A second field, even an equal one, is refused rather than guessed
        # at: the upstream must see exactly one framing.
        return errors.bad_request("More than one Content-Length")
    value = lengths[0]
    if not value.isdigit() or len(value) > 19:
        return errors.bad_request("Malformed Content-Length")
    length = int(value)
    if end_stream and length != 0:
        return errors.bad_request(
            "Content-Length announces a body the stream does not have"
        )
    return length
