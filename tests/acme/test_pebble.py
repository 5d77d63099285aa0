"""The edge's own ACME client against a real ACME server: Debian's Pebble,
Let's Encrypt's test CA, on loopback (see tests/acme/pebble.py).

Each test runs matrix-edge as operators do (``twistd matrix-edge``) with a
``tls: {acme: [edge.test]}`` listener; Pebble's validation authority
connects back to it, so tls-alpn-01 (or http-01) is answered by the edge
itself. Pebble resolves every name to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from matrix_edge.tls import generate_self_signed
from tests import processes
from tests.acme.pebble import (
    Pebble,
    ensure_pebble,
    rate_limiting_front,
    running_pebble,
)
from tests.chromium import chromium_argv, trusting_home
from tests.e2e import environment

NAME = "edge.test"
ISSUED = f"Certificate for {NAME} issued"


@pytest.fixture(scope="module")
def pebble_found() -> None:
    found, reason = ensure_pebble()
    if found is None:
        pytest.skip(reason)


class Setup:
    """A Pebble, an upstream and an edge configured for ACME, started on
    demand and stopped at the end."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.port = processes.free_port()
        self.http_port = processes.free_port()
        self.upstream_port = processes.free_port()
        self.state = tmp_path / "state"
        self.pebble: Pebble | None = None
        self.edge: processes.Process | None = None
        self._stops: list[Callable[[], None]] = []
        self.config_path = tmp_path / "edge.yaml"

    def start_pebble(self, **options: Any) -> Pebble:
        options.setdefault("tls_port", self.port)
        options.setdefault("http_port", self.http_port)
        manager = running_pebble(self.tmp_path / "pebble", **options)
        (self.tmp_path / "pebble").mkdir(exist_ok=True)
        self.pebble = manager.__enter__()
        self._stops.append(lambda: manager.__exit__(None, None, None))
        upstream = processes.start_upstream(
            self.upstream_port, self.tmp_path / "upstream.log"
        )
        self._stops.append(upstream.stop)
        return self.pebble

    def write_config(self, **acme: Any) -> Path:
        assert self.pebble is not None
        return processes.write_config(
            self.config_path,
            {
                "upstream": f"http://127.0.0.1:{self.upstream_port}",
                "listeners": [
                    {
                        "port": self.port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "client",
                        "tls": {"acme": [NAME]},
                    }
                ],
                "acme": {
                    "directory": self.pebble.directory_url,
                    "ca_bundle": str(self.pebble.ca_bundle),
                    "state_directory": str(self.state),
                    "contact": "admin@edge.test",
                    **acme,
                },
            },
        )

    def start_edge(self, log_name: str = "edge.log") -> processes.Process:
        if not self.config_path.exists():
            self.write_config()
        self.edge = processes.start_edge(
            self.config_path,
            self.tmp_path / log_name,
            wait=("127.0.0.1", self.port),
        )
        self._stops.append(self.edge.stop)
        return self.edge

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 60.0) -> str:
        assert self.edge is not None
        edge = self.edge
        try:
            processes.wait_until(lambda: edge.log().count(text) >= count, timeout)
        except AssertionError:
            raise AssertionError(
                f"{text!r} not logged {count} time(s):\n{edge.log()[-5000:]}"
            ) from None
        return edge.log()

    def trusted_context(self) -> ssl.SSLContext:
        """A client trusting Pebble's issuing root, as browsers trust
        Let's Encrypt's."""
        assert self.pebble is not None
        roots = self.tmp_path / "pebble-roots.pem"
        roots.write_bytes(self.pebble.issuing_roots_pem())
        return ssl.create_default_context(cafile=str(roots))

    def stop(self) -> None:
        while self._stops:
            self._stops.pop()()


@pytest.fixture
def setup(tmp_path: Path, pebble_found: None) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def connect(port: int, context: ssl.SSLContext, name: str = NAME) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname=name)


