"""Which headers cross the proxy, in each direction, and the ones it sets."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from matrix_edge.config.proxies import IPNetwork
from matrix_edge.server.fields import HeaderFields

# RFC 9110 section 7.6.1 connection-specific fields, plus the de-facto ones.
# Transfer-Encoding and Content-Length are framing: the upstream client and
# the client channel each frame the body themselves.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)

# Set by the edge from what it saw; never passed on from an untrusted client.
FORWARDING_HEADERS = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"forwarded",
    }
)

# The edge answers "Expect: 100-continue" itself and the body is streamed at
# once, so Synapse must not wait to send a second 100.
_REQUEST_DROPPED = FORWARDING_HEADERS | {b"expect"}


# Fields that a client's ``Connection`` header may name but never removes
# from the request sent upstream. Host goes to Synapse byte for byte, as the
# client sent it: it is end-to-end, and Synapse reads the server name from
# it. The fields the edge sets (X-Forwarded-*, the request ID) are added
# after the client's are filtered, and the body's framing is the upstream
# client's own, so no token reaches those either.
_NOT_CONNECTION_SPECIFIC = frozenset({b"host"})

# Connection values nearly every message carries, which name no header
# beyond the hop-by-hop ones that are dropped anyway.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def connection_tokens(values: Sequence[bytes] | None) -> frozenset[bytes]:
    """The lower-cased header names listed in ``Connection`` values."""
    if not values or (len(values) == 1 and values[0] in _PLAIN_CONNECTION):
        return frozenset()
    return frozenset(
        token.strip().lower()
        for value in values
        for token in value.split(b",")
        if token.strip()
    )


def filter_headers(
    headers: Iterable[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """Copy ``headers`` (name, value pairs) without hop-by-hop ones, those
    named in their own ``Connection`` header, and the lower-cased names in
    ``drop``.

    Every value of a repeated header is kept, in order.
    """
    removed = HOP_BY_HOP | drop
    kept = []
    listed: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower not in removed:
            kept.append((lower, name, value))
        elif lower == b"connection":
            listed.append(value)
    if listed:
        extra = connection_tokens(listed)
        return [(name, value) for lower, name, value in kept if lower not in extra]
    return [(name, value) for _, name, value in kept]


def upstream_request_headers(
    client_headers: HeaderFields,
    forwarded_for: bytes,
    forwarded_proto: bytes,
    request_id: tuple[bytes, bytes] | None = None,
) -> list[tuple[bytes, bytes]]:
    """The headers sent to Synapse for a client request.

    ``X-Forwarded-For`` is replaced, not appended to: Synapse believes the
    first address in it, so a client-sent value would otherwise win. The
    request ID header, when given as (name, value), replaces the client's.
    """
    removed = HOP_BY_HOP | _REQUEST_DROPPED
    if request_id is not None:
        removed = removed | {request_id[0].lower()}
    out = []
    listed: list[bytes] = []
    for lower, field in client_headers.lowered():
        if lower not in removed:
            out.append(field)
        elif lower == b"connection":
            listed.append(field[1])
    if listed:
        extra = connection_tokens(listed) - _NOT_CONNECTION_SPECIFIC
        if extra:
            out = [field for field in out if field[0].lower() not in extra]
    out.append((b"X-Forwarded-For", forwarded_for))
    out.append((b"X-Forwarded-Proto", forwarded_proto))
    if request_id is not None:
        out.append(request_id)
    return out


def parse_ip(text: bytes | str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse an address as it appears in X-Forwarded-For, IPv4-mapped IPv6
    turned into plain IPv4. None when it is not an address."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def client_address(
    peer: str, forwarded_for: Sequence[bytes] | None, trusted: Sequence[IPNetwork]
) -> str:
    """The address of the client a request came from.

    Without trusted proxies this is the peer. When the peer is a trusted
    proxy, the ``X-Forwarded-For`` chain is walked from the right, past
    every trusted hop, and the first address not trusted is the client.
    """
    if not trusted:
        # The common case, on every request: no address parsing needed
        # beyond unwrapping an IPv4 client on a dual-stack socket.
        return peer[7:] if peer.startswith("::ffff:") and "." in peer else peer
    peer_ip = parse_ip(peer)
    if peer_ip is None:
        return peer
    if not forwarded_for or not _is_trusted(peer_ip, trusted):
        return str(peer_ip)
    hops = [hop for value in forwarded_for for hop in value.split(b",")]
    client = peer_ip
    for hop in reversed(hops):
        address = parse_ip(hop)
        if address is None:
            break
        client = address
        if not _is_trusted(address, trusted):
            break
    return str(client)


def is_trusted(peer: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the connection comes from a configured trusted proxy."""
    if not trusted:
        return False
    address = parse_ip(peer)
    return address is not None and _is_trusted(address, trusted)


def _is_trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    trusted: Sequence[IPNetwork],
) -> bool:
    return any(address in network for network in trusted)
