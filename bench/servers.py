"""The servers of the benchmark: the fixed upstream and the proxies under test.

Each proxy is configured as an operator would configure it in front of
Synapse and gets the same single core: nginx as in Synapse's reverse-proxy
document plus upstream keep-alive, HAProxy as in that document plus
``http-reuse always``, Caddy as in that document (its keep-alive is on by
default), matrix-edge with its own defaults. All of them serve plain HTTP
on one port and TLS (the same certificate) on another, and log each request
(or none, with ``--no-access-log``) to a file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import procs

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
# Ports below the ephemeral range (32768-60999), away from 8008/18008 and
# the like that tests and demos use.
FAST_UPSTREAM_PORT = 24008
SLOW_UPSTREAM_PORT = 24009

SMALL_PATH = "/_matrix/client/versions"
LARGE_PATH = "/_matrix/media/v3/download/bench.test/64k"
LONG_POLL_PATH = "/_matrix/client/v3/sync"
UPLOAD_PATH = "/_matrix/media/v3/upload"
DOWNLOAD_PATH = "/_matrix/media/v3/download/bench.test/50m"

# About 100 bytes, like Synapse's answer to /versions.
SMALL_BODY = (
    '{"versions":["r0.6.1","v1.1","v1.2","v1.3","v1.4","v1.5","v1.6"],'
    '"unstable_features":{}}'
)
LARGE_SIZE = 64 * 1024


def _is_root() -> bool:
    return os.geteuid() == 0


def _wait_http_ok(url: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Wait until C{url} answers 200, failing early if C{process} exits."""

    def ok() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    if not procs.wait_for(ok, timeout):
        raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s")