def served(sock: ssl.SSLSocket) -> x509.Certificate:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def get_versions(sock: ssl.SSLSocket) -> bytes:
    """One keep-alive request; the response head."""
    sock.sendall(
        b"GET /_matrix/client/versions HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n"
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def untrusted_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_issued_on_first_start_and_served_with_the_chain(setup: Setup) -> None:
    """No certificate at start: a placeholder serves while tls-alpn-01 is
    answered on the listener itself; the issued certificate then verifies
    against the CA's root for the name, with the state kept private."""
    setup.start_pebble()
    setup.start_edge()
    log = setup.wait_for_log(ISSUED)
    assert f"Requesting the certificate for {NAME}" in log
    assert f"Answered tls-alpn-01 validation for {NAME}" in log
    assert "registered at" in log

    with connect(setup.port, setup.trusted_context()) as sock:
        certificate = served(sock)
        assert get_versions(sock).startswith(b"HTTP/1.1 200")
    names = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    assert names == [NAME]

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(setup.state) == 0o700
    assert mode(setup.state / "certificates" / NAME / "privkey.pem") == 0o600
    (account,) = (setup.state / "accounts").iterdir()
    assert mode(account / "key.pem") == 0o600
    # The challenge answer is gone once the order is through.
    assert list((setup.state / "challenges" / "tls-alpn-01").iterdir()) == []


def test_restart_reuses_certificate_and_account(setup: Setup) -> None:
    """A restart serves the stored certificate without asking the CA; a
    later order goes out under the account registered the first time."""
    setup.start_pebble()
    edge = setup.start_edge()
    log = setup.wait_for_log(ISSUED)
    account_uri = log.split("ACME account ", 1)[1].split(" ", 1)[0]
    with connect(setup.port, setup.trusted_context()) as sock:
        first = served(sock)
    edge.stop()

    setup.start_edge("edge-2.log")
    time.sleep(1.0)
    assert setup.edge is not None
    assert "Requesting the certificate" not in setup.edge.log()
    with connect(setup.port, setup.trusted_context()) as sock:
        assert served(sock).serial_number == first.serial_number
    setup.edge.stop()

    # With the certificate gone, the third start orders one: same account.
    for path in (setup.state / "certificates" / NAME).iterdir():
        path.unlink()
    setup.start_edge("edge-3.log")
    log = setup.wait_for_log(ISSUED)
    assert f"ACME account {account_uri} at" in log
    assert "registered at" not in log


def test_renewal_swaps_the_certificate_under_live_connections(setup: Setup) -> None:
    """Certificates that live 30 s are renewed with a third of that left;
    a connection made before keeps working on the old one, a new one gets
    the renewed certificate."""
    setup.start_pebble(validity_seconds=30)
    setup.start_edge()
    setup.wait_for_log(ISSUED)
    context = setup.trusted_context()
    with connect(setup.port, context) as before:
        old = served(before)
        assert get_versions(before).startswith(b"HTTP/1.1 200")

        log = setup.wait_for_log(ISSUED, count=2, timeout=40)
        assert f"Renewing the certificate for {NAME}" in log

        with connect(setup.port, context) as after:
            new = served(after)
            assert get_versions(after).startswith(b"HTTP/1.1 200")
        assert new.serial_number != old.serial_number
        assert new.not_valid_after_utc > old.not_valid_after_utc
        # The connection from before goes on, on its own certificate.
        assert get_versions(before).startswith(b"HTTP/1.1 200")
        assert served(before).serial_number == old.serial_number


def test_failing_challenge_leaves_a_placeholder_and_retries(setup: Setup) -> None:
    """The CA cannot reach the edge (its validation goes to a port where
    nothing listens): the order fails with the CA's reason, the listener
    goes on serving a self-signed placeholder, and a retry is scheduled;
    the edge does not exit."""
    setup.start_pebble(tls_port=processes.free_port())
    edge = setup.start_edge()
    log = setup.wait_for_log("Could not get a certificate")
    assert f"Could not get a certificate for {NAME} (attempt 1)" in log
    assert "validation failed: tls-alpn-01 for edge.test" in log
    assert "serving a self-signed placeholder, retrying in " in log

    with connect(setup.port, untrusted_context()) as sock:
        placeholder = served(sock)
        assert get_versions(sock).startswith(b"HTTP/1.1 200")
    assert placeholder.issuer == placeholder.subject
    assert edge.popen.poll() is None


def test_rate_limited_order_is_retried_after_an_hour(setup: Setup) -> None:
    """The CA refuses the order as Let's Encrypt does at its limits (429
    ``rateLimited``, through a front before Pebble, which has none): the
    listener serves a self-signed placeholder, the retry waits
    RATE_LIMITED_DELAY (3600 s, up to a tenth more) rather than the first
    minute of the usual backoff, and the edge does not exit."""
    pebble = setup.start_pebble()
    with rate_limiting_front(
        pebble, setup.tmp_path / "front", refuse_new_orders=1
    ) as front:
        setup.write_config(
            directory=front.directory_url, ca_bundle=str(front.ca_bundle)
        )
        edge = setup.start_edge()
        failed = f"Could not get a certificate for {NAME} (attempt 1): rateLimited:"
        log = setup.wait_for_log(failed)
        (line,) = [line for line in log.splitlines() if failed in line]
        assert "too many certificates (5) already issued" in line
        assert "serving a self-signed placeholder, retrying in " in line
        # RATE_LIMITED_DELAY (3600 s) plus up to 10% jitter, which the
        # manager writes in minutes below two hours: "60m" to "66m".
        delay = re.search(r"retrying in (\d+)m$", line)
        assert delay is not None and 60 <= int(delay[1]) <= 66, line
        assert front.refused == 1

        with connect(setup.port, untrusted_context()) as sock:
            placeholder = served(sock)
            assert get_versions(sock).startswith(b"HTTP/1.1 200")
        assert placeholder.issuer == placeholder.subject
        assert ISSUED not in edge.log()
        assert edge.popen.poll() is None


def test_http01_on_the_port_80_listener(setup: Setup) -> None:
    """With ``http01_port``, the challenge is answered over plain HTTP
    there; anything else on that port is redirected to HTTPS."""
    pebble = setup.start_pebble(tls_port=processes.free_port())
    setup.write_config(
        http01_port=pebble.http_port, http01_bind_addresses=["127.0.0.1"]
    )
    setup.start_edge()
    log = setup.wait_for_log(ISSUED)
    assert "Answered http-01 validation" in log
    with socket.create_connection(("127.0.0.1", pebble.http_port), timeout=10) as s:
        s.sendall(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 308")
    assert b"Location: https://edge.test/_matrix/client/versions" in answer


def test_revoke_command_then_reload_orders_a_new_certificate(setup: Setup) -> None:
    """``twistd matrix-edge revoke NAME`` revokes with the edge's account
    (the CA records it) and stores a placeholder; SIGHUP then serves the
    placeholder and orders a new certificate."""
    pebble = setup.start_pebble()
    edge = setup.start_edge()
    setup.wait_for_log(ISSUED)
    with connect(setup.port, setup.trusted_context()) as sock:
        revoked = served(sock)

    done = processes.run_command(
        "--config", str(setup.config_path), "revoke", "--reason", "superseded", NAME
    )
    assert done.returncode == 0, done.stderr
    assert f"Revoked the certificate for {NAME}" in done.stdout
    assert pebble.cert_status(revoked.serial_number)["Status"] == "Revoked"

    edge.popen.send_signal(signal.SIGHUP)
    setup.wait_for_log(ISSUED, count=2)
    with connect(setup.port, setup.trusted_context()) as sock:
        assert served(sock).serial_number != revoked.serial_number


def test_check_config_says_what_will_be_requested(setup: Setup) -> None:
    setup.start_pebble()
    config = setup.write_config()
    done = processes.run_command("--config", str(config), "--check-config")
    assert done.returncode == 0, done.stderr
    assert f"ACME: certificates from {setup.pebble.directory_url}" in done.stdout  # type: ignore[union-attr]
    assert f"{NAME}: nothing stored: requested at start" in done.stdout
    # Checking creates nothing.
    assert not setup.state.exists()


def test_the_documented_configuration(setup: Setup) -> None:
    """docs/automatic-certificates.md's configuration, as written but for
    what loopback needs (ports, addresses, the CA, the state directory):
    both names get certificates, each served on both listeners."""
    page = (processes.REPO / "docs" / "automatic-certificates.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", page, re.S)
    document = yaml.safe_load(block)
    pebble = setup.start_pebble()
    federation_port = processes.free_port()
    client, federation = document["listeners"]
    assert (client["port"], federation["port"]) == (443, 8448)
    client.update(port=setup.port, bind_addresses=["127.0.0.1"])
    federation.update(port=federation_port, bind_addresses=["127.0.0.1"])
    document["upstream"] = f"http://127.0.0.1:{setup.upstream_port}"
    document["acme"].update(
        directory=pebble.directory_url,
        ca_bundle=str(pebble.ca_bundle),
        state_directory=str(setup.state),
    )
    processes.write_config(setup.config_path, document)
    setup.start_edge()
    names = document["acme"]["domains"]
    for name in names:
        setup.wait_for_log(f"Certificate for {name} issued")
    context = setup.trusted_context()
    for port in (setup.port, federation_port):
        for name in names:
            with connect(port, context, name) as sock:
                san = served(sock).extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                )
                assert san.value.get_values_for_type(x509.DNSName) == [name]


def test_every_process_answers_and_serves(setup: Setup) -> None:
    """With ``processes: 2`` the kernel hands the CA's validation
    connections to either process; both answer from the state directory,
    and once issued, both serve the certificate."""
    setup.start_pebble()
    config = yaml.safe_load(setup.write_config().read_text())
    config["processes"] = 2
    processes.write_config(setup.config_path, config)
    setup.start_edge()
    log = setup.wait_for_log(ISSUED)
    # Pebble validates three times, over three connections.
    assert log.count(f"Answered tls-alpn-01 validation for {NAME}") == 3
    context = setup.trusted_context()
    deadline = time.monotonic() + 20
    while True:
        try:
            for _ in range(20):
                with connect(setup.port, context) as sock:
                    assert get_versions(sock).startswith(b"HTTP/1.1 200")
            break
        except ssl.SSLCertVerificationError:
            # The second process reloads once the first passes SIGHUP on.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_acme_and_file_certificates_on_one_listener(setup: Setup) -> None:
    """A listener serving an ACME certificate and a certificate file picks
    by SNI: the ACME name gets the CA's certificate, the file's name the
    file's, and a client naming neither the first (ACME) one."""
    setup.start_pebble()
    chain, key = setup.tmp_path / "files.pem", setup.tmp_path / "files.key"
    generate_self_signed(chain, key, ["files.test"])
    config = yaml.safe_load(setup.write_config().read_text())
    config["listeners"][0]["tls"].update(
        certificate_path=str(chain), private_key_path=str(key)
    )
    processes.write_config(setup.config_path, config)
    setup.start_edge()
    setup.wait_for_log(ISSUED)

    with connect(setup.port, setup.trusted_context()) as sock:
        assert get_versions(sock).startswith(b"HTTP/1.1 200")
    with connect(setup.port, untrusted_context(), "files.test") as sock:
        from_file = served(sock)
        assert get_versions(sock).startswith(b"HTTP/1.1 200")
    assert from_file.subject.rfc4514_string() == "CN=files.test"
    with connect(setup.port, untrusted_context(), "unknown.test") as sock:
        assert served(sock).issuer != served(sock).subject


def test_a_browser_trusts_the_issued_certificate_over_http2(setup: Setup) -> None:
    """Chromium, trusting only Pebble's root (as browsers trust Let's
    Encrypt's), loads a page through a listener with ACME on, over HTTP/2:
    the issued chain verifies, and the listener's look at the first TLS
    record for the CA's acme-tls/1 leaves a browser's large ClientHello
    alone."""
    try:
        chromium, certutil = environment.ensure_chromium()
    except environment.Unavailable as e:
        pytest.skip(str(e))
    setup.start_pebble()
    edge = setup.start_edge()
    setup.wait_for_log(ISSUED)
    roots = setup.tmp_path / "pebble-roots.pem"
    roots.write_bytes(setup.pebble.issuing_roots_pem())  # type: ignore[union-attr]
    home = trusting_home(setup.tmp_path / "home", certutil, roots)
    argv = chromium_argv(
        chromium,
        setup.tmp_path / "profile",
        setup.tmp_path / "netlog.json",
        f"https://{NAME}:{setup.port}/_matrix/client/versions",
        {NAME: "127.0.0.1"},
        extra=["--dump-dom"],
    )
    done = subprocess.run(
        argv,
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # The recording upstream answers with what it received.
    assert '"target": "/_matrix/client/versions"' in done.stdout, done.stdout
    assert '"GET /_matrix/client/versions HTTP/2"' in edge.log()
