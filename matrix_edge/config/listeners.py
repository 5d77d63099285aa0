"""The ``listeners`` section: where matrix-edge accepts connections."""

from __future__ import annotations

import enum
import ipaddress
import os

import attrs

from matrix_edge.config._base import (
    KeyPath,
    fail,
    read_bool,
    read_int,
    read_mapping,
    read_sequence,
    read_str,
)

# Synapse's own default: a dual-stack wildcard, with 0.0.0.0 listed so that
# hosts with IPv6 disabled still listen (the second bind failing is tolerated).
DEFAULT_BIND_ADDRESSES = ("::", "0.0.0.0")


class ListenerType(enum.Enum):
    """What a listener serves, mirroring the client and federation ports."""

    CLIENT = "client"
    FEDERATION = "federation"


@attrs.frozen
class TLSConfig:
    certificate_path: str
    """PEM file with the certificate followed by its intermediates."""

    private_key_path: str


@attrs.frozen
class ListenerConfig:
    port: int
    type: ListenerType
    bind_addresses: tuple[str, ...] = DEFAULT_BIND_ADDRESSES
    tls: TLSConfig | None = None
    tag: str = ""
    """A short name for logs; defaults to ``<type>-<port>``."""

    http2: bool = True
    """Offer HTTP/2 through ALPN (TLS listeners only; Synapse is still
    reached over HTTP/1.1)."""

    @property
    def alpn_protocols(self) -> tuple[bytes, ...]:
        return (b"h2", b"http/1.1") if self.http2 else (b"http/1.1",)

    @property
    def scheme(self) -> bytes:
        """The value sent upstream as ``X-Forwarded-Proto``."""
        return b"https" if self.tls is not None else b"http"


_LISTENER_KEYS = ("port", "bind_addresses", "type", "tls", "tag", "http2")
_TLS_KEYS = ("certificate_path", "private_key_path")


def parse_listeners(value: object, path: KeyPath) -> tuple[ListenerConfig, ...]:
    items = read_sequence(value, path)
    if not items:
        fail(path, "at least one listener is required")
    listeners = tuple(parse_listener(item, (*path, i)) for i, item in enumerate(items))
    seen: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(listeners):
        for address in listener.bind_addresses:
            key = (address, listener.port)
            if key in seen:
                fail(
                    (*path, i, "port"),
                    f"{address} port {listener.port} is already used by "
                    f"listeners[{seen[key]}]",
                )
            seen[key] = i
    return listeners


def parse_listener(value: object, path: KeyPath) -> ListenerConfig:
    data = read_mapping(value, path, _LISTENER_KEYS)
    if "port" not in data:
        fail((*path, "port"), "required")
    port = read_int(data["port"], (*path, "port"), minimum=1, maximum=65535)

    type_value = data.get("type", "client")
    try:
        listener_type = ListenerType(type_value)
    except ValueError:
        fail(
            (*path, "type"),
            f"expected 'client' or 'federation', got {type_value!r}",
        )

    bind_addresses: tuple[str, ...] = DEFAULT_BIND_ADDRESSES
    if "bind_addresses" in data:
        bind_path = (*path, "bind_addresses")
        raw = read_sequence(data["bind_addresses"], bind_path)
        if not raw:
            fail(bind_path, "at least one address is required")
        bind_addresses = tuple(
            _read_ip(item, (*bind_path, i)) for i, item in enumerate(raw)
        )

    tls = None
    if data.get("tls") is not None:
        tls = parse_tls(data["tls"], (*path, "tls"))

    tag = f"{listener_type.value}-{port}"
    if "tag" in data:
        tag = read_str(data["tag"], (*path, "tag"))

    http2 = tls is not None
    if "http2" in data:
        http2 = read_bool(data["http2"], (*path, "http2"))
        if http2 and tls is None:
            fail((*path, "http2"), "HTTP/2 needs `tls` (cleartext h2c is not offered)")

    return ListenerConfig(
        port=port,
        type=listener_type,
        bind_addresses=bind_addresses,
        tls=tls,
        tag=tag,
        http2=http2,
    )


def parse_tls(value: object, path: KeyPath) -> TLSConfig:
    if value is False:
        fail(path, "omit the key for a plain HTTP listener")
    data = read_mapping(value, path, _TLS_KEYS)
    paths = {}
    for key in _TLS_KEYS:
        if key not in data:
            fail((*path, key), "required")
        file_path = read_str(data[key], (*path, key))
        if not os.path.isfile(file_path):
            fail((*path, key), f"file not found: {file_path}")
        if not os.access(file_path, os.R_OK):
            fail((*path, key), f"file not readable: {file_path}")
        paths[key] = file_path
    return TLSConfig(**paths)


def _read_ip(value: object, path: KeyPath) -> str:
    text = read_str(value, path)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        fail(path, f"expected an IP address such as '::' or '127.0.0.1', got {text!r}")
    return text


__all__ = [
    "DEFAULT_BIND_ADDRESSES",
    "ListenerConfig",
    "ListenerType",
    "TLSConfig",
    "parse_listeners",
]
