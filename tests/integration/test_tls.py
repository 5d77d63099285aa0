"""ServerTLS, SighupService and generate_self_signed.

Most tests run over real loopback TLS connections: the server is a
TLS-wrapped echo protocol on the global reactor, and clients use Python's
``ssl`` module (linked against the system OpenSSL, not the one in
cryptography's wheel) in the reactor's thread pool. The loading, reload and
SighupService bookkeeping tests at the end need no sockets.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import ssl
import stat
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from matrix_edge.config._base import ConfigError
from matrix_edge.config.edge import parse_config
from matrix_edge.generation import load_tls
from matrix_edge.server.tls import HTTPSOnlyFactory
from matrix_edge.tls import (
    ServerTLS,
    SighupService,
    TLSConfigError,
    generate_self_signed,
)
from tests.pki import Leaf, Pki, make_pki

# A client that asks for this gets the ALPN protocol the server negotiated.
ALPN_QUERY = b"alpn?"


class _EchoProtocol(Protocol):
    factory: _EchoFactory

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if data == ALPN_QUERY:
            negotiated = self.transport.negotiatedProtocol  # type: ignore[attr-defined]
            self.transport.write(negotiated or b"-")  # type: ignore[union-attr]
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = ...) -> None:  # type: ignore[assignment]
        self.factory.connections.discard(self)
        self.lost.callback(None)


class _EchoFactory(Factory):
    protocol = _EchoProtocol

    def __init__(self) -> None:
        self.connections: set[_EchoProtocol] = set()


@attrs.define
class _Server:
    tls: ServerTLS
    listening: IListeningPort
    factory: _EchoFactory

    @property
    def port(self) -> int:
        return self.listening.getHost().port  # type: ignore[attr-defined, no-any-return]

    async def stop(self) -> None:
        await self.listening.stopListening()
        # Closing one connection lets the reactor run, which may close others.
        while self.factory.connections:
            connection = next(iter(self.factory.connections))
            connection.transport.abortConnection()  # type: ignore[union-attr]
            await connection.lost


@pytest_twisted.async_yield_fixture
async def start_server() -> AsyncIterator[Callable[[ServerTLS], _Server]]:
    """Start echo servers for ServerTLS instances; stop them afterwards."""
    servers: list[_Server] = []

    def start(tls: ServerTLS) -> _Server:
        factory = _EchoFactory()
        listening = reactor.listenTCP(  # type: ignore[attr-defined]
            0, HTTPSOnlyFactory(tls, factory, reactor), interface="127.0.0.1"
        )
        server = _Server(tls, listening, factory)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    """Events logged during the test."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def logged(events: list[LogEvent], level: str) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"].name == level]


@pytest.fixture
def sockets() -> Iterator[list[ssl.SSLSocket]]:
    """Client sockets to close at the end of the test."""
    opened: list[ssl.SSLSocket] = []
    yield opened
    for sock in opened:
        sock.close()


