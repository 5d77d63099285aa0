"""When the certificate manager talks to the CA, with only the
conversation replaced: a stand-in client whose ``issue`` runs on the
manager's real thread, a Clock for the reactor, and a real state
directory."""

from __future__ import annotations

import datetime
import gc
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock

from matrix_edge.acme.client import Issued, OrderFailed
from matrix_edge.acme.manager import (
    JITTER,
    RATE_LIMITED_DELAY,
    RENEW_WHEN_LEFT,
    RETRY_DELAYS,
    CertificateManager,
)
from matrix_edge.acme.store import AcmeStore
from matrix_edge.config.acme import AcmeConfig
from tests.pki import make_pki

NAME = "matrix.example.org"
OTHER = "other.example.org"
UTC = datetime.timezone.utc


class _Reactor(Clock):
    """A Clock whose callFromThread queues, for the test to run the calls
    in its own (the "reactor") thread."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue = queue.Queue()

    def callFromThread(self, f: Callable, *args, **kwargs) -> None:
        self.from_threads.put((f, args, kwargs))

    def run_from_threads(self, timeout: float = 10.0) -> None:
        """Wait for a thread's call, run it, then any others queued."""
        f, args, kwargs = self.from_threads.get(timeout=timeout)
        f(*args, **kwargs)
        while True:
            try:
                f, args, kwargs = self.from_threads.get_nowait()
            except queue.Empty:
                return
            f(*args, **kwargs)


class _FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class _CA:
    """Stands in for L{AcmeClient}: each ``issue`` takes the next outcome,
    an exception to raise or a lifetime to issue a certificate for."""

    def __init__(self, pki) -> None:
        self.pki = pki
        self.outcomes: list[BaseException | datetime.timedelta] = []
        self.calls: list[str] = []
        self.threads: list[str] = []
        self.issued: list[Issued] = []

    def issue(self, name: str) -> Issued:
        self.calls.append(name)
        self.threads.append(threading.current_thread().name)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        issued = _issued(self.pki, name, outcome)
        self.issued.append(issued)
        return issued


def _issued(pki, name: str, valid_for: datetime.timedelta) -> Issued:
    not_after = datetime.datetime.now(UTC).replace(microsecond=0) + valid_for
    leaf = pki.issue_leaf(
        f"{name}-{len(list(pki.directory.iterdir()))}",
        hostnames=[name],
        ip_addresses=[],
        not_valid_after=not_after,
    )
    pem = [
        c.public_bytes(serialization.Encoding.PEM)
        for c in (leaf.certificate, pki.intermediate.certificate)
    ]
    return Issued(key=leaf.private_key, fullchain_pem=b"".join(pem))


class _Setup:
    def __init__(self, tmp_path, names=(NAME,)) -> None:
        self.pki = make_pki(tmp_path / "pki")
        self.store = AcmeStore(tmp_path / "acme")
        self.store.prepare()
        self.reactor = _Reactor()
        self.reactor.advance(1000)  # not at zero, to catch offsets
        self.on_issued_calls = 0
        self.manager = CertificateManager(
            self.reactor,
            AcmeConfig(domains=tuple(names), state_directory=str(self.store.root)),
            names,
            self._on_issued,
            store=self.store,
        )
        self.ca = _CA(self.pki)
        self.manager.client = self.ca  # type: ignore[assignment]

    def _on_issued(self) -> None:
        self.on_issued_calls += 1

    def store_issued(self, name: str, valid_for: datetime.timedelta) -> Issued:
        issued = _issued(self.pki, name, valid_for)
        self.store.save_certificate(name, issued.key, issued.fullchain_pem)
        return issued

    def delay(self, name: str) -> float:
        return self.manager.due()[name] - self.reactor.seconds()

    def pending(self) -> list:
        return [c for c in self.reactor.getDelayedCalls() if c.active()]

    def order_now(self) -> None:
        """Let the timer fire and the order on its thread come back."""
        [timer] = self.pending()
        self.reactor.advance(max(0.0, timer.getTime() - self.reactor.seconds()))
        self.reactor.run_from_threads()


@pytest.fixture
def setup(tmp_path) -> _Setup:
    return _Setup(tmp_path)


def _expected_renewal_delay(stored, fraction_early: float) -> float:
    lifetime = (stored.not_after - stored.not_before).total_seconds()
    at = stored.not_after.timestamp() - lifetime * fraction_early
    return at - datetime.datetime.now(UTC).timestamp()


