"""What the documented proxy configs do, and what only a Matrix-aware edge
can: admin access, internal paths, request IDs, PROXY protocol, fallback
site, per-route limits, readiness, maintenance, CORS, JSON access log."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from matrix_edge.upstream.health import UpstreamWatch
from tests.rawhttp import exchange


def _get(target: bytes, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: hs.test\r\n" + extra + b"\r\n"


@pytest.mark.parametrize(
    ("allow", "trusted", "xff", "expected"),
    [
        ([], [], b"", 404),  # closed by default
        (["10.0.0.0/8"], [], b"", 403),  # open elsewhere, not here
        (["127.0.0.0/8"], [], b"", 200),  # the peer is allowed
        # A client's own X-Forwarded-For does not open it...
        (["10.0.0.0/8"], [], b"X-Forwarded-For: 10.1.1.1\r\n", 403),
        # ...but the address a trusted proxy reports is what is checked.
        (["10.0.0.0/8"], ["127.0.0.1/32"], b"X-Forwarded-For: 10.1.1.1\r\n", 200),
        (["127.0.0.0/8"], ["127.0.0.1/32"], b"X-Forwarded-For: 203.0.113.1\r\n", 403),
    ],
)
@pytest_twisted.ensureDeferred
async def test_admin_allow_list(make_stack, allow, trusted, xff, expected):
    stack = make_stack(listener={"admin_allow": allow}, trusted_proxies=trusted)
    response = await deferToThread(
        exchange, stack.port, _get(b"/_synapse/admin/v1/server_version", xff)
    )
    assert response.status == expected
    if expected != 200:
        body = json.loads(response.body)
        assert body["errcode"] == (
            "M_UNRECOGNIZED" if expected == 404 else "M_FORBIDDEN"
        )
        assert stack.upstream.requests == []
    else:
        [recorded] = stack.upstream.requests
        assert recorded.target == b"/_synapse/admin/v1/server_version"


@pytest.mark.parametrize(
    "target",
    [
        b"/_synapse/replication/send_event/x",
        b"/_synapse/metrics",
        b"/_synapse/worker/x",
        b"/_synapse/admin%2fv1",
        b"/_synapse/client/../admin/v1/users",
    ],
)
@pytest_twisted.ensureDeferred
async def test_internal_paths_never_forwarded(make_stack, target):
    stack = make_stack(listener={"admin_allow": ["127.0.0.0/8"]})
    response = await deferToThread(exchange, stack.port, _get(target))
    assert response.status in (400, 404)
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_request_id_generated_sent_and_returned(make_stack):
    stack = make_stack()
    response = await deferToThread(
        exchange,
        stack.port,
        _get(b"/_matrix/client/versions", b"X-Request-ID: chosen-by-client\r\n"),
    )
    request_id = response.header("X-Request-ID")
    assert request_id and request_id != "chosen-by-client"
    [recorded] = stack.upstream.requests
    assert recorded.headers(b"x-request-id") == [request_id.encode()]


@pytest_twisted.ensureDeferred
async def test_request_id_taken_from_trusted_proxy(make_stack):
    stack = make_stack(trusted_proxies=["127.0.0.0/8"], request_id_header="X-Trace")
    response = await deferToThread(
        exchange, stack.port, _get(b"/_matrix/client/versions", b"X-Trace: lb-1234\r\n")
    )
    assert response.header("X-Trace") == "lb-1234"
    [recorded] = stack.upstream.requests
    assert recorded.headers(b"x-trace") == [b"lb-1234"]


@pytest_twisted.ensureDeferred
async def test_request_id_on_edge_answers(make_stack):
    stack = make_stack()
    response = await deferToThread(exchange, stack.port, _get(b"/_synapse/admin/x"))
    assert response.status == 404
    assert response.header("X-Request-ID")


def _proxy_v1(source: str, raw: bytes, port: int) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = "::1" if family == "TCP6" else "127.0.0.1"
    return f"PROXY {family} {source} {dest} 40000 {port}\r\n".encode() + raw


def _proxy_v2(source: str, raw: bytes, port: int) -> bytes:
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    address = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
    payload = address + (40000).to_bytes(2, "big") + port.to_bytes(2, "big")
    return signature + b"\x21\x11" + len(payload).to_bytes(2, "big") + payload + raw


@pytest.mark.parametrize("header", [_proxy_v1, _proxy_v2], ids=["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_proxy_protocol_gives_the_client_address(make_stack, header):
    stack = make_stack(
        listener={"proxy_protocol": True, "admin_allow": ["198.51.100.0/24"]}
    )
    raw = header(
        "198.51.100.7",
        _get(b"/_matrix/client/versions", b"X-Forwarded-For: 6.6.6.6\r\n"),
        stack.port,
    )
    response = await deferToThread(exchange, stack.port, raw)
    assert response.status == 200
    [recorded] = stack.upstream.requests
    assert recorded.headers(b"x-forwarded-for") == [b"198.51.100.7"]
    # The admin allow-list sees the same address.
    raw = header("198.51.100.7", _get(b"/_synapse/admin/v1/x"), stack.port)
    assert (await deferToThread(exchange, stack.port, raw)).status == 200


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_required_when_configured(make_stack):
    stack = make_stack(listener={"proxy_protocol": True})

    def send():
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            sock.sendall(_get(b"/_matrix/client/versions"))
            return sock.recv(100)

    assert await deferToThread(send) in (b"",)
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_fallback_site_for_other_paths(make_stack):
    web = {}

    def configure():
        factory, port = make_stack.upstream()
        web["factory"] = factory
        return port

    port = configure()
    stack = make_stack(listener={"fallback": f"http://127.0.0.1:{port}"})
    for target in (
        b"/",
        b"/index.html",
        b"/.well-known/matrix/server",
        b"/%7Euser/page?x=%2F",
    ):
        response = await deferToThread(exchange, stack.port, _get(target))
        assert response.status == 200
    assert [r.target for r in web["factory"].requests] == [
        b"/",
        b"/index.html",
        b"/.well-known/matrix/server",
        b"/%7Euser/page?x=%2F",
    ]
    # Matrix paths still go to Synapse; /_synapse paths go nowhere else.
    await deferToThread(exchange, stack.port, _get(b"/_matrix/client/versions"))
    assert len(stack.upstream.requests) == 1
    response = await deferToThread(exchange, stack.port, _get(b"/_synapse/admin/v1/x"))
    assert response.status == 404
    assert len(web["factory"].requests) == 4


@pytest_twisted.ensureDeferred
async def test_media_uploads_get_their_own_limit(make_stack):
    stack = make_stack(max_upload_size="100K", max_request_size="1K")
    body = b"x" * 5000
    media = (
        b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\nContent-Length: 5000\r\n\r\n"
        + body
    )
    other = (
        b"PUT /_matrix/client/v3/rooms/%21r%3Ah/send/m.room.message/1 HTTP/1.1\r\nHost: h\r\n"
        + b"Content-Length: 5000\r\n\r\n"
        + body
    )
    assert (await deferToThread(exchange, stack.port, media)).status == 200
    response = await deferToThread(exchange, stack.port, other)
    assert response.status == 413
    assert json.loads(response.body)["errcode"] == "M_TOO_LARGE"
    assert response.header("Access-Control-Allow-Origin") == "*"


@pytest_twisted.ensureDeferred
async def test_readiness_and_fail_fast(make_stack):
    stack = make_stack(upstream_check={"interval": "100ms"})
    upstream = stack.site.upstream
    watch = UpstreamWatch(reactor, upstream, stack.config.upstream_check)
    watch.startService()
    try:
        await _until(lambda: upstream.healthy is True)
        ready = await deferToThread(exchange, stack.port, _get(b"/ready"))
        assert ready.status == 200
        assert json.loads(ready.body)["upstreams"] == {"synapse": "up"}
        assert any(r.target == b"/health" for r in stack.upstream.requests)

        # Synapse goes away: checks notice, /ready says so, requests fail fast.
        from twisted.internet.endpoints import TCP4ClientEndpoint

        upstream._endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 1)
        await upstream.close()  # and its pooled connections with it
        await _until(lambda: upstream.healthy is False)
        ready = await deferToThread(exchange, stack.port, _get(b"/ready"))
        assert ready.status == 503
        assert json.loads(ready.body)["upstreams"] == {"synapse": "down"}
        response = await deferToThread(
            exchange, stack.port, _get(b"/_matrix/client/versions")
        )
        assert response.status == 502
        assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
    finally:
        watch.stopService()


@pytest_twisted.ensureDeferred
async def test_maintenance_mode(make_stack):
    stack = make_stack(
        well_known={"server": "hs.test:443"},
        maintenance={"enabled": True, "retry_after": "120s"},
    )
    response = await deferToThread(
        exchange, stack.port, _get(b"/_matrix/client/versions")
    )
    assert response.status == 503
    assert response.header("Retry-After") == "120"
    assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
    assert (await deferToThread(exchange, stack.port, _get(b"/health"))).status == 200
    assert (
        await deferToThread(exchange, stack.port, _get(b"/.well-known/matrix/server"))
    ).status == 200
    assert stack.upstream.requests == []
    # Off again, as a reload builds it.
    stack = make_stack(well_known={"server": "hs.test:443"})
    response = await deferToThread(
        exchange, stack.port, _get(b"/_matrix/client/versions")
    )
    assert response.status == 200


@pytest_twisted.ensureDeferred
async def test_cors_not_duplicated_on_proxied_responses(make_stack):
    stack = make_stack()
    response = await deferToThread(
        exchange, stack.port, _get(b"/_matrix/client/versions")
    )
    # The recording upstream sends no CORS headers and the edge adds none
    # to Synapse's responses: Synapse sends its own.
    assert response.header("Access-Control-Allow-Origin") is None
    refused = await deferToThread(exchange, stack.port, _get(b"/nope"))
    assert refused.all("Access-Control-Allow-Origin") == ["*"]


@pytest_twisted.ensureDeferred
async def test_json_access_log(make_stack):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        stack = make_stack(access_log={"format": "json"})
        auth = b'Authorization: X-Matrix origin="hs2.test",destination="hs.test",key="ed25519:a",sig="c2ln"\r\n'
        await deferToThread(
            exchange,
            stack.port,
            _get(
                b"/_matrix/federation/v1/query/profile?user_id=%40a%3Ahs.test&access_token=t",
                auth,
            ),
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    [entry] = [e["access"] for e in events if "access_json" in e]
    assert entry["origin"] == "hs2.test"
    assert entry["status"] == 200
    assert entry["client_disconnected"] is False
    assert (
        json.loads(next(e["access_json"] for e in events if "access_json" in e))
        == entry
    )
    assert entry["request_id"]
    assert entry["listener"] == "client-1"
    assert entry["upstream_seconds"] is not None
    assert "access_token=<redacted>" in entry["target"]
    assert "c2ln" not in json.dumps(entry)


async def _until(predicate, timeout: float = 10.0) -> None:
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("condition not reached")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02
