"""The ACME state directory on a real file system: owner-only directories,
one account key per CA, placeholders until the CA's certificate is there."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from matrix_edge.acme.store import (
    PLACEHOLDER_DAYS,
    PLACEHOLDER_MARGIN,
    AcmeStore,
    StateDirectoryError,
    give_to_owner,
)
from matrix_edge.config.acme import LETSENCRYPT, LETSENCRYPT_STAGING
from tests.pki import make_pki

NAME = "matrix.example.org"
UTC = datetime.timezone.utc


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _issued(pki, name: str, not_after: datetime.datetime):
    """A CA-issued certificate for ``name`` and its key, as the manager
    stores it."""
    leaf = pki.issue_leaf(
        name.replace(".", "-"),
        hostnames=[name],
        ip_addresses=[],
        not_valid_after=not_after,
    )
    fullchain = _pem(leaf.certificate) + _pem(pki.intermediate.certificate)
    return leaf, fullchain


def _store_issued(tmp_path, store: AcmeStore, valid_for: datetime.timedelta):
    """A CA-issued certificate for NAME, valid for ``valid_for`` more,
    saved in ``store``."""
    pki = make_pki(tmp_path / "pki")
    leaf, fullchain = _issued(pki, NAME, datetime.datetime.now(UTC) + valid_for)
    store.save_certificate(NAME, leaf.private_key, fullchain)
    return leaf


@pytest.fixture
def store(tmp_path) -> AcmeStore:
    store = AcmeStore(tmp_path / "acme")
    store.prepare()
    return store


def test_prepare_makes_owner_only_directories(tmp_path):
    root = tmp_path / "state" / "acme"
    AcmeStore(root).prepare()
    assert _mode(root) == 0o700
    for part in (
        "accounts",
        "certificates",
        "challenges/tls-alpn-01",
        "challenges/http-01",
    ):
        assert (root / part).is_dir()
        assert _mode(root / part) == 0o700, part


def test_prepare_makes_every_directory_owner_only(tmp_path):
    root = tmp_path / "acme"
    AcmeStore(root).prepare()
    modes = {
        str(path.relative_to(root)): _mode(path)
        for path in root.rglob("*")
        if path.is_dir()
    }
    assert modes == dict.fromkeys(modes, 0o700)


def test_prepare_tightens_an_existing_directory(tmp_path):
    root = tmp_path / "acme"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    AcmeStore(root).prepare()
    assert _mode(root) == 0o700


def test_prepare_is_idempotent(store):
    store.prepare()
    assert _mode(store.root) == 0o700


def test_prepare_names_what_it_cannot_create(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StateDirectoryError) as e:
        AcmeStore(blocker / "acme").prepare()
    assert str(blocker) in str(e.value)


def test_account_key_is_made_once_and_reused(store):
    key = store.account_key(LETSENCRYPT)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    path = store.account_directory(LETSENCRYPT) / "key.pem"
    assert _mode(path) == 0o600
    content = path.read_bytes()

    again = store.account_key(LETSENCRYPT)
    assert again.private_numbers() == key.private_numbers()
    assert path.read_bytes() == content
    # And from a fresh store over the same directory (a restart).
    restarted = AcmeStore(store.root).account_key(LETSENCRYPT)
    assert restarted.private_numbers() == key.private_numbers()


def test_each_ca_has_its_own_account(store):
    production = store.account_directory(LETSENCRYPT)
    staging = store.account_directory(LETSENCRYPT_STAGING)
    assert production != staging
    assert production.parent == staging.parent == store.root / "accounts"
    assert production.name.startswith("acme-v02.api.letsencrypt.org-")
    assert staging.name.startswith("acme-staging-v02.api.letsencrypt.org-")
    key = store.account_key(LETSENCRYPT)
    other = store.account_key(LETSENCRYPT_STAGING)
    assert key.private_numbers() != other.private_numbers()


def test_an_account_key_of_another_type_is_refused(store):
    path = store.account_directory(LETSENCRYPT) / "key.pem"
    path.parent.mkdir(parents=True)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(StateDirectoryError, match="not an EC account key"):
        store.account_key(LETSENCRYPT)


def test_registration_round_trip(store):
    assert store.registration(LETSENCRYPT) is None
    store.save_registration(LETSENCRYPT, "https://ca.example/acct/1")
    assert store.registration(LETSENCRYPT) == "https://ca.example/acct/1"
    assert store.registration(LETSENCRYPT_STAGING) is None
    path = store.account_directory(LETSENCRYPT) / "account.json"
    assert _mode(path) == 0o600
    assert AcmeStore(store.root).registration(LETSENCRYPT) == (
        "https://ca.example/acct/1"
    )


@pytest.mark.parametrize("content", ["", "{", "[]", '{"uri": 5}', '"x"'])
def test_a_damaged_registration_is_none(store, content):
    path = store.account_directory(LETSENCRYPT) / "account.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert store.registration(LETSENCRYPT) is None


def test_certificate_files_are_per_name(store):
    chain, key = store.certificate_files(NAME)
    assert chain == str(store.root / "certificates" / NAME / "fullchain.pem")
    assert key == str(store.root / "certificates" / NAME / "privkey.pem")


def test_nothing_stored_is_none(store):
    assert store.certificate(NAME) is None


def test_ensure_servable_writes_a_placeholder(store):
    store.ensure_servable(NAME)
    stored = store.certificate(NAME)
    assert stored is not None
    assert stored.placeholder
    leaf = stored.leaf
    assert leaf.issuer == leaf.subject
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NAME
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [NAME]
    lifetime = stored.not_after - datetime.datetime.now(UTC)
    assert abs(lifetime - datetime.timedelta(days=PLACEHOLDER_DAYS)) < (
        datetime.timedelta(minutes=1)
    )
    _, key_path = store.certificate_files(NAME)
    assert _mode(key_path) == 0o600
    # The key is the certificate's.
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
    assert key.public_key() == leaf.public_key()


def test_ensure_servable_keeps_a_fresh_placeholder(store):
    store.ensure_servable(NAME)
    serial = store.certificate(NAME).leaf.serial_number
    store.ensure_servable(NAME)
    assert store.certificate(NAME).leaf.serial_number == serial


def test_ensure_servable_keeps_a_valid_certificate(tmp_path, store):
    pki = make_pki(tmp_path / "pki")
    leaf, fullchain = _issued(
        pki, NAME, datetime.datetime.now(UTC) + datetime.timedelta(days=2)
    )
    store.save_certificate(NAME, leaf.private_key, fullchain)
    store.ensure_servable(NAME)
    stored = store.certificate(NAME)
    assert not stored.placeholder
    assert stored.leaf == leaf.certificate
    assert stored.chain == (leaf.certificate, pki.intermediate.certificate)


def test_ensure_servable_replaces_an_expired_certificate(tmp_path, store):
    _store_issued(tmp_path, store, -datetime.timedelta(minutes=1))
    store.ensure_servable(NAME)
    stored = store.certificate(NAME)
    assert stored.placeholder
    assert stored.not_after > datetime.datetime.now(UTC)


def _self_signed(store, name: str, not_after: datetime.datetime) -> int:
    """Write a placeholder-like certificate ending at ``not_after``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - datetime.timedelta(days=PLACEHOLDER_DAYS))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    store.save_certificate(name, key, _pem(certificate))
    return certificate.serial_number


