"""Shared pieces of configuration parsing: errors that name the key, and
readers for the value syntaxes Synapse admins already know."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar

KeyPath = tuple[str | int, ...]

T = TypeVar("T")


class ConfigError(Exception):
    """A problem with the configuration, located by the path of the key.

    ``str()`` gives ``listeners[1].tls.certificate_path: file not found: ...``,
    the form operators see from ``--check-config`` and at start-up.
    """

    def __init__(self, path: Iterable[str | int], msg: str):
        self.path: KeyPath = tuple(path)
        self.msg = msg
        super().__init__(str(self))

    def __str__(self) -> str:
        where = format_path(self.path)
        return f"{where}: {self.msg}" if where else self.msg


def format_path(path: Iterable[str | int]) -> str:
    """Render a key path as ``a.b[2].c``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def fail(path: KeyPath, msg: str) -> NoReturn:
    raise ConfigError(path, msg)


class ConfigWarning:
    """A value that is valid but probably not what was meant, located like a
    L{ConfigError}: ``str()`` gives ``timeouts.upstream_response: ...``.
    The configuration loads; start-up logs it and ``--check-config`` prints
    it."""

    def __init__(self, path: Iterable[str | int], msg: str):
        self.path: KeyPath = tuple(path)
        self.msg = msg

    def __str__(self) -> str:
        where = format_path(self.path)
        return f"{where}: {self.msg}" if where else self.msg

    def __repr__(self) -> str:
        return f"<ConfigWarning {self}>"


# The warnings of the configuration being parsed, if one is: the parsers of
# each section report through L{warn}, without every one of them passing a
# list along.
_warnings: ContextVar[list[ConfigWarning] | None] = ContextVar(
    "matrix_edge_config_warnings", default=None
)


@contextmanager
def collecting_warnings() -> Iterator[list[ConfigWarning]]:
    """Collect what L{warn} reports while the block runs."""
    collected: list[ConfigWarning] = []
    token = _warnings.set(collected)
    try:
        yield collected
    finally:
        _warnings.reset(token)


def warn(path: KeyPath, msg: str) -> None:
    """Report a doubtful value to the surrounding L{collecting_warnings};
    outside one, nothing happens."""
    collected = _warnings.get()
    if collected is not None:
        collected.append(ConfigWarning(path, msg))


def read_mapping(
    value: object, path: KeyPath, allowed: Iterable[str] | None = None
) -> Mapping[str, Any]:
    """Check that ``value`` is a mapping with string keys, none unknown.

    Unknown keys are errors rather than warnings: a misspelt key that is
    silently ignored leaves a proxy running with a default the operator
    thought they had changed.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        fail(path, f"expected a mapping, got {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            fail(path, f"keys must be strings, got {key!r}")
    if allowed is not None:
        allowed = set(allowed)
        unknown = sorted(set(value) - allowed)
        if unknown:
            fail(
                (*path, unknown[0]),
                "unknown key (expected one of: " + ", ".join(sorted(allowed)) + ")",
            )
    return value


def read_sequence(value: object, path: KeyPath) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        fail(path, f"expected a list, got {_type_name(value)}")
    return value


def read_str(value: object, path: KeyPath) -> str:
    if not isinstance(value, str) or not value:
        fail(path, f"expected a non-empty string, got {_type_name(value)}")
    return value


def read_bool(value: object, path: KeyPath) -> bool:
    if not isinstance(value, bool):
        fail(path, f"expected true or false, got {_type_name(value)}")
    return value


def read_int(
    value: object, path: KeyPath, minimum: int | None = None, maximum: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, f"expected an integer, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        fail(path, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        fail(path, f"must be at most {maximum}, got {value}")
    return value


_SIZE = re.compile(r"\A\s*(\d+)\s*([KMGT]?)B?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object, path: KeyPath) -> int:
    """Parse a size as Synapse does: bytes as an integer, or ``"50M"`` with
    binary K/M/G/T suffixes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            fail(path, "a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    fail(path, f"expected a size such as 1048576, '512K' or '50M', got {value!r}")


_DURATION = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*\Z")
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
}


def parse_duration(value: object, path: KeyPath) -> float:
    """Parse a duration into seconds.

    Strings carry a unit (``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``); a bare
    integer is milliseconds, as in Synapse's configuration. A bare integer
    under 1000 is reported with L{warn}: ``upstream_response: 180`` is far
    more likely meant as three minutes than as 0.18 s, and would otherwise
    only show as 504s. Writing the unit (``180ms``) says it is meant.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            fail(path, "a duration cannot be negative")
        if 0 < value < 1000:
            warn(
                path,
                f"{value} is {value} ms (a bare number is milliseconds, as in "
                f"Synapse); write {value}s for seconds, or {value}ms if "
                f"milliseconds are meant",
            )
        return value / 1000.0
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    fail(
        path,
        f"expected a duration such as '500ms', '30s', '5m' or an integer of "
        f"milliseconds, got {value!r}",
    )


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
    }.get(type(value), type(value).__name__)
