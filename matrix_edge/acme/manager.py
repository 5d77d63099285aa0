"""When to talk to the CA: each ACME name's certificate obtained at start
if it has none, renewed when a third of its lifetime is left, retried with
backoff when the CA says no.

Runs in the first process only. An issued certificate goes into the state
directory, and is then put in service the way SIGHUP does it (new
connections get it, established ones keep theirs; the other processes
reload too): see L{matrix_edge.reload}.
"""

from __future__ import annotations

import datetime
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from matrix_edge.acme.client import AcmeClient, Issued, OrderFailed
from matrix_edge.acme.store import AcmeStore, StoredCertificate
from matrix_edge.config.acme import AcmeConfig

log = Logger()

RENEW_WHEN_LEFT = 1 / 3
"""Renew when this fraction of a certificate's lifetime is left (30 days
of Let's Encrypt's 90), as certbot and Caddy do."""

JITTER = 1 / 30
"""Renewal starts up to this fraction of the lifetime early, at random, so
that many edges do not ask the CA at the same moment."""

RETRY_DELAYS = (60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)
"""Waits after consecutive failures; the last repeats."""

RATE_LIMITED_DELAY = 3600.0
"""The least wait after the CA says ``rateLimited``."""


def renewal_from(stored: StoredCertificate, early: float = 0.0) -> datetime.datetime:
    """When renewing ``stored`` starts: with L{RENEW_WHEN_LEFT} of its
    lifetime left, and ``early`` (a fraction of the lifetime: the jitter)
    before that."""
    lifetime = stored.not_after - stored.not_before
    return stored.not_after - lifetime * (RENEW_WHEN_LEFT + early)


