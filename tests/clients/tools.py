"""Finding (and where needed installing) the HTTP/2 client programs the
corpus tests drive."""

from __future__ import annotations

import os
import shutil
import subprocess

NGHTTP_PACKAGE = "nghttp2-client"


def ensure_nghttp() -> tuple[str | None, str]:
    """The path of ``nghttp``, installing Debian's nghttp2-client when it is
    missing; (None, reason) when it cannot be had."""
    found = shutil.which("nghttp")
    if found:
        return found, ""
    if shutil.which("apt-get") is None:
        return None, "nghttp is missing and there is no apt-get to install it"
    if os.geteuid() != 0:
        return None, "nghttp is missing and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    steps = [
        ["apt-get", *lock, "update"],
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", NGHTTP_PACKAGE],
    ]
    for step in steps:
        try:
            done = subprocess.run(
                step, capture_output=True, text=True, timeout=900, env=env
            )
        except subprocess.TimeoutExpired:
            return None, f"{' '.join(step)} timed out"
        if done.returncode != 0 and step[-1] == NGHTTP_PACKAGE:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return None, f"apt-get install {NGHTTP_PACKAGE} failed: {' | '.join(tail)}"
    found = shutil.which("nghttp")
    if not found:
        return None, f"{NGHTTP_PACKAGE} installed but nghttp is not on PATH"
    return found, ""
