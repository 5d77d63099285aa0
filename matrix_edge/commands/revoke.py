"""``twistd matrix-edge revoke NAME``: revoke the ACME certificate stored
for a name (a key that leaked, a name given up), and put a placeholder in
its place so that the edge orders a new one at its next SIGHUP."""

from __future__ import annotations

from matrix_edge.acme.client import AcmeClient, OrderFailed
from matrix_edge.acme.service import acme_names
from matrix_edge.acme.store import AcmeStore, give_to_owner
from matrix_edge.config.edge import EdgeConfig

# RFC 5280 reason codes a subscriber may give (Let's Encrypt's list).
REASONS = {
    "unspecified": 0,
    "keyCompromise": 1,
    "superseded": 4,
    "cessationOfOperation": 5,
}


class RevokeError(Exception):
    pass


def revoke(config: EdgeConfig, name: str, reason: str = "unspecified") -> str:
    """Revoke ``name``'s stored certificate with the edge's own account;
    returns what to tell the operator."""
    acme = config.acme
    if acme is None:
        raise RevokeError("the configuration has no `acme` section")
    if reason not in REASONS:
        raise RevokeError(f"reason must be one of {', '.join(REASONS)}")
    store = AcmeStore(acme.state_directory)
    stored = store.certificate(name)
    if stored is None or stored.placeholder:
        raise RevokeError(f"no certificate from the CA is stored for {name}")
    try:
        AcmeClient(acme, store).revoke(stored.leaf, REASONS[reason])
    except OrderFailed as e:
        raise RevokeError(str(e)) from None
    store.replace_with_placeholder(name)
    give_to_owner(store.root)
    served = name in acme_names(config)
    return (
        f"Revoked the certificate for {name} "
        f"(serial {stored.leaf.serial_number:x}, reason {reason}).\n"
        + (
            "A placeholder is stored in its place: send matrix-edge SIGHUP "
            "and it serves the placeholder and orders a new certificate.\n"
            if served
            else "No listener serves this name any more.\n"
        )
    )
