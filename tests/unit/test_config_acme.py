"""The ``acme`` section and ``tls: {acme: ...}`` on listeners: every error
names its key, ``acme: true`` takes the section's domains."""

from __future__ import annotations

import pytest

from matrix_edge.config._base import ConfigError
from matrix_edge.config.acme import (
    DEFAULT_STATE_DIRECTORY,
    HTTP01_BIND_ADDRESSES,
    LETSENCRYPT,
    LETSENCRYPT_STAGING,
    AcmeConfig,
)
from matrix_edge.config.edge import parse_config
from tests.pki import make_pki


def _document(acme=None, tls=None, **extra):
    listener: dict = {"port": 8448}
    if tls is not None:
        listener["tls"] = tls
    document: dict = {"listeners": [listener], "upstream": "http://127.0.0.1:8008"}
    if acme is not None:
        document["acme"] = acme
    document.update(extra)
    return document


def _error(document) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(document)
    return str(e.value)


def test_defaults_of_the_section():
    config = parse_config(_document(acme={"domains": ["m.example.org"]}))
    assert config.acme == AcmeConfig(domains=("m.example.org",))
    assert config.acme.directory == LETSENCRYPT
    assert config.acme.contact is None
    assert config.acme.state_directory == DEFAULT_STATE_DIRECTORY
    assert config.acme.ca_bundle is None
    assert config.acme.http01_port is None
    assert config.acme.http01_bind_addresses == HTTP01_BIND_ADDRESSES


def test_no_section_is_none():
    assert parse_config(_document()).acme is None


def test_every_key(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    config = parse_config(
        _document(
            acme={
                "domains": ["M.Example.org.", "b.example.org", "m.example.org"],
                "directory": "https://acme.internal:14000/dir",
                "contact": "mailto:admin@example.org",
                "state_directory": str(tmp_path / "state"),
                "ca_bundle": str(bundle),
                "http01_port": 80,
                "http01_bind_addresses": ["192.0.2.1"],
            },
            tls={"acme": True},
        )
    )
    assert config.acme == AcmeConfig(
        # Lower case, no trailing dot, each name once, in the order given.
        domains=("m.example.org", "b.example.org"),
        directory="https://acme.internal:14000/dir",
        contact="admin@example.org",
        state_directory=str(tmp_path / "state"),
        ca_bundle=str(bundle),
        http01_port=80,
        http01_bind_addresses=("192.0.2.1",),
    )
    assert config.listeners[0].tls.acme_domains == ("m.example.org", "b.example.org")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("letsencrypt", LETSENCRYPT), ("letsencrypt-staging", LETSENCRYPT_STAGING)],
)
def test_directory_names(name, expected):
    config = parse_config(_document(acme={"directory": name}))
    assert config.acme.directory == expected


@pytest.mark.parametrize(
    ("acme", "message"),
    [
        (
            {"domains": ["a.example.org", "*.example.org"]},
            "acme.domains[1]: *.example.org: wildcard certificates need the "
            "dns-01 challenge",
        ),
        (
            {"domains": ["a.example.org", "192.0.2.1"]},
            "acme.domains[1]: 192.0.2.1: IP addresses are not supported",
        ),
        ({"domains": ["localhost"]}, "acme.domains[0]: expected a host name"),
        ({"domains": ["a_b.example.org"]}, "acme.domains[0]: expected a host name"),
        ({"domains": ["-a.example.org"]}, "acme.domains[0]: expected a host name"),
        ({"domains": ["a..example.org"]}, "acme.domains[0]: expected a host name"),
        ({"domains": ["x" * 64 + ".org"]}, "acme.domains[0]: expected a host name"),
        ({"domains": ["2001:db8::1"]}, "acme.domains[0]: expected a host name"),
        ({"domains": [""]}, "acme.domains[0]: expected a non-empty string"),
        ({"domains": [7]}, "acme.domains[0]: expected a non-empty string"),
        ({"domains": "a.example.org"}, "acme.domains: expected a list"),
        ({"contact": "admin"}, "acme.contact: expected an e-mail address"),
        ({"contact": "mailto:admin@localhost"}, "acme.contact: expected an e-mail"),
        ({"contact": "a b@example.org"}, "acme.contact: expected an e-mail address"),
        ({"contact": ""}, "acme.contact: expected a non-empty string"),
        ({"state_directory": "acme"}, "acme.state_directory: must be an absolute"),
        (
            {"ca_bundle": "/nonexistent/ca.pem"},
            "acme.ca_bundle: file not found: /nonexistent/ca.pem",
        ),
        ({"ca_bundle": "/"}, "acme.ca_bundle: is a directory, not a file: /"),
        (
            {"directory": "http://acme.example.org/dir"},
            "acme.directory: expected letsencrypt, letsencrypt-staging or an "
            "https:// directory URL, got 'http://acme.example.org/dir'",
        ),
        ({"directory": "https:///dir"}, "acme.directory: expected letsencrypt"),
        ({"directory": "staging"}, "acme.directory: expected letsencrypt"),
        ({"http01_port": 0}, "acme.http01_port: must be at least 1"),
        ({"http01_port": 65536}, "acme.http01_port: "),
        ({"http01_port": "80"}, "acme.http01_port: "),
        (
            {"http01_bind_addresses": ["0.0.0.0"]},
            "acme.http01_bind_addresses: needs `http01_port`",
        ),
        (
            {"http01_port": 80, "http01_bind_addresses": ["any"]},
            "acme.http01_bind_addresses[0]: expected an IP address",
        ),
        (
            {"http01_port": 80, "http01_bind_addresses": []},
            "acme.http01_bind_addresses: at least one address is required",
        ),
        ({"email": "a@example.org"}, "acme.email: unknown key"),
        ("yes", "acme: expected a mapping"),
    ],
)
def test_section_errors_name_the_key(acme, message):
    assert message in _error(_document(acme=acme))


