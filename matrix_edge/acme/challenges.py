"""Answering the CA's challenges: tls-alpn-01 on the TLS listeners
themselves (RFC 8737), and http-01 on an optional port-80 listener.

The answers are files in the state directory (L{matrix_edge.acme.store}),
written by the process that talks to the CA and read by whichever process
accepts the CA's connection.

tls-alpn-01: the CA opens a TLS connection offering only the ALPN protocol
``acme-tls/1`` and the name being validated (SNI), and expects a
self-signed certificate for that name carrying a digest of the key
authorization in a critical acmeIdentifier extension; nothing else is
sent. The TLS layer (L{matrix_edge.server.tls}) hands a connection whose
ClientHello mentions ``acme-tls/1`` to L{TLSALPNResponder} instead of the
listener's certificates; such a connection is never given to HTTP.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from matrix_edge.acme.store import AcmeStore
from matrix_edge.config.domains import LABEL
from matrix_edge.errors import MatrixError, bad_request, error_headers, not_found
from matrix_edge.tls import TLS12_CIPHERS, private_key_pem, write_atomically

log = Logger()

ACME_TLS_1 = "acme-tls/1"
ACME_TLS_1_BYTES = ACME_TLS_1.encode("ascii")

# id-pe-acmeIdentifier (RFC 8737 section 6.1).
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")

HTTP01_PREFIX = b"/.well-known/acme-challenge/"


def key_authorization_digest(key_authorization: str) -> bytes:
    return hashlib.sha256(key_authorization.encode("ascii")).digest()


def write_tls_alpn_answer(store: AcmeStore, name: str, key_authorization: str) -> None:
    """Put the validation certificate for ``name`` where every process's
    L{TLSALPNResponder} finds it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    # The extension's value is a DER OCTET STRING of the SHA-256 digest.
    digest = key_authorization_digest(key_authorization)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
        .add_extension(
            x509.UnrecognizedExtension(
                ACME_IDENTIFIER, b"\x04" + bytes([len(digest)]) + digest
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM) + private_key_pem(key)
    write_atomically(store.tls_alpn_path(name), pem, 0o600)


def remove_tls_alpn_answer(store: AcmeStore, name: str) -> None:
    store.tls_alpn_path(name).unlink(missing_ok=True)


def write_http01_answer(store: AcmeStore, token: str, key_authorization: str) -> None:
    write_atomically(store.http01_path(token), key_authorization.encode(), 0o600)


def remove_http01_answer(store: AcmeStore, token: str) -> None:
    store.http01_path(token).unlink(missing_ok=True)


def _challenge_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols([ACME_TLS_1])
    return context


class TLSALPNResponder:
    """TLS for a connection from the CA's tls-alpn-01 validation: the
    validation certificate of the name it asks for, if one is pending."""

    def __init__(self, store: AcmeStore):
        self.store = store
        self.context = _challenge_context()
        self.context.sni_callback = self._on_sni
        self.answered = 0

    def server_side(
        self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> ssl.SSLObject:
        return self.context.wrap_bio(incoming, outgoing, server_side=True)

    def _on_sni(
        self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        name = (server_name or "").lower().rstrip(".")
        path = self._answer_path(name)
        try:
            pending = path is not None and path.exists()
        except OSError:
            pending = False
        if path is None or not pending:
            # Anyone can ask: not worth a line of the log each time.
            log.debug(
                "tls-alpn-01 validation for {name!r}, which has no pending "
                "challenge: refused",
                name=name[:300],
            )
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        context = _challenge_context()
        try:
            context.load_cert_chain(path)
        except (OSError, ssl.SSLError) as e:
            log.error("Cannot serve tls-alpn-01 answer {path}: {e}", path=path, e=e)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        connection.context = context
        self.answered += 1
        log.info("Answered tls-alpn-01 validation for {name}", name=name)
        return None

    def _answer_path(self, name: str) -> Path | None:
        labels = name.split(".")
        if len(name) > 253 or not all(LABEL.match(label) for label in labels):
            return None
        return self.store.tls_alpn_path(name)


_HOST = re.compile(rb"\A(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?\Z")


def _error(request: Request, error: MatrixError) -> bytes:
    """The edge's own answer, a Matrix JSON error, as on every listener."""
    request.setResponseCode(error.code)
    for name, value in error_headers(error):
        request.setHeader(name, value)
    return error.body()


def _host_without_port(host: bytes) -> bytes | None:
    """The host of a ``Host`` header for an https:// URL on the default
    port: a name, an IPv4 address or a bracketed IPv6 one; None for
    anything else."""
    if not _HOST.match(host):
        return None
    if host.startswith(b"["):
        return host[: host.index(b"]") + 1]
    return host.partition(b":")[0]


class HTTP01Resource(Resource):
    """Port 80 while ACME is on: ``/.well-known/acme-challenge/<token>``
    answered from the state directory, everything else redirected to
    HTTPS, as Caddy does."""

    isLeaf = True

    def __init__(self, store: AcmeStore):
        super().__init__()
        self.store = store

    def render(self, request: Request) -> bytes:
        path = request.path
        if path.startswith(HTTP01_PREFIX):
            token = path[len(HTTP01_PREFIX) :]
            answer = self._answer(token)
            if answer is not None:
                request.setHeader(b"content-type", b"application/octet-stream")
                log.info(
                    "Answered http-01 validation for token {token}",
                    token=token.decode("ascii"),
                )
                return answer
            return _error(request, not_found())
        host = _host_without_port(request.getHeader(b"host") or b"")
        target = request.uri
        if not target.startswith(b"/") or host is None:
            return _error(request, bad_request("Expected a path and a Host"))
        request.setResponseCode(308)
        request.setHeader(b"location", b"https://" + host + target)
        request.setHeader(b"content-type", b"text/plain")
        return b"This server speaks HTTPS\n"

    def _answer(self, token: bytes) -> bytes | None:
        # Tokens are base64url (RFC 8555 section 8.1): nothing else reaches
        # the file system.
        if not token or not all(
            c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            for c in token
        ):
            return None
        try:
            return self.store.http01_path(token.decode("ascii")).read_bytes()
        except OSError:
            return None
