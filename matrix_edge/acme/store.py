"""The ACME state directory: account keys, certificates and their keys, and
the answers to pending challenges.

Layout (the directory and everything secret in it owner-only)::

    accounts/<CA host>-<hash of the directory URL>/key.pem, account.json
    certificates/<name>/fullchain.pem, privkey.pem
    challenges/tls-alpn-01/<name>         certificate and key (PEM), while pending
    challenges/http-01/<token>            key authorization, while pending

A listener serves ``certificates/<name>/`` like any certificate file pair;
until the CA has issued one, that is a self-signed placeholder, so the
listener starts and answers while the order is retried. Challenges are
files so that every process of the edge answers them, whichever accepts
the CA's connection. Every file is replaced atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from matrix_edge.tls import generate_self_signed, private_key_pem, write_atomically

# A placeholder is made again when it is this close to its end, so that a
# CA unreachable for weeks never leaves an expired certificate in service.
PLACEHOLDER_DAYS = 30
PLACEHOLDER_MARGIN = datetime.timedelta(days=7)


class StateDirectoryError(Exception):
    """The state directory cannot be made or written."""


@attrs.frozen
class StoredCertificate:
    """What ``certificates/<name>/`` holds now."""

    chain: tuple[x509.Certificate, ...]
    placeholder: bool
    """Self-signed by the edge, waiting for the CA's."""

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc


class AcmeStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def prepare(self) -> None:
        """Make the directory tree (owner-only), or say why it cannot be."""
        if _foreign(self.root):
            raise StateDirectoryError(
                f"{self.root} already holds files that are not matrix-edge's; "
                "give it a directory of its own"
            )
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            # One at a time: mkdir gives parents it makes the default mode.
            for part in (
                "accounts",
                "certificates",
                "challenges",
                "challenges/tls-alpn-01",
                "challenges/http-01",
            ):
                (self.root / part).mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateDirectoryError(
                f"cannot create {e.filename or self.root}: {e.strerror or e}"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StateDirectoryError(f"{self.root} is not writable by this user")

    # The account -----------------------------------------------------------

    def account_directory(self, directory_url: str) -> Path:
        """One account per CA directory: staging and production keep theirs
        apart."""
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:12]
        host = urlsplit(directory_url).hostname or "ca"
        return self.root / "accounts" / f"{host}-{digest}"

    def account_key(self, directory_url: str) -> ec.EllipticCurvePrivateKey:
        """The account key for ``directory_url``, made on first use."""
        path = self.account_directory(directory_url) / "key.pem"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomically(path, private_key_pem(key), 0o600)
            return key
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise StateDirectoryError(f"{path} is not an EC account key")
        return key

    def registration(self, directory_url: str) -> str | None:
        """The account URL the CA gave for this key, if registered."""
        path = self.account_directory(directory_url) / "account.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        uri = data.get("uri") if isinstance(data, dict) else None
        return uri if isinstance(uri, str) else None

    def save_registration(self, directory_url: str, uri: str) -> None:
        path = self.account_directory(directory_url) / "account.json"
        text = json.dumps({"directory": directory_url, "uri": uri}, indent=2)
        write_atomically(path, text.encode() + b"\n", 0o600)

    # Certificates ------------------------------------------------------------

    def certificate_files(self, name: str) -> tuple[str, str]:
        """(chain path, key path) a listener serves for ``name``."""
        directory = self.root / "certificates" / name
        return str(directory / "fullchain.pem"), str(directory / "privkey.pem")

    def certificate(self, name: str) -> StoredCertificate | None:
        """What is stored for ``name``; None when nothing usable is."""
        chain_path, _ = self.certificate_files(name)
        try:
            chain = tuple(
                x509.load_pem_x509_certificates(Path(chain_path).read_bytes())
            )
        except (OSError, ValueError):
            return None
        leaf = chain[0]
        return StoredCertificate(chain=chain, placeholder=leaf.issuer == leaf.subject)

    def ensure_servable(self, name: str) -> None:
        """Put a self-signed placeholder for ``name`` in place unless a
        certificate that has not expired, or a placeholder with some life
        left, is there already."""
        stored = self.certificate(name)
        now = datetime.datetime.now(datetime.timezone.utc)
        chain_path, key_path = self.certificate_files(name)
        if stored is not None and _pair_loads(chain_path, key_path):
            margin = PLACEHOLDER_MARGIN if stored.placeholder else datetime.timedelta()
            if stored.not_after - margin > now:
                return
        # Nothing, an expired certificate or an ageing placeholder: a fresh
        # placeholder, replaced by the CA's certificate once it is issued.
        self.replace_with_placeholder(name)

    def replace_with_placeholder(self, name: str) -> None:
        """Put a placeholder where a (revoked) certificate was."""
        chain_path, key_path = self.certificate_files(name)
        generate_self_signed(chain_path, key_path, [name], days=PLACEHOLDER_DAYS)

    def save_certificate(
        self, name: str, key: ec.EllipticCurvePrivateKey, fullchain_pem: bytes
    ) -> None:
        """Store an issued certificate and its key: the key first, so that
        a reader never finds a new chain beside an old key (the TLS loader
        refuses a pair that does not match, and keeps what it serves)."""
        chain_path, key_path = self.certificate_files(name)
        write_atomically(Path(key_path), private_key_pem(key), 0o600)
        write_atomically(Path(chain_path), fullchain_pem, 0o644)

    # Challenges ------------------------------------------------------------

    def tls_alpn_path(self, name: str) -> Path:
        # The name alone (up to 253 bytes): a suffix could pass NAME_MAX.
        return self.root / "challenges" / "tls-alpn-01" / name

    def http01_path(self, token: str) -> Path:
        return self.root / "challenges" / "http-01" / token


def give_to_owner(root: Path) -> None:
    """Run as root by an operator's command (``revoke``), hand what it
    wrote back to the owner of the state directory, which the edge runs as:
    a root-owned key would be unreadable to the edge, and its renewals
    could not replace it."""
    if os.geteuid() != 0:
        return
    owner = root.stat()
    if owner.st_uid == 0:
        return
    for directory, _, files in os.walk(root):
        for entry in [directory, *(os.path.join(directory, f) for f in files)]:
            if os.lstat(entry).st_uid != owner.st_uid:
                os.lchown(entry, owner.st_uid, owner.st_gid)


def _foreign(root: Path) -> bool:
    """Whether ``root`` exists with files in it that are not a state
    directory's: then it is not chmodded 0700 and filled."""
    try:
        entries = set(os.listdir(root))
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return True
    return bool(entries - {"accounts", "certificates", "challenges"})


def _pair_loads(chain_path: str, key_path: str) -> bool:
    """Whether OpenSSL takes the chain with the key (it checks they match)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(chain_path, key_path)
    except (OSError, ssl.SSLError):
        return False
    return True