def client_context(
    ca_path: Path,
    *,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    alpn: list[str] | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_path))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    # The chain is still verified; only the name is not checked.
    context.check_hostname = check_hostname
    with warnings.catch_warnings():
        # Setting TLS 1.0/1.1 is deprecated, and exactly what these tests do.
        warnings.simplefilter("ignore", DeprecationWarning)
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def _connect_blocking(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return context.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


async def connect(
    sockets: list[ssl.SSLSocket],
    port: int,
    context: ssl.SSLContext,
    server_hostname: str | None = "localhost",
) -> ssl.SSLSocket:
    """Connect and complete the handshake (verifying the server).

    C{server_hostname} is also the SNI name sent, except that Python sends
    none for C{None} or an IP address."""
    sock = await deferToThread(_connect_blocking, port, context, server_hostname)
    sockets.append(sock)
    return sock


async def handshake_error(
    port: int, context: ssl.SSLContext, server_hostname: str = "localhost"
) -> ssl.SSLError:
    """The error a handshake that must fail fails with."""

    def attempt() -> ssl.SSLError:
        try:
            _connect_blocking(port, context, server_hostname).close()
        except ssl.SSLError as e:
            return e
        raise AssertionError("handshake unexpectedly succeeded")

    return await deferToThread(attempt)


def _exchange_blocking(sock: ssl.SSLSocket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(1024)


async def exchange(sock: ssl.SSLSocket, data: bytes) -> bytes:
    return await deferToThread(_exchange_blocking, sock, data)


def peer_certificate(sock: ssl.SSLSocket) -> x509.Certificate:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def organization(cert: x509.Certificate) -> str | None:
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(values[0].value) if values else None


# Protocol versions


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
@pytest_twisted.ensureDeferred
async def test_old_protocol_versions_refused(
    pki: Pki, start_server: Callable[[ServerTLS], _Server], version: str
) -> None:
    server = start_server(ServerTLS(pki.chain_path, pki.key_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tls_version = getattr(ssl.TLSVersion, version)
    context = client_context(
        pki.ca_cert_path,
        minimum=tls_version,
        maximum=tls_version,
        # Make the client's OpenSSL really offer the old protocol.
        ciphers="DEFAULT:@SECLEVEL=0",
    )

    error = await handshake_error(server.port, context)

    # The server said no: a client that could not offer the version would
    # fail with NO_PROTOCOLS_AVAILABLE instead.
    assert error.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


@pytest.mark.parametrize(
    ("minimum", "maximum", "expected"),
    [
        (None, ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
        (ssl.TLSVersion.TLSv1_3, None, "TLSv1.3"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_tls12_and_tls13_accepted(
    pki: Pki,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    minimum: ssl.TLSVersion | None,
    maximum: ssl.TLSVersion | None,
    expected: str,
) -> None:
    server = start_server(ServerTLS(pki.chain_path, pki.key_path))
    context = client_context(pki.ca_cert_path, minimum=minimum, maximum=maximum)

    sock = await connect(sockets, server.port, context)

    assert sock.version() == expected
    assert await exchange(sock, b"ping") == b"ping"


# Cipher suites


@pytest.mark.parametrize(
    "cipher",
    # ECDHE with CBC: usable with the EC certificate (a server without our
    # cipher list accepts them), but not AEAD. Suites with RSA key exchange,
    # like AES128-SHA, would fail against an EC key whatever the list says.
    ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"],
)
@pytest_twisted.ensureDeferred
async def test_weak_tls12_ciphers_refused(
    pki: Pki, start_server: Callable[[ServerTLS], _Server], cipher: str
) -> None:
    server = start_server(ServerTLS(pki.chain_path, pki.key_path))
    context = client_context(
        pki.ca_cert_path,
        maximum=ssl.TLSVersion.TLSv1_2,
        ciphers=f"{cipher}:@SECLEVEL=0",
    )

    error = await handshake_error(server.port, context)

    assert error.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"


@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
)
@pytest_twisted.ensureDeferred
async def test_strong_tls12_ciphers_accepted(
    pki: Pki,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    cipher: str,
) -> None:
    server = start_server(ServerTLS(pki.chain_path, pki.key_path))
    context = client_context(
        pki.ca_cert_path, maximum=ssl.TLSVersion.TLSv1_2, ciphers=cipher
    )

    sock = await connect(sockets, server.port, context)

    assert sock.cipher()[0] == cipher  # type: ignore[index]


# Certificate chain


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
@pytest_twisted.ensureDeferred
async def test_full_chain_served(
    pki: Pki,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    server_hostname: str,
) -> None:
    """A client trusting only the root verifies the server, so the
    intermediate came from the server."""
    server = start_server(ServerTLS(pki.chain_path, pki.key_path))

    sock = await connect(
        sockets, server.port, client_context(pki.ca_cert_path), server_hostname
    )

    assert peer_certificate(sock) == pki.leaf.certificate
    assert await exchange(sock, b"ping") == b"ping"


@pytest_twisted.ensureDeferred
async def test_leaf_alone_does_not_verify(
    pki: Pki, start_server: Callable[[ServerTLS], _Server]
) -> None:
    """Control for test_full_chain_served: without the intermediate in the
    file the same client cannot build a path to the root."""
    server = start_server(ServerTLS(pki.cert_path, pki.key_path))

    error = await handshake_error(server.port, client_context(pki.ca_cert_path))

    assert isinstance(error, ssl.SSLCertVerificationError)
    assert error.verify_code == 20  # unable to get local issuer certificate


# ALPN


@pytest.mark.parametrize(
    ("server_protocols", "client_protocols", "expected"),
    [
        ((b"http/1.1",), ["h2", "http/1.1"], "http/1.1"),
        ((b"h2", b"http/1.1"), ["h2", "http/1.1"], "h2"),
        # The server's preference wins over the client's order.
        ((b"h2", b"http/1.1"), ["http/1.1", "h2"], "h2"),
        ((b"h2", b"http/1.1"), ["http/1.1"], "http/1.1"),
        # No overlap: no ALPN answer, but the connection goes ahead.
        ((b"http/1.1",), ["h2"], None),
        # Client without ALPN.
        ((b"h2", b"http/1.1"), None, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_alpn(
    pki: Pki,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    server_protocols: tuple[bytes, ...],
    client_protocols: list[str] | None,
    expected: str | None,
) -> None:
    server = start_server(
        ServerTLS(pki.chain_path, pki.key_path, alpn_protocols=server_protocols)
    )
    context = client_context(pki.ca_cert_path, alpn=client_protocols)

    sock = await connect(sockets, server.port, context)

    assert sock.selected_alpn_protocol() == expected
    server_view = await exchange(sock, ALPN_QUERY)
    assert server_view == (expected.encode() if expected else b"-")


# Reload


@pytest_twisted.ensureDeferred
async def test_reload_serves_new_certificate_to_new_connections(
    pki: Pki,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
) -> None:
    tls = ServerTLS(pki.chain_path, pki.key_path)
    server = start_server(tls)
    context = client_context(pki.ca_cert_path)
    old = await connect(sockets, server.port, context)
    rotated = pki.issue_leaf("rotated", organization="rotated")

    rotated.install(pki.chain_path, pki.key_path)
    assert tls.reload() is True

    new = await connect(sockets, server.port, context)
    assert peer_certificate(new) == rotated.certificate
    assert organization(peer_certificate(new)) == "rotated"
    assert tls.certificate == rotated.certificate
    # The established connection keeps working on the old certificate.
    assert await exchange(old, b"still there") == b"still there"
    assert peer_certificate(old) == pki.leaf.certificate
    assert await exchange(new, b"ping") == b"ping"


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_certificates(
    pki: Pki,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
) -> None:
    tls = ServerTLS(pki.chain_path, pki.key_path)
    server = start_server(tls)
    context = client_context(pki.ca_cert_path)
    old = await connect(sockets, server.port, context)
    rotated = pki.issue_leaf("rotated", organization="rotated")
    rotated.install(pki.chain_path, pki.key_path)

    reloaded: Deferred[None] = Deferred()
    service = SighupService(
        reactor,  # type: ignore[arg-type]
        [tls.reload, lambda: reloaded.callback(None)],
    )
    previous_handler = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await reloaded
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == previous_handler

    new = await connect(sockets, server.port, context)
    assert peer_certificate(new) == rotated.certificate
    assert await exchange(old, b"still there") == b"still there"
    assert peer_certificate(old) == pki.leaf.certificate


def _garbage_certificate(pki: Pki) -> None:
    pki.chain_path.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")


def _mismatched_key(pki: Pki) -> None:
    other = pki.issue_leaf("other")
    pki.chain_path.write_bytes(other.chain_path.read_bytes())


def _missing_key(pki: Pki) -> None:
    pki.key_path.unlink()


@pytest.mark.parametrize(
    "break_files", [_garbage_certificate, _mismatched_key, _missing_key]
)
@pytest_twisted.ensureDeferred
async def test_failed_reload_keeps_old_certificate(
    pki: Pki,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    break_files: Callable[[Pki], None],
) -> None:
    tls = ServerTLS(pki.chain_path, pki.key_path)
    server = start_server(tls)
    break_files(pki)

    assert tls.reload() is False

    sock = await connect(sockets, server.port, client_context(pki.ca_cert_path))
    assert peer_certificate(sock) == pki.leaf.certificate
    assert await exchange(sock, b"ping") == b"ping"


# Several certificates chosen by server name (SNI)


@attrs.frozen
class _SniCertificates:
    """Two certificates from the test PKI for one listener."""

    first: Leaf
    """The default: matrix.example.org and 127.0.0.1."""

    second: Leaf
    """chat.example.com, *.users.example.com and 192.0.2.7."""

    @property
    def files(self) -> list[tuple[Path, Path]]:
        return [
            (self.first.chain_path, self.first.key_path),
            (self.second.chain_path, self.second.key_path),
        ]


def issue_first(pki: Pki, name: str, organization: str | None = None) -> Leaf:
    """A certificate for the names of L{_SniCertificates.first}."""
    return pki.issue_leaf(name, ["matrix.example.org"], ["127.0.0.1"], organization)


def issue_second(pki: Pki, name: str, organization: str | None = None) -> Leaf:
    """A certificate for the names of L{_SniCertificates.second}."""
    return pki.issue_leaf(
        name, ["chat.example.com", "*.users.example.com"], ["192.0.2.7"], organization
    )


@pytest.fixture
def sni(pki: Pki) -> _SniCertificates:
    return _SniCertificates(
        first=issue_first(pki, "first", organization="first"),
        second=issue_second(pki, "second", organization="second"),
    )


@pytest.mark.parametrize(
    ("server_hostname", "expected"),
    [
        ("matrix.example.org", "first"),
        ("chat.example.com", "second"),
        ("alice.users.example.com", "second"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_sni_selects_certificate(
    pki: Pki,
    sni: _SniCertificates,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    server_hostname: str,
    expected: str,
) -> None:
    server = start_server(ServerTLS.from_certificates(sni.files))

    # The client checks that the certificate is valid for the name asked.
    sock = await connect(
        sockets, server.port, client_context(pki.ca_cert_path), server_hostname
    )

    assert organization(peer_certificate(sock)) == expected
    assert await exchange(sock, b"ping") == b"ping"


@pytest.mark.parametrize(
    "server_hostname",
    [
        None,
        "unknown.example.net",
        # A wildcard covers one label only.
        "deep.alice.users.example.com",
    ],
)
@pytest_twisted.ensureDeferred
async def test_no_or_unknown_server_name_gets_first_certificate(
    pki: Pki,
    sni: _SniCertificates,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    server_hostname: str | None,
) -> None:
    server = start_server(ServerTLS.from_certificates(sni.files))
    context = client_context(pki.ca_cert_path, check_hostname=False)

    sock = await connect(sockets, server.port, context, server_hostname)

    assert peer_certificate(sock) == sni.first.certificate
    assert await exchange(sock, b"ping") == b"ping"


@pytest.mark.parametrize(
    ("server_hostname", "expected"),
    [("matrix.example.org", "first"), ("chat.example.com", "second")],
)
@pytest_twisted.ensureDeferred
async def test_alpn_with_sni(
    pki: Pki,
    sni: _SniCertificates,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    server_hostname: str,
    expected: str,
) -> None:
    """The context switched to negotiates ALPN like the default one."""
    tls = ServerTLS.from_certificates(sni.files, alpn_protocols=[b"h2", b"http/1.1"])
    server = start_server(tls)
    context = client_context(pki.ca_cert_path, alpn=["http/1.1", "h2"])

    sock = await connect(sockets, server.port, context, server_hostname)

    assert organization(peer_certificate(sock)) == expected
    assert sock.selected_alpn_protocol() == "h2"
    assert await exchange(sock, ALPN_QUERY) == b"h2"


@pytest_twisted.ensureDeferred
async def test_reload_swaps_every_certificate(
    pki: Pki,
    sni: _SniCertificates,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
) -> None:
    tls = ServerTLS.from_certificates(sni.files)
    server = start_server(tls)
    context = client_context(pki.ca_cert_path)
    old = await connect(sockets, server.port, context, "chat.example.com")
    new_first = issue_first(pki, "new-first")
    new_second = issue_second(pki, "new-second")
    new_first.install(sni.first.chain_path, sni.first.key_path)
    new_second.install(sni.second.chain_path, sni.second.key_path)

    assert tls.reload() is True

    first = await connect(sockets, server.port, context, "matrix.example.org")
    second = await connect(sockets, server.port, context, "chat.example.com")
    assert peer_certificate(first) == new_first.certificate
    assert peer_certificate(second) == new_second.certificate
    assert tls.certificates == (new_first.certificate, new_second.certificate)
    # The established connection keeps working on the old certificate.
    assert await exchange(old, b"still there") == b"still there"
    assert peer_certificate(old) == sni.second.certificate


@pytest_twisted.ensureDeferred
async def test_failed_reload_of_one_certificate_keeps_all_old_ones(
    pki: Pki,
    sni: _SniCertificates,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
    log_events: list[LogEvent],
) -> None:
    tls = ServerTLS.from_certificates(sni.files)
    server = start_server(tls)
    # The first certificate is renewed correctly, the second is broken.
    issue_first(pki, "new-first").install(sni.first.chain_path, sni.first.key_path)
    sni.second.chain_path.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")

    assert tls.reload() is False

    context = client_context(pki.ca_cert_path)
    first = await connect(sockets, server.port, context, "matrix.example.org")
    second = await connect(sockets, server.port, context, "chat.example.com")
    assert peer_certificate(first) == sni.first.certificate
    assert peer_certificate(second) == sni.second.certificate
    assert await exchange(second, b"ping") == b"ping"
    [error] = logged(log_events, "error")
    assert str(sni.second.chain_path) in error


# Self-signed certificates for first runs


@pytest_twisted.ensureDeferred
async def test_self_signed_certificate_serves_and_verifies(
    tmp_path: Path,
    start_server: Callable[[ServerTLS], _Server],
    sockets: list[ssl.SSLSocket],
) -> None:
    cert_path = tmp_path / "tls" / "cert.pem"
    key_path = tmp_path / "tls" / "key.pem"
    generate_self_signed(cert_path, key_path, ["localhost"], ["127.0.0.1"])
    server = start_server(ServerTLS(cert_path, key_path))

    # Trusting the certificate itself is what `curl --cacert` does.
    sock = await connect(sockets, server.port, client_context(cert_path))

    assert await exchange(sock, b"ping") == b"ping"


# Loading, and clear errors for bad files (no sockets from here on)


def load_error(chain_path: Path, key_path: Path) -> str:
    with pytest.raises(TLSConfigError) as info:
        ServerTLS(chain_path, key_path)
    # The error stands on its own, without an OpenSSL exception chained on.
    error = info.value
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None
    return str(info.value)


def test_loads_chain_and_key(pki: Pki) -> None:
    tls = ServerTLS(pki.chain_path, pki.key_path)

    assert tls.certificate == pki.leaf.certificate
    assert tls.chain == (pki.leaf.certificate, pki.intermediate.certificate)
    assert tls.alpn_protocols == (b"http/1.1",)


def test_describe(pki: Pki) -> None:
    tls = ServerTLS(pki.chain_path, pki.key_path, alpn_protocols=[b"h2", b"http/1.1"])

    description = tls.describe()

    assert str(pki.chain_path) in description
    assert "subject='CN=localhost'" in description
    assert "issuer='CN=Test Intermediate CA'" in description
    not_after = pki.leaf.certificate.not_valid_after_utc.isoformat()
    assert f"not_after={not_after}" in description
    assert "chain_length=2" in description
    assert "alpn=h2,http/1.1" in description


def test_missing_certificate_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"

    assert load_error(missing, pki.key_path) == (
        f"certificate file not found: {missing}"
    )


def test_missing_key_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"

    assert load_error(pki.chain_path, missing) == (
        f"private key file not found: {missing}"
    )


def test_certificate_path_is_directory(pki: Pki, tmp_path: Path) -> None:
    assert load_error(tmp_path, pki.key_path) == (
        f"certificate path is a directory: {tmp_path}"
    )


def test_empty_certificate_file(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")

    assert load_error(empty, pki.key_path) == f"no certificate in {empty}"


def test_key_in_certificate_file(pki: Pki) -> None:
    """A common mix-up: the key file configured as the certificate."""
    assert load_error(pki.key_path, pki.key_path) == (
        f"no certificate in {pki.key_path}"
    )


def test_corrupt_certificate(pki: Pki, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_bytes(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )

    assert load_error(corrupt, pki.key_path).startswith(
        f"invalid certificate in {corrupt}: "
    )


def test_empty_key_file(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"")

    assert load_error(pki.chain_path, empty).startswith(
        f"no valid PEM private key in {empty}: "
    )


def test_encrypted_key(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        pki.leaf.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )

    assert load_error(pki.chain_path, encrypted) == (
        f"private key in {encrypted} is encrypted; passphrases are not supported"
    )


def test_key_does_not_match_certificate(pki: Pki) -> None:
    other = pki.issue_leaf("other")

    assert load_error(pki.chain_path, other.key_path) == (
        f"private key in {other.key_path} does not match certificate in "
        f"{pki.chain_path}"
    )


def test_chain_in_wrong_order(pki: Pki, tmp_path: Path) -> None:
    reversed_chain = tmp_path / "reversed.pem"
    reversed_chain.write_bytes(
        pki.intermediate_cert_path.read_bytes() + pki.cert_path.read_bytes()
    )

    assert load_error(reversed_chain, pki.key_path) == (
        f"private key in {pki.key_path} matches certificate #2 in "
        f"{reversed_chain}; the server certificate must come first"
    )


@pytest.mark.parametrize("protocol", [b"", b"x" * 256])
def test_invalid_alpn_protocol(pki: Pki, protocol: bytes) -> None:
    with pytest.raises(ValueError, match="ALPN protocol names"):
        ServerTLS(pki.chain_path, pki.key_path, alpn_protocols=[protocol])


# Choosing among several certificates (no handshakes)


@pytest.mark.parametrize(
    ("server_name", "expected"),
    [
        ("matrix.example.org", "first"),
        ("MATRIX.Example.org.", "first"),
        ("chat.example.com", "second"),
        ("bob.users.example.com", "second"),
        # A wildcard matches one whole label, and not the name it is under.
        ("users.example.com", "first"),
        ("a.bob.users.example.com", "first"),
        (".users.example.com", "first"),
        # IP addresses, should a client send one, match IP SANs only.
        ("192.0.2.7", "second"),
        ("127.0.0.1", "first"),
        ("unknown.example.net", "first"),
        ("", "first"),
        (None, "first"),
    ],
)
def test_certificate_for(
    sni: _SniCertificates, server_name: str | None, expected: str
) -> None:
    tls = ServerTLS.from_certificates(sni.files)

    assert organization(tls.certificate_for(server_name)) == expected


def test_exact_name_wins_and_first_certificate_wins(
    pki: Pki, sni: _SniCertificates, log_events: list[LogEvent]
) -> None:
    third = pki.issue_leaf(
        "third",
        hostnames=["chat.example.com", "carol.users.example.com"],
        ip_addresses=[],
        organization="third",
    )

    tls = ServerTLS.from_certificates([*sni.files, (third.chain_path, third.key_path)])

    # The second certificate came first with this name.
    assert organization(tls.certificate_for("chat.example.com")) == "second"
    # An exact name beats the second certificate's wildcard.
    assert organization(tls.certificate_for("carol.users.example.com")) == "third"
    assert organization(tls.certificate_for("dave.users.example.com")) == "second"
    [warning] = logged(log_events, "warn")
    assert warning == (
        f"Certificate in {third.chain_path} lists chat.example.com, which the "
        f"earlier certificate in {sni.second.chain_path} already serves"
    )


def test_describe_several_certificates(
    sni: _SniCertificates, log_events: list[LogEvent]
) -> None:
    tls = ServerTLS.from_certificates(sni.files, alpn_protocols=[b"h2", b"http/1.1"])

    first, second = tls.describe().splitlines()

    assert first.startswith(f"{sni.first.chain_path} (default): ")
    assert "names=matrix.example.org,127.0.0.1 " in first
    assert second.startswith(f"{sni.second.chain_path}: ")
    assert "names=chat.example.com,*.users.example.com,192.0.2.7 " in second
    assert "alpn=h2,http/1.1" in second
    # Loading logged the same lines.
    assert logged(log_events, "info") == [
        f"TLS certificate loaded: {first}",
        f"TLS certificate loaded: {second}",
    ]


def test_from_certificates_needs_one() -> None:
    with pytest.raises(ValueError):
        ServerTLS.from_certificates([])


# load_tls: configuration errors name the failing certificate's key


def _config_with_tls(tls: object) -> dict[str, object]:
    return {
        "listeners": [{"port": 8448, "tls": tls}],
        "upstream": "http://127.0.0.1:8008",
    }


def _files(chain_path: Path, key_path: Path) -> dict[str, str]:
    return {"certificate_path": str(chain_path), "private_key_path": str(key_path)}


def test_load_tls_serves_every_certificate(sni: _SniCertificates) -> None:
    config = parse_config(
        _config_with_tls({"certificates": [_files(*f) for f in sni.files]})
    )

    tls = load_tls(config)

    assert tls[0].certificates == (sni.first.certificate, sni.second.certificate)


@pytest.mark.parametrize("failing", [0, 1])
def test_load_tls_error_names_certificate_in_list(
    sni: _SniCertificates, failing: int
) -> None:
    files = [_files(*f) for f in sni.files]
    # Swap the keys of the failing one for the other's.
    other = sni.files[1 - failing]
    files[failing]["private_key_path"] = str(other[1])
    config = parse_config(_config_with_tls({"certificates": files}))

    with pytest.raises(ConfigError) as info:
        load_tls(config)

    assert info.value.path == ("listeners", 0, "tls", "certificates", failing)
    assert str(info.value) == (
        f"listeners[0].tls.certificates[{failing}]: private key in {other[1]} "
        f"does not match certificate in {sni.files[failing][0]}"
    )


def test_load_tls_error_for_single_certificate(sni: _SniCertificates) -> None:
    config = parse_config(
        _config_with_tls(_files(sni.first.chain_path, sni.second.key_path))
    )

    with pytest.raises(ConfigError) as info:
        load_tls(config)

    assert str(info.value) == (
        f"listeners[0].tls: private key in {sni.second.key_path} does not match "
        f"certificate in {sni.first.chain_path}"
    )


# Self-signed certificate files


def test_generate_self_signed(tmp_path: Path) -> None:
    cert_path = tmp_path / "new" / "dir" / "cert.pem"
    key_path = tmp_path / "new" / "keys" / "key.pem"

    generate_self_signed(
        cert_path,
        key_path,
        ["matrix.example.org", "localhost"],
        ip_addresses=["127.0.0.1", "::1"],
        days=10,
    )

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    certificate = ServerTLS(cert_path, key_path).certificate
    sans = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "matrix.example.org",
        "localhost",
    ]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert certificate.subject.rfc4514_string() == "CN=matrix.example.org"
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert 10 <= lifetime.days <= 11


def test_generate_self_signed_replaces_key_with_private_file(tmp_path: Path) -> None:
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)

    generate_self_signed(cert_path, key_path, ["localhost"])

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert ServerTLS(cert_path, key_path).certificate.subject.rfc4514_string() == (
        "CN=localhost"
    )
    # Only the two files: no temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cert.pem", "key.pem"]


def test_generate_self_signed_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_self_signed(tmp_path / "c.pem", tmp_path / "k.pem", [])


# SighupService


@pytest.fixture
def sighup_handler() -> Iterator[None]:
    """Put SIGHUP's handler back however a test leaves it."""
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_reload_all_runs_every_callback(sighup_handler: None) -> None:
    calls: list[str] = []

    def failing() -> None:
        calls.append("failing")
        raise RuntimeError("boom")

    service = SighupService(
        MemoryReactor(),
        [lambda: calls.append("first"), failing, lambda: calls.append("last")],
    )

    assert service.reload_all() is False
    assert calls == ["first", "failing", "last"]


def test_reload_all_reports_false_results() -> None:
    service = SighupService(MemoryReactor(), [lambda: True, lambda: False])

    assert service.reload_all() is False


def test_reload_all_succeeds(pki: Pki) -> None:
    tls = ServerTLS(pki.chain_path, pki.key_path)
    calls: list[str] = []
    service = SighupService(MemoryReactor(), [tls.reload])
    service.add_callback(lambda: calls.append("added"))

    assert service.reload_all() is True
    assert calls == ["added"]


def test_handler_installed_and_restored(sighup_handler: None) -> None:
    def previous(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGHUP, previous)
    service = SighupService(MemoryReactor())

    service.startService()
    assert signal.getsignal(signal.SIGHUP) not in (previous, signal.SIG_DFL)
    service.stopService()

    assert signal.getsignal(signal.SIGHUP) is previous
