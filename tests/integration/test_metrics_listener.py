"""The metrics listener of a real edge: requests over HTTP/1.1, TLS and
HTTP/2 counted, certificates followed across SIGHUP, every process of
``processes: 2`` in one scrape, and the answer valid for ``promtool``."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from matrix_edge.tls import generate_self_signed
from tests import processes
from tests.e2e import environment
from tests.h2client import H2Client
from tests.rawhttp import exchange

VERSIONS = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"


@attrs.define
class Edge:
    process: processes.Process
    plain: int
    tls: int
    metrics: int
    certificate: Path
    key: Path

    def scrape_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            return response.read().decode()

    def scrape(self) -> dict[str, list]:
        return samples_of(self.scrape_text())


def samples_of(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    yield from _edge(tmp_path, count=1)


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[Edge]:
    yield from _edge(tmp_path, count=2)


def _edge(tmp_path: Path, count: int) -> Iterator[Edge]:
    """An edge of ``count`` processes before a recording upstream: a plain
    listener, a TLS one (tagged ``tls``) and a metrics listener."""
    certificate, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    generate_self_signed(certificate, key, ["localhost"], days=365)
    upstream_port = processes.free_port()
    plain, tls, metrics = (
        processes.free_port(),
        processes.free_port(),
        processes.free_port(),
    )
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            # The metrics listener first: the others keep their indexes
            # for the sockets children inherit.
            "listeners": [
                {"port": metrics, "type": "metrics"},
                {"port": plain, "bind_addresses": ["127.0.0.1"]},
                {
                    "port": tls,
                    "bind_addresses": ["127.0.0.1"],
                    "tag": "tls",
                    "tls": {
                        "certificate_path": str(certificate),
                        "private_key_path": str(key),
                    },
                },
            ],
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "processes": count,
        },
    )
    upstream = processes.start_upstream(upstream_port, tmp_path / "upstream.log")
    try:
        process = processes.start_edge(
            config, tmp_path / "edge.log", wait=("127.0.0.1", metrics)
        )
        try:
            yield Edge(process, plain, tls, metrics, certificate, key)
        finally:
            process.stop()
        assert "Traceback" not in process.log()
    finally:
        upstream.stop()


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _requests(samples) -> dict[tuple[str, str, str, str, str], float]:
    out: dict[tuple[str, str, str, str, str], float] = {}
    for s in samples["matrix_edge_requests"]:
        key = (
            s.labels["listener"],
            s.labels["protocol"],
            s.labels["method"],
            s.labels["route"],
            s.labels["status"],
        )
        out[key] = out.get(key, 0) + s.value
    return out


def _one(samples, family: str, **labels: str) -> float:
    [value] = [
        s.value
        for s in samples[family]
        if all(s.labels.get(k) == v for k, v in labels.items())
        and not s.name.endswith(("_bucket", "_sum"))
    ]
    return value


def test_requests_over_each_protocol_are_counted(edge: Edge) -> None:
    plain = f"client-{edge.plain}"
    for _ in range(3):
        assert exchange(edge.plain, VERSIONS).status == 200
    assert exchange(edge.plain, b"GET /nowhere HTTP/1.0\r\n\r\n").status == 404
    assert exchange(edge.tls, VERSIONS, tls=_unverified()).status == 200
    client = H2Client(edge.tls)
    try:
        assert client.alpn == "h2"
        assert client.request(b"GET", b"/_matrix/client/versions").status == 200
        assert client.request(b"GET", b"/health").status == 200
        samples = edge.scrape()
        assert (
            _one(
                samples, "matrix_edge_client_connections", listener="tls", protocol="2"
            )
            == 1
        )
    finally:
        client.close()

    processes.wait_until(
        lambda: (
            _one(
                edge.scrape(),
                "matrix_edge_client_connections",
                listener="tls",
                protocol="2",
            )
            == 0
        )
    )
    samples = edge.scrape()
    assert _requests(samples) == {
        (plain, "1.1", "GET", "main", "200"): 3,
        (plain, "1.0", "GET", "local", "404"): 1,
        ("tls", "1.1", "GET", "main", "200"): 1,
        ("tls", "2", "GET", "main", "200"): 1,
        ("tls", "2", "GET", "local", "200"): 1,
    }
    assert (
        _one(
            samples,
            "matrix_edge_request_duration_seconds",
            listener=plain,
            route="main",
        )
        == 3
    )
    assert (
        _one(samples, "matrix_edge_upstream_response_duration_seconds", upstream="main")
        == 5
    )
    assert _one(samples, "matrix_edge_sent_bytes", listener=plain) > 0
    assert _one(samples, "matrix_edge_requests_in_flight", listener="tls") == 0
    assert _one(samples, "matrix_edge_tls_handshakes", listener="tls", result="ok") == 2
    assert _one(samples, "matrix_edge_upstream_up", upstream="main") == 1
    [build] = samples["matrix_edge_build_info"]
    assert build.labels["version"] and build.labels["python"]
    assert _one(samples, "process_open_fds") > 0
    assert {s.labels["process"] for f in samples.values() for s in f} == {"0"}

    # Nothing of Matrix on the metrics port, nor metrics elsewhere.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            f"http://127.0.0.1:{edge.metrics}/_matrix/client/versions"
        )
    assert refused.value.code == 404
    assert (
        exchange(edge.plain, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").status == 404
    )


def test_certificate_expiry_follows_a_reload(edge: Edge) -> None:
    def expiry() -> float:
        return _one(
            edge.scrape(),
            "matrix_edge_certificate_expiry_timestamp_seconds",
            listener="tls",
            certificate=str(edge.certificate),
        )

    def not_after() -> float:
        certificate = x509.load_pem_x509_certificate(edge.certificate.read_bytes())
        return certificate.not_valid_after_utc.timestamp()

    assert expiry() == not_after()
    generate_self_signed(edge.certificate, edge.key, ["localhost"], days=30)
    os.kill(edge.process.pid, signal.SIGHUP)
    processes.wait_until(
        lambda: _one(edge.scrape(), "matrix_edge_reloads", result="ok") == 1
    )
    assert expiry() == not_after()
    assert _one(edge.scrape(), "matrix_edge_reloads", result="failed") == 0


def test_two_processes_in_one_scrape(two_processes: Edge) -> None:
    edge = two_processes
    plain = f"client-{edge.plain}"
    made = 0

    def both_served() -> bool:
        nonlocal made
        # New connections, so the kernel may hand them to either process.
        assert exchange(edge.plain, VERSIONS).status == 200
        made += 1
        served = {
            s.labels["process"]
            for s in edge.scrape()["matrix_edge_requests"]
            if s.value > 0
        }
        return served == {"0", "1"}

    processes.wait_until(both_served)
    text = edge.scrape_text()
    samples = samples_of(text)
    assert _requests(samples) == {(plain, "1.1", "GET", "main", "200"): made}
    per_process = {
        s.labels["process"]: s.value for s in samples["matrix_edge_requests"]
    }
    assert set(per_process) == {"0", "1"} and sum(per_process.values()) == made
    assert {s.labels["process"] for s in samples["process_cpu_seconds"]} == {"0", "1"}
    assert _one(samples, "matrix_edge_metrics_scrape_errors", process="0") == 0
    # Each family once, with every process's series under it.
    assert text.count("# TYPE matrix_edge_requests_total counter") == 1
    _promtool_check(text)


def _promtool_check(text: str) -> None:
    try:
        promtool = environment.apt_install(
            ["prometheus"], "promtool", "/usr/bin/promtool"
        )
    except environment.Unavailable as e:
        pytest.fail(f"promtool cannot be had here: {e}")
    result = subprocess.run(
        [str(promtool), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout
