"""A warning in the log well before a served certificate expires, whether
it comes from a file (certbot, an internal CA) or from the ACME CA: a
renewal that has been failing for days should not first show as clients
refusing the edge."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from matrix_edge.tls import ServerTLS

log = Logger()

WARN_BEFORE = datetime.timedelta(days=21)
"""Warn this long before expiry; for certificates that live less than
four times this, when a quarter of their lifetime is left."""

CHECK_EVERY = 6 * 3600.0


def expiring(
    contexts: Iterable[ServerTLS], now: datetime.datetime
) -> list[tuple[str, datetime.datetime]]:
    """(certificate file, notAfter) of every served certificate inside its
    warning window, each file once."""
    found: dict[str, datetime.datetime] = {}
    for tls in contexts:
        for path, leaf in tls.served():
            lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
            window = min(WARN_BEFORE, lifetime / 4)
            if now >= leaf.not_valid_after_utc - window:
                found[path] = leaf.not_valid_after_utc
    return sorted(found.items())


class ExpiryWarnings(Service):
    """Checks at start and every L{CHECK_EVERY} seconds."""

    def __init__(self, reactor: Any, contexts: Callable[[], Iterable[ServerTLS]]):
        self._reactor = reactor
        self._contexts = contexts
        self._call: Any = None

    def startService(self) -> None:
        super().startService()
        self.check()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def check(self) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        for path, not_after in expiring(self._contexts(), now):
            left = not_after - now
            log.warn(
                "Certificate in {path} {when} ({not_after}): renew it",
                path=path,
                when=(
                    f"expires in {_days(left)}"
                    if left > datetime.timedelta()
                    else "has expired"
                ),
                not_after=not_after.isoformat(),
            )
        self._call = self._reactor.callLater(CHECK_EVERY, self.check)


def _days(left: datetime.timedelta) -> str:
    if left >= datetime.timedelta(days=2):
        return f"{left.days} days"
    hours = left.total_seconds() / 3600
    return f"{hours:.0f} hours" if hours >= 2 else f"{left.total_seconds():.0f} s"
