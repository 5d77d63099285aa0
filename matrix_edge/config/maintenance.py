"""The ``maintenance`` section: answering Matrix traffic with 503 while
Synapse is down on purpose. Re-read on SIGHUP."""

from __future__ import annotations

import attrs

from matrix_edge.config._base import (
    KeyPath,
    parse_duration,
    read_bool,
    read_mapping,
    read_str,
)

DEFAULT_MESSAGE = "The homeserver is down for maintenance"


@attrs.frozen
class MaintenanceConfig:
    enabled: bool = False
    retry_after: float = 300.0
    """Sent as ``Retry-After`` so that clients back off."""

    message: str = DEFAULT_MESSAGE


def parse_maintenance(value: object, path: KeyPath) -> MaintenanceConfig:
    data = read_mapping(value, path, ("enabled", "retry_after", "message"))
    return MaintenanceConfig(
        enabled=read_bool(data.get("enabled", False), (*path, "enabled")),
        retry_after=parse_duration(
            data.get("retry_after", "300s"), (*path, "retry_after")
        ),
        message=read_str(data.get("message", DEFAULT_MESSAGE), (*path, "message")),
    )
