"""The ``access_log`` section."""

from __future__ import annotations

import enum

import attrs

from matrix_edge.config._base import KeyPath, fail, read_bool, read_mapping


class AccessLogFormat(enum.Enum):
    TEXT = "text"
    """One line per request in the spirit of Synapse's request log."""

    JSON = "json"
    """One JSON object per request, for log shippers."""


@attrs.frozen
class AccessLogConfig:
    enabled: bool = True
    format: AccessLogFormat = AccessLogFormat.TEXT


def parse_access_log(value: object, path: KeyPath) -> AccessLogConfig:
    data = read_mapping(value, path, ("enabled", "format"))
    format_value = data.get("format", "text")
    try:
        log_format = AccessLogFormat(format_value)
    except ValueError:
        fail((*path, "format"), f"expected 'text' or 'json', got {format_value!r}")
    return AccessLogConfig(
        enabled=read_bool(data.get("enabled", True), (*path, "enabled")),
        format=log_format,
    )
