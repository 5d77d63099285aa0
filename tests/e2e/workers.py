"""A Synapse split into workers, behind matrix-edge, for test_e2e_workers.py.

    hs4.test  127.0.0.5   edge :443 + :8448
                            -> main process         :8008 (replication :9093)
                            -> synchrotron1         :8083
                            -> synchrotron2         :8084
                            -> client_reader1       :8085
                            -> event_creator1       :8086
                          redis-server (Debian's)   :<free port>

The main process and the workers replicate over a redis-server of the
suite's own (never the system's service), on the same loopback address.
Every Synapse process writes its client listener's access log
(``synapse.access.http.<port>``) to a file of its own, so a test can tell
which process served a request by a marker it put in the query string.

The edge is configured with a ``workers:`` section naming a pool per role
(synchrotron, client_reader, event_creator); everything else goes to the
main process, its ``upstream``.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from tests.e2e.homeserver import SYNAPSE_PORT, Homeserver, edge_argv, http_ok
from tests.e2e.processes import Process, ProcessGroup, wait_for

MAIN = "main"
REPLICATION_PORT = 9093
STARTUP_TIMEOUT = 90.0
REDIS_TIMEOUT = 15.0
ACCESS_LOG_WAIT = 10.0
ROUTE_COMMAND_TIMEOUT = 60.0
MARKER_PARAMETER = "e2e_marker"


@attrs.frozen
class WorkerSpec:
    name: str  # Synapse's worker_name
    port: int
    pool: str  # the edge's pool it belongs to


DEFAULT_WORKERS = (
    WorkerSpec("synchrotron1", 8083, "synchrotron"),
    WorkerSpec("synchrotron2", 8084, "synchrotron"),
    WorkerSpec("client_reader1", 8085, "client_reader"),
    WorkerSpec("event_creator1", 8086, "event_creator"),
)


# -- redis ---------------------------------------------------------------


@attrs.define
class Redis:
    """A redis-server of our own: no persistence, in the foreground, on a
    free port of a loopback address, stopped by PID with the rest."""

    binary: Path
    ip: str
    directory: Path
    port: int = 0
    process: Process | None = None

    def start(self, group: ProcessGroup) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.ip)
        self.process = group.start(
            "redis",
            [
                str(self.binary),
                "--bind",
                self.ip,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
            ],
            cwd=self.directory,
        )
        assert self.process is not None
        wait_for(
            f"redis-server on {self.ip}:{self.port}",
            self.ping,
            REDIS_TIMEOUT,
            watch=[self.process],
        )

    def ping(self) -> bool | None:
        with socket.create_connection((self.ip, self.port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return True if s.recv(64).startswith(b"+PONG") else None


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


# -- access logs -----------------------------------------------------------

# What Synapse's access logger writes at the end of each request
# (synapse/http/site.py), after our formatter's prefix:
# <client> - <tag> - {<user>} Processed request: ... <status> "<method> <uri> <proto>"
_ACCESS_LINE = re.compile(
    r" - (?P<client>[^ ]+) - (?P<tag>[^ ]+) - \{[^}]*\} Processed request: .*?"
    r' (?P<status>\d{3}!?) "(?P<method>\S+) (?P<uri>\S+) [^"]*"'
)


@attrs.frozen
class Landing:
    """One request as a Synapse process logged it."""

    process: str  # "main" or a worker's name
    client: str  # the client address Synapse believed
    status: str
    method: str
    uri: str


def read_access_log(process: str, path: Path) -> list[Landing]:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    landings = []
    for line in text.splitlines():
        match = _ACCESS_LINE.search(line)
        if match:
            landings.append(
                Landing(
                    process,
                    match["client"],
                    match["status"],
                    match["method"],
                    match["uri"],
                )
            )
    return landings


def new_marker() -> str:
    return secrets.token_hex(8)


def with_marker(path: str, marker: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}{MARKER_PARAMETER}={marker}"


def _log_config(access_logger: str, access_log: Path) -> dict[str, Any]:
    """Synapse's logging: everything to stderr (the process log), and the
    access lines of the client listener to a file of their own as well."""
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(message)s"
            },
        },
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "precise"},
            "access": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(access_log),
                "encoding": "utf8",
            },
        },
        "loggers": {
            "synapse.storage.SQL": {"level": "INFO"},
            access_logger: {"level": "INFO", "handlers": ["access"]},
        },
        "root": {"level": "INFO", "handlers": ["console"]},
        "disable_existing_loggers": False,
    }


# -- Synapse workers -----------------------------------------------------


@attrs.define
class SynapseWorker:
    """One synapse.app.generic_worker process."""

    spec: WorkerSpec
    ip: str
    directory: Path
    process: Process | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.spec.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / f"{self.name}.yaml"

    @property
    def log_config_path(self) -> Path:
        return self.directory / f"{self.name}.log.yaml"

    @property
    def access_log_path(self) -> Path:
        return self.directory / f"{self.name}.access.log"

    def write_config(self) -> None:
        self.log_config_path.write_text(
            yaml.safe_dump(
                _log_config(
                    f"synapse.access.http.{self.spec.port}", self.access_log_path
                ),
                sort_keys=False,
            )
        )
        worker = {
            "worker_app": "synapse.app.generic_worker",
            "worker_name": self.name,
            "worker_listeners": [
                {
                    "type": "http",
                    "port": self.spec.port,
                    "bind_addresses": [self.ip],
                    "tls": False,
                    "x_forwarded": True,
                    "resources": [
                        {"names": ["client", "federation"], "compress": False}
                    ],
                }
            ],
            "worker_log_config": str(self.log_config_path),
        }
        self.config_path.write_text(yaml.safe_dump(worker, sort_keys=False))

    def start(
        self, group: ProcessGroup, synapse_python: Path, main_config: Path, label: str
    ) -> None:
        self.process = group.start(
            f"{label}-{self.name}",
            [
                str(synapse_python),
                "-m",
                "synapse.app.generic_worker",
                "--config-path",
                str(main_config),
                "--config-path",
                str(self.config_path),
            ],
            cwd=self.directory,
        )

    def healthy(self) -> bool | None:
        return http_ok(f"{self.url}/health")

    def wait_ready(self, watch: Sequence[Process] = ()) -> None:
        assert self.process is not None
        wait_for(
            f"Synapse worker {self.name} at {self.url}/health",
            self.healthy,
            STARTUP_TIMEOUT,
            watch=[self.process, *watch],
        )

    def stop(self, group: ProcessGroup) -> int:
        """SIGTERM, and wait for it to exit; its exit status."""
        assert self.process is not None
        return group.stop(self.process)


# -- the homeserver --------------------------------------------------------


@attrs.define
class WorkersHomeserver(Homeserver):
    """A Homeserver whose Synapse is a main process plus generic workers,
    with a ``workers:`` section in the edge's configuration."""

    worker_specs: Sequence[WorkerSpec] = DEFAULT_WORKERS
    redis_port: int = 0
    workers: dict[str, SynapseWorker] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.workers = {
            spec.name: SynapseWorker(spec, self.ip, self.directory)
            for spec in self.worker_specs
        }

    @property
    def main_url(self) -> str:
        return self.synapse_url

    @property
    def main_access_log_path(self) -> Path:
        return self.directory / "main.access.log"

    @property
    def main_log_config_path(self) -> Path:
        return self.directory / "main.log.yaml"

    def pool_members(self, pool: str) -> list[SynapseWorker]:
        return [w for w in self.workers.values() if w.spec.pool == pool]

    def process_for_url(self, url: str) -> str:
        """``main`` or the worker's name for an upstream address."""
        if url.rstrip("/") == self.main_url:
            return MAIN
        for worker in self.workers.values():
            if url.rstrip("/") == worker.url:
                return worker.name
        raise LookupError(url)

    # -- configuration -------------------------------------------------

    def synapse_config(self) -> dict[str, Any]:
        config = super().synapse_config()
        config["listeners"].append(
            {
                "port": REPLICATION_PORT,
                "bind_addresses": [self.ip],
                "type": "http",
                "tls": False,
                "resources": [{"names": ["replication"]}],
            }
        )
        config["instance_map"] = {MAIN: {"host": self.ip, "port": REPLICATION_PORT}}
        config["redis"] = {"enabled": True, "host": self.ip, "port": self.redis_port}
        config["log_config"] = str(self.main_log_config_path)
        return config

    def edge_config(self) -> dict[str, Any]:
        config = super().edge_config()
        pools: dict[str, list[str]] = {}
        for worker in self.workers.values():
            pools.setdefault(worker.spec.pool, []).append(worker.url)
        config["workers"] = {"pools": pools}
        return config

    def write_configs(self) -> None:
        if not self.redis_port:
            raise AssertionError("start redis before writing Synapse's config")
        super().write_configs()
        self.main_log_config_path.write_text(
            yaml.safe_dump(
                _log_config(
                    f"synapse.access.http.{SYNAPSE_PORT}", self.main_access_log_path
                ),
                sort_keys=False,
            )
        )
        for worker in self.workers.values():
            worker.write_config()

    # -- processes -----------------------------------------------------

    def start_all(self, group: ProcessGroup, synapse_python: Path) -> None:
        """The main process first (it prepares the database the workers
        check at startup), then the workers together, then the edge; wait
        until each answers."""
        self.start_synapse(group, synapse_python)
        assert self.synapse is not None
        wait_for(
            f"Synapse main process at {self.synapse_url}/health",
            lambda: http_ok(f"{self.synapse_url}/health"),
            STARTUP_TIMEOUT,
            watch=[self.synapse],
        )
        for worker in self.workers.values():
            self.start_worker(group, synapse_python, worker.name)
        for worker in self.workers.values():
            worker.wait_ready(watch=[self.synapse])
        self.start_edge(group)
        self.wait_ready()

    def start_worker(
        self, group: ProcessGroup, synapse_python: Path, name: str
    ) -> None:
        self.workers[name].start(
            group, synapse_python, self.synapse_config_path, self.label
        )

    def stop_all(self, group: ProcessGroup) -> None:
        """Stop the edge, the workers, then the main process, by PID."""
        processes = [
            self.edge,
            *(w.process for w in self.workers.values()),
            self.synapse,
        ]
        for process in processes:
            if process is not None:
                group.stop(process)

    # -- what happened where ---------------------------------------------

    def access_logs(self) -> dict[str, Path]:
        return {
            MAIN: self.main_access_log_path,
            **{name: w.access_log_path for name, w in self.workers.items()},
        }

    def landings(self, marker: str) -> list[Landing]:
        """Every logged request whose target carries ``marker``."""
        needle = f"{MARKER_PARAMETER}={marker}"
        return [
            landing
            for process, path in self.access_logs().items()
            for landing in read_access_log(process, path)
            if needle in landing.uri
        ]

    def landing(self, marker: str, timeout: float = ACCESS_LOG_WAIT) -> Landing:
        """Where the request carrying ``marker`` was served; exactly one
        Synapse process must have logged it."""
        found = wait_for(
            f"a Synapse access log line with {MARKER_PARAMETER}={marker}",
            lambda: self.landings(marker) or None,
            timeout,
        )
        # A second process logging it late would be a duplicate request.
        time.sleep(0.05)
        found = self.landings(marker)
        if len(found) != 1:
            raise AssertionError(f"request {marker} served more than once: {found}")
        return found[0]

    # -- the edge's own view ---------------------------------------------

    def edge_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            edge_argv(self.edge_config_path, *args),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=ROUTE_COMMAND_TIMEOUT,
            cwd=self.directory,
        )

    def predicted_process(self, method: str, target: str, user_id: str) -> str:
        """Which process ``twistd matrix-edge route`` says a request goes
        to: the address on its ``worker:`` line."""
        result = self.edge_command("route", "--user", user_id, method, target)
        command = f"`matrix-edge route --user {user_id} {method} {target}`"
        if result.returncode != 0:
            raise AssertionError(
                f"{command} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        match = re.search(r"^\s*worker:\s*(\S+)", result.stdout, re.MULTILINE)
        if match is None:
            raise AssertionError(f"{command} named no worker:\n{result.stdout}")
        try:
            return self.process_for_url(match[1])
        except LookupError:
            raise AssertionError(
                f"{command} named an unknown worker:\n{result.stdout}"
            ) from None

    # -- requests through the edge ---------------------------------------

    def edge_request(
        self,
        method: str,
        target: str,
        token: str | None = None,
        body: Any = None,
        source_ip: str | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """One request to the edge's client port over a new TLS connection
        (closed afterwards), from ``source_ip`` if given."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert_path))
        connection = http.client.HTTPSConnection(
            self.server_name,
            443,
            context=context,
            timeout=timeout,
            source_address=(source_ip, 0) if source_ip else None,
        )
        headers = {"Connection": "close"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, target, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")
