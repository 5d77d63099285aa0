"""The ``listeners`` section: where matrix-edge accepts connections."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from typing import Any

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
from matrix_edge.config.domains import parse_domain
from matrix_edge.config.files import unreadable_reason
from matrix_edge.config.proxies import IPNetwork, parse_networks
from matrix_edge.config.upstream import UpstreamAddress, parse_upstream

# Synapse's own default: a dual-stack wildcard, with 0.0.0.0 listed so that
# hosts with IPv6 disabled still listen (the second bind failing is tolerated).
DEFAULT_BIND_ADDRESSES = ("::", "0.0.0.0")

# A metrics listener answers anyone who reaches it: loopback unless told
# otherwise, for a Prometheus on the same host (or a tunnel to it).
METRICS_BIND_ADDRESSES = ("127.0.0.1", "::1")


class ListenerType(enum.Enum):
    """What a listener serves, mirroring the client and federation ports."""

    CLIENT = "client"
    FEDERATION = "federation"
    METRICS = "metrics"
    """Prometheus metrics at ``/metrics``, and nothing of Matrix's."""


@attrs.frozen
class CertificateFiles:
    certificate_path: str
    """PEM file with the certificate followed by its intermediates."""

    private_key_path: str


@attrs.frozen
class TLSConfig:
    certificates: tuple[CertificateFiles, ...]
    """Certificate files, chosen by the name the client asks for (SNI)
    after the ACME certificates; the first certificate of all serves
    clients that ask for none of them."""

    acme_domains: tuple[str, ...] | None = None
    """Names with a certificate of their own from the ACME CA (the
    ``acme`` section), served before the files; None for none. ``()``
    only while parsing: ``acme: true``, the section's domains."""

    @property
    def certificate_path(self) -> str:
        return self.certificates[0].certificate_path

    @property
    def private_key_path(self) -> str:
        return self.certificates[0].private_key_path


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

    admin_allow: tuple[IPNetwork, ...] = ()
    """Client addresses that may reach ``/_synapse/admin`` here; none by
    default."""

    proxy_protocol: bool = False
    """Connections start with a PROXY protocol (v1 or v2) header giving the
    client's address, as sent by HAProxy or a cloud load balancer."""

    fallback: UpstreamAddress | None = None
    """Where requests outside the Matrix paths go (a web server), instead of
    a 404 from the edge."""

    @property
    def alpn_protocols(self) -> tuple[bytes, ...]:
        return (b"h2", b"http/1.1") if self.http2 else (b"http/1.1",)

    @property
    def scheme(self) -> bytes:
        """The value sent upstream as ``X-Forwarded-Proto``."""
        return b"https" if self.tls is not None else b"http"


_LISTENER_KEYS = (
    "port",
    "bind_addresses",
    "type",
    "tls",
    "tag",
    "http2",
    "admin_allow",
    "proxy_protocol",
    "fallback",
)
_CERTIFICATE_KEYS = ("certificate_path", "private_key_path")

# What a metrics listener takes; the other keys are for Matrix traffic, and
# are refused by name rather than silently ignored.
_METRICS_KEYS = ("port", "bind_addresses", "type", "tag")


def parse_listeners(value: object, path: KeyPath) -> tuple[ListenerConfig, ...]:
    items = read_sequence(value, path)
    if not items:
        fail(path, "at least one listener is required")
    listeners = tuple(parse_listener(item, (*path, i)) for i, item in enumerate(items))
    if all(listener.type is ListenerType.METRICS for listener in listeners):
        fail(path, "at least one client or federation listener is required")
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
            f"expected 'client', 'federation' or 'metrics', got {type_value!r}",
        )
    if listener_type is ListenerType.METRICS:
        return _parse_metrics_listener(data, path, port)

    bind_addresses = parse_bind_addresses(data, path, DEFAULT_BIND_ADDRESSES)

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

    fallback = None
    if data.get("fallback") is not None:
        fallback = parse_upstream(data["fallback"], (*path, "fallback"))

    return ListenerConfig(
        port=port,
        type=listener_type,
        bind_addresses=bind_addresses,
        tls=tls,
        tag=tag,
        http2=http2,
        admin_allow=parse_networks(data.get("admin_allow"), (*path, "admin_allow")),
        proxy_protocol=read_bool(
            data.get("proxy_protocol", False), (*path, "proxy_protocol")
        ),
        fallback=fallback,
    )


