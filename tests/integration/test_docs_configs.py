"""The configurations in docs/migrating-from-*.md, run as written.

Each page holds exactly one ``yaml`` block: the matrix-edge configuration
that replaces one of the reverse-proxy configurations in Synapse's
documentation. Here that block is taken from the page, and only what a
test on loopback must change is changed: listener ports (to free ones),
wildcard bind addresses (to ``::1`` and ``127.0.0.1``), certificate files
(to test certificates issued for the same names) and the upstream and
fallback addresses (to recording stand-ins, on a unix socket where the page
uses one). ``--check-config`` must accept the result, then ``twistd
matrix-edge`` runs it and the behaviours the original configuration
promised are checked over real TLS connections.

docs/workers.md holds one deployment with Synapse workers, as nginx and as
matrix-edge: its matrix-edge configuration must pass ``--check-config``,
its line counts must be those of its two configurations, and the output it
shows of ``route``, ``routes`` and ``migrate-workers`` must be what they
print.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from matrix_edge.config._base import parse_size
from matrix_edge.config.edge import parse_config
from tests import processes
from tests.h2client import H2Client
from tests.pki import Pki, make_pki
from tests.rawhttp import RawResponse, connect, read_response

DOCS = processes.REPO / "docs"

PAGES = {
    "nginx": "migrating-from-nginx.md",
    "apache": "migrating-from-apache.md",
    "caddy": "migrating-from-caddy.md",
    "haproxy": "migrating-from-haproxy.md",
    "haproxy-single-port": "migrating-from-haproxy-single-port.md",
    "relayd": "migrating-from-relayd.md",
}

FIFTY_MIB = 50 * 1024 * 1024

# The delegation documents of the Caddy and HAProxy examples in Synapse's
# documentation, which the matrix-edge pages must reproduce exactly.
SEED_DELEGATION = {
    "server": {"m.server": "matrix.example.com:443"},
    "client": {
        "m.homeserver": {"base_url": "https://matrix.example.com"},
        "m.identity_server": {"base_url": "https://identity.example.com"},
    },
}
EXPECTED_WELL_KNOWN: dict[str, dict[str, Any] | None] = {
    "nginx": {},
    "apache": {},
    "caddy": SEED_DELEGATION,
    "haproxy": SEED_DELEGATION,
    "haproxy-single-port": SEED_DELEGATION,
    # The relayd seed serves its documents from httpd; their content is
    # the page's own.
    "relayd": None,
}

# What each seed configuration listens on, where it forwards, and whether
# it offers HTTP/2, which the page's YAML must keep.
SEED_LISTENERS = {
    "nginx": {443: "client", 8448: "federation"},
    "apache": {443: "client", 8448: "federation"},
    "caddy": {443: "client", 8448: "federation"},
    "haproxy": {443: "client", 8448: "federation"},
    "haproxy-single-port": {443: "client"},
    "relayd": {443: "client", 8448: "federation"},
}
SEED_UPSTREAM = {
    key: "unix:/run/synapse/main_public.sock"
    if key == "haproxy-single-port"
    else "http://127.0.0.1:8008"
    for key in PAGES
}
SEED_FALLBACK = {"relayd": {443: "http://127.0.0.1:8080"}}
SEED_OFFERS_H2 = {"nginx", "caddy", "haproxy", "haproxy-single-port"}

# Certificate files whose path does not name the host they are for.
CERTIFICATE_NAMES = {"/etc/ssl/haproxy/synapse.pem": "example.com"}
_NAME_IN_PATH = re.compile(r"((?:[a-z0-9-]+\.)*example\.com)")

LOOPBACK = {"::": "::1", "0.0.0.0": "127.0.0.1"}

# Only these keys may differ between a page's YAML and what the test runs.
_REWRITABLE = re.compile(
    r"\A(?:upstream"
    r"|listeners\[\d+\]\.(?:port|fallback|bind_addresses\[\d+\]"
    r"|tls\.(?:certificates\[\d+\]\.)?(?:certificate_path|private_key_path)))\Z"
)

# A Synapse stand-in: tests.recording_upstream, which answers every request
# with a JSON echo of the request head it received, listening on a TCP port
# or a unix socket, and appending every request head to a journal file so
# that the test can also see what never reached it.
RECORDER = r"""
import json
import os
import sys

from twisted.internet import reactor

from tests.recording_upstream import RecordingUpstreamFactory


class Journal(list):
    def append(self, recorded):
        super().append(recorded)
        with open(sys.argv[2], "a", encoding="latin-1") as f:
            f.write(json.dumps(recorded.head.decode("latin-1")) + "\n")


factory = RecordingUpstreamFactory()
factory.requests = Journal()
where = sys.argv[1]
if where.startswith("/"):
    reactor.listenUNIX(where, factory)
else:
    reactor.listenTCP(int(where), factory, interface="127.0.0.1")
