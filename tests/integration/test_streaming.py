"""Large bodies cross the proxy without being held in memory.

matrix-edge runs as its own process so that its peak RSS (VmHWM) can be
read; the test asserts a memory bound, never a time.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from tests import processes
from tests.rawhttp import connect

MiB = 1024 * 1024
SIZE = 50 * MiB
# Peak RSS growth allowed while 50 MB passes through. Buffering the body
# anywhere would grow it by at least the body's size.
GROWTH_LIMIT_KIB = 16 * 1024


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streaming")
    upstream_port = processes.free_port()
    port = processes.free_port()
    config = processes.write_config(
        tmp / "edge.yaml",
        {
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "max_upload_size": "60M",
        },
    )
    upstream = processes.start_upstream(upstream_port, tmp / "upstream.log")
    edge = processes.start_edge(config, tmp / "edge.log", wait=("127.0.0.1", port))
    # Warm up the process so the first-request allocations are not counted.
    with connect(port) as sock:
        sock.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n")
        sock.recv(65536)
    yield edge, port
    edge.stop()
    upstream.stop()


def _report(name: str, before: dict, after: dict, seconds: float) -> None:
    print(
        f"\n{name}: {SIZE // MiB} MiB in {seconds:.2f}s; edge VmRSS "
        f"{before['VmRSS'] // 1024}->{after['VmRSS'] // 1024} MiB, VmHWM "
        f"{before['VmHWM'] // 1024}->{after['VmHWM'] // 1024} MiB "
        f"(peak growth {(after['VmHWM'] - before['VmHWM']) // 1024} MiB)"
    )


def test_50mb_upload_is_streamed(edge) -> None:
    process, port = edge
    before = processes.memory_kib(process.pid)
    digest = hashlib.sha256()
    chunk = bytes(range(256)) * 256  # 64 KiB
    started = time.monotonic()
    with connect(port) as sock:
        sock.sendall(
            b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % SIZE
        )
        for _ in range(SIZE // len(chunk)):
            sock.sendall(chunk)
            digest.update(chunk)
        response = b""
        while not response.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    seconds = time.monotonic() - started
    after = processes.memory_kib(process.pid)
    _report("upload", before, after, seconds)
    echoed = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert echoed["body_length"] == SIZE
    assert echoed["body_sha256"] == digest.hexdigest()
    assert after["VmHWM"] - before["VmHWM"] < GROWTH_LIMIT_KIB


def test_50mb_download_to_a_slow_reader(edge) -> None:
    process, port = edge
    before = processes.memory_kib(process.pid)
    started = time.monotonic()
    with connect(port) as sock:
        sock.setsockopt(
            __import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 65536
        )
        sock.sendall(b"GET /_matrix/big?mb=50 HTTP/1.1\r\nHost: h\r\n\r\n")
        # Read nothing for a while: the edge must stop reading Synapse
        # rather than queue the body.
        time.sleep(2)
        paused = processes.memory_kib(process.pid)
        received = 0
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        while received < SIZE:
            data = sock.recv(256 * 1024)
            if not data:
                break
            received += len(data)
    seconds = time.monotonic() - started
    after = processes.memory_kib(process.pid)
    _report("download", before, after, seconds)
    assert b"Content-Length: %d" % SIZE in head
    assert received == SIZE
    assert paused["VmHWM"] - before["VmHWM"] < GROWTH_LIMIT_KIB
    assert after["VmHWM"] - before["VmHWM"] < GROWTH_LIMIT_KIB


@pytest.fixture(scope="module")
def tls_edge(tmp_path_factory):
    from tests.pki import make_pki

    tmp = tmp_path_factory.mktemp("streaming-h2")
    pki = make_pki(tmp / "pki")
    upstream_port = processes.free_port()
    port = processes.free_port()
    config = processes.write_config(
        tmp / "edge.yaml",
        {
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": {
                        "certificate_path": str(pki.chain_path),
                        "private_key_path": str(pki.key_path),
                    },
                }
            ],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "max_upload_size": "60M",
        },
    )
    upstream = processes.start_upstream(upstream_port, tmp / "upstream.log")
    edge = processes.start_edge(config, tmp / "edge.log", wait=("127.0.0.1", port))
    yield edge, port
    edge.stop()
    upstream.stop()


def test_50mb_over_http2_both_ways(tls_edge) -> None:
    from tests.h2client import H2Client

    process, port = tls_edge
    client = H2Client(port)
    try:
        assert client.alpn == "h2"
        client.request(b"GET", b"/_matrix/client/versions")  # warm up
        before = processes.memory_kib(process.pid)
        started = time.monotonic()
        upload = client.start(
            b"POST",
            b"/_matrix/media/v3/upload",
            headers=[(b"content-length", b"%d" % SIZE)],
            end_stream=False,
        )
        client.send_body(upload, SIZE)
        client.until(lambda: client.streams[upload].ended, timeout=120)
        up_seconds = time.monotonic() - started
        after_upload = processes.memory_kib(process.pid)
        assert json.loads(bytes(client.streams[upload].body))["body_length"] == SIZE

        started = time.monotonic()
        download = client.start(
            b"GET", b"/_matrix/big?mb=50", keep_body=False, withhold_credit=True
        )
        client.until(lambda: client.streams[download].received > 0)
        time.sleep(2)  # the reader holds back: flow control must stop the edge
        paused = processes.memory_kib(process.pid)
        client.grant(download)
        client.until(lambda: client.streams[download].ended, timeout=120)
        down_seconds = time.monotonic() - started
        after = processes.memory_kib(process.pid)
        assert client.streams[download].received == SIZE
    finally:
        client.close()
    _report("h2 upload", before, after_upload, up_seconds)
    _report("h2 download", after_upload, after, down_seconds)
    assert after_upload["VmHWM"] - before["VmHWM"] < GROWTH_LIMIT_KIB
    assert paused["VmHWM"] - before["VmHWM"] < GROWTH_LIMIT_KIB
    assert after["VmHWM"] - before["VmHWM"] < GROWTH_LIMIT_KIB
