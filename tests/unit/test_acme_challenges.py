"""The answers to the CA's challenges: tls-alpn-01 through real TLS
handshakes over memory BIOs, http-01 through a real Site over an
in-memory transport."""

from __future__ import annotations

import hashlib
import json
import ssl

import pytest
from cryptography import x509
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.server import Site

from matrix_edge.acme.challenges import (
    ACME_IDENTIFIER,
    ACME_TLS_1,
    HTTP01Resource,
    TLSALPNResponder,
    key_authorization_digest,
    remove_http01_answer,
    remove_tls_alpn_answer,
    write_http01_answer,
    write_tls_alpn_answer,
)
from matrix_edge.acme.store import AcmeStore
from matrix_edge.server.tls import HTTPSOnlyFactory
from matrix_edge.tls import ServerTLS, generate_self_signed

NAME = "matrix.example.org"
KEY_AUTHORIZATION = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


@pytest.fixture
def store(tmp_path) -> AcmeStore:
    store = AcmeStore(tmp_path / "acme")
    store.prepare()
    return store


class _Handshake:
    """A client SSLObject and a server SSLObject, bytes pumped between
    them by hand."""

    def __init__(
        self,
        responder: TLSALPNResponder,
        server_hostname: str | None,
        alpn: list[str] | None = None,
    ):
        client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
        client_context.set_alpn_protocols([ACME_TLS_1] if alpn is None else alpn)
        self.c_in, self.c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.s_in, self.s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_context.wrap_bio(
            self.c_in, self.c_out, server_hostname=server_hostname
        )
        self.server = responder.server_side(self.s_in, self.s_out)

    def run(self) -> None:
        """Handshake both sides; raises the first side's ssl.SSLError."""
        client_done = server_done = False
        for _ in range(20):
            if not client_done:
                try:
                    self.client.do_handshake()
                    client_done = True
                except ssl.SSLWantReadError:
                    pass
            self.s_in.write(self.c_out.read())
            if not server_done:
                try:
                    self.server.do_handshake()
                    server_done = True
                except ssl.SSLWantReadError:
                    pass
            self.c_in.write(self.s_out.read())
            if client_done and server_done:
                return
        raise AssertionError("handshake did not finish")

    def presented(self) -> x509.Certificate:
        der = self.client.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def test_digest_is_sha256_of_the_key_authorization():
    assert key_authorization_digest(KEY_AUTHORIZATION) == (
        hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()
    )


def test_validation_certificate_written(store):
    write_tls_alpn_answer(store, NAME, KEY_AUTHORIZATION)
    path = store.tls_alpn_path(NAME)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    data = path.read_bytes()
    assert b"PRIVATE KEY" in data
    [certificate] = x509.load_pem_x509_certificates(data)
    extension = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    assert extension.critical
    # A DER OCTET STRING holding the 32-byte digest (RFC 8737 section 3).
    assert extension.value.value == b"\x04\x20" + key_authorization_digest(
        KEY_AUTHORIZATION
    )
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [NAME]
    assert certificate.issuer == certificate.subject


def test_tls_alpn_handshake_presents_the_validation_certificate(store):
    write_tls_alpn_answer(store, NAME, KEY_AUTHORIZATION)
    responder = TLSALPNResponder(store)
    handshake = _Handshake(responder, NAME)
    handshake.run()

    assert handshake.client.selected_alpn_protocol() == ACME_TLS_1
    assert handshake.server.selected_alpn_protocol() == ACME_TLS_1
    certificate = handshake.presented()
    extension = certificate.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    assert extension.critical
    assert (
        extension.value.value[2:] == hashlib.sha256(KEY_AUTHORIZATION.encode()).digest()
    )
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == [NAME]
    assert responder.answered == 1


