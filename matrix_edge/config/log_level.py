"""The ``log_level`` key: how much of matrix-edge's own log is written."""

from __future__ import annotations

import enum

from matrix_edge.config._base import KeyPath, fail


class LogLevelSetting(enum.Enum):
    """The least severe events written to twistd's log, named as in
    twisted.logger's ``LogLevel``."""

    DEBUG = "debug"
    """Everything, including ``/health`` and ``/ready`` probes."""

    INFO = "info"
    """Start-up, reloads, upstream state changes and the access log."""

    WARN = "warn"
    """Only what needs an operator's attention."""

    ERROR = "error"


# Python logging's names, which homeserver.yaml's log config uses.
_ALIASES = {"warning": LogLevelSetting.WARN, "critical": LogLevelSetting.ERROR}


def parse_log_level(value: object, path: KeyPath) -> LogLevelSetting:
    """A level name, in either case; ``warning`` is taken for ``warn``."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in _ALIASES:
            return _ALIASES[name]
        try:
            return LogLevelSetting(name)
        except ValueError:
            pass
    fail(path, f"expected one of debug, info, warn or error, got {value!r}")
