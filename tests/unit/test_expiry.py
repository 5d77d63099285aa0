"""Warnings before served certificates expire: the window is three weeks,
or a quarter of the lifetime for short-lived certificates."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from matrix_edge.expiry import CHECK_EVERY, WARN_BEFORE, ExpiryWarnings, expiring
from matrix_edge.tls import ServerTLS
from tests.pki import make_pki

UTC = datetime.timezone.utc
DAY = datetime.timedelta(days=1)


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


def _tls(pki, name: str, valid_for: datetime.timedelta) -> tuple[ServerTLS, object]:
    """A listener's TLS over a certificate issued an hour ago."""
    leaf = pki.issue_leaf(name, not_valid_after=datetime.datetime.now(UTC) + valid_for)
    return ServerTLS(leaf.chain_path, leaf.key_path), leaf


def _aged(pki, name: str, age: datetime.timedelta, left: datetime.timedelta):
    """(chain path, key path, certificate) of a certificate from the test
    CA issued ``age`` ago with ``left`` to go."""
    now = datetime.datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(pki.intermediate.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - age)
        .not_valid_after(now + left)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
        .sign(pki.intermediate.private_key, hashes.SHA256())
    )
    chain = pki.directory / f"{name}.fullchain.pem"
    key_path = pki.directory / f"{name}.key.pem"
    chain.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + pki.intermediate.certificate.public_bytes(serialization.Encoding.PEM)
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return chain, key_path, certificate


def test_a_long_lived_certificate_warns_three_weeks_before(pki):
    tls, leaf = _tls(pki, "long", 90 * DAY)
    not_after = leaf.certificate.not_valid_after_utc
    assert (
        expiring([tls], not_after - WARN_BEFORE - datetime.timedelta(seconds=1)) == []
    )
    assert expiring([tls], not_after - WARN_BEFORE) == [
        (str(leaf.chain_path), not_after)
    ]
    assert expiring([tls], not_after + DAY) == [(str(leaf.chain_path), not_after)]


def test_a_short_lived_certificate_warns_at_a_quarter_left(pki):
    tls, leaf = _tls(pki, "short", 6 * DAY)
    certificate = leaf.certificate
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    window = lifetime / 4
    assert window < WARN_BEFORE
    not_after = certificate.not_valid_after_utc
    now = datetime.datetime.now(UTC)
    assert expiring([tls], now) == []
    assert expiring([tls], not_after - window - datetime.timedelta(seconds=1)) == []
    assert expiring([tls], not_after - window) == [(str(leaf.chain_path), not_after)]


def test_only_certificates_in_their_window_and_each_file_once(pki):
    short, short_leaf = _tls(pki, "short", 2 * DAY)
    long, _ = _tls(pki, "long", 90 * DAY)
    now = datetime.datetime.now(UTC) + DAY + datetime.timedelta(hours=12)
    shared_again = ServerTLS(short_leaf.chain_path, short_leaf.key_path)
    assert expiring([short, long, shared_again], now) == [
        (str(short_leaf.chain_path), short_leaf.certificate.not_valid_after_utc)
    ]


def test_every_certificate_of_an_sni_listener_is_looked_at(pki):
    a = _aged(pki, "a", 10 * DAY, 80 * DAY)
    b = _aged(pki, "b", 80 * DAY, 10 * DAY)  # 90 days, three weeks' window
    c = _aged(pki, "c", 1 * DAY, 5 * DAY)  # 6 days, a day and a half's window
    tls = ServerTLS.from_certificates([c[:2], a[:2], b[:2]])
    found = expiring([tls], datetime.datetime.now(UTC))
    assert found == [(str(b[0]), b[2].not_valid_after_utc)]
    later = expiring([tls], datetime.datetime.now(UTC) + 4 * DAY)
    # Sorted by file.
    assert later == [
        (str(b[0]), b[2].not_valid_after_utc),
        (str(c[0]), c[2].not_valid_after_utc),
    ]


def test_no_contexts_nothing_expiring():
    assert expiring([], datetime.datetime.now(UTC)) == []


@pytest.fixture
def warnings():
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "matrix_edge.expiry":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_the_service_checks_at_start_and_every_period(pki, warnings):
    chain, key, _ = _aged(pki, "soon", 80 * DAY, 10 * DAY)
    soon = ServerTLS(chain, key)
    fine, _ = _tls(pki, "fine", 90 * DAY)
    clock = Clock()
    asked = []

    def contexts():
        asked.append(clock.seconds())
        return [soon, fine]

    service = ExpiryWarnings(clock, contexts)
    service.startService()
    assert asked == [0]
    assert len(warnings) == 1
    assert warnings[0]["path"] == str(chain)
    assert warnings[0]["when"] in ("expires in 9 days", "expires in 10 days")
    clock.advance(CHECK_EVERY - 1)
    assert asked == [0]
    clock.advance(1)
    assert asked == [0, CHECK_EVERY]
    assert len(warnings) == 2
    [call] = clock.getDelayedCalls()
    service.stopService()
    assert not call.active()
    assert clock.getDelayedCalls() == []


def test_an_expired_certificate_is_said_to_have_expired(pki, warnings):
    leaf = pki.issue_leaf(
        "expired",
        not_valid_after=datetime.datetime.now(UTC) - datetime.timedelta(minutes=5),
    )
    tls = ServerTLS(leaf.chain_path, leaf.key_path)
    clock = Clock()
    service = ExpiryWarnings(clock, lambda: [tls])
    service.startService()
    assert [event["when"] for event in warnings] == ["has expired"]
    service.stopService()


def test_no_warning_for_fresh_certificates(pki, warnings):
    tls, _ = _tls(pki, "fine", 90 * DAY)
    clock = Clock()
    service = ExpiryWarnings(clock, lambda: [tls])
    service.startService()
    assert warnings == []
    service.stopService()
