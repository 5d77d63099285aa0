"""The edge's HPACK encoder for response header blocks, checked against the
h2 library's own decoder and RFC 7541's examples."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder

from matrix_edge.server import h2_hpack
from matrix_edge.server.h2_hpack import (
    FieldCache,
    StaticEncoder,
    encode_field,
    encode_integer,
)


def decode(block: bytes, decoder: Decoder | None = None) -> list[tuple[bytes, bytes]]:
    decoder = decoder or Decoder()
    return [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)]


@pytest.mark.parametrize(
    "value, prefix, expected",
    [
        # RFC 7541 appendix C.1.
        (10, 5, b"\x0a"),
        (1337, 5, b"\x1f\x9a\x0a"),
        (42, 8, b"\x2a"),
        (31, 5, b"\x1f\x00"),
        (127, 7, b"\x7f\x00"),
        (128, 7, b"\x7f\x01"),
    ],
)
def test_integers_as_rfc_7541_writes_them(
    value: int, prefix: int, expected: bytes
) -> None:
    assert encode_integer(value, prefix, 0) == expected


def test_whole_static_fields_are_one_byte() -> None:
    assert encode_field(b":status", b"200") == b"\x88"
    assert encode_field(b":status", b"404") == b"\x8d"


def test_other_fields_are_literals_that_leave_no_trace_in_the_table() -> None:
    decoder = Decoder()
    fields = [
        (b":status", b"429"),
        (b"content-type", b"application/json"),
        (b"x-request-id", b"Ab3dEf"),
        (b"access-control-allow-origin", b"*"),
    ]
    assert decode(StaticEncoder(FieldCache()).encode(fields), decoder) == fields
    # A literal without indexing adds nothing to the decoder's dynamic table.
    assert len(decoder.header_table.dynamic_entries) == 0


def test_a_typical_synapse_response_round_trips() -> None:
    fields = [
        (b":status", b"200"),
        (b"date", b"Wed, 02 Dec 2026 18:00:00 GMT"),
        (b"content-type", b"application/json"),
        (b"content-length", b"612"),
        (b"cache-control", b"no-cache, no-store, must-revalidate"),
        (b"access-control-allow-origin", b"*"),
        (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
        (
            b"access-control-allow-headers",
            b"X-Requested-With, Content-Type, Authorization, Date",
        ),
        (b"access-control-expose-headers", b"Synapse-Trace-Id, Server"),
        (b"server", b"matrix-edge"),
        (b"set-cookie", b"a=b; Secure"),
        (b"x-long", b"v" * 3000),
    ]
    encoder = StaticEncoder(FieldCache())
    decoder = Decoder()
    for _ in range(3):
        assert decode(encoder.encode(fields), decoder) == fields


def test_random_fields_round_trip() -> None:
    rng = random.Random(7)
    alphabet = bytes(range(0x20, 0x7F)) + b"\t\x80\xff"
    names = [b"content-type", b"etag", b"x-custom", b"date", b"server", b":status"]
    encoder = StaticEncoder(FieldCache())
    decoder = Decoder()
    for _ in range(300):
        fields = [
            (
                rng.choice(names),
                bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 300))),
            )
            for _ in range(rng.randrange(1, 8))
        ]
        assert decode(encoder.encode(fields), decoder) == fields


def test_a_lowered_table_size_is_announced_at_the_start_of_the_next_block() -> None:
    encoder = StaticEncoder(FieldCache())
    encoder.header_table_size = 0
    block = encoder.encode([(b":status", b"200")])
    assert block == b"\x20\x88"
    decoder = Decoder()
    decoder.header_table_size = 0
    assert decode(block, decoder) == [(b":status", b"200")]
    # Announced once only.
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
    # An unchanged size is not announced again.
    encoder.header_table_size = 0
    assert encoder.encode([(b":status", b"200")]) == b"\x88"


def test_fields_that_repeat_are_kept_huffman_coded_and_others_sent_as_they_are() -> (
    None
):
    cache = FieldCache()
    encoder = StaticEncoder(cache)
    field = (b"content-type", b"application/json")
    first = encoder.encode([field])
    assert first == encode_field(*field, huffman=False)
    second = encoder.encode([field])
    assert second == encode_field(*field) and len(second) < len(first)
    assert cache.encoded == {field: second}


def test_the_cache_is_bounded_and_skips_long_values() -> None:
    cache = FieldCache()
    encoder = StaticEncoder(cache)
    for i in range(h2_hpack.CACHE_ENTRIES * 3):
        encoder.encode([(b"x-request-id", str(i).encode())] * 2)
        assert len(cache.encoded) <= h2_hpack.CACHE_ENTRIES
        assert len(cache.seen) <= h2_hpack.CACHE_ENTRIES
    long_field = (b"x-long", b"v" * (h2_hpack.CACHE_VALUE_LIMIT + 1))
    cache = FieldCache()
    StaticEncoder(cache).encode([long_field] * 3)
    assert cache == FieldCache()
