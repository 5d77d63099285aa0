"""A real ACME server on loopback for tests of the edge's built-in ACME client.

Debian's ``pebble`` (Let's Encrypt's test CA) plays the CA and
``pebble-challtestsrv`` plays DNS for it, answering every name with
127.0.0.1 (and no AAAA), so pebble's validation authority connects back to
the edge under test on ``tls_port`` (tls-alpn-01) and ``http_port``
(http-01). Nothing listens on or connects to anything but 127.0.0.1.

Typical use, as a fixture::

    @pytest.fixture
    def pebble(tmp_path):
        found, reason = ensure_pebble()
        if found is None:
            pytest.skip(reason)
        with running_pebble(tmp_path, tls_port=..., http_port=...) as server:
            yield server

An ACME client then talks to ``server.directory_url`` trusting
``server.ca_bundle`` (e.g. ``requests``' ``verify=str(server.ca_bundle)``),
and a test checks the issued chain against ``server.issuing_roots_pem()``.

Pebble quirks worth knowing: its root and intermediate are new on every
start; it enforces no rate limits (``rate_limiting_front`` below answers
like Let's Encrypt at its limits); revocation is recorded but only visible
through the management interface (``cert_status``), as there is no OCSP/CRL.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import attrs

from tests.e2e import environment
from tests.pki import make_pki
from tests.processes import free_port

PEBBLE_PACKAGE = "pebble"
STARTUP_TIMEOUT = 15.0

# Deterministic, fast pebble: validate at once, accept every good nonce and
# never reuse an authorization (so every order brings fresh challenges).
DEFAULT_ENV = {
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
    "PEBBLE_AUTHZREUSE": "0",
}


def ensure_pebble() -> tuple[str | None, str]:
    """The path of ``pebble``, installing Debian's pebble package (which also
    brings ``pebble-challtestsrv``) when it is missing; (None, reason) when it
    cannot be had, so tests can skip with the reason."""
    try:
        pebble = environment.apt_install([PEBBLE_PACKAGE], "pebble", "/usr/bin/pebble")
        environment.apt_install(
            [PEBBLE_PACKAGE], "pebble-challtestsrv", "/usr/bin/pebble-challtestsrv"
        )
    except environment.Unavailable as e:
        return None, str(e)
    return str(pebble), ""


@attrs.frozen
class Pebble:
    """A running pebble (ACME CA) plus the challtestsrv it resolves names with."""

    directory_url: str
    """``https://127.0.0.1:PORT/dir``, the ACME directory."""
    management_url: str
    """``https://127.0.0.1:PORT``, pebble's management interface (same CA)."""
    ca_bundle: Path
    """PEM of the CA that signed pebble's own HTTPS certificate (not the CA
    that signs issued certificates: see ``issuing_roots_pem``)."""
    tls_port: int
    """Where pebble's VA connects for tls-alpn-01 (on 127.0.0.1)."""
    http_port: int
    """Where pebble's VA connects for http-01 (on 127.0.0.1)."""
    dns_port: int
    """challtestsrv's DNS server (UDP/TCP on 127.0.0.1)."""
    dns_management_url: str
    """challtestsrv's plain-HTTP management (for dns-01 TXT records)."""
    process: subprocess.Popen
    challtestsrv: subprocess.Popen
    log_path: Path
    dns_log_path: Path

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _management_get(self, path: str) -> bytes:
        with urllib.request.urlopen(
            self.management_url + path, context=self._ssl_context(), timeout=10
        ) as response:
            return response.read()

    def issuing_roots_pem(self) -> bytes:
        """The root (PEM) that signs the certificates pebble issues, made anew
        at every start: the trust anchor for checking an issued chain."""
        return self._management_get("/roots/0")

    def issuing_intermediate_pem(self) -> bytes:
        """The intermediate (PEM) that directly signs issued leaf certificates
        (pebble also puts it in the chain it serves)."""
        return self._management_get("/intermediates/0")

    def cert_status(self, serial: int) -> dict:
        """Pebble's record of an issued certificate, e.g. {"Status": "Valid"}
        or {"Status": "Revoked", "Reason": 4, ...}: the only way to observe
        revocation, as pebble runs no OCSP responder and publishes no CRL."""
        return json.loads(self._management_get(f"/cert-status-by-serial/{serial:x}"))

    def set_dns01_txt(self, name: str, value: str) -> None:
        """Publish a dns-01 answer: TXT ``_acme-challenge.<name>`` = value."""
        self._dns_post("/set-txt", {"host": f"_acme-challenge.{name}.", "value": value})

    def clear_dns01_txt(self, name: str) -> None:
        """Withdraw the TXT records of ``_acme-challenge.<name>``."""
        self._dns_post("/clear-txt", {"host": f"_acme-challenge.{name}."})

    def _dns_post(self, path: str, body: dict) -> None:
        request = urllib.request.Request(
            self.dns_management_url + path,
            data=json.dumps(body).encode(),
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def log(self) -> str:
        """Pebble's output so far (it logs every request and validation)."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop pebble and challtestsrv: terminate, wait, then kill."""
        for popen in (self.process, self.challtestsrv):
            _stop(popen)


def _stop(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=5)


def _write_https_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and, issued by it, a certificate for 127.0.0.1/localhost that
    pebble serves its directory and management interface with. Returns
    (ca_bundle, certificate chain, private key) paths."""
    pki = make_pki(directory, hostnames=["localhost"], ip_addresses=["127.0.0.1"])
    return pki.ca_cert_path, pki.chain_path, pki.key_path


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_pebble(
    tmp_path: Path,
    *,
    tls_port: int,
    http_port: int,
    validity_seconds: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Pebble:
    """Start challtestsrv (DNS: every name -> 127.0.0.1, no AAAA) and pebble
    using it, with files and logs in ``tmp_path``; return once the ACME
    directory and management interface answer 200 over verified HTTPS.

    ``validity_seconds`` sets the lifetime of issued certificates (pebble's
    default is 5 years); ``env`` adds to or overrides ``DEFAULT_ENV``. The
    caller must ``stop()`` the result (or use ``running_pebble``)."""
    pebble_bin, reason = ensure_pebble()
    if pebble_bin is None:
        raise RuntimeError(reason)
    challtestsrv_bin = shutil.which("pebble-challtestsrv")
    assert challtestsrv_bin is not None
    tmp_path.mkdir(parents=True, exist_ok=True)
    ca_bundle, cert_path, key_path = _write_https_pki(tmp_path)
    acme_port, management_port = free_port(), free_port()
    dns_port, dns_management_port = free_port(), free_port()
    settings: dict = {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": str(cert_path),
        "privateKey": str(key_path),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity_seconds is not None:
        settings["certificateValidityPeriod"] = validity_seconds
    config_path = tmp_path / "pebble-config.json"
    config_path.write_text(json.dumps({"pebble": settings}, indent=2))

    dns_log_path = tmp_path / "challtestsrv.log"
    with dns_log_path.open("wb") as dns_log:
        challtestsrv = subprocess.Popen(
            [
                challtestsrv_bin,
                "-dns01",
                f"127.0.0.1:{dns_port}",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{dns_management_port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=dns_log,
            stderr=subprocess.STDOUT,
        )
    log_path = tmp_path / "pebble.log"
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    pebble_bin,
                    "-config",
                    str(config_path),
                    "-dnsserver",
                    f"127.0.0.1:{dns_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **DEFAULT_ENV, **(env or {})},
            )
    except BaseException:
        _stop(challtestsrv)
        raise
    pebble = Pebble(
        directory_url=f"https://127.0.0.1:{acme_port}/dir",
        management_url=f"https://127.0.0.1:{management_port}",
        ca_bundle=ca_bundle,
        tls_port=tls_port,
        http_port=http_port,
        dns_port=dns_port,
        dns_management_url=f"http://127.0.0.1:{dns_management_port}",
        process=process,
        challtestsrv=challtestsrv,
        log_path=log_path,
        dns_log_path=dns_log_path,
    )
    try:
        _wait_ready(pebble)
    except BaseException:
        pebble.stop()
        raise
    return pebble


def _wait_ready(pebble: Pebble) -> None:
    """Poll until the directory, pebble's management interface and
    challtestsrv's management all answer; raise with the logs' tails if
    a process dies or ``STARTUP_TIMEOUT`` passes."""
    context = pebble._ssl_context()
    urls = [
        (pebble.directory_url, context),
        (pebble.management_url + "/roots/0", context),
        (pebble.dns_management_url + "/", None),
    ]
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last_error = "not tried"
    while urls:
        for name, popen, path in (
            ("pebble", pebble.process, pebble.log_path),
            ("pebble-challtestsrv", pebble.challtestsrv, pebble.dns_log_path),
        ):
            if popen.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {popen.returncode}:\n{_log_tail(path)}"
                )
        url, url_context = urls[0]
        try:
            with urllib.request.urlopen(url, context=url_context, timeout=2) as reply:
                reply.read()
            urls.pop(0)
            continue
        except urllib.error.HTTPError as e:
            # challtestsrv's management has no handler for "/": any HTTP
            # answer means it is up.
            if url_context is None:
                urls.pop(0)
                continue
            last_error = f"{url}: HTTP {e.code}"
        except (OSError, ssl.SSLError) as e:
            last_error = f"{url}: {e}"
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"pebble not ready after {STARTUP_TIMEOUT}s ({last_error});"
                f" pebble log:\n{_log_tail(pebble.log_path)}\n"
                f"challtestsrv log:\n{_log_tail(pebble.dns_log_path)}"
            )
        time.sleep(0.05)


@contextmanager
def running_pebble(
    tmp_path: Path,
    *,
    tls_port: int,
    http_port: int,
    validity_seconds: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Pebble]:
    """``start_pebble`` as a context manager that always stops it, the shape
    for a pytest fixture (``with running_pebble(tmp_path, ...) as p: yield p``)."""
    pebble = start_pebble(
        tmp_path,
        tls_port=tls_port,
        http_port=http_port,
        validity_seconds=validity_seconds,
        env=env,
    )
    try:
        yield pebble
    finally:
        pebble.stop()


RATE_LIMITED_DETAIL = (
    "too many certificates (5) already issued for this exact set of"
    " identifiers in the last 168h0m0s, retry after {at}: see"
    " https://letsencrypt.org/docs/rate-limits/#new-certificates-per-exact-set-of-hostnames"
)
"""Let's Encrypt's wording when its duplicate-certificate limit is hit."""


@attrs.define
class RateLimitingFront:
    """A running ``rate_limiting_front``: point the ACME client here."""

    directory_url: str
    """``https://127.0.0.1:PORT/dir``: pebble's directory, seen through the front."""
    ca_bundle: Path
    """PEM with the CAs of both the front's and pebble's HTTPS certificates."""
    refused: int = 0
    """newOrder requests answered 429 so far."""


@contextmanager
def rate_limiting_front(
    pebble: Pebble,
    tmp_path: Path,
    refuse_new_orders: int,
    retry_after: int = 3600,
) -> Iterator[RateLimitingFront]:
    """An HTTPS proxy on 127.0.0.1 in front of ``pebble`` that answers the
    first ``refuse_new_orders`` newOrder POSTs the way Let's Encrypt does
    when a rate limit is hit (429, ``urn:ietf:params:acme:error:rateLimited``,
    ``Retry-After``), since pebble itself enforces no limits; everything
    else is forwarded to pebble.

    The ``Host`` header is passed on, so pebble checks the JWS ``url``
    against the front's URLs and builds its own from them; pebble's base URL
    is still rewritten to the front's in bodies, ``Location`` and ``Link``,
    should any slip through. A refusal carries a real ``Replay-Nonce`` from
    pebble's newNonce, as the client needs one with every answer."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    front_ca, cert_path, key_path = _write_https_pki(tmp_path)
    ca_bundle = tmp_path / "front-and-pebble-ca.pem"
    ca_bundle.write_bytes(front_ca.read_bytes() + pebble.ca_bundle.read_bytes())
    pebble_context = pebble._ssl_context()
    pebble_url = urllib.parse.urlsplit(pebble.directory_url)
    pebble_base = f"https://{pebble_url.netloc}"
    with urllib.request.urlopen(
        pebble.directory_url, context=pebble_context, timeout=10
    ) as reply:
        directory = json.loads(reply.read())
    new_order_path = urllib.parse.urlsplit(directory["newOrder"]).path
    new_nonce_path = urllib.parse.urlsplit(directory["newNonce"]).path
    lock = threading.Lock()

    def to_pebble(
        method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPSConnection(
            pebble_url.hostname, pebble_url.port, context=pebble_context, timeout=30
        )
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._handle()

        do_HEAD = do_POST = do_GET

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if self.command == "POST" and self.path == new_order_path:
                with lock:
                    refuse = front.refused < refuse_new_orders
                    front.refused += refuse
                if refuse:
                    self._refuse()
                    return
            forwarded = {
                name: self.headers[name]
                for name in ("Host", "Content-Type", "User-Agent", "Accept")
                if self.headers[name] is not None
            }
            status, headers, answer = to_pebble(
                self.command, self.path, body, forwarded
            )
            passed = [
                (name, value.replace(pebble_base, own_base))
                for name, value in headers
                if name.lower()
                in {"content-type", "replay-nonce", "location", "link", "retry-after"}
            ]
            self._send(
                status, passed, answer.replace(pebble_base.encode(), own_base.encode())
            )

        def _refuse(self) -> None:
            _, headers, _ = to_pebble("HEAD", new_nonce_path, None, {})
            nonce = dict((name.lower(), value) for name, value in headers)[
                "replay-nonce"
            ]
            at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
                seconds=retry_after
            )
            problem = {
                "type": "urn:ietf:params:acme:error:rateLimited",
                "detail": RATE_LIMITED_DETAIL.format(
                    at=at.strftime("%Y-%m-%d %H:%M:%S UTC")
                ),
                "status": 429,
            }
            self._send(
                429,
                [
                    ("Content-Type", "application/problem+json"),
                    ("Retry-After", str(retry_after)),
                    ("Replay-Nonce", nonce),
                    ("Link", f'<{own_base}{pebble_url.path}>;rel="index"'),
                ],
                json.dumps(problem).encode(),
            )

        def _send(
            self, status: int, headers: list[tuple[str, str]], body: bytes
        ) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # pebble's log has every request

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_path, key_path)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    own_base = f"https://127.0.0.1:{server.server_address[1]}"
    front = RateLimitingFront(
        directory_url=own_base + pebble_url.path, ca_bundle=ca_bundle
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
