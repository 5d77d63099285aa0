"""TLS for the listeners: server contexts, certificate reload on SIGHUP, and
self-signed certificates for first runs.

The contexts (the standard library's, which the listeners' TLS layer uses,
see L{matrix_edge.server.tls}) are built here rather than through Twisted's
``CertificateOptions`` or an ``ssl:`` endpoint string, so that the protocol
floor, cipher list, ALPN and certificate chain are explicit and can be
swapped atomically on reload.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import ssl
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
from twisted.application.service import Service
from twisted.internet.interfaces import (
    IReactorFromThreads,
)
from twisted.logger import Logger

logger = Logger()

# TLS 1.2 suites: forward-secret key exchange and AEAD only (the ECDHE part of
# Mozilla's "intermediate" profile). TLS 1.3 suites are all AEAD already and
# keep OpenSSL's defaults, as do the key exchange groups.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
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

    certificate_index: int | None = None
    """The position of the failing certificate among those given to
    L{ServerTLS}, so that configuration errors can name its key."""


@attrs.frozen
class _LoadedCertificate:
    """One ready-to-use server context and the chain it serves."""

    ssl_context: ssl.SSLContext
    chain: tuple[x509.Certificate, ...]
    chain_path: str
    names: tuple[str, ...]
    """The DNS names (lower case, wildcards as ``*.example.org``) and IP
    addresses in the subjectAltName: the server names that select it."""

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


def _ssl_context(
    chain_path: str, key_path: str, alpn_protocols: Sequence[bytes]
) -> ssl.SSLContext:
    """A server context for one certificate: TLS 1.2 floor, the cipher
    list, no compression or renegotiation, server cipher preference, ALPN
    in server preference order (a client offering none of them gets no ALPN
    answer)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_NO_RENEGOTIATION
    )
    context.set_ciphers(TLS12_CIPHERS)
    try:
        context.load_cert_chain(chain_path, key_path)
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError(
            f"OpenSSL rejected certificate {chain_path} with key {key_path}: {e}"
        ) from None
    if alpn_protocols:
        context.set_alpn_protocols([p.decode("ascii") for p in alpn_protocols])
    return context


def _load_certificate(
    chain_path: str, key_path: str, alpn_protocols: Sequence[bytes]
) -> _LoadedCertificate:
    """Read a PEM chain and key and build a server context serving them."""
    chain = _load_chain(chain_path)
    key = _load_private_key(key_path)
    _check_key_matches(chain, key, chain_path, key_path)

    return _LoadedCertificate(
        ssl_context=_ssl_context(chain_path, key_path, alpn_protocols),
        chain=chain,
        chain_path=chain_path,
        names=_server_names(chain[0]),
    )


def _server_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        sans = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value
    except x509.ExtensionNotFound:
        return ()
    names = [
        _normalise_dns_name(name) for name in sans.get_values_for_type(x509.DNSName)
    ]
    names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    return tuple(dict.fromkeys(names))


def _normalise_dns_name(name: str) -> str:
    return name.lower().rstrip(".")


