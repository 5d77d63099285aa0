"""Plain HTTP sent to a TLS listener gets a 400 in plain HTTP, as nginx
answers it, while TLS clients see no difference: over real loopback
sockets, with curl, with a ClientHello sent a byte at a time, and behind the
PROXY protocol."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests import processes
from tests.pki import make_pki
from tests.rawhttp import RawResponse, exchange, read_response

GET = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: hs.test\r\n\r\n"


def _client_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def _assert_plain_http_refused(response: RawResponse) -> None:
    assert response.status == 400
    assert json.loads(response.body) == {
        "errcode": "M_UNKNOWN",
        "error": "This port speaks HTTPS",
    }
    assert response.header("Connection") == "close"
    assert response.header("Content-Type") == "application/json"
    assert response.header("Server") == "matrix-edge"
    assert response.complete


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest_twisted.ensureDeferred
async def test_curl_over_plain_http_gets_a_400(make_stack):
    stack = make_stack(tls=True)
    url = f"http://127.0.0.1:{stack.port}/"
    result = await deferToThread(
        _curl, "--include", "--write-out", "\n%{http_code}", url
    )
    assert result.returncode == 0, result.stderr
    # Text mode: curl's CRLFs arrive as newlines.
    head, _, rest = result.stdout.partition("\n\n")
    body, _, code = rest.rpartition("\n")
    assert code == "400"
    assert head.splitlines()[0] == "HTTP/1.1 400 Bad Request"
    assert "Connection: close" in head.splitlines()
    assert json.loads(body)["error"] == "This port speaks HTTPS"
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_curl_over_https_is_unaffected(make_stack):
    stack = make_stack(tls=True)
    for version in ("--http1.1", "--http2"):
        result = await deferToThread(
            _curl,
            "--insecure",
            version,
            "--write-out",
            "%{http_code} %{http_version}",
            "--output",
            "/dev/null",
            f"https://127.0.0.1:{stack.port}/_matrix/client/versions",
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == ("200 1.1" if version == "--http1.1" else "200 2")
    assert len(stack.upstream.requests) == 2


@pytest.mark.parametrize(
    "raw",
    [
        GET,
        # A POST whose body follows the head: read and dropped, so the
        # answer is not lost to a reset.
        b"POST /_matrix/client/v3/login HTTP/1.1\r\nHost: hs.test\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"x" * 100000,
        # A first read of a single byte.
        b"G",
    ],
    ids=["get", "post-with-body", "one-byte"],
)
@pytest_twisted.ensureDeferred
async def test_plain_http_requests_get_a_400(make_stack, raw):
    stack = make_stack(tls=True)

    def send() -> RawResponse:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            sock.sendall(raw[:1])
            time.sleep(0.05)
            sock.sendall(raw[1:])
            return read_response(sock)

    _assert_plain_http_refused(await deferToThread(send))
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_the_answer_ends_the_connection(make_stack):
    stack = make_stack(tls=True)

    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            sock.sendall(GET)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    received = await deferToThread(send)
    assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert received.endswith(b'"error": "This port speaks HTTPS"}')


@pytest_twisted.ensureDeferred
async def test_no_server_header_when_turned_off(make_stack):
    stack = make_stack(tls=True, server_header=False)
    response = await deferToThread(exchange, stack.port, GET)
    assert response.status == 400
    assert response.header("Server") is None


def _trickled_handshake(port: int, prefix: bytes = b"") -> tuple[str | None, bytes]:
    """A TLS client that sends its ClientHello one byte at a time, then a
    request; returns the ALPN protocol and the response's status code."""
    context = _client_context(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(prefix)
        first = True
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if first:
                    for i in range(len(pending)):
                        sock.sendall(pending[i : i + 1])
                        time.sleep(0.001)
                    first = False
                elif pending:
                    sock.sendall(pending)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(data)
        sock.sendall(outgoing.read())
        alpn = tls.selected_alpn_protocol()
        # Whatever ALPN chose, an HTTP/1.1 request only works over http/1.1.
        if alpn != "http/1.1":
            return alpn, b""
        tls.write(GET)
        sock.sendall(outgoing.read())
        response = b""
        while b"\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                response += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
        return alpn, response.split(b"\r\n")[0].split(b" ")[1]


@pytest_twisted.ensureDeferred
async def test_a_client_hello_sent_byte_by_byte_still_handshakes(make_stack):
    stack = make_stack(tls=True, listener={"http2": False})
    alpn, status = await deferToThread(_trickled_handshake, stack.port)
    assert (alpn, status) == ("http/1.1", b"200")


@pytest_twisted.ensureDeferred
async def test_tls_behind_the_proxy_protocol(make_stack):
    """The PROXY header comes first and is taken off before the check: TLS
    after it handshakes, plain HTTP after it gets the 400."""
    stack = make_stack(tls=True, listener={"proxy_protocol": True, "http2": False})
    header = f"PROXY TCP4 198.51.100.7 127.0.0.1 40000 {stack.port}\r\n".encode()
    alpn, status = await deferToThread(_trickled_handshake, stack.port, header)
    assert (alpn, status) == ("http/1.1", b"200")
    [recorded] = stack.upstream.requests
    assert recorded.headers(b"x-forwarded-for") == [b"198.51.100.7"]

    response = await deferToThread(exchange, stack.port, header + GET)
    _assert_plain_http_refused(response)

    def header_then_request() -> RawResponse:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            sock.sendall(header)
            time.sleep(0.05)
            sock.sendall(GET)
            return read_response(sock)

    _assert_plain_http_refused(await deferToThread(header_then_request))
    assert len(stack.upstream.requests) == 1


@pytest_twisted.ensureDeferred
async def test_tls_garbage_still_just_closes(make_stack):
    """Bytes that are neither TLS nor HTTP go to TLS, which closes the
    connection as before."""
    stack = make_stack(tls=True)

    def send() -> bytes:
        with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
            try:
                return sock.recv(65536)
            except ConnectionResetError:
                return b""

    received = await deferToThread(send)
    assert not received.startswith(b"HTTP/")


# As twistd runs it ------------------------------------------------------------


def test_a_running_edge_answers_plain_http_on_its_tls_ports(tmp_path: Path) -> None:
    """The listeners service.py builds: plain HTTP gets the 400 on a TLS
    port, with and without the PROXY protocol, and TLS clients get through."""
    pki = make_pki(tmp_path / "pki")
    tls = {
        "certificate_path": str(pki.chain_path),
        "private_key_path": str(pki.key_path),
    }
    upstream_port = processes.free_port()
    direct, proxied = processes.free_port(), processes.free_port()
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [
                {"port": direct, "bind_addresses": ["127.0.0.1"], "tls": tls},
                {
                    "port": proxied,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": tls,
                    "proxy_protocol": True,
                    "http2": False,
                },
            ],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "server_header": "edge.test",
        },
    )
    upstream = processes.start_upstream(upstream_port, tmp_path / "upstream.log")
    edge = processes.start_edge(
        config, tmp_path / "edge.log", wait=("127.0.0.1", direct)
    )
    try:
        response = exchange(direct, GET)
        assert response.status == 400
        assert response.header("Server") == "edge.test"
        assert json.loads(response.body)["error"] == "This port speaks HTTPS"

        health = exchange(
            direct,
            b"GET /health HTTP/1.1\r\nHost: hs.test\r\n\r\n",
            tls=_client_context(),
        )
        assert (health.status, health.header("Server")) == (200, "edge.test")

        header = f"PROXY TCP4 198.51.100.7 127.0.0.1 40000 {proxied}\r\n".encode()
        assert exchange(proxied, header + GET).status == 400
        assert _trickled_handshake(proxied, header) == ("http/1.1", b"200")
    finally:
        edge.stop()
        upstream.stop()
    log = edge.log()
    assert "Plain HTTP from" in log
    assert "Traceback" not in log
