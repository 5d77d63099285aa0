"""The ``access_log`` section."""

from __future__ import annotations

import enum
import os

import attrs

from matrix_edge.config._base import KeyPath, fail, read_bool, read_mapping, read_str


class AccessLogFormat(enum.Enum):
    TEXT = "text"
    """One line per request in the spirit of Synapse's request log."""

    JSON = "json"
    """One JSON object per request, for log shippers."""


@attrs.frozen
class AccessLogConfig:
    enabled: bool = True
    format: AccessLogFormat = AccessLogFormat.TEXT
    path: str | None = None
    """A file of its own for the access log, written in batches, instead of
    the main log; reopened on SIGHUP, for logrotate."""


def parse_access_log(value: object, path: KeyPath) -> AccessLogConfig:
    data = read_mapping(value, path, ("enabled", "format", "path"))
    file_path = None
    if data.get("path") is not None:
        file_path = read_str(data["path"], (*path, "path"))
        directory = os.path.dirname(os.path.abspath(file_path))
        if not os.path.isdir(directory):
            fail((*path, "path"), f"directory not found: {directory}")
        if not os.access(directory, os.W_OK):
            fail((*path, "path"), f"directory not writable: {directory}")
    format_value = data.get("format", "text")
    try:
        log_format = AccessLogFormat(format_value)
    except ValueError:
        fail((*path, "format"), f"expected 'text' or 'json', got {format_value!r}")
    return AccessLogConfig(
        enabled=read_bool(data.get("enabled", True), (*path, "enabled")),
        format=log_format,
        path=file_path,
    )