class CertificateManager(Service):
    """Keeps a certificate from the CA for each of ``names``."""

    def __init__(
        self,
        reactor: Any,
        config: AcmeConfig,
        names: Sequence[str],
        on_issued: Callable[[], object],
        store: AcmeStore | None = None,
    ):
        """
        @param names: the names the listeners serve from ACME.
        @param on_issued: puts newly stored certificates in service.
        """
        self._reactor = reactor
        self.config = config
        self.names = tuple(names)
        self._on_issued = on_issued
        self.store = store or AcmeStore(config.state_directory)
        self.client = AcmeClient(config, self.store, log=self._log_info)
        self._due: dict[str, float] = {}
        self._seen: dict[str, int | None] = {}
        """The serial each name's schedule was made from."""
        self._failures: dict[str, int] = {}
        self.last_error: dict[str, str] = {}
        self._timer: Any = None
        self._running: Deferred[None] | None = None
        self.random = random.Random()
        self.issued = 0

    def _log_info(self, message: str) -> None:
        self._reactor.callFromThread(log.info, "{message}", message=message)

    def startService(self) -> None:
        super().startService()
        now = self._reactor.seconds()
        for name in self.names:
            self._due[name] = self._renewal_time(name, now)
        self._schedule()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # An order under way is not waited for: its thread is a daemon, and
        # stores what it gets (for the next start) before it reports back.
        return None

    def update(self, config: AcmeConfig, names: Sequence[str]) -> None:
        """A reload changed the ``acme`` section or the names: later orders
        use the new settings, new names are scheduled, names no listener
        serves any more are dropped. An order under way finishes as it
        started; there is never a second one beside it."""
        if config != self.config:
            self.config = config
            self.store = AcmeStore(config.state_directory)
            self.client = AcmeClient(config, self.store, log=self._log_info)
        self.names = tuple(names)
        now = self._reactor.seconds()
        for name in list(self._due):
            if name not in self.names:
                del self._due[name]
        for name in self.names:
            if name not in self._due:
                self._due[name] = self._renewal_time(name, now)
        self._schedule()

    def refresh(self) -> None:
        """Look at the state directory again (on SIGHUP): a name whose
        certificate changed behind the manager's back (``revoke`` put a
        placeholder there, an operator copied one in) is scheduled anew."""
        now = self._reactor.seconds()
        for name in self.names:
            if self._serial(name) != self._seen.get(name):
                self._due[name] = self._renewal_time(name, now)
        self._schedule()

    def due(self) -> dict[str, float]:
        """When each name is next ordered (reactor seconds)."""
        return dict(self._due)

    def _serial(self, name: str) -> int | None:
        stored = self.store.certificate(name)
        return None if stored is None else stored.leaf.serial_number

    def _renewal_time(self, name: str, now: float) -> float:
        stored = self.store.certificate(name)
        self._seen[name] = None if stored is None else stored.leaf.serial_number
        if stored is None or stored.placeholder:
            return now
        at = renewal_from(stored, JITTER * self.random.random()).timestamp()
        return now + max(0.0, at - _wall_clock())

    def _schedule(self) -> None:
        """Arm one timer for the next name that is due."""
        if not self.running or self._running is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self._due:
            return
        name = min(self._due, key=self._due.__getitem__)
        delay = max(0.0, self._due[name] - self._reactor.seconds())
        self._timer = self._reactor.callLater(delay, self._order, name)

    def _order(self, name: str) -> None:
        self._timer = None
        stored = self.store.certificate(name)
        what = (
            "Renewing"
            if stored is not None and not stored.placeholder
            else ("Requesting")
        )
        log.info(
            "{what} the certificate for {name} from {directory}",
            what=what,
            name=name,
            directory=self.config.directory,
        )
        self._running = self._run(name)

    @inlineCallbacks
    def _run(self, name: str) -> Any:
        try:
            issued = yield self._in_thread(self._issue_and_store, name)
        except OrderFailed as e:
            self._failed(name, e)
        except OSError as e:
            # Ordered again after the usual wait, not at once: every order
            # is a certificate the CA counts against its limits.
            self._failed(name, OrderFailed(f"cannot store the certificate: {e}"))
        except Exception:
            log.failure("ACME order for {name} failed unexpectedly", name=name)
            self._failed(name, OrderFailed("internal error (see the log)"))
        else:
            self._stored(name, issued)
        finally:
            self._running = None
            self._schedule()

    def _issue_and_store(self, name: str) -> Issued:
        """In the order's thread: the certificate is on disk even when the
        edge stops before the thread is done (the CA has counted it)."""
        issued = self.client.issue(name)
        self.store.save_certificate(name, issued.key, issued.fullchain_pem)
        return issued

    def _in_thread(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run a blocking ``acme`` call on a daemon thread of its own: one
        order at a time, and a stop that does not wait for the CA."""
        done: Deferred[Any] = Deferred()

        def run() -> None:
            try:
                result = function(*args)
            except BaseException:
                failure = Failure()
                self._reactor.callFromThread(done.errback, failure)
            else:
                self._reactor.callFromThread(done.callback, result)

        threading.Thread(target=run, name="acme", daemon=True).start()
        return done

    def _stored(self, name: str, issued: Issued) -> None:
        leaf = issued.leaf
        self.issued += 1
        self._failures.pop(name, None)
        self.last_error.pop(name, None)
        log.info(
            "Certificate for {name} issued: serial={serial:x} "
            "not_after={not_after}; putting it in service",
            name=name,
            serial=leaf.serial_number,
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
        if name in self._due:
            self._due[name] = self._renewal_time(name, self._reactor.seconds())
        if self.running:
            self._on_issued()

    def _failed(self, name: str, error: OrderFailed) -> None:
        count = self._failures[name] = self._failures.get(name, 0) + 1
        delay = RETRY_DELAYS[min(count, len(RETRY_DELAYS)) - 1]
        if error.rate_limited:
            delay = max(delay, RATE_LIMITED_DELAY)
        # Up to a tenth more, so that retries spread out.
        delay *= 1 + 0.1 * self.random.random()
        self.last_error[name] = str(error)
        stored = self.store.certificate(name)
        serving = (
            "a self-signed placeholder"
            if stored is None or stored.placeholder
            else f"the current certificate (valid until {stored.not_after.isoformat()})"
        )
        log.warn(
            "Could not get a certificate for {name} (attempt {count}): {error}; "
            "serving {serving}, retrying in {delay}",
            name=name,
            count=count,
            error=str(error),
            serving=serving,
            delay=_duration(delay),
        )
        self._due[name] = self._reactor.seconds() + delay


def _wall_clock() -> float:
    return datetime.datetime.now(datetime.timezone.utc).timestamp()


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
