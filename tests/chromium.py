"""Headless Chromium for the tests that need a real browser: a HOME whose
NSS database trusts the suite's CA, and the command line for one page with
nothing reachable but the names the test maps to loopback."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


def trusting_home(home: Path, certutil: Path, ca_cert: Path) -> Path:
    """A HOME whose NSS database (where Chromium on Linux looks for locally
    added roots) trusts ``ca_cert`` for TLS servers."""
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    database = ["-d", f"sql:{nssdb}"]
    for argv in (
        [str(certutil), "-N", *database, "--empty-password"],
        [
            str(certutil),
            "-A",
            *database,
            "-n",
            "test CA",
            "-t",
            "C,,",
            "-i",
            str(ca_cert),
        ],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
    return home


def chromium_argv(
    chromium: Path,
    profile: Path,
    netlog: Path,
    url: str,
    hosts: dict[str, str],
    extra: Sequence[str] = (),
) -> list[str]:
    """Headless Chromium on one page, with nothing from outside: no proxy,
    no background services, and no name resolving but ``hosts`` (name to
    address); its NetLog goes to ``netlog``."""
    rules = ", ".join(f"MAP {name} {address}" for name, address in hosts.items())
    return [
        str(chromium),
        "--headless=new",
        # The suites run as root, where Chromium's sandbox cannot start.
        "--no-sandbox",
        f"--user-data-dir={profile}",
        "--no-proxy-server",
        f"--host-resolver-rules={rules}, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-sync",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--metrics-recording-only",
        f"--log-net-log={netlog}",
        *extra,
        url,
    ]
