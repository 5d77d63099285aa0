"""matrix-edge as operators run it: ``twistd matrix-edge`` in a process of
its own, with TLS, configuration checks and reloading on SIGHUP."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests import processes
from tests.pki import make_pki
from tests.rawhttp import connect, exchange, read_response


def _run_twistd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [processes.TWISTD, "-n", "--pidfile=", "matrix-edge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=processes.REPO,
    )


def test_check_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listeners": [
                    {"port": 8443, "type": "client"},
                    {
                        "port": 8448,
                        "type": "federation",
                        "tls": {
                            "certificate_path": str(tmp_path / "missing.pem"),
                            "private_key_path": str(tmp_path / "missing.key"),
                        },
                    },
                ],
                "upstream": "http://127.0.0.1:8008",
            }
        )
    )
    result = _run_twistd("--config", str(config), "--check-config")
    assert result.returncode != 0
    assert "listeners[1].tls.certificate_path: file not found:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("listeners: []\nupstream: http://127.0.0.1:8008\n", "listeners: at least one"),
        (
            "listeners:\n  - {port: 70000}\nupstream: x\n",
            "listeners[0].port: must be at most 65535",
        ),
        (
            "listeners:\n  - {port: 1, typo: 2}\nupstream: x\n",
            "listeners[0].typo: unknown key",
        ),
        (
            "listeners:\n  - {port: 1}\nupstream: http://h:8008/x\n",
            "upstream: give the address only",
        ),
        (
            "listeners:\n  - {port: 1}\nupstream: unix:/s\nmax_upload_size: lots\n",
            "max_upload_size: expected a size",
        ),
        (
            "listeners:\n  - {port: 1}\nupstream: unix:/s\ntimeouts: {body_idle: 5 years}\n",
            "timeouts.body_idle: expected a duration",
        ),
        (
            "listeners:\n  - {port: 1}\nupstream: unix:/s\ntrusted_proxies: [10.0.0.1/8]\n",
            "trusted_proxies[0]: expected a CIDR",
        ),
        (
            "listeners:\n  - {port: 1}\nupstream: unix:/s\nwell_known: {server: 'bad name:1'}\n",
            "well_known.server: invalid host name",
        ),
        ("listeners: [\n", "is not valid YAML"),
    ],
)
def test_check_config_errors(tmp_path: Path, document: str, message: str) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(document)
    result = _run_twistd("--config", str(config), "--check-config")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_names_a_workers_key(tmp_path: Path) -> None:
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [{"port": 8443}],
            "upstream": "http://127.0.0.1:8008",
            "workers": {
                "pools": {
                    "synchrotron": [
                        "http://127.0.0.1:8083",
                        "http://127.0.0.1:8084/_matrix",
                    ]
                }
            },
        },
    )
    result = _run_twistd("--config", str(config), "--check-config")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"matrix-edge: configuration error in {config}: workers.pools.synchrotron[1]: "
        "give the address only, without a path, got 'http://127.0.0.1:8084/_matrix'"
    ]
    assert "Traceback" not in result.stdout


def test_missing_config_file(tmp_path: Path) -> None:
    result = _run_twistd("--config", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0
    assert "cannot read config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_config_is_valid(tmp_path: Path) -> None:
    result = _run_twistd("--generate-config")
    assert result.returncode == 0
    document = yaml.safe_load(result.stdout)
    pki = make_pki(tmp_path / "pki")
    for listener in document["listeners"]:
        listener["tls"] = {
            "certificate_path": str(pki.chain_path),
            "private_key_path": str(pki.key_path),
        }
    config = processes.write_config(tmp_path / "edge.yaml", document)
    check = _run_twistd("--config", str(config), "--check-config")
    assert check.returncode == 0, check.stderr
    assert "configuration OK" in check.stdout


def test_bad_certificate_named_at_check(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [
                {
                    "port": 8443,
                    "tls": {
                        "certificate_path": str(garbage),
                        "private_key_path": str(garbage),
                    },
                }
            ],
            "upstream": "http://127.0.0.1:8008",
        },
    )
    result = _run_twistd("--config", str(config), "--check-config")
    assert result.returncode != 0
    assert "listeners[0].tls:" in result.stderr
    assert str(garbage) in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = processes.write_config(
            tmp_path / "edge.yaml",
            {
                "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
                "upstream": "http://127.0.0.1:8008",
            },
        )
        result = _run_twistd("--config", str(config))
    assert result.returncode != 0
    # In the foreground, twistd sends stderr into its log on stdout.
    output = result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1 port {port}" in output
    assert "Traceback" not in output


@pytest.fixture
def tls_edge(tmp_path: Path):
    """matrix-edge on TLS client and federation ports, IPv4 and IPv6, in
    front of the recording upstream."""
    pki = make_pki(tmp_path / "pki", hostnames=["matrix.test"])
    live_chain = tmp_path / "fullchain.pem"
    live_key = tmp_path / "privkey.pem"
    pki.leaf.install(live_chain, live_key)
    upstream_port = processes.free_port()
    client_port = processes.free_port()
    federation_port = processes.free_port()
    tls = {"certificate_path": str(live_chain), "private_key_path": str(live_key)}
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [
                {
                    "port": client_port,
                    "bind_addresses": ["127.0.0.1", "::1"],
                    "type": "client",
                    "tls": tls,
                },
                {
                    "port": federation_port,
                    "bind_addresses": ["127.0.0.1", "::1"],
                    "type": "federation",
                    "tls": tls,
                },
            ],
            "upstream": f"http://127.0.0.1:{upstream_port}",
        },
    )
    upstream = processes.start_upstream(upstream_port, tmp_path / "upstream.log")
    edge = processes.start_edge(
        config, tmp_path / "edge.log", wait=("127.0.0.1", client_port)
    )
    processes.wait_for_port(federation_port, "::1", process=edge.popen)
    yield {
        "pki": pki,
        "edge": edge,
        "client_port": client_port,
        "federation_port": federation_port,
        "chain": live_chain,
        "key": live_key,
    }
    edge.stop()
    upstream.stop()


def _client_context(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert_path))
    return context


def test_tls_forwarding_on_both_ports_and_families(tls_edge) -> None:
    context = _client_context(tls_edge["pki"])
    target = b"/_matrix/federation/v1/event/%24abc%2F%2Bdef"
    for host in ("127.0.0.1", "::1"):
        for port in (tls_edge["client_port"], tls_edge["federation_port"]):
            with connect(port, host, context, server_hostname="matrix.test") as sock:
                assert sock.version() in ("TLSv1.2", "TLSv1.3")
                assert sock.selected_alpn_protocol() in (None, "http/1.1")
                sock.sendall(
                    b"GET " + target + b" HTTP/1.1\r\nHost: matrix.test\r\n\r\n"
                )
                response = read_response(sock)
            assert response.status == 200
            echoed = json.loads(response.body)
            assert echoed["target"] == target.decode()
            head = echoed["head"].split("\r\n")
            assert "X-Forwarded-Proto: https" in head
            assert f"X-Forwarded-For: {host}" in head
    assert "Traceback" not in tls_edge["edge"].log()


def test_old_tls_versions_refused(tls_edge) -> None:
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = version
        context.maximum_version = version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            connect(tls_edge["client_port"], tls=context, server_hostname="matrix.test")


def test_chain_is_served(tls_edge) -> None:
    # The client trusts only the root: the intermediate must come from the
    # server for verification to succeed.
    context = _client_context(tls_edge["pki"])
    with connect(
        tls_edge["client_port"], tls=context, server_hostname="matrix.test"
    ) as sock:
        assert sock.getpeercert()["subject"]


def test_sighup_swaps_certificate_keeping_connections(tls_edge) -> None:
    pki = tls_edge["pki"]
    context = _client_context(pki)
    port = tls_edge["client_port"]
    request = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: matrix.test\r\n\r\n"

    def organization(sock: ssl.SSLSocket) -> str | None:
        for rdn in sock.getpeercert()["subject"]:
            for key, value in rdn:
                if key == "organizationName":
                    return value
        return None

    with connect(port, tls=context, server_hostname="matrix.test") as old:
        before = organization(old)
        rotated = pki.issue_leaf(
            "rotated", hostnames=["matrix.test"], organization="rotated"
        )
        rotated.install(tls_edge["chain"], tls_edge["key"])
        os.kill(tls_edge["edge"].pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        after = before
        while after != "rotated" and time.monotonic() < deadline:
            with connect(port, tls=context, server_hostname="matrix.test") as new:
                after = organization(new)
            time.sleep(0.05)
        assert after == "rotated"
        # The connection opened before the reload still works.
        old.sendall(request)
        assert read_response(old).status == 200
    assert before != "rotated"


def test_daemonises_with_pidfile(tmp_path: Path) -> None:
    port = processes.free_port()
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
            "upstream": "http://127.0.0.1:1",
        },
    )
    pidfile = tmp_path / "edge.pid"
    result = subprocess.run(
        [
            processes.TWISTD,
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(tmp_path / "edge.log"),
            "matrix-edge",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    processes.wait_for_port(port)
    pid = int(pidfile.read_text())
    try:
        response = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.body == b"OK"
        # No Synapse at the upstream: a Matrix error, and a log line that
        # says why.
        response = exchange(
            port, b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert response.status == 502
        assert json.loads(response.body)["errcode"] == "M_UNKNOWN"
        assert (
            "No Synapse answers at http://127.0.0.1:1"
            in (tmp_path / "edge.log").read_text()
        )
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists()


def test_sighup_switches_maintenance_mode(tmp_path: Path) -> None:
    upstream_port = processes.free_port()
    port = processes.free_port()
    document = {
        "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
        "upstream": f"http://127.0.0.1:{upstream_port}",
    }
    config = processes.write_config(tmp_path / "edge.yaml", document)
    upstream = processes.start_upstream(upstream_port, tmp_path / "upstream.log")
    edge = processes.start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
    request = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"

    def status_after_hup(expected: int) -> int:
        os.kill(edge.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        status = exchange(port, request).status
        while status != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            status = exchange(port, request).status
        return status

    try:
        assert exchange(port, request).status == 200
        document["maintenance"] = {"enabled": True, "retry_after": "1m"}
        processes.write_config(config, document)
        assert status_after_hup(503) == 503
        response = exchange(port, request)
        assert response.header("Retry-After") == "60"
        assert exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").status == 200

        # A file that no longer validates changes nothing.
        config.write_text("listeners: []\n")
        os.kill(edge.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "Not reloading" not in edge.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "upstream: required" in edge.log()
        assert exchange(port, request).status == 503

        document["maintenance"] = {"enabled": False}
        processes.write_config(config, document)
        assert status_after_hup(200) == 200
        assert "Traceback" not in edge.log()
    finally:
        edge.stop()
        upstream.stop()
