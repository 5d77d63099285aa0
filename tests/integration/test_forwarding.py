"""The forwarding path over real sockets: what Synapse receives, byte for
byte, and what the client gets back."""

from __future__ import annotations

import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.rawhttp import connect, exchange, read_response

# Targets that must reach Synapse unchanged. Federation signatures cover
# the raw URI: one changed byte breaks them.
EXACT_TARGETS = [
    b"/_matrix/client/v3/rooms/%21abc%3Aexample.org/state/m.room.name/",
    b"/_matrix/client/v3/rooms/!abc:example.org/send/m.room.message/txn1",
    b"/_matrix/federation/v1/event/$ev:hs1.test",
    b"/_matrix/federation/v1/event/%24ev%3Ahs1.test",
    # Room version 3 event IDs: base64 with '/' and '+', raw and escaped.
    b"/_matrix/federation/v1/event/%24acR1l0raoZnm60CBwAVgqbZqoO%2FmYU81xysh1u7XcJk",
    b"/_matrix/federation/v1/event/$acR1l0raoZnm60CBwAVgqbZqoO%2fmYU81x+sh1u7XcJk",
    b"/_matrix/client/v3/directory/room/%23alias%3Ahs1.test",
    b"/_matrix/client/v3/profile/%40user%3Ahs1.test/displayname",
    b"/_matrix/client/v3/rooms/%21r%3Ah/state/a%2Fb%2fc/%25%7E%7e",
    b"/_matrix/client/v3/rooms/%21r%3Ah/state/x+y%2By/%21%40%24%3A",
    b"/_matrix/client/v3/a;b=c/d;e",
    b"/_matrix/client//v3///double//slashes/",
    b"/_matrix/client/v3/search?",
    b"/_matrix/client/v3/sync?",
    b"/_matrix/client/v3/sync?since=s1_2&timeout=30000&filter=%7B%22room%22%3A%7B%7D%7D",
    b"/_matrix/client/v3/x?a=1&a=2&b=%2F+z&c=&&d",
    b"/_matrix/client/v3/user/%40%C3%A9l%C3%A8ve%3Ahs.test/filter/%E2%9C%93",
    b"/_matrix/client/v3/CaSe/%2F%2f/%aB",
    b"/_matrix/media/v3/download/hs1.test/AbCdEf123?allow_remote=true",
    b"/_synapse/client/oidc/callback?code=x&state=y",
    b"/_matrix",
    b"/_matrix/",
]


def _get(target: bytes, extra: bytes = b"") -> bytes:
    return (
        b"GET "
        + target
        + b" HTTP/1.1\r\nHost: matrix.example.org\r\n"
        + extra
        + b"\r\n"
    )


@pytest.mark.parametrize("target", EXACT_TARGETS, ids=lambda t: t.decode())
@pytest_twisted.ensureDeferred
async def test_target_reaches_upstream_byte_for_byte(make_stack, target):
    stack = make_stack()
    response = await deferToThread(exchange, stack.port, _get(target))
    assert response.status == 200
    [recorded] = stack.upstream.requests
    assert recorded.request_line == b"GET " + target + b" HTTP/1.1"
    assert json.loads(response.body)["target"] == target.decode("latin-1")


REJECTED = [
    b"GET http://evil.example/_matrix/client/versions HTTP/1.1",
    b"GET matrix-federation://hs1.test/_matrix/key/v2/server HTTP/1.1",
    b"CONNECT hs1.test:443 HTTP/1.1",
    b"GET _matrix/client/versions HTTP/1.1",
    b"GET * HTTP/1.1",
    b"GET /_matrix/client/../../_synapse/admin/v1/users HTTP/1.1",
    b"GET /_matrix/client/./versions HTTP/1.1",
    b"GET /_matrix/client/%2e%2e/%2E%2E/_synapse/admin HTTP/1.1",
    b"GET /_matrix/client/.%2e/x HTTP/1.1",
    b"GET /_matrix/client/%2e/x HTTP/1.1",
    b"GET /_matrix/client/.. HTTP/1.1",
    b"GET /_matrix/client/x%00y HTTP/1.1",
    b"GET /_matrix/client/x%0Ay HTTP/1.1",
    b"GET /_matrix/client/x\x01y HTTP/1.1",
    b"GET /_matrix/client/x\x7fy HTTP/1.1",
    b"GET /_matrix/client/x\x80y HTTP/1.1",
    b"GET /_matrix/client/\xc3\xa9 HTTP/1.1",
    b"GET /_matrix/client/versions#fragment HTTP/1.1",
    b"GET /_matrix/client/bad%zzescape HTTP/1.1",
    b"GET /_matrix/client/x?q=%00 HTTP/1.1",
]


@pytest.mark.parametrize("line", REJECTED, ids=lambda t: repr(t)[2:-1])
@pytest_twisted.ensureDeferred
async def test_unsafe_target_is_refused_before_routing(make_stack, line):
    stack = make_stack()
    raw = line + b"\r\nHost: matrix.example.org\r\n\r\n"
    response = await deferToThread(exchange, stack.port, raw)
    assert response.status == 400
    assert response.header("Content-Type") == "application/json"
    assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
    assert stack.upstream.requests == []


@pytest.mark.parametrize(
    ("listener_type", "target", "forwarded"),
    [
        ("client", b"/_matrix/client/versions", True),
        ("client", b"/_synapse/client/pick_username", True),
        ("client", b"/_synapse/admin/v1/users", False),
        ("client", b"/_synapse/replication/x", False),
        ("client", b"/_synapse/metrics", False),
        ("client", b"/_matrixfoo", False),
        ("client", b"/", False),
        ("client", b"/index.html", False),
        ("federation", b"/_matrix/federation/v1/version", True),
        ("federation", b"/_matrix/key/v2/server", True),
        ("federation", b"/_synapse/client/pick_username", False),
        ("federation", b"/_synapse/admin/v1/users", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_routes(make_stack, listener_type, target, forwarded):
    stack = make_stack(listener={"type": listener_type})
    response = await deferToThread(exchange, stack.port, _get(target))
    if forwarded:
        assert response.status == 200
        assert len(stack.upstream.requests) == 1
    else:
        assert response.status == 404
        assert json.loads(response.body) == {
            "errcode": "M_UNRECOGNIZED",
            "error": "Unrecognized request",
        }
        assert response.header("Access-Control-Allow-Origin") == "*"
        assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_health_is_local(make_stack):
    stack = make_stack()
    response = await deferToThread(exchange, stack.port, _get(b"/health"))
    assert response.status == 200
    assert response.body == b"OK"
    assert response.header("Content-Type").startswith("text/plain")
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_request_headers_sent_upstream(make_stack):
    stack = make_stack()
    raw = (
        b"GET /_matrix/client/versions HTTP/1.1\r\n"
        b"Host: matrix.example.org:8443\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-For: 7.7.7.7\r\n"
        b"X-Forwarded-Proto: gopher\r\n"
        b"X-Real-IP: 6.6.6.6\r\n"
        b"Forwarded: for=6.6.6.6\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"Accept: a\r\nAccept: b\r\n"
        b"Cookie: c=1\r\nCookie: d=2\r\n"
        b"Connection: keep-alive, X-Drop-Me\r\n"
        b"X-Drop-Me: secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic xyz\r\n"
        b"Upgrade: h2c\r\n"
        b"Authorization: Bearer token\r\n"
        b"\r\n"
    )
    await deferToThread(exchange, stack.port, raw)
    [recorded] = stack.upstream.requests
    assert recorded.headers(b"host") == [b"matrix.example.org:8443"]
    assert recorded.headers(b"x-forwarded-for") == [b"127.0.0.1"]
    assert recorded.headers(b"x-forwarded-proto") == [b"http"]
    assert recorded.headers(b"accept") == [b"a", b"b"]
    assert recorded.headers(b"cookie") == [b"c=1", b"d=2"]
    assert recorded.headers(b"authorization") == [b"Bearer token"]
    for dropped in (
        b"x-real-ip",
        b"forwarded",
        b"x-forwarded-host",
        b"x-drop-me",
        b"keep-alive",
        b"te",
        b"proxy-authorization",
        b"upgrade",
    ):
        assert recorded.headers(dropped) == [], dropped
    # Only the edge's own connection management goes upstream.
    assert recorded.headers(b"connection") == []


@pytest_twisted.ensureDeferred
async def test_trusted_proxy_chain(make_stack):
    stack = make_stack(trusted_proxies=["127.0.0.0/8", "10.0.0.0/8"])
    raw = _get(
        b"/_matrix/client/versions",
        b"X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.1.2.3\r\n",
    )
    await deferToThread(exchange, stack.port, raw)
    [recorded] = stack.upstream.requests
    # 10.1.2.3 is a trusted hop; 203.0.113.9 is the first one that is not.
    assert recorded.headers(b"x-forwarded-for") == [b"203.0.113.9"]


@pytest_twisted.ensureDeferred
async def test_response_headers_filtered_and_repeated_kept(make_stack):
    stack = make_stack()
    response = await deferToThread(
        exchange, stack.port, _get(b"/_matrix/client/versions")
    )
    assert response.all("Set-Cookie") == ["a=1", "b=2"]
    assert response.header("X-Upstream") == "yes"
    assert response.header("Keep-Alive") is None
    assert response.header("Content-Length") == str(len(response.body))


@pytest_twisted.ensureDeferred
async def test_missing_or_repeated_host(make_stack):
    stack = make_stack()
    missing = b"GET /_matrix/client/versions HTTP/1.1\r\n\r\n"
    twice = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"
    for raw in (missing, twice):
        response = await deferToThread(exchange, stack.port, raw)
        assert response.status == 400
        assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_keep_alive_pooled_upstream(make_stack):
    stack = make_stack()

    def five_requests():
        with connect(stack.port) as sock:
            for _ in range(5):
                sock.sendall(_get(b"/_matrix/client/versions"))
                read_response(sock)
        with connect(stack.port) as sock:
            sock.sendall(_get(b"/_matrix/client/versions"))
            read_response(sock)

    await deferToThread(five_requests)
    ids = {r.connection_id for r in stack.upstream.requests}
    assert len(stack.upstream.requests) == 6
    assert len(ids) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
        b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 1,1\r\n\r\na",
    ],
    ids=["duplicate-cl", "cl-and-te", "te-not-chunked", "negative-cl", "list-cl"],
)
@pytest_twisted.ensureDeferred
async def test_smuggling_shapes_refused(make_stack, raw):
    stack = make_stack()
    response = await deferToThread(exchange, stack.port, raw)
    assert response.status == 400
    assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_body_forwarded_with_length(make_stack):
    stack = make_stack()
    body = b"x" * 100_000
    raw = (
        b"PUT /_matrix/client/v3/rooms/%21r%3Ah/send/m.room.message/1 HTTP/1.1\r\n"
        b"Host: h\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n"
        % len(body)
    ) + body
    response = await deferToThread(exchange, stack.port, raw)
    assert response.status == 200
    [recorded] = stack.upstream.requests
    assert recorded.body_length == len(body)
    assert recorded.headers(b"content-length") == [str(len(body)).encode()]
    assert recorded.headers(b"transfer-encoding") == []


@pytest_twisted.ensureDeferred
async def test_chunked_request_body_forwarded_chunked(make_stack):
    stack = make_stack()
    raw = (
        b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    response = await deferToThread(exchange, stack.port, raw)
    assert response.status == 200
    [recorded] = stack.upstream.requests
    assert recorded.body_length == 11
    assert recorded.headers(b"transfer-encoding") == [b"chunked"]


@pytest_twisted.ensureDeferred
async def test_expect_continue_not_forwarded(make_stack):
    stack = make_stack()

    def send():
        with connect(stack.port) as sock:
            sock.sendall(
                b"PUT /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\n"
                b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
            )
            interim = sock.recv(1024)
            sock.sendall(b"hello")
            return interim, read_response(sock)

    interim, response = await deferToThread(send)
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert response.status == 200
    [recorded] = stack.upstream.requests
    assert recorded.headers(b"expect") == []
    assert recorded.body_length == 5


@pytest_twisted.ensureDeferred
async def test_chunked_response_passes_through(make_stack):
    stack = make_stack()
    response = await deferToThread(exchange, stack.port, _get(b"/_matrix/chunked"))
    assert response.status == 200
    assert response.body == b"hello world"
    assert response.complete
    assert response.header("Transfer-Encoding") == "chunked"


@pytest_twisted.ensureDeferred
async def test_too_large_by_content_length(make_stack):
    stack = make_stack(max_upload_size="1K")

    def send():
        with connect(stack.port) as sock:
            # The body is never sent: the answer must come without it.
            sock.sendall(
                b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\n"
                b"Expect: 100-continue\r\nContent-Length: 2000\r\n\r\n"
            )
            return read_response(sock)

    response = await deferToThread(send)
    assert response.status == 413
    assert json.loads(response.body)["errcode"] == "M_TOO_LARGE"
    assert response.header("Access-Control-Allow-Origin") == "*"
    assert response.header("Connection") == "close"
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_too_large_while_streaming_chunked(make_stack):
    stack = make_stack(max_upload_size="1K")
    raw = (
        b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"a" * 512
        + b"\r\n"
        + b"200\r\n"
        + b"b" * 512
        + b"\r\n"
        + b"200\r\n"
        + b"c" * 512
        + b"\r\n"
        + b"0\r\n\r\n"
    )
    response = await deferToThread(exchange, stack.port, raw)
    assert response.status == 413
    assert json.loads(response.body)["errcode"] == "M_TOO_LARGE"
    # Synapse never saw a complete body.
    assert all(not r.complete for r in stack.upstream.requests)


@pytest_twisted.ensureDeferred
async def test_upstream_refused_is_502(make_stack):
    stack = make_stack()
    # Point the edge at a port nobody listens on.
    from twisted.internet.endpoints import TCP4ClientEndpoint

    stack.site.upstream._endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 1)
    response = await deferToThread(
        exchange, stack.port, _get(b"/_matrix/client/versions")
    )
    assert response.status == 502
    assert response.header("Content-Type") == "application/json"
    assert json.loads(response.body)["errcode"] == "M_UNKNOWN"


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_504(make_stack):
    stack = make_stack(timeouts={"upstream_response": "300ms"})
    response = await deferToThread(exchange, stack.port, _get(b"/_matrix/hang"))
    assert response.status == 504
    assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
    # The hung upstream connection was closed, not returned to the pool.
    await _until(lambda: stack.upstream.lost)


@pytest_twisted.ensureDeferred
async def test_client_disconnect_cancels_upstream(make_stack):
    stack = make_stack()

    def send_and_leave():
        with connect(stack.port) as sock:
            sock.sendall(_get(b"/_matrix/hang"))
            # Leave only once Synapse is working on the request.
            deadline = time.monotonic() + 10
            while not stack.upstream.requests and time.monotonic() < deadline:
                time.sleep(0.01)

    await deferToThread(send_and_leave)
    assert stack.upstream.requests
    await _until(lambda: stack.upstream.lost)
    assert stack.upstream.open_connections == 0


@pytest_twisted.ensureDeferred
async def test_upstream_death_mid_response_is_not_complete(make_stack):
    stack = make_stack()
    response = await deferToThread(exchange, stack.port, _get(b"/_matrix/die"))
    assert response.status == 200
    assert not response.complete
    assert len(response.body) < 1000


@pytest_twisted.ensureDeferred
async def test_early_upstream_answer_during_upload(make_stack):
    stack = make_stack()

    def send():
        with connect(stack.port) as sock:
            sock.sendall(
                b"PUT /_matrix/early413 HTTP/1.1\r\nHost: h\r\n"
                b"Content-Length: 10000000\r\n\r\n" + b"x" * 65536
            )
            return read_response(sock)

    response = await deferToThread(send)
    assert response.status == 413
    assert json.loads(response.body)["errcode"] == "M_TOO_LARGE"


async def _until(predicate, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, bounded so a bug fails, not hangs."""
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


@pytest_twisted.ensureDeferred
async def test_a_target_longer_than_8_kib_gets_414(make_stack):
    stack = make_stack()
    target = b"/_matrix/client/v3/rooms/" + b"x" * 8192
    response = await deferToThread(exchange, stack.port, _get(target))
    assert response.status == 414
    assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
    assert stack.upstream.requests == []
    just_fits = b"/_matrix/client/v3/" + b"x" * (8192 - 19)
    response = await deferToThread(exchange, stack.port, _get(just_fits))
    assert response.status == 200
