"""The ``upstream`` and ``upstream_pool`` keys: where Synapse listens and how
many idle connections to keep to it."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import attrs

from matrix_edge.config._base import (
    KeyPath,
    fail,
    parse_duration,
    read_bool,
    read_int,
    read_mapping,
    read_str,
)

_HOST = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


@attrs.frozen
class UpstreamAddress:
    """A Synapse HTTP listener: TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.unix_path)

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@attrs.frozen
class UpstreamPoolConfig:
    max_idle_connections: int = 64
    """Idle keep-alive connections kept per upstream. Requests beyond this
    many at once still get their own connection, which is closed after use,
    so set it near the expected concurrency (parked long-polls included)."""

    idle_timeout: float = 60.0
    """How long an idle pooled connection is kept open."""


@attrs.frozen
class UpstreamCheckConfig:
    """Active checks of Synapse's ``/health``, as relayd's ``check``."""

    enabled: bool = True
    path: str = "/health"
    interval: float = 5.0
    """Between checks while Synapse answers; checks are every second while
    it does not, so that it is seen back soon."""

    fail_fast: bool = True
    """While the check fails, answer 502 at once instead of letting every
    request wait for its own connection attempt. Where the upstream is the
    only process for a request (main, the fallback web server, a pool with
    no member up), one request at a time still tries it, so that a Synapse
    back before the next check is used, and marked up, at once."""


def parse_upstream_check(value: object, path: KeyPath) -> UpstreamCheckConfig:
    data = read_mapping(value, path, ("enabled", "path", "interval", "fail_fast"))
    defaults = UpstreamCheckConfig()
    check_path = read_str(data.get("path", defaults.path), (*path, "path"))
    if not check_path.startswith("/") or any(c in check_path for c in " #"):
        fail((*path, "path"), f"expected a path such as /health, got {check_path!r}")
    interval = parse_duration(data.get("interval", "5s"), (*path, "interval"))
    if interval <= 0:
        fail((*path, "interval"), "must be greater than zero")
    return UpstreamCheckConfig(
        enabled=read_bool(data.get("enabled", True), (*path, "enabled")),
        path=check_path,
        interval=interval,
        fail_fast=read_bool(data.get("fail_fast", True), (*path, "fail_fast")),
    )


def parse_upstream(value: object, path: KeyPath) -> UpstreamAddress:
    text = read_str(value, path)
    if text.startswith("unix:"):
        socket_path = text[len("unix:") :]
        if not socket_path.startswith("/"):
            fail(path, f"a unix socket needs an absolute path, got {text!r}")
        return UpstreamAddress(unix_path=socket_path)

    parts = urlsplit(text)
    if parts.scheme != "http":
        fail(
            path,
            "expected http://HOST:PORT or unix:/path/to/socket "
            f"(Synapse listens in plain HTTP behind a proxy), got {text!r}",
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # A path here is what makes nginx canonicalise URIs; refuse it.
        fail(path, f"give the address only, without a path, got {text!r}")
    try:
        port = parts.port or 80
    except ValueError:
        fail(path, f"invalid port in {text!r}")
    host = parts.hostname
    if not host:
        fail(path, f"no host in {text!r}")
    if not _HOST.match(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            fail(path, f"invalid host in {text!r}")
    return UpstreamAddress(host=host, port=port)


def parse_upstream_pool(value: object, path: KeyPath) -> UpstreamPoolConfig:
    data = read_mapping(value, path, ("max_idle_connections", "idle_timeout"))
    defaults = UpstreamPoolConfig()
    return UpstreamPoolConfig(
        max_idle_connections=read_int(
            data.get("max_idle_connections", defaults.max_idle_connections),
            (*path, "max_idle_connections"),
            minimum=1,
        ),
        idle_timeout=parse_duration(
            data.get("idle_timeout", "60s"), (*path, "idle_timeout")
        ),
    )
