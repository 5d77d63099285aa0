"""What the end-to-end suite installs: its own virtualenv with pinned Synapse
and matrix-nio, Debian's redis-server for Synapse's workers, and for the
browser test Debian's Chromium and the pinned npm packages of
``browser/package.json`` (matrix-js-sdk and esbuild).

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
# certutil, to trust the suite's CA in the browser's profile, is in
# libnss3-tools.
CHROMIUM_PACKAGES = ["chromium", "libnss3-tools"]
BROWSER = HERE / "browser"


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
    with apt-get if it is missing (once per machine).

    Only the binary is wanted: the tests run their own server on a loopback
    address and port of their own, and leave the system service alone."""
    return apt_install([REDIS_PACKAGE], "redis-server", "/usr/bin/redis-server")


def ensure_chromium() -> tuple[Path, Path]:
    """Return the paths of Debian's ``chromium`` and of ``certutil`` (to
    trust the suite's CA in a browser profile), installing the packages with
    apt-get if they are missing."""
    chromium = apt_install(CHROMIUM_PACKAGES, "chromium", "/usr/bin/chromium")
    certutil = apt_install(CHROMIUM_PACKAGES, "certutil", "/usr/bin/certutil")
    return chromium, certutil


def apt_install(packages: list[str], command: str, path: str) -> Path:
    """Return where ``command`` is, installing ``packages`` with apt-get if
    it is missing: at most once per machine at a time, waiting for other
    installs to free dpkg's lock, with an ``apt-get update`` only if the
    first try fails. Raise Unavailable if it cannot be had."""
    found = shutil.which(command) or _executable(path)
    if found:
        return Path(found)
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise Unavailable(f"{command} is not installed and there is no apt-get")
    if os.geteuid() != 0:
        raise Unavailable(f"{command} is not installed; installing it needs root")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"apt-{packages[0]}.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", f"DPkg::Lock::Timeout={INSTALL_TIMEOUT:.0f}"]
    install = [apt_get, *wait, "install", "-y", "--no-install-recommends", *packages]
    with open(root / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(log, "a") as out:
            for argv in (install, [apt_get, *wait, "update"], install):
                if _executable(path):
                    break
                out.write(f"$ {' '.join(argv)}\n")
                out.flush()
                started = time.monotonic()
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
                    out.write(f"apt-get failed: {e!r}\n")
                out.write(f"({time.monotonic() - started:.0f}s)\n")
    found = shutil.which(command) or _executable(path)
    if not found:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        raise Unavailable(
            f"apt-get could not install {' '.join(packages)} (see {log}):\n{tail}"
        )
    return Path(found)


def ensure_browser_packages() -> Path:
    """Return a ``node_modules`` folder holding exactly the npm packages
    pinned by ``browser/package-lock.json``, installing them with ``npm ci``
    if it is missing or was made from other pins. npm itself comes from
    Debian if the machine has none.

    Install scripts are not run: esbuild's binary comes in a package of its
    own, and nothing else needs one."""
    npm = apt_install(["npm"], "npm", "/usr/bin/npm")
    root = cache_dir() / "browser"
    root.mkdir(parents=True, exist_ok=True)
    modules = root / "node_modules"
    marker = root / "package-lock.sha256"
    pins = [BROWSER / "package.json", BROWSER / "package-lock.json"]
    wanted = hashlib.sha256(b"".join(p.read_bytes() for p in pins)).hexdigest()
    with open(cache_dir() / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == wanted and modules.is_dir():
            return modules
        marker.unlink(missing_ok=True)
        for pin in pins:
            shutil.copyfile(pin, root / pin.name)
        log = root / "npm-install.log"
        argv = [str(npm), "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
        started = time.monotonic()
        with open(log, "w") as out:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            try:
                result = subprocess.run(
                    argv,
                    cwd=root,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=INSTALL_TIMEOUT,
                )
                failed = result.returncode != 0
            except (OSError, subprocess.TimeoutExpired) as e:
                out.write(f"npm failed: {e!r}\n")
                failed = True
        if failed:
            tail = "".join(log.read_text().splitlines(True)[-30:])
            raise Unavailable(f"npm ci failed in {root} (see {log}):\n{tail}")
        marker.write_text(wanted)
        sys.stderr.write(
            f"\ne2e: npm packages in {modules} in {time.monotonic() - started:.0f}s\n"
        )
        return modules


def _executable(path: str) -> str | None:
    return path if os.access(path, os.X_OK) else None