def test_a_placeholder_is_ordered_at_once(setup):
    setup.store.ensure_servable(NAME)
    setup.manager.startService()
    assert setup.manager.due() == {NAME: setup.reactor.seconds()}
    [timer] = setup.pending()
    assert timer.getTime() == setup.reactor.seconds()
    setup.ca.outcomes.append(datetime.timedelta(days=90))
    setup.order_now()
    assert setup.ca.calls == [NAME]
    assert setup.ca.threads == ["acme"]


def test_nothing_stored_is_ordered_at_once(setup):
    setup.manager.startService()
    assert setup.delay(NAME) == 0


@pytest.mark.parametrize("value", [0.0, 0.5, 0.999])
def test_a_stored_certificate_is_renewed_a_third_before_its_end(setup, value):
    setup.store_issued(NAME, datetime.timedelta(days=90))
    setup.manager.random = _FixedRandom(value)  # type: ignore[assignment]
    setup.manager.startService()
    stored = setup.store.certificate(NAME)
    expected = _expected_renewal_delay(stored, RENEW_WHEN_LEFT + JITTER * value)
    assert setup.delay(NAME) == pytest.approx(expected, abs=5)
    # Roughly 60 days out, never before the jitter allows.
    lifetime = (stored.not_after - stored.not_before).total_seconds()
    latest = _expected_renewal_delay(stored, RENEW_WHEN_LEFT)
    earliest = latest - lifetime * JITTER
    assert earliest - 5 <= setup.delay(NAME) <= latest + 5
    [timer] = setup.pending()
    assert timer.getTime() == pytest.approx(setup.manager.due()[NAME])
    assert setup.ca.calls == []


def test_the_real_jitter_stays_within_its_fraction(setup):
    setup.store_issued(NAME, datetime.timedelta(days=30))
    setup.manager.startService()
    stored = setup.store.certificate(NAME)
    lifetime = (stored.not_after - stored.not_before).total_seconds()
    latest = _expected_renewal_delay(stored, RENEW_WHEN_LEFT)
    assert latest - lifetime * JITTER - 5 <= setup.delay(NAME) <= latest + 5


def test_a_certificate_past_its_renewal_time_is_ordered_at_once(setup):
    # 20 minutes left of a certificate that lived 80: less than a third.
    setup.store_issued(NAME, datetime.timedelta(minutes=20))
    setup.manager.startService()
    assert setup.delay(NAME) == 0


def test_success_stores_the_certificate_and_puts_it_in_service(setup):
    setup.store.ensure_servable(NAME)
    setup.manager.random = _FixedRandom(0.0)  # type: ignore[assignment]
    setup.manager.startService()
    setup.ca.outcomes.append(datetime.timedelta(days=90))
    setup.order_now()

    [issued] = setup.ca.issued
    stored = setup.store.certificate(NAME)
    assert not stored.placeholder
    assert stored.leaf == issued.leaf
    _, key_path = setup.store.certificate_files(NAME)
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
    assert key.private_numbers() == issued.key.private_numbers()
    assert setup.on_issued_calls == 1
    assert setup.manager.issued == 1
    assert setup.manager.last_error == {}
    # The next order is the renewal of the new certificate.
    expected = _expected_renewal_delay(stored, RENEW_WHEN_LEFT)
    assert setup.delay(NAME) == pytest.approx(expected, abs=5)
    [timer] = setup.pending()
    assert timer.getTime() == pytest.approx(setup.manager.due()[NAME])


def test_failures_back_off(setup):
    setup.manager.startService()
    expected = [*RETRY_DELAYS, RETRY_DELAYS[-1], RETRY_DELAYS[-1]]
    for attempt, delay in enumerate(expected, 1):
        setup.ca.outcomes.append(OrderFailed(f"no ({attempt})"))
        setup.order_now()
        assert len(setup.ca.calls) == attempt
        assert delay <= setup.delay(NAME) <= delay * 1.1 + 1e-6, attempt
        assert setup.manager.last_error == {NAME: f"no ({attempt})"}
        [timer] = setup.pending()
        assert timer.getTime() == pytest.approx(setup.manager.due()[NAME])
    assert setup.on_issued_calls == 0
    assert setup.store.certificate(NAME) is None