def test_tls_alpn_name_is_matched_without_case_or_trailing_dot(store):
    write_tls_alpn_answer(store, NAME, KEY_AUTHORIZATION)
    responder = TLSALPNResponder(store)
    handshake = _Handshake(responder, "Matrix.Example.ORG")
    handshake.run()
    assert handshake.presented().extensions.get_extension_for_oid(ACME_IDENTIFIER)


def test_each_name_gets_its_own_answer(store):
    write_tls_alpn_answer(store, NAME, KEY_AUTHORIZATION)
    write_tls_alpn_answer(store, "other.example.org", "other.key-authorization")
    responder = TLSALPNResponder(store)
    handshake = _Handshake(responder, "other.example.org")
    handshake.run()
    extension = handshake.presented().extensions.get_extension_for_oid(ACME_IDENTIFIER)
    assert extension.value.value[2:] == key_authorization_digest(
        "other.key-authorization"
    )


@pytest.mark.parametrize(
    "server_name", ["other.example.org", None, "sub.matrix.example.org"]
)
def test_a_name_with_no_pending_answer_fails_the_handshake(store, server_name):
    write_tls_alpn_answer(store, NAME, KEY_AUTHORIZATION)
    responder = TLSALPNResponder(store)
    handshake = _Handshake(responder, server_name)
    with pytest.raises(ssl.SSLError):
        handshake.run()
    assert responder.answered == 0


def test_a_removed_answer_is_no_longer_served(store):
    write_tls_alpn_answer(store, NAME, KEY_AUTHORIZATION)
    remove_tls_alpn_answer(store, NAME)
    remove_tls_alpn_answer(store, NAME)  # and again: nothing to remove
    assert not store.tls_alpn_path(NAME).exists()
    handshake = _Handshake(TLSALPNResponder(store), NAME)
    with pytest.raises(ssl.SSLError):
        handshake.run()


def test_a_damaged_answer_fails_the_handshake(store):
    store.tls_alpn_path(NAME).write_bytes(b"not a certificate")
    handshake = _Handshake(TLSALPNResponder(store), NAME)
    with pytest.raises(ssl.SSLError):
        handshake.run()


def test_names_outside_host_name_syntax_never_reach_the_file_system(store):
    responder = TLSALPNResponder(store)
    assert responder._answer_path("../../certificates/x") is None
    assert responder._answer_path("a/b.example.org") is None
    assert responder._answer_path("") is None
    assert responder._answer_path(NAME) == store.tls_alpn_path(NAME)


# http-01 ------------------------------------------------------------------


def _get(store: AcmeStore, target: bytes, host: bytes | None = b"matrix.example.org"):
    """The raw HTTP/1.1 response of the port-80 site to one GET."""
    site = Site(HTTP01Resource(store))
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    request = b"GET " + target + b" HTTP/1.1\r\n"
    if host is not None:
        request += b"Host: " + host + b"\r\n"
    channel.dataReceived(request + b"Connection: close\r\n\r\n")
    response = transport.value()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(b":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def test_http01_token_is_served(store):
    write_http01_answer(store, TOKEN, KEY_AUTHORIZATION)
    assert oct(store.http01_path(TOKEN).stat().st_mode & 0o777) == oct(0o600)
    status, headers, body = _get(
        store, b"/.well-known/acme-challenge/" + TOKEN.encode()
    )
    assert status == 200
    assert body == KEY_AUTHORIZATION.encode()
    assert headers[b"content-type"] == b"application/octet-stream"


def test_http01_unknown_token_is_404(store):
    status, headers, body = _get(
        store, b"/.well-known/acme-challenge/" + TOKEN.encode()
    )
    assert status == 404
    # The edge's own answers are Matrix errors here too.
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["errcode"] == "M_UNRECOGNIZED"


def test_http01_removed_token_is_404(store):
    write_http01_answer(store, TOKEN, KEY_AUTHORIZATION)
    remove_http01_answer(store, TOKEN)
    remove_http01_answer(store, TOKEN)
    status, _, _ = _get(store, b"/.well-known/acme-challenge/" + TOKEN.encode())
    assert status == 404


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"../account.json",
        b"..%2f..%2faccounts",
        b"%2e%2e",
        b"a%2fb",
        b"a/b",
        b"..",
        b"tok.en",
    ],
)
def test_http01_bad_tokens_are_404(store, token):
    # Files a traversal could reach exist, and are not served.
    write_http01_answer(store, TOKEN, KEY_AUTHORIZATION)
    (store.root / "challenges" / "account.json").write_text("secret")
    (store.root / "challenges" / "http-01" / "tok.en").write_text("secret")
    status, _, body = _get(store, b"/.well-known/acme-challenge/" + token)
    assert status == 404
    assert b"secret" not in body


