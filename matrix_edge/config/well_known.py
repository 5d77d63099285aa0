"""The ``well_known`` section: delegation documents served by the edge."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import attrs

from matrix_edge.config._base import KeyPath, fail, read_mapping, read_str

_DNS_NAME = re.compile(r"\A[A-Za-z0-9.-]{1,255}\Z")


@attrs.frozen
class WellKnownConfig:
    """JSON bodies for ``/.well-known/matrix/{server,client,support}``, or
    None where that document is not served."""

    server: bytes | None = None
    client: bytes | None = None
    support: bytes | None = None

    @property
    def enabled(self) -> bool:
        return any((self.server, self.client, self.support))


def parse_well_known(value: object, path: KeyPath) -> WellKnownConfig:
    data = read_mapping(value, path, ("server", "client", "support"))
    server = None
    if data.get("server") is not None:
        name = read_str(data["server"], (*path, "server"))
        check_server_name(name, (*path, "server"))
        server = _encode({"m.server": name})
    client = _json_object(data.get("client"), (*path, "client"))
    support = _json_object(data.get("support"), (*path, "support"))
    return WellKnownConfig(server=server, client=client, support=support)


def check_server_name(name: str, path: KeyPath) -> None:
    """Check ``name`` against the Matrix server-name grammar: a DNS name, an
    IPv4 address or a bracketed IPv6 address, with an optional port."""
    host, port = name, None
    if name.startswith("["):
        end = name.find("]")
        if end == -1:
            fail(path, f"unclosed '[' in server name {name!r}")
        host, rest = name[1:end], name[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            fail(path, f"invalid IPv6 address in server name {name!r}")
        if rest:
            if not rest.startswith(":"):
                fail(path, f"invalid server name {name!r}")
            port = rest[1:]
    else:
        if ":" in name:
            host, port = name.rsplit(":", 1)
        if not _DNS_NAME.match(host) or host.startswith(".") or ".." in host:
            fail(path, f"invalid host name in server name {name!r}")
    if port is not None and (
        not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536
    ):
        fail(path, f"invalid port in server name {name!r}")


def _json_object(value: Any, path: KeyPath) -> bytes | None:
    if value is None:
        return None
    data = read_mapping(value, path)
    try:
        return _encode(data)
    except (TypeError, ValueError) as e:
        fail(path, f"cannot be served as JSON: {e}")


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=False).encode("utf-8")
