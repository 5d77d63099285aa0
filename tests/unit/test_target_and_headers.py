"""Request-target checks and header handling, as pure functions."""

from __future__ import annotations

import pytest

from matrix_edge.server.accesslog import redact_target
from matrix_edge.server.fields import HeaderFields
from matrix_edge.server.headers import (
    client_address,
    connection_tokens,
    filter_headers,
    parse_ip,
    upstream_request_headers,
)
from matrix_edge.target import (
    check_target,
    disguised_matrix_path,
    normalised_path,
    path_has_prefix,
    split_target,
)


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/_matrix",
        b"/a/b%2Fc",
        b"/a//b/",
        b"/a/b?",
        b"/a?x=%0A",
        b"/a/...",
        b"/a/.b",
        b"/a/b.",
        b"/a/%2e%2e%2e",
        b"/a/b..%2fc",
        b"/a/b%2F..c",
        b"/a%2F...%2Fb",
        b"/a/%2F%2e%2e%2e",
        b"/a?b=..%2f..%2f",
        b"/a;p",
        b"/%7E",
        b"/a/%C3%A9",
    ],
)
def test_accepted_targets(target):
    assert check_target(b"GET", target) is None


@pytest.mark.parametrize(
    ("method", "target", "reason"),
    [
        (b"CONNECT", b"hs:443", "CONNECT"),
        (b"GET", b"http://x/y", "Absolute-form"),
        (b"GET", b"x/y", "must start with '/'"),
        (b"GET", b"", "must start with '/'"),
        (b"GET", b"/a/../b", "dot segment"),
        (b"GET", b"/a/..", "dot segment"),
        (b"GET", b"/a/.", "dot segment"),
        (b"GET", b"/./a", "dot segment"),
        (b"GET", b"/a/%2E%2e/b", "dot segment"),
        (b"GET", b"/a/%2e./b", "dot segment"),
        (b"GET", b"/a/%2E", "dot segment"),
        # Closed or opened by an encoded slash, which a decoding server
        # reads as a slash.
        (b"GET", b"/a/..%2fb", "dot segment"),
        (b"GET", b"/a/..%2F", "dot segment"),
        (b"GET", b"/a/%2e%2e%2fb", "dot segment"),
        (b"GET", b"/a/%2E%2E%2Fb", "dot segment"),
        (b"GET", b"/a/.%2F", "dot segment"),
        (b"GET", b"/a%2f..%2fb", "dot segment"),
        (b"GET", b"/a%2F%2e%2E", "dot segment"),
        (b"GET", b"/a%2f.", "dot segment"),
        (b"GET", b"/a%2f..?x", "dot segment"),
        (b"GET", b"/a b", "characters"),
        (b"GET", b"/a#b", "characters"),
        (b"GET", b"/a\x00", "characters"),
        (b"GET", b"/a\x7f", "characters"),
        (b"GET", b"/a\xff", "characters"),
        (b"GET", b"/a%", "malformed"),
        (b"GET", b"/a%4", "malformed"),
        (b"GET", b"/a%g0", "malformed"),
        (b"GET", b"/a%00", "control"),
        (b"GET", b"/a%0d%0a", "control"),
        (b"GET", b"/a%7F", "control"),
        (b"GET", b"/a?b=%00", "control"),
    ],
)
def test_refused_targets(method, target, reason):
    problem = check_target(method, target)
    assert problem is not None and reason in problem


def test_dot_segments_in_query_are_data():
    assert check_target(b"GET", b"/a?next=/../b") is None
    assert check_target(b"GET", b"/a?next=%2F..%2Fb") is None


@pytest.mark.parametrize(
    "path",
    [
        b"//_synapse/admin/v1/server_version",
        b"///_matrix/client/versions",
        b"/%5fsynapse/admin",
        b"/%5Fsynapse/admin",
        b"/_synapse%2fadmin",
        b"/_synapse%2Fadmin",
        b"/%2F_synapse/admin",
        b"/\\_synapse/admin",
        b"/_SYNAPSE/admin",
        b"/_Matrix/client/versions",
        b"/%5Fmatrix",
        b"/_synaps%65",
    ],
)
def test_disguised_matrix_paths(path):
    assert disguised_matrix_path(path)


@pytest.mark.parametrize(
    "path",
    [
        b"/",
        b"/index.html",
        b"//index.html",
        b"/_synapsefoo",
        b"/%5fmatrixfoo/x",
        b"/static/_synapse/admin",
        b"/a%2F_synapse/admin",
    ],
)
def test_paths_that_are_not_matrix_paths(path):
    assert not disguised_matrix_path(path)


def test_normalised_path():
    assert normalised_path(b"//A%2Fb\\\\C%5f") == b"/a/b/c_"
    assert normalised_path(b"/plain") == b"/plain"


def test_split_target_keeps_empty_query():
    assert split_target(b"/a?") == (b"/a", b"")
    assert split_target(b"/a") == (b"/a", None)
    assert split_target(b"/a?b?c") == (b"/a", b"b?c")


def test_path_has_prefix():
    assert path_has_prefix(b"/_matrix", b"/_matrix")
    assert path_has_prefix(b"/_matrix/client", b"/_matrix")
    assert not path_has_prefix(b"/_matrixx", b"/_matrix")
    assert not path_has_prefix(b"/_MATRIX/client", b"/_matrix")