@pytest.mark.parametrize(
    "target",
    [b"/", b"/_matrix/client/versions", b"/a?b=c", b"/.well-known/matrix/server"],
)
def test_http01_everything_else_is_redirected_to_https(store, target):
    status, headers, _ = _get(store, target, host=b"matrix.example.org:80")
    assert status == 308
    assert headers[b"location"] == b"https://matrix.example.org" + target


def test_http01_absolute_form_target_is_refused(store):
    status, _, _ = _get(store, b"http://matrix.example.org/x")
    assert status == 400


def test_http01_redirect_keeps_an_ipv6_literal_valid(store):
    status, headers, _ = _get(store, b"/x", host=b"[2001:db8::1]:80")
    assert status == 308
    assert headers[b"location"] == b"https://[2001:db8::1]/x"


def test_http01_token_with_a_query_is_still_served(store):
    write_http01_answer(store, TOKEN, KEY_AUTHORIZATION)
    status, _, body = _get(
        store, b"/.well-known/acme-challenge/" + TOKEN.encode() + b"?x=1"
    )
    assert (status, body) == (200, KEY_AUTHORIZATION.encode())


@pytest.mark.parametrize("host", [b"a b", b"exa\x7fmple.org", b"[::1", b""])
def test_http01_redirect_refuses_a_host_that_is_no_host(store, host):
    status, headers, _ = _get(store, b"/x", host=host)
    assert status == 400
    assert b"location" not in headers


def test_an_over_long_name_is_refused_without_touching_the_files(store):
    name = ".".join(["a" * 60] * 5)  # 304 characters: no file name takes it
    responder = TLSALPNResponder(store)
    assert responder._on_sni(None, name, None) == (  # type: ignore[arg-type]
        ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    )


@pytest.mark.parametrize("first", [1, 3, 5, 40])
def test_a_client_hello_in_pieces_still_reaches_the_validation(tmp_path, store, first):
    """The listener's TLS layer tells the CA's connection apart by the
    ALPN list in its first TLS record, however the record is cut up by
    TCP: here the first piece is ``first`` bytes, the rest comes after."""
    write_tls_alpn_answer(store, NAME, KEY_AUTHORIZATION)
    chain, key = tmp_path / "site.pem", tmp_path / "site.key"
    generate_self_signed(chain, key, [NAME])
    https = HTTPSOnlyFactory(
        ServerTLS(chain, key),
        Factory.forProtocol(Protocol),
        Clock(),
        acme=TLSALPNResponder(store),
    )
    connection = https.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)

    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    client_context.set_alpn_protocols([ACME_TLS_1])
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(c_in, c_out, server_hostname=NAME)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = c_out.read()
    connection.dataReceived(hello[:first])
    assert transport.value() == b""
    connection.dataReceived(hello[first:])
    c_in.write(transport.value())
    client.do_handshake()

    assert client.selected_alpn_protocol() == ACME_TLS_1
    der = client.getpeercert(binary_form=True)
    assert der is not None
    presented = x509.load_der_x509_certificate(der)
    assert presented.extensions.get_extension_for_oid(ACME_IDENTIFIER).critical