def parse_bind_addresses(
    data: Mapping[str, Any],
    path: KeyPath,
    default: tuple[str, ...],
    key: str = "bind_addresses",
) -> tuple[str, ...]:
    """The IP addresses under ``key`` of the mapping at ``path``."""
    if key not in data:
        return default
    bind_path = (*path, key)
    raw = read_sequence(data[key], bind_path)
    if not raw:
        fail(bind_path, "at least one address is required")
    return tuple(_read_ip(item, (*bind_path, i)) for i, item in enumerate(raw))


def _parse_metrics_listener(
    data: Mapping[str, Any], path: KeyPath, port: int
) -> ListenerConfig:
    """A ``type: metrics`` listener, as Synapse's: a port and addresses
    (loopback by default), in plain HTTP. Keys for Matrix traffic are
    errors: metrics are not served over TLS here (put them behind a tunnel
    or a proxy that terminates it), and no Matrix request is answered."""
    for key in data:
        if key not in _METRICS_KEYS:
            why = (
                "a metrics listener serves plain HTTP; TLS is not supported"
                if key == "tls"
                else "not used by a metrics listener"
            )
            fail((*path, key), f"{why} (it takes: {', '.join(_METRICS_KEYS)})")
    tag = f"{ListenerType.METRICS.value}-{port}"
    if "tag" in data:
        tag = read_str(data["tag"], (*path, "tag"))
    return ListenerConfig(
        port=port,
        type=ListenerType.METRICS,
        bind_addresses=parse_bind_addresses(data, path, METRICS_BIND_ADDRESSES),
        tag=tag,
        http2=False,
    )


def parse_tls(value: object, path: KeyPath) -> TLSConfig:
    """``tls`` holds one certificate, or ``certificates``: a list of them
    for SNI, and/or ``acme``: ``true`` for the certificates of the ``acme``
    section's domains, or a list of names."""
    if value is False:
        fail(path, "omit the key for a plain HTTP listener")
    data = read_mapping(value, path, (*_CERTIFICATE_KEYS, "certificates", "acme"))
    acme_domains = _parse_acme_names(data.get("acme"), (*path, "acme"))
    has_files = any(key in data for key in (*_CERTIFICATE_KEYS, "certificates"))
    if data.get("acme") is False and not has_files:
        fail(
            (*path, "acme"),
            "false leaves this listener without a certificate: give `true`, "
            "a list of names, or certificate files",
        )
    if acme_domains is not None and not has_files:
        return TLSConfig(certificates=(), acme_domains=acme_domains)
    if "certificates" in data:
        if any(key in data for key in _CERTIFICATE_KEYS):
            fail(path, "give either `certificates` or one certificate, not both")
        items = read_sequence(data["certificates"], (*path, "certificates"))
        if not items:
            fail((*path, "certificates"), "at least one certificate is required")
        certificates = tuple(
            _parse_certificate(item, (*path, "certificates", i))
            for i, item in enumerate(items)
        )
    else:
        certificates = (
            _parse_certificate(
                {k: v for k, v in data.items() if k in _CERTIFICATE_KEYS}, path
            ),
        )
    return TLSConfig(certificates=certificates, acme_domains=acme_domains)


def _parse_acme_names(value: object, path: KeyPath) -> tuple[str, ...] | None:
    """``acme: true`` (the section's domains, as ``()``), a list of names, or
    nothing."""
    if value is None or value is False:
        return None
    if value is True:
        return ()
    items = read_sequence(value, path)
    if not items:
        fail(path, "expected true or a list of names, got an empty list")
    return tuple(
        dict.fromkeys(parse_domain(item, (*path, i)) for i, item in enumerate(items))
    )


def _parse_certificate(value: object, path: KeyPath) -> CertificateFiles:
    data = read_mapping(value, path, _CERTIFICATE_KEYS)
    paths = {}
    for key in _CERTIFICATE_KEYS:
        if key not in data:
            fail((*path, key), "required")
        file_path = read_str(data[key], (*path, key))
        problem = unreadable_reason(file_path)
        if problem is not None:
            fail((*path, key), problem)
        paths[key] = file_path
    return CertificateFiles(**paths)


def _read_ip(value: object, path: KeyPath) -> str:
    text = read_str(value, path)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        fail(path, f"expected an IP address such as '::' or '127.0.0.1', got {text!r}")
    return text
