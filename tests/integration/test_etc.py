"""The files in etc/ work as written: the sample configuration, the init
script and the systemd unit's commands."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests import processes
from tests.pki import make_pki
from tests.rawhttp import exchange

ETC = processes.REPO / "etc"


def _sample_config(tmp_path: Path) -> tuple[Path, int]:
    """etc/matrix-edge.yaml with only ports, addresses and certificate paths
    changed so it runs unprivileged on loopback."""
    pki = make_pki(tmp_path / "pki")
    text = (ETC / "matrix-edge.yaml").read_text()
    text = text.replace(
        "/etc/matrix-edge/tls/fullchain.pem", str(pki.chain_path)
    ).replace("/etc/matrix-edge/tls/privkey.pem", str(pki.key_path))
    document = yaml.safe_load(text)
    assert [entry["port"] for entry in document["listeners"]] == [443, 8448]
    assert document["upstream"] == "http://127.0.0.1:8008"
    port = processes.free_port()
    for listener in document["listeners"]:
        listener["port"] = (
            port if listener["type"] == "client" else processes.free_port()
        )
        listener["bind_addresses"] = ["127.0.0.1"]
    return processes.write_config(tmp_path / "matrix-edge.yaml", document), port


def _tls_health(port: int) -> bytes:
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", tls=context).body


def test_init_script_lifecycle(tmp_path: Path) -> None:
    config, port = _sample_config(tmp_path)
    env = dict(
        os.environ,
        TWISTD=processes.TWISTD,
        CONFIG=str(config),
        PIDFILE=str(tmp_path / "run" / "matrix-edge.pid"),
        LOGFILE=str(tmp_path / "log" / "matrix-edge.log"),
        DEFAULTS=str(tmp_path / "no-defaults"),
        PYTHONPATH=str(processes.REPO),
    )

    def init(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", str(ETC / "init.d" / "matrix-edge"), action],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert init("status").returncode == 3
    started = init("start")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        processes.wait_for_port(port)
        assert _tls_health(port) == b"OK"
        status = init("status")
        assert status.returncode == 0
        assert "is running" in status.stdout
        assert init("start").stdout.startswith("matrix-edge is already running")
        assert init("reload").returncode == 0
        assert _tls_health(port) == b"OK"
        restarted = init("restart")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        processes.wait_for_port(port)
        assert _tls_health(port) == b"OK"
    finally:
        stopped = init("stop")
    assert stopped.returncode == 0
    assert init("status").returncode == 3
    assert not Path(env["PIDFILE"]).exists()


def _init_start(
    tmp_path: Path, config: Path
) -> tuple[subprocess.CompletedProcess, float]:
    """``etc/init.d/matrix-edge start``, and how long it took; a start that
    hangs fails at the timeout."""
    started = time.monotonic()
    result = subprocess.run(
        ["sh", str(ETC / "init.d" / "matrix-edge"), "start"],
        env=dict(
            os.environ,
            TWISTD=processes.TWISTD,
            CONFIG=str(config),
            PIDFILE=str(tmp_path / "run" / "pid"),
            LOGFILE=str(tmp_path / "log" / "log"),
            DEFAULTS="/nonexistent",
            PYTHONPATH=str(processes.REPO),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - started


def test_init_script_refuses_a_broken_config(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("listeners: []\nupstream: http://127.0.0.1:8008\n")
    result, elapsed = _init_start(tmp_path, config)
    assert result.returncode != 0
    assert elapsed < 30
    assert "listeners: at least one listener is required" in result.stderr
    assert not (tmp_path / "run" / "pid").exists()


def test_init_script_start_fails_fast_when_port_is_taken(tmp_path: Path) -> None:
    config, port = _sample_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result, elapsed = _init_start(tmp_path, config)
    assert result.returncode != 0
    assert elapsed < 30
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr
    assert "matrix-edge did not start" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "pid").exists()


def _unit_commands() -> dict[str, list[str]]:
    commands: dict[str, list[str]] = {}
    for line in (ETC / "matrix-edge.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("ExecStartPre", "ExecStart", "ExecReload"):
            commands[key] = shlex.split(value)
    return commands


def test_systemd_unit_commands(tmp_path: Path) -> None:
    config, port = _sample_config(tmp_path)
    commands = _unit_commands()

    def localise(argv: list[str]) -> list[str]:
        return [
            processes.TWISTD
            if a == "/opt/matrix-edge/bin/twistd"
            else str(config)
            if a == "/etc/matrix-edge/matrix-edge.yaml"
            else a
            for a in argv
        ]

    check = subprocess.run(
        localise(commands["ExecStartPre"]), capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    process = processes.start(localise(commands["ExecStart"]), tmp_path / "edge.log")
    try:
        processes.wait_for_port(port, process=process.popen)
        assert _tls_health(port) == b"OK"
        assert commands["ExecReload"] == ["/bin/kill", "-HUP", "$MAINPID"]
        os.kill(process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "Reloading" not in process.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Reloading" in process.log()
        assert _tls_health(port) == b"OK"
    finally:
        process.stop()
    # twistd ends by re-raising the signal it stopped on, which systemd
    # counts as a clean stop for SIGTERM.
    assert process.popen.returncode in (0, -signal.SIGTERM)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit, with its commands pointed
    at this checkout's twistd."""
    unit = tmp_path / "matrix-edge.service"
    unit.write_text(
        (ETC / "matrix-edge.service")
        .read_text()
        .replace("/opt/matrix-edge/bin/twistd", processes.TWISTD)
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "matrix-edge.service" not in result.stderr, result.stderr
