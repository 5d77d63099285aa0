"""A throwaway PKI for tests: root CA -> intermediate CA -> server certificates.

All keys are EC P-256, so building one takes milliseconds. Everything is
written as PEM into one directory:

    ca.pem                  root certificate (the trust anchor for clients)
    intermediate.pem        intermediate CA certificate
    <name>.cert.pem         server certificate alone
    <name>.fullchain.pem    server certificate followed by the intermediate
    <name>.key.pem          server private key (PKCS#8, unencrypted)
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTNAMES = ("localhost",)
DEFAULT_IP_ADDRESSES = ("127.0.0.1", "::1")


@attrs.frozen
class Leaf:
    """A server certificate issued by the intermediate, and its files."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    cert_path: Path
    chain_path: Path
    key_path: Path

    def install(self, chain_path: Path, key_path: Path) -> None:
        """Copy this full chain and key over other files, e.g. the ones a
        server is configured with, to simulate a certificate renewal."""
        chain_path.write_bytes(self.chain_path.read_bytes())
        key_path.write_bytes(self.key_path.read_bytes())


@attrs.frozen
class CertificateAuthority:
    """A CA certificate and the key it signs with."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


@attrs.frozen
class Pki:
    """A root CA, an intermediate CA and a default server certificate."""

    directory: Path
    root: CertificateAuthority
    intermediate: CertificateAuthority
    ca_cert_path: Path
    intermediate_cert_path: Path
    leaf: Leaf

    @property
    def cert_path(self) -> Path:
        """The default server certificate alone (no intermediate)."""
        return self.leaf.cert_path

    @property
    def chain_path(self) -> Path:
        """The default server certificate followed by the intermediate."""
        return self.leaf.chain_path

    @property
    def key_path(self) -> Path:
        """The default server private key."""
        return self.leaf.key_path

    def issue_leaf(
        self,
        name: str,
        hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
        ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
        organization: str | None = None,
        not_valid_after: datetime.datetime | None = None,
    ) -> Leaf:
        """Issue a new server certificate (new key, new serial) from the
        intermediate and write it as C{<name>.*.pem}."""
        return _issue_leaf(
            self.directory,
            self.intermediate,
            name,
            hostnames,
            ip_addresses,
            organization,
            not_valid_after,
        )


def make_pki(
    directory: Path,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
    organization: str | None = None,
) -> Pki:
    """Create a root CA, an intermediate CA and a server certificate named
    C{server} for C{hostnames} and C{ip_addresses}, all under C{directory}."""
    directory.mkdir(parents=True, exist_ok=True)
    root_key = _new_key()
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Root CA")])
    root_cert = (
        _builder(root_name, root_key, None, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    root = CertificateAuthority(root_cert, root_key)

    intermediate_key = _new_key()
    intermediate_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "Test Intermediate CA")]
    )
    intermediate_cert = (
        _builder(intermediate_name, intermediate_key, root, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    intermediate = CertificateAuthority(intermediate_cert, intermediate_key)

    ca_cert_path = directory / "ca.pem"
    ca_cert_path.write_bytes(_pem(root_cert))
    intermediate_cert_path = directory / "intermediate.pem"
    intermediate_cert_path.write_bytes(_pem(intermediate_cert))

    return Pki(
        directory=directory,
        root=root,
        intermediate=intermediate,
        ca_cert_path=ca_cert_path,
        intermediate_cert_path=intermediate_cert_path,
        leaf=_issue_leaf(
            directory, intermediate, "server", hostnames, ip_addresses, organization
        ),
    )


def _issue_leaf(
    directory: Path,
    intermediate: CertificateAuthority,
    name: str,
    hostnames: Sequence[str],
    ip_addresses: Sequence[str],
    organization: str | None = None,
    not_valid_after: datetime.datetime | None = None,
) -> Leaf:
    key = _new_key()
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, _common_name(hostnames))]
    if organization is not None:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    builder = (
        _builder(x509.Name(subject), key, intermediate, not_valid_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    certificate = builder.sign(intermediate.private_key, hashes.SHA256())

    cert_path = directory / f"{name}.cert.pem"
    chain_path = directory / f"{name}.fullchain.pem"
    key_path = directory / f"{name}.key.pem"
    cert_path.write_bytes(_pem(certificate))
    chain_path.write_bytes(_pem(certificate) + _pem(intermediate.certificate))
    key_path.write_bytes(_key_pem(key))
    return Leaf(certificate, key, cert_path, chain_path, key_path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _common_name(hostnames: Sequence[str]) -> str:
    return hostnames[0] if hostnames else "server"


def _builder(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: CertificateAuthority | None,
    not_valid_after: datetime.datetime | None,
) -> x509.CertificateBuilder:
    """A builder with validity, serial and key identifiers filled in; a
    missing C{issuer} means self-signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if not_valid_after is None:
        not_valid_after = now + datetime.timedelta(days=30)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    if issuer is None:
        issuer_name = subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    else:
        issuer_name = issuer.certificate.subject
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.private_key.public_key()
        )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(not_valid_after)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
