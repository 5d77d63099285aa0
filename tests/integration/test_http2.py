"""HTTP/2 to clients: the same forwarding as HTTP/1.1, stream by stream,
with flow control carrying back-pressure."""

from __future__ import annotations

import json
import subprocess

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.h2client import H2Client
from tests.integration.test_forwarding import EXACT_TARGETS, REJECTED
from tests.rawhttp import exchange

MiB = 1024 * 1024


def _in_client(port, work):
    client = H2Client(port)
    try:
        assert client.alpn == "h2"
        return work(client)
    finally:
        client.close()


@pytest.mark.parametrize("target", EXACT_TARGETS, ids=lambda t: t.decode())
@pytest_twisted.ensureDeferred
async def test_target_byte_for_byte_over_h2(make_stack, target):
    stack = make_stack(tls=True)
    stream = await deferToThread(
        _in_client, stack.port, lambda c: c.request(b"GET", target)
    )
    assert stream.status == 200
    [recorded] = stack.upstream.requests
    assert recorded.request_line == b"GET " + target + b" HTTP/1.1"
    assert recorded.headers(b"host") == [b"matrix.test"]
    assert recorded.headers(b"x-forwarded-proto") == [b"https"]


H2_REJECTED = [
    line.split(b" ")[1]
    for line in REJECTED
    if line.startswith(b"GET ")
    and all(0x21 <= c <= 0x7E for c in line.split(b" ")[1])
    and b"#" not in line
]


@pytest.mark.parametrize("target", H2_REJECTED, ids=lambda t: t.decode())
@pytest_twisted.ensureDeferred
async def test_unsafe_targets_refused_over_h2(make_stack, target):
    stack = make_stack(tls=True)
    stream = await deferToThread(
        _in_client, stack.port, lambda c: c.request(b"GET", target)
    )
    assert stream.status == 400
    assert json.loads(bytes(stream.body))["errcode"] == "M_UNKNOWN"
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_errors_and_limits_over_h2(make_stack):
    stack = make_stack(tls=True, max_upload_size="1K")

    def work(client):
        not_found = client.request(b"GET", b"/_synapse/admin/v1/users")
        too_large = client.request(
            b"POST",
            b"/_matrix/media/v3/upload",
            headers=[(b"content-length", b"5000")],
            end_stream=False,
        )
        health = client.request(b"GET", b"/health")
        return not_found, too_large, health

    not_found, too_large, health = await deferToThread(_in_client, stack.port, work)
    assert not_found.status == 404
    assert json.loads(bytes(not_found.body))["errcode"] == "M_UNRECOGNIZED"
    assert too_large.status == 413
    assert json.loads(bytes(too_large.body))["errcode"] == "M_TOO_LARGE"
    assert health.status == 200 and bytes(health.body) == b"OK"


@pytest_twisted.ensureDeferred
async def test_upstream_failures_over_h2(make_stack):
    stack = make_stack(tls=True, timeouts={"upstream_response": "300ms"})

    def work(client):
        timed_out = client.request(b"GET", b"/_matrix/hang")
        died = client.request(b"GET", b"/_matrix/die")
        after = client.request(b"GET", b"/_matrix/client/versions")
        return timed_out, died, after

    timed_out, died, after = await deferToThread(_in_client, stack.port, work)
    assert timed_out.status == 504
    # The broken response is reset, never ended as if complete.
    assert died.reset and not died.ended
    # ...and the connection carries on with other streams.
    assert after.status == 200


@pytest_twisted.ensureDeferred
async def test_download_stalled_by_flow_control_while_other_streams_move(make_stack):
    stack = make_stack(tls=True)

    def work(client):
        big = client.start(
            b"GET", b"/_matrix/big?mb=20", keep_body=False, withhold_credit=True
        )
        client.until(lambda: client.streams[big].received > 0)
        small = [client.request(b"GET", b"/_matrix/client/versions") for _ in range(5)]
        stalled_at = client.streams[big].received
        client.grant(big)
        client.until(lambda: client.streams[big].ended, timeout=120)
        return small, stalled_at, client.streams[big]

    small, stalled_at, big = await deferToThread(_in_client, stack.port, work)
    assert all(s.status == 200 for s in small)
    assert stalled_at < 20 * MiB
    assert big.received == 20 * MiB
    assert big.headers[b"content-length"] == b"%d" % (20 * MiB)


@pytest_twisted.ensureDeferred
async def test_upload_while_other_streams_move(make_stack):
    stack = make_stack(tls=True)
    size = 20 * MiB

    def work(client):
        upload = client.start(
            b"PUT",
            b"/_matrix/media/v3/upload",
            headers=[(b"content-length", b"%d" % size)],
            end_stream=False,
        )
        answered: list[int] = []

        def between(sent: int) -> None:
            # Every 2 MiB, another stream gets its answer mid-upload.
            if sent >= (len(answered) + 1) * 2 * MiB:
                answered.append(
                    client.request(b"GET", b"/_matrix/client/versions").status
                )

        client.send_body(upload, size, between)
        client.until(lambda: client.streams[upload].ended)
        return answered, client.streams[upload]

    answered, upload = await deferToThread(_in_client, stack.port, work)
    assert answered and all(code == 200 for code in answered)
    assert upload.status == 200
    assert json.loads(bytes(upload.body))["body_length"] == size
    [recorded] = [r for r in stack.upstream.requests if r.target.endswith(b"upload")]
    assert recorded.body_length == size


@pytest_twisted.ensureDeferred
async def test_curl_negotiates_h2(make_stack):
    stack = make_stack(tls=True)
    result = await deferToThread(
        subprocess.run,
        [
            "curl",
            "-sk",
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            f"https://127.0.0.1:{stack.port}/_matrix/client/versions",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout == "2"


@pytest_twisted.ensureDeferred
async def test_http2_switched_off(make_stack):
    stack = make_stack(tls=True, listener={"http2": False})
    client = await deferToThread(H2Client, stack.port)
    try:
        assert client.alpn == "http/1.1"
    finally:
        client.close()
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    response = await deferToThread(
        exchange,
        stack.port,
        b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n",
        tls=context,
    )
    assert response.status == 200
