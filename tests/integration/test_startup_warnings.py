"""Values that load but are probably not what was meant: a bare duration
under 1000, which is milliseconds. ``--check-config`` prints a warning
naming the key and what to write; a running edge logs it at start-up."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests import processes

WARNING = (
    "timeouts.upstream_response: 180 is 180 ms (a bare number is milliseconds, "
    "as in Synapse); write 180s for seconds, or 180ms if milliseconds are meant"
)


def _config(tmp_path: Path, port: int = 8443, **extra: object) -> Path:
    document = {
        "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
        "upstream": "http://127.0.0.1:8008",
        **extra,
    }
    return processes.write_config(tmp_path / "edge.yaml", document)


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(processes.TWISTD, "-n", "--pidfile=", "matrix-edge"),
            *("--config", str(config), "--check-config"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=processes.REPO,
    )


def test_check_config_prints_the_warning_and_passes(tmp_path: Path) -> None:
    config = _config(
        tmp_path, timeouts={"upstream_response": 180, "upstream_connect": 500}
    )
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: configuration OK\n"
    assert result.stderr.splitlines() == [
        f"matrix-edge: warning in {config}: timeouts.upstream_connect: 500 is "
        "500 ms (a bare number is milliseconds, as in Synapse); write 500s for "
        "seconds, or 500ms if milliseconds are meant",
        f"matrix-edge: warning in {config}: {WARNING}",
    ]


def test_check_config_is_quiet_with_units(tmp_path: Path) -> None:
    config = _config(
        tmp_path, timeouts={"upstream_response": "180s", "upstream_connect": "500ms"}
    )
    result = _check(config)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_the_warning_is_logged_at_start_up(tmp_path: Path) -> None:
    port = processes.free_port()
    config = _config(tmp_path, port, timeouts={"upstream_response": 180})
    edge = processes.start_edge(config, tmp_path / "edge.log", wait=("127.0.0.1", port))
    try:
        log = edge.log()
    finally:
        edge.stop()
    [line] = [line for line in log.splitlines() if "upstream_response" in line]
    assert line.endswith(f"{config}: {WARNING}")
    assert "#warn]" in line
    assert "Traceback" not in log
