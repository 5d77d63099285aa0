"""The package list and data files in pyproject.toml cover the tree, so a
normal (not editable) install has every module and data file."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _setuptools() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_is_listed():
    packages = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "matrix_edge").rglob("__init__.py")
    }
    assert packages <= set(_setuptools()["packages"])


def test_every_data_file_is_listed():
    data = _setuptools()["package-data"]
    for path in (ROOT / "matrix_edge").rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".txt"):
            package = ".".join(path.parent.relative_to(ROOT).parts)
            assert path.name in data.get(package, []), path