class _CertificateSet:
    """The certificates of one load, and which of them serves each server
    name (the rules are in L{ServerTLS}).

    The servername callback goes on the first (default) context, which every
    connection starts with, and switches the connection to the chosen one.
    It is bound to this set, so a connection accepted just before a reload
    still chooses among the certificates it started with.
    """

    def __init__(self, certificates: Sequence[_LoadedCertificate]) -> None:
        self.certificates = tuple(certificates)
        self.default = self.certificates[0]
        self._exact: dict[str, _LoadedCertificate] = {}
        # "*.example.org" is stored under "example.org".
        self._wildcard: dict[str, _LoadedCertificate] = {}
        self.shadowed: list[tuple[str, _LoadedCertificate, _LoadedCertificate]] = []
        """(name, certificate listing it too, certificate serving it)."""
        for certificate in self.certificates:
            for name in certificate.names:
                if name.startswith("*."):
                    table, key = self._wildcard, name[2:]
                else:
                    table, key = self._exact, name
                serving = table.setdefault(key, certificate)
                if serving is not certificate:
                    self.shadowed.append((name, certificate, serving))
        if len(self.certificates) > 1:
            # Must happen before any connection uses the context.
            self.default.ssl_context.sni_callback = self._on_sni

    def select(self, server_name: str | None) -> _LoadedCertificate:
        """The certificate for a client asking for C{server_name}."""
        if not server_name:
            return self.default
        name = _normalise_dns_name(server_name)
        try:
            # Some clients send an IP address despite RFC 6066.
            name = str(ipaddress.ip_address(name))
        except ValueError:
            pass
        else:
            return self._exact.get(name, self.default)
        exact = self._exact.get(name)
        if exact is not None:
            return exact
        label, _, parent = name.partition(".")
        if label and parent:
            return self._wildcard.get(parent, self.default)
        return self.default

    def _on_sni(
        self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        certificate = self.select(server_name)
        if certificate is not self.default:
            connection.context = certificate.ssl_context


def _describe_certificate(cert: x509.Certificate) -> str:
    return (
        f"subject={cert.subject.rfc4514_string()!r} "
        f"issuer={cert.issuer.rfc4514_string()!r} "
        f"serial={cert.serial_number:x} "
        f"not_after={cert.not_valid_after_utc.isoformat()}"
    )


def _warn_about_selection(certificates: _CertificateSet) -> None:
    for name, certificate, serving in certificates.shadowed:
        logger.warn(
            "Certificate in {path} lists {name}, which the earlier certificate "
            "in {serving_path} already serves",
            path=certificate.chain_path,
            name=name,
            serving_path=serving.chain_path,
        )
    for certificate in certificates.certificates[1:]:
        if not certificate.names:
            logger.warn(
                "Certificate in {path} has no DNS or IP subjectAltName, so no "
                "server name selects it",
                path=certificate.chain_path,
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


class ServerTLS:
    """Server-side TLS for one listener, reloadable without a restart.

    Serves the whole chain from ``certificate_chain_path`` (PEM, server
    certificate first, then intermediates, like ``fullchain.pem``) with the
    key in ``private_key_path``. TLS 1.2 is the minimum.

    L{from_certificates} serves several such pairs on one listener, chosen by
    the server name the client sends (SNI) among the DNS names and IP
    addresses in each certificate's subjectAltName. A wildcard
    ``*.example.org`` matches exactly one label, and an exact name wins over
    a wildcard; when several certificates list the same name the first one
    serves it (a warning is logged). A client sending no server name, or one
    no certificate lists, gets the first certificate. All certificates share
    the TLS settings and ALPN.

    ALPN picks the first of ``alpn_protocols`` (in server preference order)
    that the client offers. A client offering none of them gets no ALPN
    answer, and a client not using ALPN is unaffected; both are then served
    HTTP/1.1.

    Each connection takes the certificates current at accept time, so a
    reload only affects new handshakes.
    """

    certificate_files: tuple[tuple[str, str], ...]
    """(certificate chain path, private key path) of each certificate; the
    first is the default."""

    alpn_protocols: tuple[bytes, ...]

    def __init__(
        self,
        certificate_chain_path: str | os.PathLike[str],
        private_key_path: str | os.PathLike[str],
        alpn_protocols: Sequence[bytes] = (b"http/1.1",),
    ) -> None:
        self._setup([(certificate_chain_path, private_key_path)], alpn_protocols)

    @classmethod
    def from_certificates(
        cls,
        certificates: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
        alpn_protocols: Sequence[bytes] = (b"http/1.1",),
    ) -> ServerTLS:
        """Serve several (certificate chain path, private key path) pairs,
        chosen by SNI; the first serves clients asking for no listed name.

        A L{TLSConfigError} says which pair failed in its
        C{certificate_index}.
        """
        tls = cls.__new__(cls)
        tls._setup(certificates, alpn_protocols)
        return tls

    def _setup(
        self,
        certificates: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
        alpn_protocols: Sequence[bytes],
    ) -> None:
        if not certificates:
            raise ValueError("at least one certificate is needed")
        self.certificate_files = tuple(
            (os.fspath(chain), os.fspath(key)) for chain, key in certificates
        )
        self.alpn_protocols = tuple(alpn_protocols)
        for protocol in self.alpn_protocols:
            if not isinstance(protocol, bytes) or not 0 < len(protocol) < 256:
                raise ValueError(
                    f"ALPN protocol names must be 1-255 bytes: {protocol!r}"
                )
        self._current = self._load()
        self._log_loaded()

    def __repr__(self) -> str:
        more = len(self.certificate_files) - 1
        return (
            f"<ServerTLS {self.certificate_chain_path} key={self.private_key_path}"
            + (f" and {more} more" if more else "")
            + ">"
        )

    @property
    def certificate_chain_path(self) -> str:
        """The chain file of the default certificate."""
        return self.certificate_files[0][0]

    @property
    def private_key_path(self) -> str:
        """The key file of the default certificate."""
        return self.certificate_files[0][1]

    def _load(self) -> _CertificateSet:
        """Load every certificate, or raise for the first that fails."""
        loaded = []
        for index, (chain_path, key_path) in enumerate(self.certificate_files):
            try:
                certificate = _load_certificate(
                    chain_path, key_path, self.alpn_protocols
                )
            except TLSConfigError as e:
                e.certificate_index = index
                raise
            loaded.append(certificate)
        return _CertificateSet(loaded)

    def _log_loaded(self) -> None:
        for certificate in self._current.certificates:
            _warn_if_not_current(certificate.leaf, certificate.chain_path)
        _warn_about_selection(self._current)
        for line in self._descriptions():
            logger.info("TLS certificate loaded: {description}", description=line)

    @property
    def certificate(self) -> x509.Certificate:
        """The default server certificate currently served."""
        return self._current.default.leaf

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The default server certificate followed by its intermediates."""
        return self._current.default.chain

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        """Every server certificate currently served, default first."""
        return tuple(c.leaf for c in self._current.certificates)

    def expiry(self) -> list[tuple[str, float]]:
        """Each certificate file served now, with its server certificate's
        notAfter in seconds since the epoch: what the metrics report, read
        from what the last (re)load put in service."""
        return [
            (path, leaf.not_valid_after_utc.timestamp()) for path, leaf in self.served()
        ]

    def served(self) -> list[tuple[str, x509.Certificate]]:
        """Each certificate file served now, with its server certificate."""
        return [(c.chain_path, c.leaf) for c in self._current.certificates]

    def certificate_for(self, server_name: str | None) -> x509.Certificate:
        """The server certificate a client sending C{server_name} (SNI)
        gets."""
        return self._current.select(server_name).leaf

    def describe(self) -> str:
        """For logs: one line per certificate, with the names it serves and
        the ALPN list."""
        return "\n".join(self._descriptions())

    def _descriptions(self) -> list[str]:
        alpn = ",".join(p.decode("ascii", "replace") for p in self.alpn_protocols)
        several = len(self._current.certificates) > 1
        lines = []
        for certificate in self._current.certificates:
            default = (
                " (default)" if several and certificate is self._current.default else ""
            )
            lines.append(
                f"{certificate.chain_path}{default}: "
                f"{_describe_certificate(certificate.leaf)} "
                f"chain_length={len(certificate.chain)} "
                f"names={','.join(certificate.names) or '-'} alpn={alpn or '-'}"
            )
        return lines

    def reload(self) -> bool:
        """Re-read all certificate and key files and serve them to new
        connections. If any fails to load, keep serving all the previous
        ones, so that the certificates never come from different reloads.

        @return: whether the new files were loaded.
        """
        try:
            loaded = self._load()
        except TLSConfigError as e:
            logger.error(
                "TLS reload failed, still serving the previous certificates: {error}",
                error=str(e),
            )
            return False
        self._current = loaded
        self._log_loaded()
        return True

    def server_side(
        self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> ssl.SSLObject:
        """The standard library's TLS for one accepted TCP connection, with
        the certificates current now."""
        return self._current.default.ssl_context.wrap_bio(
            incoming, outgoing, server_side=True
        )


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
        self.reloads = {True: 0, False: 0}
        """Reloads that succeeded (True) and failed, for metrics."""

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
        self.reloads[succeeded] += 1
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
    write_atomically(Path(private_key_path), private_key_pem(key), 0o600)
    write_atomically(
        Path(certificate_path),
        certificate.public_bytes(serialization.Encoding.PEM),
        0o644,
    )


def private_key_pem(key: _ServerKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM, as every key file here is
    written."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600, so the key is never readable by others.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            # On disk before it replaces the old file: a crash must not
            # leave an empty certificate or key behind.
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
