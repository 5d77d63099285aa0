"""HPACK encoding of the response header blocks the edge sends over HTTP/2.

The h2 library's encoder looks every field up in the dynamic table and
Huffman-codes every value in pure Python: about a tenth of the CPU an
HTTP/2 request costs the edge. This encoder never uses the dynamic table,
as nginx's does not: each field is a static-table index where RFC 7541's
static table has the whole field (``:status: 200``), and otherwise a
"literal without indexing" with the name indexed where the static table
knows it. Such representations do not depend on what came before on the
connection, so a field that repeats is encoded once (Huffman-coded when
that is shorter) and reused by every connection; a field seen for the first
time, like a request ID, is sent uncoded, which costs next to nothing. The
price is a few dozen bytes per response that a dynamic table would have
saved.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
from hpack.hpack import encode_integer as hpack_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

# RFC 7541 Appendix A, in order: index 1 is the first entry.
_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)

_NAME_INDEX: dict[bytes, int] = {}
_FIELD_INDEX: dict[tuple[bytes, bytes], int] = {}
for _index, (_name, _value) in enumerate(_STATIC_TABLE, start=1):
    _NAME_INDEX.setdefault(_name, _index)
    if _value:
        _FIELD_INDEX[(_name, _value)] = _index

_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

CACHE_ENTRIES = 2048
"""Encoded fields kept for reuse, and as many fields seen once. When either
fills up it is emptied and refilled by the fields that do repeat, which
costs far less than an eviction policy would."""

CACHE_VALUE_LIMIT = 256
"""Longer values are encoded each time, without Huffman coding, and not
kept."""


def encode_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 section 5.1: ``value`` in a ``prefix_bits`` prefix whose
    first byte also carries ``flags``."""
    out = hpack_integer(value, prefix_bits)
    out[0] |= flags
    return bytes(out)


def encode_string(data: bytes, huffman: bool) -> bytes:
    """RFC 7541 section 5.2: a string literal, Huffman-coded if asked and
    shorter."""
    if huffman:
        coded = _huffman.encode(data)
        if len(coded) < len(data):
            return encode_integer(len(coded), 7, 0x80) + coded
    return encode_integer(len(data), 7, 0) + data


def encode_field(name: bytes, value: bytes, huffman: bool = True) -> bytes:
    """One field as a static-table index or a literal without indexing
    (RFC 7541 sections 6.1 and 6.2.2); never touches a dynamic table."""
    index = _FIELD_INDEX.get((name, value))
    if index is not None:
        return encode_integer(index, 7, 0x80)
    index = _NAME_INDEX.get(name)
    if index is not None:
        head = encode_integer(index, 4, 0)
    else:
        head = b"\x00" + encode_string(name, huffman)
    return head + encode_string(value, huffman)


class StaticEncoder:
    """Stands in for ``hpack.Encoder`` on an ``h2`` connection.

    h2 calls L{encode} for each header block it sends and sets
    L{header_table_size} when the client's SETTINGS_HEADER_TABLE_SIZE
    changes. The dynamic table stays empty, but a decoder that lowered its
    table size expects the next block to begin with a size update
    (RFC 7541 section 4.2), so one is sent.
    """

    def __init__(self, cache: FieldCache | None = None):
        self._cache = _shared_cache if cache is None else cache
        self._table_size = 4096
        self._size_update: bytes = b""

    @property
    def header_table_size(self) -> int:
        return self._table_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value != self._table_size:
            self._table_size = value
            self._size_update = encode_integer(value, 5, 0x20)

    def encode(
        self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True
    ) -> bytes:
        """The header block for ``headers``: (name, value) pairs of bytes,
        names already in lower case."""
        known = self._cache.encoded
        block = [self._size_update] if self._size_update else []
        self._size_update = b""
        for field in headers:
            encoded = known.get(field)
            if encoded is None:
                encoded = self._cache.encode(field)
            block.append(encoded)
        return b"".join(block)


@attrs.define
class FieldCache:
    """Encoded fields shared by every connection of the process."""

    encoded: dict[tuple[bytes, bytes], bytes] = attrs.Factory(dict)
    """Fields seen more than once, in their shortest encoding."""

    seen: set[tuple[bytes, bytes]] = attrs.Factory(set)
    """Fields seen once so far."""

    def encode(self, field: tuple[bytes, bytes]) -> bytes:
        """Encode a field not in L{encoded}; keep it there if it repeats."""
        name, value = field
        if len(value) > CACHE_VALUE_LIMIT:
            return encode_field(name, value, huffman=False)
        seen = self.seen
        if field not in seen:
            if len(seen) >= CACHE_ENTRIES:
                seen.clear()
            seen.add(field)
            return encode_field(name, value, huffman=False)
        encoded = self.encoded
        if len(encoded) >= CACHE_ENTRIES:
            encoded.clear()
        encoded[field] = result = encode_field(name, value)
        return result


_shared_cache = FieldCache()
