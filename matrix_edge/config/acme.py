"""The ``acme`` section: certificates from an ACME certificate authority
(Let's Encrypt by default), obtained and renewed by the edge itself.

A TLS listener asks for them with ``tls: {acme: true}`` (the names in
``acme.domains``) or ``tls: {acme: [names]}``; see
L{matrix_edge.config.listeners.parse_tls}. The section says where the
certificates come from and where they are kept.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import attrs

from matrix_edge.config._base import (
    KeyPath,
    fail,
    read_int,
    read_mapping,
    read_sequence,
    read_str,
)
from matrix_edge.config.domains import parse_domain
from matrix_edge.config.files import unreadable_reason
from matrix_edge.config.listeners import parse_bind_addresses

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
DIRECTORY_NAMES = {
    "letsencrypt": LETSENCRYPT,
    "letsencrypt-staging": LETSENCRYPT_STAGING,
}

DEFAULT_STATE_DIRECTORY = "/var/lib/matrix-edge/acme"

# The port-80 listener for http-01 answers anyone: every address by default.
HTTP01_BIND_ADDRESSES = ("::", "0.0.0.0")

_KEYS = (
    "domains",
    "directory",
    "contact",
    "state_directory",
    "ca_bundle",
    "http01_port",
    "http01_bind_addresses",
)

_EMAIL = re.compile(r"\A[^@\s:]+@[^@\s]+\.[^@\s]+\Z")


@attrs.frozen
class AcmeConfig:
    domains: tuple[str, ...] = ()
    """The names served by ``tls: {acme: true}`` listeners; listeners may
    name others of their own."""

    directory: str = LETSENCRYPT
    """The ACME directory URL; ``letsencrypt-staging`` for Let's Encrypt's
    staging CA (untrusted certificates, generous rate limits)."""

    contact: str | None = None
    """An e-mail address for the CA's expiry and policy notices."""

    state_directory: str = DEFAULT_STATE_DIRECTORY
    """The account key, certificates and keys, and pending challenges;
    created owner-only."""

    ca_bundle: str | None = None
    """PEM file of the CAs that sign the ACME server's own HTTPS
    certificate, for a private ACME server; the system's store otherwise."""

    http01_port: int | None = None
    """A plain HTTP port (80) answering http-01 challenges and redirecting
    everything else to HTTPS; without it, only tls-alpn-01 is used, answered
    on the TLS listeners themselves."""

    http01_bind_addresses: tuple[str, ...] = HTTP01_BIND_ADDRESSES


def parse_acme(value: object, path: KeyPath) -> AcmeConfig | None:
    if value is None:
        return None
    data = read_mapping(value, path, _KEYS)

    domains: tuple[str, ...] = ()
    if "domains" in data:
        items = read_sequence(data["domains"], (*path, "domains"))
        domains = tuple(
            parse_domain(item, (*path, "domains", i)) for i, item in enumerate(items)
        )
        domains = tuple(dict.fromkeys(domains))

    directory = LETSENCRYPT
    if "directory" in data:
        directory = _parse_directory(data["directory"], (*path, "directory"))

    contact = None
    if "contact" in data:
        contact = read_str(data["contact"], (*path, "contact")).removeprefix("mailto:")
        if not _EMAIL.match(contact):
            fail((*path, "contact"), f"expected an e-mail address, got {contact!r}")

    state_directory = DEFAULT_STATE_DIRECTORY
    if "state_directory" in data:
        state_directory = read_str(data["state_directory"], (*path, "state_directory"))
        if not state_directory.startswith("/"):
            fail((*path, "state_directory"), "must be an absolute path")

    ca_bundle = None
    if "ca_bundle" in data:
        ca_bundle = read_str(data["ca_bundle"], (*path, "ca_bundle"))
        problem = unreadable_reason(ca_bundle)
        if problem is not None:
            fail((*path, "ca_bundle"), problem)

    http01_port = None
    if data.get("http01_port") is not None:
        http01_port = read_int(
            data["http01_port"], (*path, "http01_port"), minimum=1, maximum=65535
        )
    if "http01_bind_addresses" in data and http01_port is None:
        fail((*path, "http01_bind_addresses"), "needs `http01_port`")

    return AcmeConfig(
        domains=domains,
        directory=directory,
        contact=contact,
        state_directory=state_directory,
        ca_bundle=ca_bundle,
        http01_port=http01_port,
        http01_bind_addresses=parse_bind_addresses(
            data, path, HTTP01_BIND_ADDRESSES, key="http01_bind_addresses"
        ),
    )


def _parse_directory(value: object, path: KeyPath) -> str:
    text = read_str(value, path)
    if text in DIRECTORY_NAMES:
        return DIRECTORY_NAMES[text]
    url = urlsplit(text)
    if url.scheme != "https" or not url.hostname:
        names = ", ".join(DIRECTORY_NAMES)
        fail(path, f"expected {names} or an https:// directory URL, got {text!r}")
    return text
