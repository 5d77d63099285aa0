"""ACME in the running edge: the certificate manager for the names the
listeners serve from ACME, and the optional port-80 listener for http-01.

Both live in the first process only; the others answer tls-alpn-01 from the
state directory and reload when it passes SIGHUP on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.web.server import Site

from matrix_edge.acme.challenges import HTTP01Resource
from matrix_edge.acme.manager import CertificateManager
from matrix_edge.acme.store import AcmeStore
from matrix_edge.config.acme import AcmeConfig
from matrix_edge.config.edge import EdgeConfig
from matrix_edge.config.listeners import ListenerConfig, ListenerType
from matrix_edge.listening import ListenerService

log = Logger()


def acme_names(config: EdgeConfig) -> tuple[str, ...]:
    """Every name some listener serves from ACME, in the order first
    listed."""
    names: dict[str, None] = {}
    for listener in config.listeners:
        if listener.tls is not None and listener.tls.acme_domains:
            names.update(dict.fromkeys(listener.tls.acme_domains))
    return tuple(names)


class AcmeService(MultiService):
    """Keeps one L{CertificateManager} in line with the configuration
    (L{apply} on reload), and the http-01 listener it was started with."""

    def __init__(
        self, reactor: Any, config: EdgeConfig, on_issued: Callable[[], object]
    ):
        super().__init__()
        self._reactor = reactor
        self._on_issued = on_issued
        self.manager: CertificateManager | None = None
        self._current: tuple[AcmeConfig | None, tuple[str, ...]] = (None, ())
        self.http01: ListenerService | None = None
        acme = config.acme
        self._http01_at = (
            (acme.http01_port, acme.http01_bind_addresses) if acme else (None, ())
        )
        if acme is not None and acme.http01_port is not None:
            site = Site(HTTP01Resource(AcmeStore(acme.state_directory)))
            site.noisy = False
            self.http01 = ListenerService(
                reactor,
                ListenerConfig(
                    port=acme.http01_port,
                    type=ListenerType.CLIENT,
                    bind_addresses=acme.http01_bind_addresses,
                    tag=f"acme-http01-{acme.http01_port}",
                ),
                site,
            )
            self.http01.setServiceParent(self)
        self.apply(config)

    def apply(self, config: EdgeConfig) -> None:
        """Order certificates for what ``config`` asks (on start and each
        reload): the manager takes a changed ``acme`` section or names in
        place (an order under way is never doubled), else looks at what the
        state directory holds now."""
        wanted = (config.acme, acme_names(config))
        if wanted == self._current:
            if self.manager is not None:
                self.manager.refresh()
            return
        acme = config.acme
        http01_at = (
            (acme.http01_port, acme.http01_bind_addresses) if acme else (None, ())
        )
        if http01_at != self._http01_at and self.running:
            log.warn("acme.http01_port: changes apply after a restart")
        self._current = wanted
        names = wanted[1]
        if acme is None or not names:
            if self.manager is not None:
                # Kept, with nothing to order: an order under way still
                # guards against a second one if ACME comes back.
                self.manager.update(self.manager.config, ())
        elif self.manager is not None:
            self.manager.update(acme, names)
        else:
            self.manager = CertificateManager(
                self._reactor, acme, names, self._on_issued
            )
            self.manager.setServiceParent(self)
