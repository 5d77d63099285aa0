"""matrix-edge as operators run it: ``twistd matrix-edge`` in a process of
its own, with TLS, configuration checks and reloading on SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from tests import processes
from tests.pki import make_pki
from tests.rawhttp import connect, exchange, read_response


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
    result = processes.run_command("--config", str(config), "--check-config")
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
    result = processes.run_command("--config", str(config), "--check-config")
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
    result = processes.run_command("--config", str(config), "--check-config")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"matrix-edge: configuration error in {config}: workers.pools.synchrotron[1]: "
        "give the address only, without a path, got 'http://127.0.0.1:8084/_matrix'"
    ]
    assert "Traceback" not in result.stdout


def test_missing_config_file(tmp_path: Path) -> None:
    result = processes.run_command("--config", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0
    assert "cannot read config file" in result.stderr
    assert "Traceback" not in result.stderr


def test_generated_config_is_valid(tmp_path: Path) -> None:
    result = processes.run_command("--generate-config")
    assert result.returncode == 0
    document = yaml.safe_load(result.stdout)
    pki = make_pki(tmp_path / "pki")
    for listener in document["listeners"]:
        listener["tls"] = {
            "certificate_path": str(pki.chain_path),
            "private_key_path": str(pki.key_path),
        }
    config = processes.write_config(tmp_path / "edge.yaml", document)
    check = processes.run_command("--config", str(config), "--check-config")
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
    result = processes.run_command("--config", str(config), "--check-config")
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
        result = processes.run_command("--config", str(config))
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


def test_version_is_matrix_edges_own() -> None:
    result = processes.run_command("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"matrix-edge {metadata.version('matrix-edge')}\n"


# A failed start in daemon mode ends twistd with the reason on stderr: it
# used to wait forever for a daemon that had exited. Well within this
# bound; a hang fails the test at the subprocess timeout.
DAEMON_START_LIMIT = 15.0


def _start_daemon(
    tmp_path: Path, config: Path, wrapper: Sequence[str] = ()
) -> tuple[subprocess.CompletedProcess, float, Path]:
    """Run ``twistd matrix-edge`` as a daemon; its result, how long it took
    and its pidfile."""
    pidfile = tmp_path / "edge.pid"
    started = time.monotonic()
    result = subprocess.run(
        [
            *wrapper,
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
        timeout=2 * DAEMON_START_LIMIT,
        cwd=processes.REPO,
    )
    return result, time.monotonic() - started, pidfile


def _assert_failed_start(
    result: subprocess.CompletedProcess, elapsed: float, pidfile: Path, message: str
) -> None:
    assert result.returncode != 0
    assert elapsed < DAEMON_START_LIMIT
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not pidfile.exists()


def test_daemon_start_fails_fast_when_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = processes.write_config(
            tmp_path / "edge.yaml",
            {
                "listeners": [
                    {"port": processes.free_port(), "bind_addresses": ["127.0.0.1"]},
                    {"port": port, "bind_addresses": ["127.0.0.1"]},
                ],
                "upstream": "http://127.0.0.1:8008",
            },
        )
        result, elapsed, pidfile = _start_daemon(tmp_path, config)
    _assert_failed_start(
        result,
        elapsed,
        pidfile,
        f"matrix-edge: cannot listen on 127.0.0.1 port {port} "
        f"(listeners[1], client-{port}): Address already in use",
    )


def test_daemon_start_fails_fast_on_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("listeners: []\nupstream: http://127.0.0.1:8008\n")
    result, elapsed, pidfile = _start_daemon(tmp_path, config)
    _assert_failed_start(
        result, elapsed, pidfile, "listeners: at least one listener is required"
    )


def test_daemon_start_fails_fast_on_a_bad_certificate(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [
                {
                    "port": processes.free_port(),
                    "bind_addresses": ["127.0.0.1"],
                    "tls": {
                        "certificate_path": str(garbage),
                        "private_key_path": str(garbage),
                    },
                }
            ],
            "upstream": "http://127.0.0.1:8008",
        },
    )
    result, elapsed, pidfile = _start_daemon(tmp_path, config)
    _assert_failed_start(
        result, elapsed, pidfile, f"listeners[0].tls: no certificate in {garbage}"
    )


# Root without the capabilities that let it bind ports below 1024 and read
# any file: the permission errors an unprivileged user gets.
_WITHOUT_PRIVILEGE = (
    "setpriv",
    "--bounding-set=-net_bind_service,-dac_override,-dac_read_search",
)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to take privileges away",
)
def test_daemon_start_fails_fast_on_a_privileged_port(tmp_path: Path) -> None:
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [{"port": 443, "bind_addresses": ["127.0.0.1"]}],
            "upstream": "http://127.0.0.1:8008",
        },
    )
    result, elapsed, pidfile = _start_daemon(tmp_path, config, _WITHOUT_PRIVILEGE)
    _assert_failed_start(
        result,
        elapsed,
        pidfile,
        "cannot listen on 127.0.0.1 port 443 (listeners[0], client-443): "
        "Permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to take privileges away",
)
def test_daemon_start_fails_fast_on_an_unreadable_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    key = tmp_path / "privkey.pem"
    key.write_bytes(pki.key_path.read_bytes())
    key.chmod(0)
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [
                {
                    "port": processes.free_port(),
                    "bind_addresses": ["127.0.0.1"],
                    "tls": {
                        "certificate_path": str(pki.chain_path),
                        "private_key_path": str(key),
                    },
                }
            ],
            "upstream": "http://127.0.0.1:8008",
        },
    )
    result, elapsed, pidfile = _start_daemon(tmp_path, config, _WITHOUT_PRIVILEGE)
    _assert_failed_start(
        result,
        elapsed,
        pidfile,
        f"listeners[0].tls.private_key_path: file not readable by user root: {key}",
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to take privileges away",
)
def test_a_key_behind_an_unsearchable_directory_names_the_directory(
    tmp_path: Path,
) -> None:
    """As with certbot's 0700 live/ directory for another user: the file
    is there, the directory on its way is what stops the edge."""
    pki = make_pki(tmp_path / "pki")
    live = tmp_path / "live"
    live.mkdir()
    key = live / "privkey.pem"
    key.write_bytes(pki.key_path.read_bytes())
    live.chmod(0o600)
    config = processes.write_config(
        tmp_path / "edge.yaml",
        {
            "listeners": [
                {
                    "port": processes.free_port(),
                    "bind_addresses": ["127.0.0.1"],
                    "tls": {
                        "certificate_path": str(pki.chain_path),
                        "private_key_path": str(key),
                    },
                }
            ],
            "upstream": "http://127.0.0.1:8008",
        },
    )
    try:
        result, elapsed, pidfile = _start_daemon(tmp_path, config, _WITHOUT_PRIVILEGE)
    finally:
        live.chmod(0o700)
    _assert_failed_start(
        result,
        elapsed,
        pidfile,
        f"listeners[0].tls.private_key_path: permission denied on directory {live}",
    )


_VERSIONS = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n"
_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("level", "probes", "requests", "start_up"),
    [
        ("debug", True, True, True),
        ("info", False, True, True),
        ("warn", False, False, False),
    ],
)
def test_log_level_filters_twistds_log(
    tmp_path: Path, level: str, probes: bool, requests: bool, start_up: bool
) -> None:
    with processes.edge_before_upstream(tmp_path, log_level=level) as (port, edge):
        assert exchange(port, _HEALTH).status == 200
        assert exchange(port, _VERSIONS).status == 200
        # Written after the access entries: the log has caught up.
        os.kill(edge.pid, signal.SIGHUP)
        if level != "warn":
            processes.wait_until(lambda: "Reloading" in edge.log())
        else:
            time.sleep(1)
    log = edge.log()
    assert ('"GET /health HTTP/1.1"' in log) is probes
    assert ('"GET /_matrix/client/versions HTTP/1.1"' in log) is requests
    assert ("twistd" in log and "starting up" in log) is start_up
    assert ("#info]" in log) is (level != "warn")
    assert "Traceback" not in log


def test_a_bad_log_level_is_named(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text(
        "listeners: [{port: 8080}]\nupstream: http://127.0.0.1:8008\n"
        "log_level: verbose\n"
    )
    result = processes.run_command("--config", str(config), "--check-config")
    assert result.returncode != 0
    assert (
        f"configuration error in {config}: log_level: expected one of debug, "
        "info, warn or error, got 'verbose'"
    ) in result.stderr


def _jq(text: str) -> list[dict]:
    """Each line through ``jq -c .`` as a shipper reads it, when jq is
    installed; and through json.loads."""
    if shutil.which("jq"):
        result = subprocess.run(
            ["jq", "-c", "."], input=text, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == len(text.splitlines())
    return [json.loads(line) for line in text.splitlines()]


def _check_entry(entry: dict) -> None:
    assert type(entry["status"]) is int
    assert type(entry["client_disconnected"]) is bool
    assert type(entry["bytes"]) is int
    assert isinstance(entry["total_seconds"], float)
    assert isinstance(entry["timestamp"], float)
    assert abs(entry["timestamp"] - time.time()) < 120
    assert entry["time"][:4].isdigit() and entry["time"][-6] in "+-"


def test_json_access_log_file_is_json_lines_and_reopened_on_sighup(
    tmp_path: Path,
) -> None:
    access = tmp_path / "access.log"
    settings = {"access_log": {"format": "json", "path": str(access)}}
    with processes.edge_before_upstream(tmp_path, **settings) as (port, edge):
        assert exchange(port, _VERSIONS).status == 200
        assert exchange(port, _HEALTH).status == 200
        processes.wait_until(
            lambda: access.exists() and access.read_text().endswith("\n")
        )
        # logrotate moves the file, then sends SIGHUP (postrotate).
        access.rename(tmp_path / "access.log.1")
        os.kill(edge.pid, signal.SIGHUP)
        processes.wait_until(lambda: access.exists())
        assert exchange(port, _VERSIONS).status == 200
        processes.wait_until(lambda: len(access.read_text().splitlines()) == 1)
    rotated = _jq((tmp_path / "access.log.1").read_text())
    fresh = _jq(access.read_text())
    assert [e["target"] for e in rotated] == ["/_matrix/client/versions"]
    assert len(fresh) == 1
    for entry in rotated + fresh:
        _check_entry(entry)
        assert entry["status"] == 200
    # The access entries went to the file, not to twistd's log.
    assert "client/versions" not in edge.log()


def test_json_access_log_without_a_path_is_the_message(tmp_path: Path) -> None:
    """In twistd's log, after twistd's time and system, the message is the
    JSON object and nothing else."""
    with processes.edge_before_upstream(tmp_path, access_log={"format": "json"}) as (
        port,
        edge,
    ):
        assert exchange(port, _VERSIONS).status == 200
        processes.wait_until(lambda: "client/versions" in edge.log())
    [line] = [line for line in edge.log().splitlines() if "client/versions" in line]
    prefix, _, message = line.partition("] ")
    assert prefix.endswith(f"[matrix_edge.access.client-{port}#info")
    [entry] = _jq(message + "\n")
    _check_entry(entry)
    assert entry["status"] == 200