reactor.run()
"""

# Requests forwarded on client listeners, byte for byte: escapes that a
# normalising proxy would decode, a room version 3 event ID with '/' and
# '+', an empty query kept as '?', a doubled slash, SSO's callback.
CLIENT_TARGETS = [
    "/_matrix/client/v3/rooms/%21room%3Aexample.com/event/%24Ab%2Fcd%2Bef?access_token=t&x=%2F",
    "/_matrix/client/versions?",
    "/_matrix/media/v3/download/example.com/abc//def",
    "/_synapse/client/oidc/callback?code=a%2Bb&state=c%3D",
    "/_matrix",
]
FEDERATION_TARGETS = [
    "/_matrix/federation/v1/event/%24Ab%2Fcd%2Bef",
    "/_matrix/key/v2/server",
    "/_matrix/federation/v1/query/profile?user_id=%40alice%3Aexample.com&field=displayname",
]
X_MATRIX = (
    'X-Matrix origin="other.example.net",destination="example.com",'
    'key="ed25519:a",sig="c2ln"'
)
# Answered 404 by federation listeners (client listeners forward or serve
# some of these paths, so each carries a mark of its own where needed).
REFUSED_ON_FEDERATION_PORT = [
    "/_synapse/client/oidc/callback?port=federation",
    "/.well-known/matrix/server",
    "/.well-known/matrix/client",
    "/?port=federation",
    "/index.html?port=federation",
]
# Never forwarded by any listener of any page.
CLOSED_TARGETS = [
    "/_synapse/admin/v1/server_version",
    "/_synapse/admin/v1/users/%40alice%3Aexample.com",
    "/_synapse/metrics",
    "/_synapse/replication/send_event/x",
    "/_matrixfoo",
]


# The pages ----------------------------------------------------------------


def yaml_block(page: str) -> str:
    text = (DOCS / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"{page} must hold exactly one ```yaml block"
    return blocks[0]


def page_document(key: str) -> dict[str, Any]:
    document = yaml.safe_load(yaml_block(PAGES[key]))
    assert isinstance(document, dict)
    return document


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{path}[{i}]"))
        return out
    return {path: value}


def _certificate_name(path: str) -> str:
    if path in CERTIFICATE_NAMES:
        return CERTIFICATE_NAMES[path]
    match = _NAME_IN_PATH.search(path)
    assert match, f"no host name in certificate path {path}"
    return match.group(1)


def _certificate_entries(listener: dict[str, Any]) -> list[dict[str, Any]]:
    tls = listener.get("tls")
    if not tls:
        return []
    return list(tls["certificates"]) if "certificates" in tls else [tls]


class Certificates:
    """Test certificates standing in for the files a page names: one leaf
    per host name, written as a chain and key, or as one combined PEM where
    the page gives the same file for both (HAProxy's layout)."""

    def __init__(self, pki: Pki):
        self.pki = pki
        self._leaves: dict[str, Any] = {}

    def replace(self, entry: dict[str, Any]) -> str:
        name = _certificate_name(entry["certificate_path"])
        slug = name.replace(".", "-")
        if name not in self._leaves:
            self._leaves[name] = self.pki.issue_leaf(
                slug, hostnames=[name], ip_addresses=[]
            )
        leaf = self._leaves[name]
        if entry["certificate_path"] == entry["private_key_path"]:
            combined = self.pki.directory / f"{slug}.combined.pem"
            combined.write_bytes(
                leaf.chain_path.read_bytes() + leaf.key_path.read_bytes()
            )
            entry["certificate_path"] = entry["private_key_path"] = str(combined)
        else:
            entry["certificate_path"] = str(leaf.chain_path)
            entry["private_key_path"] = str(leaf.key_path)
        return name


# Processes -------------------------------------------------------------


@attrs.define
class Recorder:
    """A recording upstream running in its own process."""

    process: processes.Process
    journal: Path
    address: str
    """As written in the configuration."""

    def heads(self) -> list[str]:
        if not self.journal.exists():
            return []
        lines = self.journal.read_text(encoding="latin-1").splitlines()
        return [json.loads(line) for line in lines]

    def targets(self) -> list[str]:
        """Request targets received, without matrix-edge's health checks."""
        out = []
        for head in self.heads():
            target = head.split("\r\n", 1)[0].split(" ")[1]
            if target != "/health":
                out.append(target)
        return out


def start_recorder(
    directory: Path, name: str, unix_path: str | None = None
) -> Recorder:
    journal = directory / f"{name}.journal"
    if unix_path is not None:
        where, address = unix_path, f"unix:{unix_path}"
    else:
        port = processes.free_port()
        where, address = str(port), f"http://127.0.0.1:{port}"
    process = processes.start(
        [sys.executable, "-c", RECORDER, where, str(journal)], directory / f"{name}.log"
    )
    try:
        if unix_path is not None:
            _wait_for_unix_socket(unix_path, process)
        else:
            processes.wait_for_port(int(where), process=process.popen)
    except Exception:
        process.stop()
        raise
    return Recorder(process, journal, address)


def start_static_web_server(
    directory: Path, root: Path
) -> tuple[processes.Process, str]:
    """Python's http.server on ``root``: a web server that answers 404 for
    any file it does not have."""
    port = processes.free_port()
    process = processes.start(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(root),
        ],
        directory / "web.log",
    )
    try:
        processes.wait_for_port(port, process=process.popen)
    except Exception:
        process.stop()
        raise
    return process, f"http://127.0.0.1:{port}"


