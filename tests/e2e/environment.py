"""What the end-to-end suite installs: its own virtualenv with pinned Synapse
and matrix-nio, and Debian's redis-server for Synapse's workers.

They are not dependencies of matrix-edge and must not be mixed into the test
environment, so the suite builds a separate virtualenv the first time it runs
and reuses it while ``requirements.txt`` is unchanged. The location is
``<repo>/.e2e-cache/`` unless ``MATRIX_EDGE_E2E_CACHE`` names another folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REQUIREMENTS = HERE / "requirements.txt"
INSTALL_TIMEOUT = 600.0
REDIS_PACKAGE = "redis-server"


class Unavailable(Exception):
    """Something the suite needs could not be installed here."""


def cache_dir() -> Path:
    configured = os.environ.get("MATRIX_EDGE_E2E_CACHE")
    return Path(configured) if configured else REPO / ".e2e-cache"


def pinned_version(package: str) -> str:
    """The version ``requirements.txt`` pins ``package`` to."""
    for line in REQUIREMENTS.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package.lower():
            return version.strip()
    raise LookupError(f"{package} is not pinned in {REQUIREMENTS}")


def ensure_venv() -> Path:
    """Return the python of a virtualenv holding exactly the pinned packages,
    creating it if it is missing or was made from other pins."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / "venv"
    python = venv / "bin" / "python"
    marker = venv / "e2e-requirements.sha256"
    wanted = hashlib.sha256(
        REQUIREMENTS.read_bytes() + sys.version.encode()
    ).hexdigest()
    with open(root / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == wanted and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log = root / "install.log"
        started = time.monotonic()
        with open(log, "w") as out:
            for argv in (
                [sys.executable, "-m", "venv", str(venv)],
                [
                    str(python),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "-r",
                    str(REQUIREMENTS),
                ],
            ):
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                result = subprocess.run(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=INSTALL_TIMEOUT,
                )
                if result.returncode != 0:
                    tail = "".join(log.read_text().splitlines(True)[-30:])
                    raise RuntimeError(
                        f"installing the e2e environment failed "
                        f"(exit {result.returncode}); see {log}:\n{tail}"
                    )
        marker.write_text(wanted)
        sys.stderr.write(f"\ne2e: built {venv} in {time.monotonic() - started:.0f}s\n")
        return python


def ensure_redis_server() -> Path:
    """Return the path of Debian's ``redis-server``, installing the package
    with apt-get if it is missing (once per machine; an ``apt-get update``
    only if the first try fails). Raise Unavailable if it cannot be had.

    Only the binary is wanted: the tests run their own server on a loopback
    address and port of their own, and leave the system service alone."""
    found = shutil.which("redis-server") or _executable("/usr/bin/redis-server")
    if found:
        return Path(found)
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise Unavailable("redis-server is not installed and there is no apt-get")
    if os.geteuid() != 0:
        raise Unavailable("redis-server is not installed; installing it needs root")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    log = root / "apt-redis.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt_get, "install", "-y", "--no-install-recommends", REDIS_PACKAGE]
    with open(root / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(log, "a") as out:
            for argv in (install, [apt_get, "update"], install):
                if _executable("/usr/bin/redis-server"):
                    break
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                try:
                    subprocess.run(
                        argv,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=env,
                        timeout=INSTALL_TIMEOUT,
                    )
                except (OSError, subprocess.TimeoutExpired) as e:
                    out.write(f"{argv[1]} failed: {e!r}\n")
    found = shutil.which("redis-server") or _executable("/usr/bin/redis-server")
    if not found:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        raise Unavailable(
            f"apt-get could not install {REDIS_PACKAGE} (see {log}):\n{tail}"
        )
    return Path(found)


def _executable(path: str) -> str | None:
    return path if os.access(path, os.X_OK) else None
