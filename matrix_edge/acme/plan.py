"""What ``--check-config`` says about ACME: which certificates will be
requested, from where, and what is stored for each name now."""

from __future__ import annotations

import datetime

from matrix_edge.acme.manager import renewal_from
from matrix_edge.acme.service import acme_names
from matrix_edge.acme.store import AcmeStore
from matrix_edge.config.edge import EdgeConfig


def describe_plan(config: EdgeConfig) -> str:
    acme = config.acme
    assert acme is not None
    store = AcmeStore(acme.state_directory)
    challenges = "tls-alpn-01 on the TLS listeners" + (
        f", http-01 on port {acme.http01_port}" if acme.http01_port else ""
    )
    lines = [
        f"ACME: certificates from {acme.directory}",
        f"  account contact: {acme.contact or '(none)'}; "
        f"state in {acme.state_directory}",
        f"  challenges answered: {challenges}",
    ]
    now = datetime.datetime.now(datetime.timezone.utc)
    names = acme_names(config)
    for name in names:
        stored = store.certificate(name)
        if stored is None:
            state = "nothing stored: requested at start"
        elif stored.placeholder:
            state = "placeholder only: requested at start"
        else:
            renew = renewal_from(stored)
            when = "at start" if renew <= now else f"from {renew.isoformat()}"
            state = f"valid until {stored.not_after.isoformat()}; renewed {when}"
        lines.append(f"  {name}: {state}")
    if not names:
        lines.append("  no listener has `tls: {acme: ...}`: nothing requested")
    return "\n".join(lines) + "\n"