def _wait_for_unix_socket(
    path: str, process: processes.Process, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError("recording upstream exited:\n" + process.log())
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {path}")


def check_config(path: Path) -> subprocess.CompletedProcess:
    return processes.run_command("--config", str(path), "--check-config")


@attrs.define
class Stack:
    """A page's configuration running under twistd, with its stand-ins."""

    key: str
    original: dict[str, Any]
    document: dict[str, Any]
    pki: Pki
    edge: processes.Process
    synapse: Recorder
    web: Recorder | None
    ports: dict[int, int]
    """Port in the page -> port in the test."""

    names: dict[int, list[str]]
    """Port in the page -> the names of its certificates, default first."""

    def listener(self, seed_port: int) -> dict[str, Any]:
        [listener] = [
            entry for entry in self.original["listeners"] if entry["port"] == seed_port
        ]
        return listener

    def ports_of(self, listener_type: str) -> list[int]:
        return [
            entry["port"]
            for entry in self.original["listeners"]
            if entry.get("type", "client") == listener_type
        ]

    def addresses(self, seed_port: int) -> list[str]:
        [listener] = [
            entry
            for entry in self.document["listeners"]
            if entry["port"] == self.ports[seed_port]
        ]
        return list(listener["bind_addresses"])

    def sni(self, seed_port: int) -> str:
        return self.names[seed_port][0]

    def context(self, alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert_path))
        context.set_alpn_protocols(list(alpn))
        return context

    def send(
        self,
        seed_port: int,
        raw: bytes,
        host: str = "127.0.0.1",
        sni: str | None = None,
        method: str = "GET",
    ) -> RawResponse:
        sni = sni or self.sni(seed_port)
        with connect(
            self.ports[seed_port], host, self.context(), server_hostname=sni
        ) as sock:
            sock.sendall(raw)
            return read_response(sock, method)

    def get(
        self,
        seed_port: int,
        target: str,
        host_header: str | None = None,
        extra: str = "",
        host: str = "127.0.0.1",
        sni: str | None = None,
    ) -> RawResponse:
        host_header = host_header or self.sni(seed_port)
        raw = f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\n{extra}\r\n".encode()
        return self.send(seed_port, raw, host=host, sni=sni)


def rewrite_for_loopback(
    original: dict[str, Any],
    certificates: Certificates,
    upstream: str,
    fallback: str | None,
) -> tuple[dict[str, Any], dict[int, int], dict[int, list[str]]]:
    document = copy.deepcopy(original)
    ports: dict[int, int] = {}
    names: dict[int, list[str]] = {}
    for listener in document["listeners"]:
        seed_port = listener["port"]
        listener["port"] = ports[seed_port] = processes.free_port()
        addresses = listener.get("bind_addresses", ["::", "0.0.0.0"])
        listener["bind_addresses"] = [
            LOOPBACK.get(a, "::1" if ":" in a else "127.0.0.1") for a in addresses
        ]
        names[seed_port] = [
            certificates.replace(e) for e in _certificate_entries(listener)
        ]
        if "fallback" in listener:
            assert fallback is not None
            listener["fallback"] = fallback
    document["upstream"] = upstream
    return document, ports, names


@contextlib.contextmanager
def run_page(
    key: str, directory: Path, web_root: Path | None = None
) -> Iterator[Stack]:
    """Run page ``key``'s configuration. Its fallback, if any, is a
    recording upstream, or a static web server on ``web_root``."""
    original = page_document(key)
    pki = make_pki(directory / "pki")
    running: list[processes.Process] = []
    socket_dir = None
    try:
        unix_path = None
        if original["upstream"].startswith("unix:"):
            # Short: unix socket paths are limited to about 100 bytes.
            socket_dir = tempfile.mkdtemp(prefix="edge-docs-")
            unix_path = f"{socket_dir}/{Path(original['upstream']).name}"
        synapse = start_recorder(directory, "synapse", unix_path)
        running.append(synapse.process)
        web = None
        fallback = None
        if any("fallback" in listener for listener in original["listeners"]):
            if web_root is None:
                web = start_recorder(directory, "web")
                running.append(web.process)
                fallback = web.address
            else:
                process, fallback = start_static_web_server(directory, web_root)
                running.append(process)

        # The page's YAML is valid as written, certificate files apart
        # (they exist only on the reader's server).
        certificates = Certificates(pki)
        as_written = copy.deepcopy(original)
        for listener in as_written["listeners"]:
            for entry in _certificate_entries(listener):
                certificates.replace(entry)
        parse_config(as_written)

        document, ports, names = rewrite_for_loopback(
            original, certificates, synapse.address, fallback
        )
        before, after = _flatten(original), _flatten(document)
        changed = {
            k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
        }
        assert all(_REWRITABLE.match(k) for k in changed), sorted(changed)

        config_path = processes.write_config(directory / "matrix-edge.yaml", document)
        checked = check_config(config_path)
        assert checked.returncode == 0, checked.stderr
        assert "configuration OK" in checked.stdout

        first = document["listeners"][0]
        edge = processes.start_edge(
            config_path,
            directory / "edge.log",
            wait=(first["bind_addresses"][0], first["port"]),
        )
        running.append(edge)
        for listener in document["listeners"]:
            for address in listener["bind_addresses"]:
                processes.wait_for_port(listener["port"], address, process=edge.popen)
        yield Stack(key, original, document, pki, edge, synapse, web, ports, names)
        assert "Traceback" not in edge.log()
    finally:
        for process in reversed(running):
            process.stop()
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture(scope="module", params=list(PAGES))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with run_page(request.param, tmp_path_factory.mktemp(request.param)) as running:
        yield running