def test_ensure_servable_replaces_an_ageing_placeholder(store):
    now = datetime.datetime.now(UTC)
    old = _self_signed(
        store, NAME, now + PLACEHOLDER_MARGIN - datetime.timedelta(hours=1)
    )
    store.ensure_servable(NAME)
    stored = store.certificate(NAME)
    assert stored.placeholder
    assert stored.leaf.serial_number != old


def test_ensure_servable_keeps_a_placeholder_outside_the_margin(store):
    now = datetime.datetime.now(UTC)
    old = _self_signed(
        store, NAME, now + PLACEHOLDER_MARGIN + datetime.timedelta(hours=1)
    )
    store.ensure_servable(NAME)
    assert store.certificate(NAME).leaf.serial_number == old


def test_ensure_servable_replaces_a_certificate_without_its_key(tmp_path, store):
    _store_issued(tmp_path, store, datetime.timedelta(days=60))
    os.unlink(store.certificate_files(NAME)[1])
    store.ensure_servable(NAME)
    assert store.certificate(NAME).placeholder
    assert os.path.exists(store.certificate_files(NAME)[1])


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\n"])
def test_ensure_servable_replaces_an_unreadable_chain(store, content):
    chain_path, key_path = store.certificate_files(NAME)
    os.makedirs(os.path.dirname(chain_path))
    Path(chain_path).write_bytes(content)
    Path(key_path).write_bytes(b"")
    assert store.certificate(NAME) is None
    store.ensure_servable(NAME)
    assert store.certificate(NAME).placeholder


