"""matrix-edge's own version, as ``twistd matrix-edge --version`` prints it."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def version() -> str:
    """The installed distribution's version; from a source tree that is not
    installed (``PYTHONPATH=.``), the one pyproject.toml declares."""
    try:
        return metadata.version("matrix-edge")
    except metadata.PackageNotFoundError:
        return _source_version() or "unknown"


def _source_version() -> str | None:
    try:
        text = _PYPROJECT.read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return found.group(1) if found else None