# What came back ------------------------------------------------------------


@attrs.frozen
class Echo:
    """A request as the recording upstream received it."""

    request_line: str
    headers: list[tuple[str, str]]
    target: str
    body_length: int

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def echo_of(response: RawResponse) -> Echo:
    assert response.status == 200, (response.status, response.body)
    assert response.header("X-Upstream") == "yes", "not answered by the upstream"
    data = json.loads(response.body)
    lines = data["head"].split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    return Echo(lines[0], headers, data["target"], data["body_length"])  # type: ignore[arg-type]


def echo_from_h2(body: bytes) -> Echo:
    data = json.loads(body)
    lines = data["head"].split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
    return Echo(lines[0], headers, data["target"], data["body_length"])  # type: ignore[arg-type]


def assert_answered_by_edge(response: RawResponse, status: int, errcode: str) -> None:
    assert response.status == status, (response.status, response.body)
    assert response.header("X-Upstream") is None, "answered by the upstream"
    assert json.loads(response.body)["errcode"] == errcode
    assert response.header("Access-Control-Allow-Origin") == "*"


def peer_certificate(stack: Stack, seed_port: int, sni: str | None) -> x509.Certificate:
    """The certificate a client asking for ``sni`` (None: no SNI) gets,
    without verifying it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with connect(stack.ports[seed_port], tls=context, server_hostname=sni) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def common_name(certificate: x509.Certificate) -> str:
    [attribute] = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def _host_header(name: str, seed_port: int) -> str:
    """What a client sends as Host for ``name`` on the page's port."""
    return name if seed_port == 443 else f"{name}:{seed_port}"


# Every page ----------------------------------------------------------------


