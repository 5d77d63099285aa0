"""End-to-end fixtures: real Synapse homeservers behind real matrix-edge
processes, on loopback, and real Matrix clients (matrix-nio).

    hs1.test  127.0.0.2   edge :443 + :8448 -> Synapse :8008
    hs2.test  127.0.0.3   edge :443 + :8448 -> Synapse :8008
    hs3.test  127.0.0.4   edge :443 + :8448 -> %xx-decoding shim :8009
                                             -> Synapse :8008
    hs4.test  127.0.0.5   edge :443 + :8448 -> Synapse's main process and
                                             workers (test_e2e_workers.py)

hs1 and hs2 federate normally. hs3 is a fresh homeserver behind a
canonicalising proxy; only the test that expects federation to break there
talks to it, so Synapse's backoff after those failures never touches hs1 to
hs2 traffic.

Synapse and matrix-nio come from a virtualenv the suite builds from the pins
in requirements.txt (see environment.py). Every process is started here,
recorded by PID, and stopped by PID when the session ends, failed or not.
Set MATRIX_EDGE_SKIP_E2E=1 (or use ``-m "not e2e"``) to leave the suite out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import environment
from tests.e2e.clients import Clients
from tests.e2e.homeserver import Homeserver
from tests.e2e.processes import ProcessGroup
from tests.e2e.topology import (
    ALL_HOSTS,
    DECODING_SHIM_HOST,
    HOSTS,
    PASSWORD,
    SHIM_PORT,
    SOURCE_IPS,
    Cluster,
    User,
    Users,
)
from tests.pki import make_pki

MACHINE_LOCK = "/tmp/matrix-edge-e2e.lock"
MACHINE_LOCK_WAIT = 600.0

_running: ProcessGroup | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end tests against real Synapse behind matrix-edge "
        '(slow; deselect with -m "not e2e")',
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    report = yield
    if report.failed and _running is not None and item.get_closest_marker("e2e"):
        report.sections.append(
            (f"e2e logs (all in {_running.log_dir})", _running.tails())
        )
    return report


def _check_host() -> None:
    if os.environ.get("MATRIX_EDGE_SKIP_E2E") == "1":
        pytest.skip("MATRIX_EDGE_SKIP_E2E=1")
    if os.geteuid() != 0:
        pytest.skip(
            "the e2e suite binds ports 443 and 8448 on 127.0.0.2-5 and may edit "
            "/etc/hosts: run it as root"
        )
    missing = [
        f"{ip} {name}\n" for name, ip in ALL_HOSTS.items() if _resolve(name) != ip
    ]
    if missing:
        with open("/etc/hosts", "a+") as hosts:
            hosts.seek(0)
            ends_line = hosts.read().endswith("\n")
            hosts.write(
                ("" if ends_line else "\n")
                + "# matrix-edge e2e suite\n"
                + "".join(missing)
            )
        still = [name for name, ip in ALL_HOSTS.items() if _resolve(name) != ip]
        if still:
            pytest.fail(f"/etc/hosts edited but {still} still do not resolve")


def _resolve(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


@pytest.fixture(scope="session")
def e2e_python() -> Path:
    """The suite's virtualenv python, with pinned Synapse and matrix-nio."""
    _check_host()
    return environment.ensure_venv()


@pytest.fixture(scope="session")
def processes(
    e2e_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcessGroup]:
    global _running
    with _machine_lock():
        log_dir = tmp_path_factory.mktemp("e2e-logs", numbered=True)
        group = ProcessGroup(log_dir)
        _running = group
        try:
            yield group
        finally:
            group.stop_all()


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """One e2e run at a time on a machine: the addresses and ports are
    fixed. A second run waits for the first (bounded)."""
    with open(MACHINE_LOCK, "w") as lock:
        deadline = time.monotonic() + MACHINE_LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"another e2e run held {MACHINE_LOCK} for "
                        f"{MACHINE_LOCK_WAIT:.0f}s"
                    )
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def cluster(
    e2e_python: Path,
    processes: ProcessGroup,
    tmp_path_factory: pytest.TempPathFactory,
) -> Cluster:
    """All three homeservers, started together; hs1 and hs2 are ready. Wait
    for hs3 with the ``hs3`` fixture, so that a broken decoding shim fails
    only the tests that use it."""
    root = tmp_path_factory.mktemp("e2e-homeservers", numbered=True)
    pki = make_pki(root / "pki")
    servers = [
        Homeserver(
            name,
            ip,
            root / name,
            pki,
            shim_port=SHIM_PORT if name == DECODING_SHIM_HOST else None,
        )
        for name, ip in HOSTS.items()
    ]
    started = time.monotonic()
    for server in servers:
        server.write_configs()
        server.start(processes, e2e_python)
    cluster = Cluster(*servers)
    cluster.hs1.wait_ready()
    cluster.hs2.wait_ready()
    print(f"\ne2e: hs1 and hs2 up in {time.monotonic() - started:.1f}s")
    return cluster


@pytest.fixture(scope="session")
def hs3(cluster: Cluster) -> Homeserver:
    """The homeserver behind the %xx-decoding shim, once it answers."""
    cluster.hs3.wait_ready()
    return cluster.hs3


@pytest.fixture(scope="session")
def clients(e2e_python: Path, processes: ProcessGroup, cluster: Cluster) -> Clients:
    return Clients(processes, e2e_python, cluster.hs1.pki.ca_cert_path)


def _log_in(clients: Clients, name: str, server: Homeserver) -> User:
    """Register ``name`` with the shared-secret admin API (Synapse's own
    port), then log in with matrix-nio through the edge."""
    server.register(name, PASSWORD)
    result = clients.call(
        "login",
        name=name,
        server_name=server.server_name,
        user=name,
        password=PASSWORD,
        source_ip=SOURCE_IPS[name],
    )
    assert result["base_url"] == server.client_url, result
    return User(name, result["user_id"], result["device_id"], server)


@pytest.fixture(scope="session")
def users(cluster: Cluster, clients: Clients) -> Users:
    """Alice on hs1, Bob on hs2, and an admin token for hs1's whois."""
    admin = cluster.hs1.register("admin", PASSWORD, admin=True)
    return Users(
        alice=_log_in(clients, "alice", cluster.hs1),
        bob=_log_in(clients, "bob", cluster.hs2),
        hs1_admin_token=admin["access_token"],
    )


@pytest.fixture(scope="session")
def carol(hs3: Homeserver, clients: Clients) -> User:
    """Carol on hs3, behind the decoding shim."""
    return _log_in(clients, "carol", hs3)
