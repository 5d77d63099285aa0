"""The ``access_log`` section."""

from __future__ import annotations

import attrs

from matrix_edge.config._base import KeyPath, read_bool, read_mapping


@attrs.frozen
class AccessLogConfig:
    enabled: bool = True


def parse_access_log(value: object, path: KeyPath) -> AccessLogConfig:
    data = read_mapping(value, path, ("enabled",))
    return AccessLogConfig(
        enabled=read_bool(data.get("enabled", True), (*path, "enabled"))
    )