@pytest.mark.parametrize("key", list(PAGES))
def test_page_layout(key: str) -> None:
    text = (DOCS / PAGES[key]).read_text(encoding="utf-8")
    yaml_block(PAGES[key])
    for heading in (
        "## The matrix-edge configuration",
        "## Directive by directive",
        "## What matrix-edge does differently",
        "## Not supported",
        "## Tested by",
    ):
        assert heading in text, f"{PAGES[key]} lacks {heading!r}"
    assert PAGES[key] in (DOCS / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("key", list(PAGES))
def test_yaml_keeps_the_seed_layout(key: str) -> None:
    """The ports, listener types, IPv6 and IPv4, TLS, upstream and
    fallback of the seed configuration, as written on the page."""
    document = page_document(key)
    listeners = {entry["port"]: entry for entry in document["listeners"]}
    assert {
        port: entry.get("type", "client") for port, entry in listeners.items()
    } == SEED_LISTENERS[key]
    for port, entry in listeners.items():
        assert set(entry.get("bind_addresses", ["::", "0.0.0.0"])) == {"::", "0.0.0.0"}
        assert _certificate_entries(entry), f"port {port} has no TLS"
        if key in SEED_OFFERS_H2:
            assert entry.get("http2", True) is True
        assert entry.get("fallback") == SEED_FALLBACK.get(key, {}).get(port)
    assert document["upstream"] == SEED_UPSTREAM[key]


def test_client_port_forwards_matrix_and_synapse_client(stack: Stack) -> None:
    """/_matrix and /_synapse/client reach Synapse byte for byte, with
    X-Forwarded-For replaced, X-Forwarded-Proto: https and Host (with its
    port) as sent, on IPv6 and IPv4."""
    for seed_port in stack.ports_of("client"):
        host_header = _host_header(stack.sni(seed_port), seed_port)
        for address in stack.addresses(seed_port):
            for target in CLIENT_TARGETS:
                response = stack.get(
                    seed_port,
                    target,
                    host_header,
                    "X-Forwarded-For: 203.0.113.66\r\nX-Forwarded-Proto: http\r\n"
                    "X-Forwarded-Host: evil.example.net\r\n",
                    host=address,
                )
                echo = echo_of(response)
                assert echo.request_line == f"GET {target} HTTP/1.1"
                assert echo.target == target
                assert echo.values("Host") == [host_header]
                assert echo.values("X-Forwarded-For") == [address]
                assert echo.values("X-Forwarded-Proto") == ["https"]
                assert echo.values("X-Forwarded-Host") == []
                assert echo.values("X-Request-ID")
    assert set(CLIENT_TARGETS) <= set(stack.synapse.targets())


def test_federation_port_forwards_matrix_only(stack: Stack) -> None:
    """A federation listener forwards /_matrix (federation, keys) and
    nothing else: not /_synapse/client, nor .well-known."""
    federation_ports = stack.ports_of("federation")
    if not federation_ports:
        pytest.skip("federation comes in on the client port here")
    for seed_port in federation_ports:
        host_header = f"{stack.sni(seed_port)}:{seed_port}"
        for address in stack.addresses(seed_port):
            for target in FEDERATION_TARGETS:
                echo = echo_of(
                    stack.get(
                        seed_port,
                        target,
                        host_header,
                        f"Authorization: {X_MATRIX}\r\nX-Forwarded-For: 203.0.113.66\r\n",
                        host=address,
                    )
                )
                assert echo.target == target
                assert echo.values("Host") == [host_header]
                assert echo.values("Authorization") == [X_MATRIX]
                assert echo.values("X-Forwarded-For") == [address]
                assert echo.values("X-Forwarded-Proto") == ["https"]
        for target in REFUSED_ON_FEDERATION_PORT:
            assert_answered_by_edge(
                stack.get(seed_port, target, host_header), 404, "M_UNRECOGNIZED"
            )
    assert not set(REFUSED_ON_FEDERATION_PORT) & set(stack.synapse.targets())
    if stack.web is not None:
        # relayd's "matrix" protocol blocks everything else: nothing from
        # the federation port goes to the web server.
        assert not set(REFUSED_ON_FEDERATION_PORT) & set(stack.web.targets())


def test_admin_and_internal_paths_not_forwarded(stack: Stack) -> None:
    """/_synapse/admin (and Synapse's internal paths) stay closed on every
    listener: answered 404 by matrix-edge, never seen by Synapse nor by a
    fallback web server."""
    for listener in stack.original["listeners"]:
        seed_port = listener["port"]
        for target in CLOSED_TARGETS:
            response = stack.get(seed_port, target)
            if target == "/_matrixfoo" and "fallback" in listener:
                continue  # not a Matrix path: the web server's
            assert_answered_by_edge(response, 404, "M_UNRECOGNIZED")
    seen = stack.synapse.targets() + (stack.web.targets() if stack.web else [])
    assert not any(
        t.startswith(("/_synapse/admin", "/_synapse/metrics", "/_synapse/replication"))
        for t in seen
    )
    assert "/_matrixfoo" not in stack.synapse.targets()


def test_other_paths_not_forwarded_to_synapse(stack: Stack) -> None:
    """Without a fallback, a client listener answers other paths with a
    Matrix 404; with one, they go to the web server and never to Synapse."""
    for seed_port in stack.ports_of("client"):
        listener = stack.listener(seed_port)
        response = stack.get(seed_port, "/index.html")
        if "fallback" in listener:
            assert echo_of(response).target == "/index.html"
        else:
            assert_answered_by_edge(response, 404, "M_UNRECOGNIZED")
    assert "/index.html" not in stack.synapse.targets()


def test_http2_offered_and_forwarding(stack: Stack) -> None:
    """ALPN offers h2 where the page says so (the default on TLS
    listeners), and requests over HTTP/2 are forwarded too."""
    for listener in stack.original["listeners"]:
        seed_port = listener["port"]
        expected = "h2" if listener.get("http2", True) else "http/1.1"
        with connect(
            stack.ports[seed_port],
            tls=stack.context(("h2", "http/1.1")),
            server_hostname=stack.sni(seed_port),
        ) as sock:
            assert sock.selected_alpn_protocol() == expected
        if expected != "h2":
            continue
        client = H2Client(stack.ports[seed_port], server_hostname=stack.sni(seed_port))
        try:
            assert client.alpn == "h2"
            target = b"/_matrix/federation/v1/version"
            stream = client.request(b"GET", target)
            assert stream.status == 200
            echo = echo_from_h2(bytes(stream.body))
            assert echo.request_line == "GET /_matrix/federation/v1/version HTTP/1.1"
            assert echo.values("Host") == ["matrix.test"]
            assert echo.values("X-Forwarded-Proto") == ["https"]
            assert echo.values("X-Forwarded-For") == ["127.0.0.1"]
        finally:
            client.close()


def test_body_limit_is_50m(stack: Stack) -> None:
    """Bodies over 50M (Synapse's max_upload_size, nginx's
    client_max_body_size) get 413 M_TOO_LARGE before they are sent."""
    document = stack.original
    assert parse_size(document.get("max_upload_size", "50M"), ()) == FIFTY_MIB
    assert (
        parse_size(
            document.get("max_request_size", document.get("max_upload_size", "50M")), ()
        )
        == FIFTY_MIB
    )
    seed_port = stack.ports_of("client")[0]
    for method, target in (
        ("POST", "/_matrix/media/v3/upload?filename=a.bin"),
        ("PUT", "/_matrix/client/v3/rooms/%21r%3Aexample.com/send/m.room.message/t1"),
    ):
        raw = (
            f"{method} {target} HTTP/1.1\r\nHost: {stack.sni(seed_port)}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {FIFTY_MIB + 1}\r\n\r\n"
        )
        response = stack.send(seed_port, raw.encode())
        assert_answered_by_edge(response, 413, "M_TOO_LARGE")
    assert not any("/upload" in t or "/send/" in t for t in stack.synapse.targets())


def test_well_known_documents(stack: Stack) -> None:
    """Where the seed served /.well-known/matrix/*, matrix-edge serves the
    same documents as application/json with Access-Control-Allow-Origin: *
    on the client port; where it did not, they are 404 (and not
    forwarded)."""
    expected = EXPECTED_WELL_KNOWN[stack.key]
    configured = stack.original.get("well_known") or {}
    if expected is None:
        expected = {}
        if "server" in configured:
            expected["server"] = {"m.server": configured["server"]}
        if "client" in configured:
            expected["client"] = configured["client"]
        assert set(expected) == {"server", "client"}
    for seed_port in stack.ports_of("client"):
        for name in ("server", "client"):
            for sni in stack.names[seed_port]:
                response = stack.get(
                    seed_port, f"/.well-known/matrix/{name}", sni, sni=sni
                )
                if name not in expected:
                    if "fallback" in stack.listener(seed_port):
                        continue
                    assert_answered_by_edge(response, 404, "M_UNRECOGNIZED")
                    continue
                assert response.status == 200
                assert response.header("X-Upstream") is None
                assert response.header("Content-Type") == "application/json"
                assert response.header("Access-Control-Allow-Origin") == "*"
                assert json.loads(response.body) == expected[name]
    assert not any(t.startswith("/.well-known") for t in stack.synapse.targets())
    if stack.web is not None:
        assert not any(
            t.startswith("/.well-known/matrix/") for t in stack.web.targets()
        )


def test_certificate_for_each_name(stack: Stack) -> None:
    """Every listener serves, by SNI, the certificate of each name the page
    gives it, verified against the test CA with its full chain."""
    for listener in stack.original["listeners"]:
        seed_port = listener["port"]
        for name in stack.names[seed_port]:
            with connect(
                stack.ports[seed_port], tls=stack.context(), server_hostname=name
            ) as sock:
                assert sock.version() in ("TLSv1.2", "TLSv1.3")
                subject = dict(
                    item for rdn in sock.getpeercert()["subject"] for item in rdn
                )
                assert subject["commonName"] == name


# One page at a time ------------------------------------------------------------


@pytest.mark.parametrize("stack", ["nginx"], indirect=True)
def test_nginx_50m_upload_passes(stack: Stack) -> None:
    """A body of exactly client_max_body_size reaches Synapse whole."""
    raw = (
        b"POST /_matrix/media/v3/upload?filename=big.bin HTTP/1.1\r\n"
        b"Host: matrix.example.com\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % FIFTY_MIB
    )
    block = b"\0" * (1024 * 1024)
    with connect(
        stack.ports[443], tls=stack.context(), server_hostname="matrix.example.com"
    ) as sock:
        sock.sendall(raw)
        for _ in range(50):
            sock.sendall(block)
        response = read_response(sock)
    echo = echo_of(response)
    assert echo.body_length == FIFTY_MIB


@pytest.mark.parametrize("stack", ["haproxy", "haproxy-single-port"], indirect=True)
def test_haproxy_no_strict_sni(stack: Stack) -> None:
    """HAProxy's strict-sni is not supported: a client asking for no name,
    or for one no certificate has, gets the first certificate of the list
    instead of a failed handshake."""
    first = stack.names[443][0]
    assert common_name(peer_certificate(stack, 443, None)) == first
    assert common_name(peer_certificate(stack, 443, "unknown.example.net")) == first


@pytest.mark.parametrize("stack", ["haproxy-single-port"], indirect=True)
def test_haproxy_single_port_carries_federation_over_unix_socket(stack: Stack) -> None:
    """One listener on 443: federation requests, delegated to
    matrix.example.com:443, reach Synapse's unix socket byte for byte like
    client requests, but no path is forwarded for its SNI alone."""
    assert len(stack.original["listeners"]) == 1
    assert stack.original["upstream"] == "unix:/run/synapse/main_public.sock"
    assert stack.synapse.address.startswith("unix:")
    for address in stack.addresses(443):
        for target in FEDERATION_TARGETS:
            echo = echo_of(
                stack.get(
                    443,
                    target,
                    "matrix.example.com:443",
                    f"Authorization: {X_MATRIX}\r\nX-Forwarded-For: 203.0.113.66\r\n",
                    host=address,
                )
            )
            assert echo.target == target
            assert echo.values("Host") == ["matrix.example.com:443"]
            assert echo.values("X-Forwarded-For") == [address]
            assert echo.values("X-Forwarded-Proto") == ["https"]
    # HAProxy's `use_backend matrix if matrix-sni` sent these to Synapse.
    for target in ("/_synapse/admin/v1/server_version", "/_synapse/metrics", "/"):
        response = stack.get(
            443, target, "matrix.example.com", sni="matrix.example.com"
        )
        assert_answered_by_edge(response, 404, "M_UNRECOGNIZED")
    assert set(FEDERATION_TARGETS) <= set(stack.synapse.targets())


@pytest.mark.parametrize("stack", ["relayd"], indirect=True)
def test_relayd_fallback_to_web_server(stack: Stack) -> None:
    """`pass forward to <webserver>`: every path outside /_matrix and
    /_synapse goes to the web server byte for byte, with the same
    X-Forwarded-For and X-Forwarded-Proto as requests to Synapse; the
    Matrix paths still go to Synapse only."""
    assert stack.web is not None
    targets = ["/", "/index.html", "/%7Euser/page?x=%2F&y", "/.well-known/other.txt"]
    for address in stack.addresses(443):
        for target in targets:
            echo = echo_of(
                stack.get(
                    443,
                    target,
                    "example.com",
                    "X-Forwarded-For: 203.0.113.66\r\n",
                    host=address,
                )
            )
            assert echo.target == target
            assert echo.values("Host") == ["example.com"]
            assert echo.values("X-Forwarded-For") == [address]
            assert echo.values("X-Forwarded-Proto") == ["https"]
    web_targets = stack.web.targets()
    assert set(targets) <= set(web_targets)
    assert not set(targets) & set(stack.synapse.targets())
    echo_of(stack.get(443, "/_matrix/client/versions", "example.com"))
    assert "/_matrix/client/versions" in stack.synapse.targets()
    assert "/_matrix/client/versions" not in stack.web.targets()
    # The check that stands in for relayd's `check tcp` looks at both.
    response = stack.get(443, "/ready", "example.com")
    assert response.status == 200
    assert json.loads(response.body)["upstreams"] == {"synapse": "up", "fallback": "up"}


def _index_page_statuses(stack: Stack, seconds: float) -> list[int]:
    """GET /index.html through the edge for ``seconds``: long enough for the
    health checks to have run."""
    statuses = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = stack.get(443, "/index.html", "example.com")
        statuses.append(response.status)
        if response.status == 200:
            assert response.body == b"<h1>example.com</h1>\n"
        time.sleep(0.2)
    return statuses


def test_relayd_with_static_web_server(tmp_path: Path) -> None:
    """A plain static web server has no /health: the fallback check counts
    any HTTP answer to / as up, as relayd's `check tcp` counted a connect,
    so its pages are served after the checks have run."""
    root = tmp_path / "htdocs"
    root.mkdir()
    (root / "index.html").write_text("<h1>example.com</h1>\n")
    with run_page("relayd", tmp_path / "stack", web_root=root) as stack:
        assert set(_index_page_statuses(stack, 2.5)) == {200}
        ready = stack.get(443, "/ready", "example.com")
        assert json.loads(ready.body)["upstreams"] == {
            "synapse": "up",
            "fallback": "up",
        }


# docs/workers.md ------------------------------------------------------------
#
# Unlike the migration pages, it holds several ``yaml`` blocks: each test
# takes the block under its section's heading.

WORKERS_PAGE = "workers.md"
WORKER_SAMPLES = processes.REPO / "etc" / "examples" / "synapse-workers"
# The configuration file the page's commands name.
WORKERS_CONFIG_PATH = "/etc/matrix-edge/matrix-edge.yaml"

# Pool -> members in the deployment the page describes.
WORKERS_DEPLOYMENT = {
    "synchrotron": 2,
    "initial_sync": 1,
    "client_reader": 2,
    "event_creator": 1,
    "federation_inbound": 2,
    "federation_reader": 1,
    "media_repository": 1,
    "typing": 1,
    "to_device": 1,
    "account_data": 1,
    "push_rules": 1,
    "receipts": 1,
    "presence": 1,
}

_CERTIFICATE_KEY = re.compile(
    r"\Alisteners\[\d+\]\.tls\.(?:certificates\[\d+\]\.)?"
    r"(?:certificate_path|private_key_path)\Z"
)
# Where the page's excerpts leave lines out.
ELISION = "[...]"


def page_section(page: str, heading: str) -> str:
    """The text under ``## heading``, up to the next ``##`` heading."""
    text = (DOCS / page).read_text(encoding="utf-8")
    match = re.search(
        rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL
    )
    assert match, f"{page} lacks the heading {heading!r}"
    return match.group(1)


def fenced_blocks(text: str, info: str) -> list[str]:
    return re.findall(rf"^```{info}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def section_block(page: str, heading: str, info: str) -> str:
    blocks = fenced_blocks(page_section(page, heading), info)
    assert len(blocks) == 1, (
        f"{page}: {heading!r} must hold exactly one ```{info} block"
    )
    return blocks[0]


def significant_lines(block: str) -> int:
    """Lines that are neither blank nor only a comment, as
    ``grep -cvE '^\\s*(#|$)'`` counts them."""
    return sum(
        1
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )


def workers_page_document() -> dict[str, Any]:
    document = yaml.safe_load(
        section_block(WORKERS_PAGE, "The matrix-edge configuration", "yaml")
    )
    assert isinstance(document, dict)
    return document


def console_runs(block: str) -> Iterator[tuple[str, list[str]]]:
    """Each ``$ command`` of a console block, with the lines shown after it."""
    command: str | None = None
    shown: list[str] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            if command is not None:
                yield command, shown
            command, shown = line[2:], []
        elif command is not None:
            shown.append(line)
    if command is not None:
        yield command, shown


def assert_shown(shown: list[str], printed: str) -> None:
    """``shown`` is what was printed; or, where it has ``[...]`` lines, its
    runs between them are found in what was printed, in order."""
    lines = printed.splitlines()
    if ELISION not in shown:
        assert shown == lines
        return
    runs: list[list[str]] = [[]]
    for line in shown:
        if line == ELISION:
            runs.append([])
        else:
            runs[-1].append(line)
    start = 0
    for run in runs:
        for i in range(start, len(lines) - len(run) + 1):
            if lines[i : i + len(run)] == run:
                start = i + len(run)
                break
        else:
            pytest.fail("not printed in this order:\n" + "\n".join(run))


@pytest.fixture(scope="module")
def workers_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page's configuration, with test certificates for the same names
    in place of its certificate files and nothing else changed."""
    directory = tmp_path_factory.mktemp("workers")
    original = workers_page_document()
    document = copy.deepcopy(original)
    certificates = Certificates(make_pki(directory / "pki"))
    for listener in document["listeners"]:
        for entry in _certificate_entries(listener):
            certificates.replace(entry)
    before, after = _flatten(original), _flatten(document)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed and all(_CERTIFICATE_KEY.match(k) for k in changed), sorted(changed)
    # In the page's order: `routes` lists the pools in it.
    path = directory / "matrix-edge.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_twistd(argv: list[str], cwd: Path = processes.REPO) -> str:
    result = subprocess.run(
        [processes.TWISTD, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(processes.REPO)),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_workers_page_layout() -> None:
    text = (DOCS / WORKERS_PAGE).read_text(encoding="utf-8")
    for heading in (
        "The deployment",
        "Line counts",
        "The nginx configuration",
        "The matrix-edge configuration",
        "Checking the routing",
        "Migrating an existing deployment",
        "Policies",
        "Health and fallback",
        "Limits",
        "`/ready`",
        "The access log",
        "Adding or overriding routes",
        "Tested by",
    ):
        assert f"\n## {heading}\n" in text, f"{WORKERS_PAGE} lacks {heading!r}"
    assert WORKERS_PAGE in (DOCS / "README.md").read_text(encoding="utf-8")
    assert f"docs/{WORKERS_PAGE}" in (processes.REPO / "README.md").read_text(
        encoding="utf-8"
    )


def test_workers_page_config_checks(workers_config: Path) -> None:
    """The deployment the page describes, on 443 and 8448 with TLS, passes
    ``--check-config`` as written (certificate files apart)."""
    document = workers_page_document()
    assert {entry["port"]: entry["type"] for entry in document["listeners"]} == {
        443: "client",
        8448: "federation",
    }
    assert all(_certificate_entries(entry) for entry in document["listeners"])
    assert document["upstream"] == "http://127.0.0.1:8008"
    pools = document["workers"]["pools"]
    assert {
        name: len(addresses) for name, addresses in pools.items()
    } == WORKERS_DEPLOYMENT
    checked = check_config(workers_config)
    assert checked.returncode == 0, checked.stderr
    assert "configuration OK" in checked.stdout


def test_workers_page_line_counts() -> None:
    """The numbers in the page's line-count table are those of the nginx
    and matrix-edge configurations it gives."""
    table = page_section(WORKERS_PAGE, "Line counts")
    stated = dict(
        re.findall(
            r"^\| (nginx|matrix-edge) \| `[^`]+` \| (\d+) \|$", table, re.MULTILINE
        )
    )
    assert set(stated) == {"nginx", "matrix-edge"}
    nginx = section_block(WORKERS_PAGE, "The nginx configuration", "nginx")
    edge = section_block(WORKERS_PAGE, "The matrix-edge configuration", "yaml")
    assert int(stated["nginx"]) == significant_lines(nginx)
    assert int(stated["matrix-edge"]) == significant_lines(edge)
    # The README quotes both.
    readme = (processes.REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(
        r"^## Synapse workers\n(.*?)^## ", readme, re.MULTILINE | re.DOTALL
    )
    assert section, "README.md lacks its Synapse workers section"
    assert set(re.findall(r"(\d+) lines", section.group(1))) == set(stated.values())


@pytest.mark.parametrize(
    "heading", ["Policies", "Limits", "Adding or overriding routes"]
)
def test_workers_page_snippets(heading: str, workers_config: Path) -> None:
    """The ``workers`` snippets of the page are valid added to its
    configuration."""
    snippet = yaml.safe_load(section_block(WORKERS_PAGE, heading, "yaml"))["workers"]
    document = yaml.safe_load(workers_config.read_text())
    document["workers"]["pools"].update(snippet.get("pools") or {})
    document["workers"]["routes"] = snippet.get("routes", [])
    parse_config(document)


def test_workers_page_dry_runs(workers_config: Path) -> None:
    """Every ``twistd matrix-edge -c ... route`` and ``routes`` command on
    the page prints what the page shows, run on the page's configuration."""
    text = (DOCS / WORKERS_PAGE).read_text(encoding="utf-8")
    commands = []
    for block in fenced_blocks(text, "console"):
        for command, shown in console_runs(block):
            argv = shlex.split(command)
            if argv[:3] != ["twistd", "matrix-edge", "-c"]:
                continue
            assert argv[3] == WORKERS_CONFIG_PATH, command
            assert_shown(
                shown, run_twistd(["matrix-edge", "-c", str(workers_config), *argv[4:]])
            )
            commands.append(argv[4])
    assert "routes" in commands
    assert commands.count("route") >= 5


def test_workers_page_migration() -> None:
    """``migrate-workers`` on the page's sample Synapse files prints what the
    page shows: the ``upstream`` and pools of the page's configuration."""
    shown = page_section(WORKERS_PAGE, "Migrating an existing deployment")
    [command] = [
        command
        for block in fenced_blocks(shown, "console")
        for command, _ in console_runs(block)
        if command.startswith("twistd ")
    ]
    argv = shlex.split(command)
    assert argv[:4] == ["twistd", "matrix-edge", "migrate-workers", "homeserver.yaml"]
    assert argv[4:] == ["workers/*.yaml"]
    workers = sorted(
        str(p.relative_to(WORKER_SAMPLES))
        for p in WORKER_SAMPLES.glob("workers/*.yaml")
    )
    printed = run_twistd([*argv[1:4], *workers], cwd=WORKER_SAMPLES)
    assert printed == section_block(
        WORKERS_PAGE, "Migrating an existing deployment", "yaml"
    )
    document = workers_page_document()
    assert yaml.safe_load(printed) == {
        "upstream": document["upstream"],
        "workers": {"pools": document["workers"]["pools"]},
    }
