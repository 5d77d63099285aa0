"""``twistd matrix-edge --version``: the installed version, or the source
tree's when matrix-edge runs from a checkout that is not installed."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from matrix_edge import version as version_module

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def test_installed_version() -> None:
    assert version_module.version() == metadata.version("matrix-edge")


def test_source_version_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version_module.metadata, "version", not_installed)
    assert version_module.version() == _declared()