def test_errors_start_with_the_key():
    # Not just somewhere in the message: the key comes first, as operators
    # read it.
    error = _error(_document(acme={"domains": ["ok.example.org", "*.example.org"]}))
    assert error.startswith("acme.domains[1]: ")


def test_http01_port_null_is_no_port():
    config = parse_config(_document(acme={"http01_port": None}))
    assert config.acme.http01_port is None


def test_acme_true_takes_the_section_domains():
    config = parse_config(
        _document(
            acme={"domains": ["a.example.org", "b.example.org"]}, tls={"acme": True}
        )
    )
    tls = config.listeners[0].tls
    assert tls.acme_domains == ("a.example.org", "b.example.org")
    assert tls.certificates == ()
    assert config.warnings == ()


def test_a_listener_list_of_names_is_its_own():
    config = parse_config(
        _document(
            acme={"domains": ["a.example.org"]},
            tls={"acme": ["Other.Example.org", "other.example.org."]},
        )
    )
    assert config.listeners[0].tls.acme_domains == ("other.example.org",)


def test_a_listener_list_of_names_needs_no_section_domains():
    config = parse_config(_document(acme={}, tls={"acme": ["a.example.org"]}))
    assert config.listeners[0].tls.acme_domains == ("a.example.org",)
    assert config.acme.domains == ()


def test_acme_true_without_section_domains():
    error = _error(_document(acme={"contact": "a@example.org"}, tls={"acme": True}))
    assert error.startswith("listeners[0].tls.acme: `true` takes the names in")


@pytest.mark.parametrize("tls", [{"acme": True}, {"acme": ["a.example.org"]}])
def test_listener_acme_without_the_section(tls):
    error = _error(_document(tls=tls))
    assert error == (
        "listeners[0].tls.acme: needs the top-level `acme` section "
        "(contact, directory, ...)"
    )


def test_the_second_listener_is_named():
    document = _document(acme={"domains": ["a.example.org"]})
    document["listeners"].append({"port": 8449, "tls": {"acme": ["*.example.org"]}})
    assert _error(document).startswith("listeners[1].tls.acme[0]: *.example.org")


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"acme": []}, "listeners[0].tls.acme: expected true or a list of names"),
        ({"acme": "yes"}, "listeners[0].tls.acme: expected a list"),
        (
            {"acme": ["a.example.org", "10.0.0.1"]},
            "listeners[0].tls.acme[1]: 10.0.0.1: IP addresses are not supported",
        ),
        ({"acme": False}, "listeners[0].tls.acme: false leaves this listener"),
        ({"acme": True, "chain": "x"}, "listeners[0].tls.chain: unknown key"),
    ],
)
def test_listener_acme_errors(tls, message):
    assert message in _error(_document(acme={"domains": ["a.example.org"]}, tls=tls))


def test_a_section_no_listener_uses_is_a_warning():
    config = parse_config(_document(acme={"domains": ["a.example.org"]}))
    assert [str(w) for w in config.warnings] == [
        "acme: no listener has `tls: {acme: ...}`, so no certificate is requested"
    ]


def test_acme_and_certificate_files_on_one_listener_keep_both(tmp_path):
    pki = make_pki(tmp_path)
    config = parse_config(
        _document(
            acme={"domains": ["a.example.org"]},
            tls={
                "acme": True,
                "certificate_path": str(pki.chain_path),
                "private_key_path": str(pki.key_path),
            },
        )
    )
    tls = config.listeners[0].tls
    assert tls.acme_domains == ("a.example.org",)
    assert [(c.certificate_path, c.private_key_path) for c in tls.certificates] == [
        (str(pki.chain_path), str(pki.key_path))
    ]
    assert config.warnings == ()


def test_acme_and_a_certificates_list_keep_both(tmp_path):
    pki = make_pki(tmp_path)
    pair = {
        "certificate_path": str(pki.chain_path),
        "private_key_path": str(pki.key_path),
    }
    config = parse_config(
        _document(
            acme={"domains": ["a.example.org"]},
            tls={"acme": ["b.example.org"], "certificates": [pair, pair]},
        )
    )
    tls = config.listeners[0].tls
    assert tls.acme_domains == ("b.example.org",)
    assert len(tls.certificates) == 2


def test_certificate_files_are_still_checked_beside_acme():
    error = _error(
        _document(
            acme={"domains": ["a.example.org"]},
            tls={"acme": True, "certificate_path": "/nonexistent/cert.pem"},
        )
    )
    assert error.startswith("listeners[0].tls.certificate_path: file not found")


def test_plain_listeners_are_untouched():
    config = parse_config(_document(acme={"domains": ["a.example.org"]}))
    assert config.listeners[0].tls is None


def test_same_configuration_compares_equal():
    document = _document(acme={"domains": ["a.example.org"]}, tls={"acme": True})
    assert parse_config(document) == parse_config(document)


@pytest.mark.parametrize(
    "addresses", [["127.0.0.1"], ["::"], None], ids=["same", "wildcard", "default"]
)
def test_http01_port_taken_by_a_listener(addresses):
    document = _document(
        acme={"domains": ["example.org"], "http01_port": 8448},
        tls={"acme": True},
    )
    if addresses is not None:
        document["acme"]["http01_bind_addresses"] = addresses
    assert _error(document) == (
        "acme.http01_port: port 8448 is already used by listeners[0]"
    )
