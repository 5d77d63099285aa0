"""One homeserver of the suite: a Synapse on ``<ip>:8008`` and a matrix-edge
in front of it on ``<ip>:443`` (client) and ``<ip>:8448`` (federation).

Everything it needs (configs, signing key, SQLite database, media store) is
written under one folder; the edge's certificate comes from the suite's
private CA, which Synapse is told to trust for federation
(``federation_custom_ca_list``) with certificate checking left on.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import yaml

from tests.e2e.processes import Process, ProcessGroup, wait_for
from tests.pki import Pki

SYNAPSE_PORT = 8008
CLIENT_PORT = 443
FEDERATION_PORT = 8448
STARTUP_TIMEOUT = 90.0
SHIM = Path(__file__).resolve().parent / "decoding_shim.py"


@attrs.define
class Homeserver:
    """Where one homeserver lives and how to reach it."""

    server_name: str
    ip: str
    directory: Path
    pki: Pki
    shared_secret: str = attrs.field(factory=lambda: secrets.token_hex(16))
    # Set when a %xx-decoding proxy is put between the edge and Synapse.
    shim_port: int | None = None
    synapse: Process | None = None
    edge: Process | None = None
    shim: Process | None = None

    @property
    def synapse_url(self) -> str:
        """Synapse's own listener; used only for the shared-secret admin
        API, which the edge does not forward."""
        return f"http://{self.ip}:{SYNAPSE_PORT}"

    @property
    def client_url(self) -> str:
        return f"https://{self.server_name}"

    @property
    def federation_url(self) -> str:
        return f"https://{self.server_name}:{FEDERATION_PORT}"

    @property
    def synapse_config_path(self) -> Path:
        return self.directory / "homeserver.yaml"

    @property
    def edge_config_path(self) -> Path:
        return self.directory / "matrix-edge.yaml"

    @property
    def shim_log_path(self) -> Path:
        return self.directory / "decoding-shim-requests.log"

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    # -- configuration -------------------------------------------------

    def write_configs(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        signing_key = self.directory / "signing.key"
        # Synapse's format: "ed25519 <key id> <unpadded base64 of the seed>".
        seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
        signing_key.write_text(f"ed25519 a_{secrets.token_hex(2)} {seed}\n")
        self.synapse_config_path.write_text(
            yaml.safe_dump(self.synapse_config(), sort_keys=False)
        )
        self.edge_config_path.write_text(
            yaml.safe_dump(self.edge_config(), sort_keys=False)
        )

    def synapse_config(self) -> dict[str, Any]:
        """homeserver.yaml, as a dict."""
        signing_key = self.directory / "signing.key"
        return {
            "server_name": self.server_name,
            "public_baseurl": f"https://{self.server_name}/",
            "pid_file": str(self.directory / "homeserver.pid"),
            "listeners": [
                {
                    "port": SYNAPSE_PORT,
                    "bind_addresses": [self.ip],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": True,
                    "resources": [
                        {"names": ["client", "federation"], "compress": False}
                    ],
                }
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.directory / "homeserver.db")},
            },
            "media_store_path": str(self.directory / "media_store"),
            "signing_key_path": str(signing_key),
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "registration_shared_secret": self.shared_secret,
            "enable_registration": False,
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "url_preview_enabled": False,
            "max_upload_size": "50M",
            # Federation over loopback, verified against the suite's CA.
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "federation_verify_certificates": True,
            "federation_custom_ca_list": [str(self.pki.ca_cert_path)],
            **_GENEROUS_RATE_LIMITS,
        }

    def edge_config(self) -> dict[str, Any]:
        """matrix-edge's configuration, as a dict; issues the edge's
        certificate."""
        leaf = self.pki.issue_leaf(
            self.server_name, hostnames=[self.server_name], ip_addresses=[self.ip]
        )
        upstream_port = self.shim_port or SYNAPSE_PORT
        return {
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": [self.ip],
                    "type": kind,
                    "tls": {
                        "certificate_path": str(leaf.chain_path),
                        "private_key_path": str(leaf.key_path),
                    },
                }
                for port, kind in (
                    (CLIENT_PORT, "client"),
                    (FEDERATION_PORT, "federation"),
                )
            ],
            "upstream": f"http://{self.ip}:{upstream_port}",
            "max_upload_size": "50M",
            "well_known": {
                "server": f"{self.server_name}:{FEDERATION_PORT}",
                "client": {"m.homeserver": {"base_url": self.client_url}},
            },
        }

    # -- processes -----------------------------------------------------

    @property
    def label(self) -> str:
        """The first label of the server name, to name its processes."""
        return self.server_name.split(".")[0]

    def start(self, group: ProcessGroup, synapse_python: Path) -> None:
        """Start Synapse, the shim if any, and the edge; do not wait."""
        self.start_synapse(group, synapse_python)
        self.start_edge(group)

    def start_synapse(self, group: ProcessGroup, synapse_python: Path) -> None:
        self.synapse = group.start(
            f"{self.label}-synapse",
            [
                str(synapse_python),
                "-m",
                "synapse.app.homeserver",
                "--config-path",
                str(self.synapse_config_path),
            ],
            cwd=self.directory,
        )

    def start_edge(self, group: ProcessGroup) -> None:
        """Start the shim if there is one, and the edge."""
        label = self.label
        if self.shim_port is not None:
            self.shim = group.start(
                f"{label}-decoding-shim",
                [
                    sys.executable,
                    str(SHIM),
                    f"{self.ip}:{self.shim_port}",
                    f"{self.ip}:{SYNAPSE_PORT}",
                    str(self.shim_log_path),
                ],
            )
            group.extra_logs.append(self.shim_log_path)
        self.edge = group.start(
            f"{label}-matrix-edge",
            edge_argv(self.edge_config_path),
            cwd=self.directory,
        )

    def wait_ready(self) -> None:
        processes = [p for p in (self.synapse, self.shim, self.edge) if p]
        wait_for(
            f"Synapse {self.server_name} at {self.synapse_url}/health",
            lambda: http_ok(f"{self.synapse_url}/health"),
            STARTUP_TIMEOUT,
            watch=processes,
        )
        for url in (f"{self.client_url}/health", f"{self.federation_url}/health"):
            wait_for(
                f"matrix-edge {url}",
                lambda url=url: http_ok(url, self.pki),
                STARTUP_TIMEOUT,
                watch=processes,
            )
        # Synapse answers through the edge (and the shim, if there is one).
        wait_for(
            f"Synapse {self.server_name} through matrix-edge",
            lambda: http_ok(f"{self.client_url}/_matrix/client/versions", self.pki),
            STARTUP_TIMEOUT,
            watch=processes,
        )

    # -- Synapse's admin API (direct, not through the edge) ------------

    def register(self, localpart: str, password: str, admin: bool = False) -> dict:
        """Create a user with the shared-secret registration API."""
        url = f"{self.synapse_url}/_synapse/admin/v1/register"
        nonce = request_json("GET", url)[1]["nonce"]
        flag = "admin" if admin else "notadmin"
        message = "\x00".join((nonce, localpart, password, flag)).encode()
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": hmac.new(
                self.shared_secret.encode(), message, hashlib.sha1
            ).hexdigest(),
        }
        status, result = request_json("POST", url, body)
        if status != 200:
            raise AssertionError(f"registering {localpart} failed: {status} {result}")
        return result

    def whois(self, admin_token: str, user_id: str) -> dict:
        """Synapse's record of a user's sessions: devices, IPs, user agents."""
        status, result = request_json(
            "GET",
            f"{self.synapse_url}/_synapse/admin/v1/whois/{_quote(user_id)}",
            token=admin_token,
        )
        if status != 200:
            raise AssertionError(f"whois {user_id}: {status} {result}")
        return result


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _open(request: urllib.request.Request, pki: Pki | None, timeout: float) -> Any:
    """urlopen without any proxy from the environment, trusting the suite's
    CA for https."""
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if pki is not None:
        context = ssl.create_default_context(cafile=str(pki.ca_cert_path))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)


def request_json(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    pki: Pki | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with _open(request, pki, timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def http_ok(url: str, pki: Pki | None = None) -> bool | None:
    """True once ``url`` answers 200; None (try again) otherwise."""
    request = urllib.request.Request(url)
    try:
        with _open(request, pki, 5.0) as response:
            return True if response.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


_LOTS = {"per_second": 1000, "burst_count": 1000}
_GENEROUS_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _LOTS,
    "rc_registration": _LOTS,
    "rc_login": {"address": _LOTS, "account": _LOTS, "failed_attempts": _LOTS},
    "rc_joins": {"local": _LOTS, "remote": _LOTS},
    "rc_joins_per_room": _LOTS,
    "rc_invites": {"per_room": _LOTS, "per_user": _LOTS, "per_issuer": _LOTS},
    "rc_admin_redaction": _LOTS,
    "rc_media_create": _LOTS,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 1000,
        "sleep_delay": 1,
        "reject_limit": 1000,
        "concurrent": 100,
    },
}


def edge_argv(config_path: Path, *args: str) -> list[str]:
    """``twistd -n matrix-edge --config CONFIG ARGS`` with this Python, in
    the foreground and without a pidfile."""
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "matrix-edge",
        "--config",
        str(config_path),
        *args,
    ]
