"""TLS for the listeners: server contexts, certificate reload on SIGHUP, and
self-signed certificates for first runs.

The OpenSSL context is built here rather than through ``CertificateOptions``
or an ``ssl:`` endpoint string, so that the protocol floor, cipher list, ALPN
and certificate chain are explicit and can be swapped atomically on reload.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorFromThreads,
)
from twisted.logger import Logger
from zope.interface import implementer

logger = Logger()

# TLS 1.2 suites: forward-secret key exchange and AEAD only (the ECDHE part of
# Mozilla's "intermediate" profile). TLS 1.3 suites are all AEAD already and
# keep OpenSSL's defaults, as do the key exchange groups.
TLS12_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

_CONTEXT_OPTIONS = (
    SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
)

_PEM_CERTIFICATE_MARKER = b"-----BEGIN CERTIFICATE-----"


_ServerKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


class TLSConfigError(Exception):
    """A certificate or key could not be loaded; the message names the file."""


@attrs.frozen
class _LoadedCertificate:
    """One ready-to-use server context and the chain it serves."""

    context: SSL.Context
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise TLSConfigError(f"{what} path is a directory: {path}") from None
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} file {path}: {e.strerror}") from None


def _load_chain(path: str) -> tuple[x509.Certificate, ...]:
    data = _read_file(path, "certificate")
    if _PEM_CERTIFICATE_MARKER not in data:
        raise TLSConfigError(f"no certificate in {path}")
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as e:
        raise TLSConfigError(f"invalid certificate in {path}: {e}") from None


def _load_private_key(path: str) -> _ServerKey:
    data = _read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise TLSConfigError(
            f"private key in {path} is encrypted; passphrases are not supported"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(f"no valid PEM private key in {path}: {e}") from None
    if not isinstance(
        key,
        (
            rsa.RSAPrivateKey,
            ec.EllipticCurvePrivateKey,
            ed25519.Ed25519PrivateKey,
            ed448.Ed448PrivateKey,
        ),
    ):
        raise TLSConfigError(
            f"unsupported private key type in {path}: {type(key).__name__}"
        )
    return key


def _public_key_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def _check_key_matches(
    chain: Sequence[x509.Certificate],
    key: _ServerKey,
    chain_path: str,
    key_path: str,
) -> None:
    key_der = _public_key_der(key.public_key())
    if _public_key_der(chain[0].public_key()) == key_der:
        return
    for position, cert in enumerate(chain[1:], start=2):
        if _public_key_der(cert.public_key()) == key_der:
            raise TLSConfigError(
                f"private key in {key_path} matches certificate #{position} in "
                f"{chain_path}; the server certificate must come first"
            )
    raise TLSConfigError(
        f"private key in {key_path} does not match certificate in {chain_path}"
    )


def _load_certificate(
    chain_path: str,
    key_path: str,
    select_alpn: Callable[[SSL.Connection, list[bytes]], Any] | None,
) -> _LoadedCertificate:
    """Read a PEM chain and key and build a server context serving them."""
    chain = _load_chain(chain_path)
    key = _load_private_key(key_path)
    _check_key_matches(chain, key, chain_path, key_path)

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(_CONTEXT_OPTIONS)
    # Free per-connection read/write buffers while idle; a proxy holds many
    # mostly idle connections.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(TLS12_CIPHERS)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    try:
        context.use_certificate(chain[0])
        for intermediate in chain[1:]:
            context.add_extra_chain_cert(intermediate)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error as e:
        raise TLSConfigError(
            f"OpenSSL rejected certificate {chain_path} with key {key_path}: {e}"
        ) from None
    if select_alpn is not None:
        context.set_alpn_select_callback(select_alpn)
    return _LoadedCertificate(context=context, chain=chain)


def _describe_certificate(cert: x509.Certificate) -> str:
    return (
        f"subject={cert.subject.rfc4514_string()!r} "
        f"issuer={cert.issuer.rfc4514_string()!r} "
        f"serial={cert.serial_number:x} "
        f"not_after={cert.not_valid_after_utc.isoformat()}"
    )


def _warn_if_not_current(cert: x509.Certificate, path: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > cert.not_valid_after_utc:
        logger.warn(
            "Certificate in {path} expired at {not_after}",
            path=path,
            not_after=cert.not_valid_after_utc.isoformat(),
        )
    elif now < cert.not_valid_before_utc:
        logger.warn(
            "Certificate in {path} is not valid before {not_before}",
            path=path,
            not_before=cert.not_valid_before_utc.isoformat(),
        )


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server-side TLS for one listener, reloadable without a restart.

    Serves the whole chain from ``certificate_chain_path`` (PEM, server
    certificate first, then intermediates, like ``fullchain.pem``) with the
    key in ``private_key_path``. TLS 1.2 is the minimum.

    ALPN picks the first of ``alpn_protocols`` (in server preference order)
    that the client offers. A client offering none of them gets no ALPN
    answer, and a client not using ALPN is unaffected; both are then treated
    as HTTP/1.1 by Twisted.

    Each connection takes the context current at accept time, so a reload
    only affects new handshakes. Certificates per server name (SNI) can be
    added later by keeping one ``_LoadedCertificate`` per name and switching
    with a servername callback on the default context.
    """

    def __init__(
        self,
        certificate_chain_path: str | os.PathLike[str],
        private_key_path: str | os.PathLike[str],
        alpn_protocols: Sequence[bytes] = (b"http/1.1",),
    ) -> None:
        self.certificate_chain_path = os.fspath(certificate_chain_path)
        self.private_key_path = os.fspath(private_key_path)
        self.alpn_protocols: tuple[bytes, ...] = tuple(alpn_protocols)
        for protocol in self.alpn_protocols:
            if not isinstance(protocol, bytes) or not 0 < len(protocol) < 256:
                raise ValueError(
                    f"ALPN protocol names must be 1-255 bytes: {protocol!r}"
                )
        self._current = self._load()

    def __repr__(self) -> str:
        return f"<ServerTLS {self.certificate_chain_path} key={self.private_key_path}>"

    def _load(self) -> _LoadedCertificate:
        loaded = _load_certificate(
            self.certificate_chain_path,
            self.private_key_path,
            self._select_alpn if self.alpn_protocols else None,
        )
        _warn_if_not_current(loaded.leaf, self.certificate_chain_path)
        return loaded

    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in self.alpn_protocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    @property
    def certificate(self) -> x509.Certificate:
        """The server certificate currently served."""
        return self._current.leaf

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The server certificate followed by the intermediates served."""
        return self._current.chain

    def describe(self) -> str:
        """One line for logs: the certificate served and the ALPN list."""
        alpn = ",".join(p.decode("ascii", "replace") for p in self.alpn_protocols)
        return (
            f"{self.certificate_chain_path}: {_describe_certificate(self.certificate)} "
            f"chain_length={len(self.chain)} alpn={alpn or '-'}"
        )

    def reload(self) -> bool:
        """Re-read the certificate and key files and serve them to new
        connections. On failure keep serving the previous ones.

        @return: whether the new files were loaded.
        """
        try:
            loaded = self._load()
        except TLSConfigError as e:
            logger.error(
                "TLS reload failed, still serving the previous certificate: {error}",
                error=str(e),
            )
            return False
        self._current = loaded
        logger.info(
            "TLS certificate loaded: {description}", description=self.describe()
        )
        return True

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """Create the OpenSSL connection for one accepted TCP connection."""
        return SSL.Connection(self._current.context, None)


class SighupService(Service):
    """Runs reload callbacks (certificates, and later routes or maintenance
    mode) when the process receives SIGHUP.

    The signal handler only schedules the work: the callbacks run in the
    reactor thread, one after another, and one failing does not stop the
    rest. The previous SIGHUP handler is restored when the service stops.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        callbacks: Iterable[Callable[[], object]] = (),
    ) -> None:
        self._reactor = reactor
        self._callbacks: list[Callable[[], object]] = list(callbacks)
        self._previous_handler: Any = None
        self._installed = False

    def add_callback(self, callback: Callable[[], object]) -> None:
        """Also run C{callback} on SIGHUP. A return value of C{False}
        counts as a failed reload."""
        self._callbacks.append(callback)

    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        self._installed = True

    def stopService(self) -> None:
        if self._installed:
            previous = self._previous_handler
            signal.signal(
                signal.SIGHUP, signal.SIG_DFL if previous is None else previous
            )
            self._installed = False
        super().stopService()

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.reload_all)

    def reload_all(self) -> bool:
        """Run every callback now.

        @return: whether all of them succeeded.
        """
        logger.info("Reloading ({count} reload callbacks)", count=len(self._callbacks))
        succeeded = True
        for callback in self._callbacks:
            try:
                result = callback()
            except Exception:
                logger.failure("Reload callback {callback!r} failed", callback=callback)
                succeeded = False
                continue
            if result is False:
                succeeded = False
        return succeeded


def generate_self_signed(
    certificate_path: str | os.PathLike[str],
    private_key_path: str | os.PathLike[str],
    hostnames: Sequence[str],
    ip_addresses: Sequence[str] = (),
    days: int = 365,
) -> None:
    """Write a self-signed EC P-256 certificate for C{hostnames} and
    C{ip_addresses}, so that a first run can serve TLS at once.

    Parent directories are created; the key file is readable by its owner
    only. Both files are replaced atomically.
    """
    if not hostnames and not ip_addresses:
        raise ValueError("at least one hostname or IP address is needed")
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    common_name = hostnames[0] if hostnames else ip_addresses[0]

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _write_atomically(
        Path(private_key_path),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write_atomically(
        Path(certificate_path),
        certificate.public_bytes(serialization.Encoding.PEM),
        0o644,
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600, so the key is never readable by others.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