def test_the_extra_wait_is_at_most_a_tenth(setup):
    setup.manager.random = _FixedRandom(0.999)  # type: ignore[assignment]
    setup.manager.startService()
    setup.ca.outcomes.append(OrderFailed("no"))
    setup.order_now()
    assert setup.delay(NAME) == pytest.approx(RETRY_DELAYS[0] * 1.0999)


def test_a_success_resets_the_backoff(setup):
    setup.manager.startService()
    setup.ca.outcomes += [
        OrderFailed("no"),
        OrderFailed("no"),
        datetime.timedelta(hours=3),  # short-lived: renewed within the hour
        OrderFailed("no again"),
    ]
    setup.order_now()
    setup.order_now()
    assert RETRY_DELAYS[1] <= setup.delay(NAME)
    setup.order_now()
    assert setup.on_issued_calls == 1
    assert setup.manager.last_error == {}
    assert setup.delay(NAME) < 3 * 3600
    setup.order_now()
    assert RETRY_DELAYS[0] <= setup.delay(NAME) <= RETRY_DELAYS[0] * 1.1


def test_rate_limited_waits_at_least_the_rate_limited_delay(setup):
    setup.manager.startService()
    setup.ca.outcomes.append(OrderFailed("rateLimited: slow down", rate_limited=True))
    setup.order_now()
    assert setup.delay(NAME) >= RATE_LIMITED_DELAY
    assert setup.delay(NAME) <= RATE_LIMITED_DELAY * 1.1


def test_rate_limited_keeps_a_longer_backoff(setup):
    setup.manager.startService()
    for _ in range(4):
        setup.ca.outcomes.append(OrderFailed("no"))
        setup.order_now()
    setup.ca.outcomes.append(OrderFailed("rateLimited", rate_limited=True))
    setup.order_now()
    assert setup.delay(NAME) >= RETRY_DELAYS[4]


def test_an_unexpected_error_is_a_failure(setup, tracebacks):
    setup.manager.startService()
    setup.ca.outcomes.append(RuntimeError("bug"))
    setup.order_now()
    assert setup.manager.last_error == {NAME: "internal error (see the log)"}
    assert RETRY_DELAYS[0] <= setup.delay(NAME) <= RETRY_DELAYS[0] * 1.1
    assert len(tracebacks) == 1
    tracebacks.clear()


def test_one_timer_for_the_earliest_name(tmp_path):
    setup = _Setup(tmp_path, names=(NAME, OTHER))
    setup.store_issued(NAME, datetime.timedelta(days=90))
    setup.manager.startService()
    assert setup.delay(OTHER) == 0
    assert setup.delay(NAME) > 50 * 86400
    [timer] = setup.pending()
    assert timer.args == (OTHER,)
    setup.ca.outcomes.append(datetime.timedelta(days=60))
    setup.order_now()
    assert setup.ca.calls == [OTHER]
    [timer] = setup.pending()
    assert timer.args == (OTHER,)  # 40 days out, before NAME's 60
    assert setup.delay(OTHER) < setup.delay(NAME)


def test_refresh_reschedules_a_name_whose_certificate_changed(tmp_path):
    setup = _Setup(tmp_path, names=(NAME, OTHER))
    setup.store_issued(NAME, datetime.timedelta(days=90))
    setup.store_issued(OTHER, datetime.timedelta(days=60))
    setup.manager.startService()
    before = setup.manager.due()
    assert all(due > setup.reactor.seconds() for due in before.values())

    setup.reactor.advance(3600)
    setup.manager.refresh()
    assert setup.manager.due() == before  # nothing changed: left alone

    setup.store.replace_with_placeholder(NAME)  # as `revoke` does
    setup.manager.refresh()
    due = setup.manager.due()
    assert due[NAME] == setup.reactor.seconds()
    assert due[OTHER] == before[OTHER]
    [timer] = setup.pending()
    assert timer.args == (NAME,)
    assert timer.getTime() == setup.reactor.seconds()


def test_refresh_sees_a_certificate_copied_in(setup):
    setup.manager.startService()
    setup.ca.outcomes.append(OrderFailed("no"))
    setup.order_now()
    assert setup.delay(NAME) >= RETRY_DELAYS[0]
    setup.store_issued(NAME, datetime.timedelta(days=90))
    setup.manager.refresh()
    assert setup.delay(NAME) > 50 * 86400


def test_refresh_keeps_a_backoff_when_nothing_changed(setup):
    setup.manager.startService()
    setup.ca.outcomes.append(OrderFailed("no"))
    setup.order_now()
    due = setup.manager.due()
    setup.manager.refresh()
    assert setup.manager.due() == due