def test_connection_tokens():
    assert connection_tokens([b"keep-alive, X-Foo", b" Upgrade "]) == {
        b"keep-alive",
        b"x-foo",
        b"upgrade",
    }
    assert connection_tokens(None) == frozenset()


def test_filter_headers_keeps_repeats_and_drops_hop_by_hop():
    headers = [
        (b"Accept", b"a"),
        (b"Connection", b"close, X-Secret"),
        (b"X-Secret", b"s"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Accept", b"b"),
        (b"Content-Length", b"3"),
        (b"TE", b"trailers"),
        (b"Set-Cookie", b"a=1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert filter_headers(headers) == [
        (b"Accept", b"a"),
        (b"Accept", b"b"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]


def test_upstream_headers_replace_forwarding_headers():
    client = HeaderFields(
        [
            (b"Host", b"hs:8443"),
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"X-Forwarded-For", b"2.2.2.2"),
            (b"X-Forwarded-Proto", b"http"),
            (b"Forwarded", b"for=1.1.1.1"),
            (b"X-Real-IP", b"1.1.1.1"),
            (b"Expect", b"100-continue"),
        ]
    )
    out = upstream_request_headers(
        client, b"203.0.113.1", b"https", request_id=(b"X-Request-ID", b"abc")
    )
    assert out == [
        (b"Host", b"hs:8443"),
        (b"X-Forwarded-For", b"203.0.113.1"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Request-ID", b"abc"),
    ]


@pytest.mark.parametrize(
    "connection",
    [
        [b"Host"],
        [b" hOsT "],
        [b"keep-alive", b"Host"],
        [b"X-Hop, Host, X-Forwarded-For, X-Request-ID, Content-Length"],
    ],
)
def test_connection_never_removes_host(connection):
    """Connection may name end-to-end fields to drop (X-Hop), never Host,
    nor what the edge sets itself."""
    client = HeaderFields(
        [
            (b"Host", b"Matrix.Example.org:8448"),
            *[(b"Connection", value) for value in connection],
            (b"X-Hop", b"1"),
            (b"Authorization", b"Bearer t"),
        ]
    )
    out = upstream_request_headers(
        client, b"203.0.113.1", b"https", request_id=(b"X-Request-ID", b"abc")
    )
    dropped = b"x-hop" in b",".join(connection).lower()
    assert out == [
        (b"Host", b"Matrix.Example.org:8448"),
        *([] if dropped else [(b"X-Hop", b"1")]),
        (b"Authorization", b"Bearer t"),
        (b"X-Forwarded-For", b"203.0.113.1"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Request-ID", b"abc"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"1.2.3.4", "1.2.3.4"),
        (b" ::1 ", "::1"),
        (b"::ffff:10.0.0.1", "10.0.0.1"),
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"unknown", None),
        (b"\xff", None),
    ],
)
def test_parse_ip(text, expected):
    address = parse_ip(text)
    assert (str(address) if address else None) == expected


TRUSTED = [__import__("ipaddress").ip_network(n) for n in ("10.0.0.0/8", "::1/128")]


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.5", [b"6.6.6.6"], "203.0.113.5"),  # untrusted peer: ignore XFF
        ("::ffff:203.0.113.5", None, "203.0.113.5"),  # mapped address normalised
        ("10.0.0.2", None, "10.0.0.2"),  # trusted but nothing sent
        ("10.0.0.2", [b"6.6.6.6"], "6.6.6.6"),
        ("10.0.0.2", [b"6.6.6.6, 7.7.7.7"], "7.7.7.7"),  # rightmost untrusted wins
        ("10.0.0.2", [b"6.6.6.6", b"7.7.7.7, 10.9.9.9"], "7.7.7.7"),
        ("10.0.0.2", [b"10.1.1.1, 10.2.2.2"], "10.1.1.1"),  # all trusted: leftmost
        ("10.0.0.2", [b"6.6.6.6, garbage"], "10.0.0.2"),  # unparsable hop: stop
        ("::1", [b"::ffff:8.8.8.8"], "8.8.8.8"),
    ],
)
def test_client_address(peer, xff, expected):
    assert client_address(peer, xff, TRUSTED) == expected


def test_redaction():
    assert redact_target(b"/sync?access_token=syt_abc&since=1") == (
        "/sync?access_token=<redacted>&since=1"
    )
    assert (
        redact_target(b"/x?a=1&client_secret=s3cr3t")
        == "/x?a=1&client_secret=<redacted>"
    )
    assert redact_target(b"/x?my_access_token=keep") == "/x?my_access_token=keep"
    # Escaped names are read by Synapse all the same.
    assert redact_target(b"/s?access%5Ftoken=SECRET&x=1") == (
        "/s?access%5Ftoken=<redacted>&x=1"
    )
    assert redact_target(b"/s?client%5fsecret=S&access_token") == (
        "/s?client%5fsecret=<redacted>&access_token"
    )
    assert redact_target(b"/s?") == "/s?"


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:0:1", "::ffff:0:1"),
    ],
)
def test_client_address_without_trusted_proxies(peer, expected):
    assert client_address(peer, [b"6.6.6.6"], []) == expected
