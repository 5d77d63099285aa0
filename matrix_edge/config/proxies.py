"""Address ranges: ``trusted_proxies`` (peers whose ``X-Forwarded-For`` is
believed) and allow-lists such as a listener's ``admin_allow``."""

from __future__ import annotations

import ipaddress

from matrix_edge.config._base import KeyPath, fail, read_sequence, read_str

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: object, path: KeyPath) -> tuple[IPNetwork, ...]:
    if value is None:
        return ()
    networks = []
    for i, item in enumerate(read_sequence(value, path)):
        text = read_str(item, (*path, i))
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as e:
            fail((*path, i), f"expected a CIDR such as '10.0.0.0/8': {e}")
    return tuple(networks)