@dataclass
class RunDir:
    """Where configs, logs, the certificate and test files of a run live."""

    path: Path

    def __post_init__(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def subdir(self, name: str) -> Path:
        directory = self.path / name
        directory.mkdir(parents=True, exist_ok=True)
        # nginx workers may run as another user and write temp files here.
        directory.chmod(0o777)
        return directory


def make_certificate(run: RunDir) -> tuple[Path, Path, Path]:
    """A self-signed EC P-256 certificate for localhost and 127.0.0.1.

    Returns the certificate, the key, and both in one file for HAProxy.
    """
    cert, key, combined = (
        run.file("cert.pem"),
        run.file("key.pem"),
        run.file("combined.pem"),
    )
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "7",
            "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, combined


class FastUpstream:
    """The upstream for throughput scenarios: an nginx server block that
    answers from memory or a static file, costing ~10 us per request, so
    that it is never the bottleneck."""

    def __init__(self, run: RunDir, port: int = FAST_UPSTREAM_PORT):
        self.run = run
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        www = self.run.subdir("upstream-www")
        large = www / LARGE_PATH.lstrip("/")
        large.parent.mkdir(parents=True, exist_ok=True)
        large.write_bytes(bytes(range(256)) * (LARGE_SIZE // 256))
        temp = self.run.subdir("upstream-temp")
        user = "user root;" if _is_root() else ""
        return textwrap.dedent(
            f"""\
            {user}
            worker_processes 1;
            worker_rlimit_nofile {procs.open_files_limit()};
            pid {self.run.file("upstream-nginx.pid")};
            error_log {self.run.file("upstream-nginx.error.log")} warn;
            events {{ worker_connections {procs.open_files_limit() - 50}; }}
            http {{
                access_log off;
                keepalive_requests 1000000;
                keepalive_timeout 300s;
                sendfile on;
                open_file_cache max=16;
                default_type application/octet-stream;
                client_body_temp_path {temp}/body;
                proxy_temp_path {temp}/proxy;
                fastcgi_temp_path {temp}/fastcgi;
                uwsgi_temp_path {temp}/uwsgi;
                scgi_temp_path {temp}/scgi;
                server {{
                    listen {HOST}:{self.port} backlog=4096;
                    root {www};
                    location = {SMALL_PATH} {{
                        default_type application/json;
                        return 200 '{SMALL_BODY}';
                    }}
                    # Synapse's health check, which matrix-edge polls.
                    location = /health {{
                        default_type text/plain;
                        return 200 'OK';
                    }}
                }}
            }}
            """
        )

    def start(self) -> None:
        config = self.run.file("upstream-nginx.conf")
        config.write_text(self._config())
        self.process = procs.start(
            ["nginx", "-c", str(config), "-p", str(self.run.path), "-g", "daemon off;"],
            self.run.file("upstream-nginx.out"),
        )
        _wait_http_ok(f"http://{HOST}:{self.port}{SMALL_PATH}", 10, self.process)

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process)
            self.process = None


class SlowUpstream:
    """The upstream for long-polls and 50 MB bodies (bench/upstream.py)."""

    def __init__(self, run: RunDir, delay: float, port: int = SLOW_UPSTREAM_PORT):
        self.run = run
        self.delay = delay
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def control_url(self) -> str:
        return f"http://{HOST}:{self.port}/bench"

    def start(self) -> None:
        self.process = procs.start(
            [
                sys.executable,
                str(BENCH_DIR / "upstream.py"),
                "--port", str(self.port),
                "--delay", str(self.delay),
            ],
            self.run.file("upstream-python.out"),
        )  # fmt: skip
        _wait_http_ok(f"http://{HOST}:{self.port}{SMALL_PATH}", 10, self.process)

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process)
            self.process = None


@dataclass
class Proxy:
    """One proxy under test: how to configure and start it, and its ports.

    Subclasses write the configuration; this class starts, checks and stops
    the process, and names its log files.
    """

    run: RunDir
    cert: tuple[Path, Path, Path]
    access_log: bool
    plain_port: int
    tls_port: int
    name: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started_at: float = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def url(self, path: str, tls: bool = False) -> str:
        if tls:
            return f"https://{HOST}:{self.tls_port}{path}"
        return f"http://{HOST}:{self.plain_port}{path}"

    def log_file(self, suffix: str) -> Path:
        return self.run.file(f"{self.name}.{suffix}")

    def argv(self, config: Path) -> list[str]:
        raise NotImplementedError

    def config_text(self, upstream_port: int) -> str:
        raise NotImplementedError

    def config_suffix(self) -> str:
        return "conf"

    def start(self, upstream_port: int) -> None:
        """Start the proxy in front of the upstream on C{upstream_port} and
        wait until a request passes through it."""
        config = self.log_file(self.config_suffix())
        config.write_text(self.config_text(upstream_port))
        self.process = procs.start(self.argv(config), self.log_file("out"))
        self.started_at = time.monotonic()
        try:
            _wait_http_ok(self.url(SMALL_PATH), 30, self.process)
        except RuntimeError as e:
            raise RuntimeError(
                f"{self.name} did not start: {e}; see {self.log_file('out')}"
            ) from None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            procs.stop(self.process)
            self.process = None


@dataclass
class MatrixEdge(Proxy):
    """matrix-edge, one process, run by twistd in the foreground. Its log
    (access lines included) goes to standard output, kept in a file."""

    name: str = "matrix-edge"
    processes: int = 1
    workers: bool = False

    def config_suffix(self) -> str:
        return "yaml"

    def config_text(self, upstream_port: int) -> str:
        cert, key, _ = self.cert
        listeners = [
            {"port": self.plain_port, "bind_addresses": [HOST], "type": "client"},
            {
                "port": self.tls_port,
                "bind_addresses": [HOST],
                "type": "client",
                "tls": {"certificate_path": str(cert), "private_key_path": str(key)},
            },
        ]
        config = {
            "listeners": listeners,
            "upstream": f"http://{HOST}:{upstream_port}",
            "upstream_pool": {"max_idle_connections": 64, "idle_timeout": "60s"},
            # To a file of its own, as nginx's and HAProxy's go to theirs.
            "access_log": (
                {"enabled": True, "path": str(self.log_file("access.log"))}
                if self.access_log
                else {"enabled": False}
            ),
            "timeouts": {"upstream_response": "180s"},
            "processes": self.processes,
        }
        if self.workers:
            # /_matrix/client/versions is a client_reader route: the table
            # is matched and a lease taken for every request.
            upstream = f"http://{HOST}:{upstream_port}"
            config["workers"] = {"pools": {"client_reader": [upstream]}}
        # JSON is YAML, and needs no YAML library here.
        return json.dumps(config, indent=2) + "\n"

    def argv(self, config: Path) -> list[str]:
        twistd = Path(sys.executable).with_name("twistd")
        return [str(twistd), "-n", "--pidfile=", "matrix-edge", "--config", str(config)]


@dataclass
class Nginx(Proxy):
    """nginx with the location block of Synapse's reverse-proxy document,
    ``keepalive 32`` to the upstream, one worker.

    ``worker_connections`` is set past what the open-files limit allows:
    nginx starts closing connections that have not yet sent their request
    once fewer than 1/16 of its connection slots are free, and a parked
    long-poll takes two slots.
    """

    name: str = "nginx"

    def config_text(self, upstream_port: int) -> str:
        cert, key, _ = self.cert
        temp = self.run.subdir("nginx-temp")
        user = "user root;" if _is_root() else ""
        access = (
            f"access_log {self.log_file('access.log')};"
            if self.access_log
            else "access_log off;"
        )
        return textwrap.dedent(
            f"""\
            {user}
            worker_processes 1;
            worker_rlimit_nofile {procs.open_files_limit()};
            pid {self.log_file("pid")};
            error_log {self.log_file("error.log")} warn;
            events {{ worker_connections {procs.open_files_limit() * 2}; }}
            http {{
                {access}
                # h2load does not reconnect after the GOAWAY that nginx sends
                # at its default of 1,000 requests per connection, and
                # neither HAProxy nor matrix-edge sets such a limit.
                keepalive_requests 1000000;
                client_body_temp_path {temp}/body;
                proxy_temp_path {temp}/proxy;
                fastcgi_temp_path {temp}/fastcgi;
                uwsgi_temp_path {temp}/uwsgi;
                scgi_temp_path {temp}/scgi;

                upstream backend {{
                    server {HOST}:{upstream_port};
                    keepalive 32;
                }}

                server {{
                    listen {HOST}:{self.plain_port} backlog=4096;
                    listen {HOST}:{self.tls_port} ssl http2 backlog=4096;
                    ssl_certificate {cert};
                    ssl_certificate_key {key};
                    server_name localhost;

                    location ~ ^(/_matrix|/_synapse/client) {{
                        proxy_pass http://backend;
                        proxy_set_header X-Forwarded-For $remote_addr;
                        proxy_set_header X-Forwarded-Proto $scheme;
                        proxy_set_header Host $host:$server_port;
                        client_max_body_size 50M;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                    }}
                }}
            }}
            """
        )

    def argv(self, config: Path) -> list[str]:
        return [
            "nginx",
            "-c",
            str(config),
            "-p",
            str(self.run.path),
            "-g",
            "daemon off;",
        ]


@dataclass
class HAProxy(Proxy):
    """HAProxy as in Synapse's reverse-proxy document, with ``http-reuse
    always``, one thread. Timeouts outlast a /sync long-poll, as
    matrix-edge's defaults do."""

    name: str = "haproxy"

    def config_text(self, upstream_port: int) -> str:
        _, _, combined = self.cert
        log_global = "log stdout format raw local0" if self.access_log else ""
        log_defaults = "log global" if self.access_log else ""
        httplog = "option httplog" if self.access_log else ""
        return textwrap.dedent(
            f"""\
            global
                nbthread 1
                maxconn {procs.max_proxied_connections()}
                {log_global}

            defaults
                mode http
                {log_defaults}
                {httplog}
                maxconn {procs.max_proxied_connections()}
                timeout connect 5s
                timeout client 180s
                timeout server 180s
                timeout http-request 60s
                timeout http-keep-alive 120s

            frontend matrix
                bind {HOST}:{self.plain_port}
                bind {HOST}:{self.tls_port} ssl crt {combined} alpn h2,http/1.1
                http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
                http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
                http-request set-header X-Forwarded-For %[src]
                acl matrix-path path_beg /_matrix
                acl matrix-path path_beg /_synapse/client
                use_backend matrix if matrix-path

            backend matrix
                http-reuse always
                server matrix {HOST}:{upstream_port}
            """
        )

    def argv(self, config: Path) -> list[str]:
        return ["haproxy", "-db", "-f", str(config)]


@dataclass
class Caddy(Proxy):
    """Caddy as in Synapse's reverse-proxy document (``reverse_proxy`` for
    ``/_matrix/*`` and ``/_synapse/client/*``; Caddy sets X-Forwarded-For
    and X-Forwarded-Proto itself), with the suite's certificate instead of
    ACME, HTTP/1.1 and HTTP/2 (no HTTP/3, which the others do not serve).
    Upstream keep-alive is Caddy's default: up to 32 idle connections, as
    nginx's ``keepalive 32``.

    Go sizes its scheduler to the CPUs it may run on, so pinned to one core
    Caddy runs one thread of Go code at a time (``GOMAXPROCS=1``, set too).
    The admin API is off, so that it listens on no other port; its state
    goes under the run directory rather than the user's home; and it stops
    within 2 s of SIGTERM rather than waiting for parked requests.
    """

    name: str = "caddy"

    def config_suffix(self) -> str:
        return "Caddyfile"

    def config_text(self, upstream_port: int) -> str:
        cert, key, _ = self.cert
        upstream = f"{HOST}:{upstream_port}"
        # JSON lines, Caddy's default access log format, in one file. Joined
        # at the indentation of the template below, which dedent removes.
        access = (
            "\n                ".join(
                [
                    "log {",
                    f"    output file {self.log_file('access.log')} {{",
                    "        roll_disabled",
                    "    }",
                    "}",
                ]
            )
            if self.access_log
            else ""
        )
        text = textwrap.dedent(
            f"""\
            {{
                admin off
                auto_https off
                grace_period 2s
                servers {{
                    protocols h1 h2
                }}
            }}

            (matrix) {{
                bind {HOST}
                {access}
                reverse_proxy /_matrix/* {upstream}
                reverse_proxy /_synapse/client/* {upstream}
            }}

            http://:{self.plain_port} {{
                import matrix
            }}

            https://:{self.tls_port} {{
                tls {cert} {key}
                import matrix
            }}
            """
        )
        # Indented with tabs, as ``caddy fmt`` does, or Caddy warns.
        return re.sub(r"(?m)^(?: {4})+", lambda m: "\t" * (len(m[0]) // 4), text)

    def argv(self, config: Path) -> list[str]:
        state = self.run.subdir("caddy-state")
        return [
            "env",
            f"XDG_DATA_HOME={state}",
            f"XDG_CONFIG_HOME={state}",
            "GOMAXPROCS=1",
            "caddy", "run", "--config", str(config), "--adapter", "caddyfile",
        ]  # fmt: skip


@dataclass
class Floor(Proxy):
    """One of bench/floors.py's stand-ins: what CPython and Twisted cost
    before any proxy feature. Throughput scenarios only."""

    throughput_only = True

    def config_text(self, upstream_port: int) -> str:
        return f"{upstream_port}\n"

    def argv(self, config: Path) -> list[str]:
        cert, key, _ = self.cert
        upstream_port = config.read_text().strip()
        script = Path(__file__).with_name("floors.py")
        return [
            sys.executable,
            str(script),
            self.name,
            str(self.plain_port),
            str(self.tls_port),
            str(cert),
            str(key),
            upstream_port,
        ]


@dataclass
class RawProxyFloor(Floor):
    name: str = "raw-proxy"


@dataclass
class TwistedWebFloor(Floor):
    name: str = "twisted-web"


PROXY_CLASSES: dict[str, type[Proxy]] = {
    "matrix-edge": MatrixEdge,
    "nginx": Nginx,
    "haproxy": HAProxy,
    "caddy": Caddy,
    "raw-proxy": RawProxyFloor,
    "twisted-web": TwistedWebFloor,
}
PROXY_PORTS = {
    "matrix-edge": (24100, 24101),
    "nginx": (24200, 24201),
    "haproxy": (24300, 24301),
    "caddy": (24600, 24601),
    "raw-proxy": (24400, 24401),
    "twisted-web": (24500, 24501),
}


def ports_in_use() -> list[int]:
    """Those of the suite's ports that something else is listening on."""
    ports = [
        FAST_UPSTREAM_PORT,
        SLOW_UPSTREAM_PORT,
        *(p for pair in PROXY_PORTS.values() for p in pair),
    ]
    busy = []
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((HOST, port))
            except OSError:
                busy.append(port)
    return busy


def make_proxy(
    name: str,
    run: RunDir,
    cert: tuple[Path, Path, Path],
    access_log: bool,
    processes: int = 1,
    workers: bool = False,
) -> Proxy:
    plain, tls = PROXY_PORTS[name]
    proxy = PROXY_CLASSES[name](
        run=run, cert=cert, access_log=access_log, plain_port=plain, tls_port=tls
    )
    if isinstance(proxy, MatrixEdge):
        proxy.processes = processes
        proxy.workers = workers
    return proxy