def test_save_certificate_modes(tmp_path, store):
    pki = make_pki(tmp_path / "pki")
    leaf, fullchain = _issued(
        pki, NAME, datetime.datetime.now(UTC) + datetime.timedelta(days=90)
    )
    store.save_certificate(NAME, leaf.private_key, fullchain)
    chain_path, key_path = store.certificate_files(NAME)
    assert _mode(key_path) == 0o600
    assert _mode(chain_path) == 0o644
    assert Path(chain_path).read_bytes() == fullchain
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None)
    assert key.private_numbers() == leaf.private_key.private_numbers()
    # Nothing left behind by the atomic writes.
    assert sorted(os.listdir(os.path.dirname(chain_path))) == [
        "fullchain.pem",
        "privkey.pem",
    ]


def test_save_certificate_replaces_a_placeholder(tmp_path, store):
    store.ensure_servable(NAME)
    leaf = _store_issued(tmp_path, store, datetime.timedelta(days=90))
    stored = store.certificate(NAME)
    assert not stored.placeholder
    assert stored.leaf == leaf.certificate


def test_replace_with_placeholder(tmp_path, store):
    leaf = _store_issued(tmp_path, store, datetime.timedelta(days=90))
    store.replace_with_placeholder(NAME)
    stored = store.certificate(NAME)
    assert stored.placeholder
    assert stored.leaf.serial_number != leaf.certificate.serial_number


def test_challenge_paths(store):
    assert store.tls_alpn_path(NAME) == (
        store.root / "challenges" / "tls-alpn-01" / NAME
    )
    assert (
        store.http01_path("abc_-1") == store.root / "challenges" / "http-01" / "abc_-1"
    )


def test_ensure_servable_replaces_a_pair_whose_key_does_not_match(tmp_path, store):
    """A crash after the new key was written and before its chain was:
    the old chain beside a new key would stop the listener loading; a
    placeholder serves instead, and the manager orders anew."""
    _store_issued(tmp_path, store, datetime.timedelta(days=60))
    _, key_path = store.certificate_files(NAME)
    Path(key_path).write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    store.ensure_servable(NAME)
    assert store.certificate(NAME).placeholder


def test_prepare_refuses_a_directory_holding_other_files(tmp_path):
    """``state_directory: /etc`` would otherwise be chmodded 0700."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "something-else").write_text("x")
    with pytest.raises(StateDirectoryError, match="not matrix-edge's"):
        AcmeStore(shared).prepare()
    assert _mode(shared) == 0o755


@pytest.mark.skipif(os.geteuid() != 0, reason="changing owners needs root")
def test_give_to_owner_hands_files_written_by_root_back(store):
    """``revoke`` run as root (the service's user being systemd's dynamic
    one): what it wrote goes back to the directory's owner."""
    os.chown(store.root, 65534, 65534)
    store.replace_with_placeholder(NAME)
    give_to_owner(store.root)
    for path in [
        *store.certificate_files(NAME),
        Path(store.certificate_files(NAME)[0]).parent,
    ]:
        assert os.stat(path).st_uid == 65534