def test_refresh_during_an_order_waits_for_it(setup):
    setup.manager.startService()
    release = threading.Event()
    outcomes = setup.ca.outcomes

    class _Slow:
        def issue(self, name):
            release.wait(10)
            outcomes.pop(0)
            raise OrderFailed("no")

    setup.manager.client = _Slow()  # type: ignore[assignment]
    outcomes.append(None)
    setup.reactor.advance(0)
    setup.store.replace_with_placeholder(NAME)
    setup.manager.refresh()
    assert setup.pending() == []  # no second order while one runs
    release.set()
    setup.reactor.run_from_threads()
    assert len(setup.pending()) == 1


def test_stop_cancels_the_timer(setup):
    setup.store_issued(NAME, datetime.timedelta(days=90))
    setup.manager.startService()
    [timer] = setup.pending()
    assert setup.manager.stopService() is None
    assert not timer.active()
    assert setup.pending() == []
    setup.manager.refresh()
    assert setup.pending() == []


def test_an_order_ending_after_stop_does_not_put_anything_in_service(setup):
    setup.manager.startService()
    setup.ca.outcomes.append(datetime.timedelta(days=90))
    setup.reactor.advance(0)
    setup.manager.stopService()
    setup.reactor.run_from_threads()
    assert setup.on_issued_calls == 0
    assert setup.pending() == []


def test_a_certificate_that_cannot_be_saved_is_not_ordered_again_at_once(setup):
    # A real file-system failure: the chain's place is taken by a directory.
    chain_path, _ = setup.store.certificate_files(NAME)
    (setup.store.root / "certificates" / NAME / "fullchain.pem" / "x").mkdir(
        parents=True
    )
    assert chain_path.endswith("fullchain.pem")
    setup.manager.startService()
    setup.ca.outcomes.append(datetime.timedelta(days=90))
    setup.order_now()
    gc.collect()  # the unhandled failure is logged here, not in a later test
    assert setup.ca.calls == [NAME]
    assert setup.delay(NAME) >= RETRY_DELAYS[0]


class _GatedCA(_CA):
    """Holds each order on its thread until the test opens the gate."""

    def __init__(self, pki) -> None:
        super().__init__(pki)
        self.gate = threading.Event()

    def issue(self, name: str) -> Issued:
        assert self.gate.wait(10)
        return super().issue(name)


def test_a_reload_during_an_order_starts_no_second_one(tmp_path):
    """A reload that adds a name while an order is under way: the same
    manager takes the new names, and nothing else is ordered until the
    order comes back (two orders for one name would each remove the
    other's challenge answer)."""
    setup = _Setup(tmp_path)
    ca = setup.manager.client = _GatedCA(setup.pki)  # type: ignore[assignment]
    ca.outcomes += [datetime.timedelta(days=90)] * 2
    setup.manager.startService()
    [timer] = setup.pending()
    setup.reactor.advance(0)
    assert not timer.active()

    config = setup.manager.config
    setup.manager.update(config, (NAME, OTHER))
    setup.manager.refresh()
    assert setup.pending() == []

    ca.gate.set()
    setup.reactor.run_from_threads()
    assert ca.calls == [NAME]
    setup.order_now()
    assert ca.calls == [NAME, OTHER]
    assert setup.on_issued_calls == 2


def test_a_name_dropped_by_a_reload_is_not_ordered(setup):
    setup.manager.startService()
    setup.manager.update(setup.manager.config, ())
    assert setup.manager.due() == {}
    assert setup.pending() == []


def test_an_order_ending_after_stop_is_stored_for_the_next_start(tmp_path):
    """The thread stores the certificate itself: the CA has counted it, and
    a stop (whose reactor runs nothing more) must not lose it."""
    setup = _Setup(tmp_path)
    ca = setup.manager.client = _GatedCA(setup.pki)  # type: ignore[assignment]
    ca.outcomes.append(datetime.timedelta(days=90))
    setup.manager.startService()
    setup.reactor.advance(0)
    setup.manager.stopService()
    ca.gate.set()
    stored = None
    for _ in range(200):
        stored = setup.store.certificate(NAME)
        if stored is not None and not stored.placeholder:
            break
        threading.Event().wait(0.05)
    assert stored is not None and not stored.placeholder
    assert stored.leaf.serial_number == ca.issued[0].leaf.serial_number
