"""A renewal as a Let's Encrypt deployment does it, with the edge not root.

certbot (here, the test, as root) writes the renewed certificate into its
own 0700 ``live/`` directory and runs the deploy hook the project ships,
``etc/letsencrypt/deploy-hook``: it copies the pair to a directory whose key
only the edge's group may read, then sends the reload. The edge runs as
``nobody`` with that group alone, without any capability. New connections
must get the renewed certificate, and a connection made before must go on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests import processes
from tests.pki import Leaf, make_pki

HOOK = processes.REPO / "etc" / "letsencrypt" / "deploy-hook"
NOBODY = 65534
# A group no account uses: the edge's stand-in for Debian's ssl-cert.
EDGE_GROUP = 54321

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root (certbot's side) and setpriv (the edge's side)",
)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory ``nobody`` can enter (pytest's own are root's only)."""
    path = Path(tempfile.mkdtemp(prefix="edge-renewal-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def certbot_writes(live: Path, leaf: Leaf) -> None:
    """What certbot leaves in ``live/<name>/``: root's, and only root's."""
    live.mkdir(parents=True, exist_ok=True)
    live.parent.chmod(0o700)
    shutil.copyfile(leaf.chain_path, live / "fullchain.pem")
    shutil.copyfile(leaf.key_path, live / "privkey.pem")
    (live / "privkey.pem").chmod(0o600)


def run_hook(live: Path, tls_dir: Path, reload: str) -> None:
    env = dict(
        os.environ,
        RENEWED_LINEAGE=str(live),
        MATRIX_EDGE_TLS_DIR=str(tls_dir),
        MATRIX_EDGE_TLS_GROUP=str(EDGE_GROUP),
        MATRIX_EDGE_RELOAD=reload,
    )
    subprocess.run([str(HOOK)], env=env, check=True, timeout=30)


def served_certificate(port: int, ca: Path) -> x509.Certificate:
    with connect(port, ca) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def connect(port: int, ca: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def get_health(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return sock.recv(65536)


def test_a_renewal_reaches_an_unprivileged_edge(base: Path) -> None:
    pki = make_pki(base / "pki")
    live = base / "letsencrypt" / "live" / "matrix.example.org"
    tls_dir = base / "matrix-edge-tls"
    certbot_writes(live, pki.leaf)
    run_hook(live, tls_dir, reload="true")

    key = tls_dir / "privkey.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o640
    assert key.stat().st_gid == EDGE_GROUP
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o750

    port = processes.free_port()
    config = processes.write_config(
        base / "edge.yaml",
        {
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "client",
                    "tls": {
                        "certificate_path": str(tls_dir / "fullchain.pem"),
                        "private_key_path": str(key),
                    },
                }
            ],
            "upstream": "http://127.0.0.1:8008",
        },
    )
    (base / "edge.yaml").chmod(0o644)
    edge = processes.start(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            f"--groups={EDGE_GROUP}",
            "--inh-caps=-all",
            "--bounding-set=-all",
            processes.TWISTD,
            "-n",
            "--pidfile=",
            "matrix-edge",
            "--config",
            str(config),
        ],
        base / "edge.log",
    )
    try:
        processes.wait_for_port(port, process=edge.popen)
        assert served_certificate(port, pki.ca_cert_path) == pki.leaf.certificate
        # Certbot's own directory is out of the edge's reach: the copy is
        # what makes the renewal readable.
        probe = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                f"--groups={EDGE_GROUP}",
                "cat",
                str(live / "privkey.pem"),
            ],
            capture_output=True,
        )
        assert probe.returncode != 0

        old = connect(port, pki.ca_cert_path)
        try:
            assert get_health(old).startswith(b"HTTP/1.1 200")

            renewed = pki.issue_leaf("renewed", organization="renewed")
            certbot_writes(live, renewed)
            run_hook(live, tls_dir, reload=f"kill -HUP {edge.pid}")

            deadline = time.monotonic() + 20
            while served_certificate(port, pki.ca_cert_path) != renewed.certificate:
                assert time.monotonic() < deadline, edge.log()
                time.sleep(0.1)
            # The connection made before the renewal carries on, on the
            # certificate it was made with.
            assert get_health(old).startswith(b"HTTP/1.1 200")
            der = old.getpeercert(binary_form=True)
            assert der is not None
            assert x509.load_der_x509_certificate(der) == pki.leaf.certificate
        finally:
            old.close()
        assert edge.popen.poll() is None
        assert "Traceback" not in edge.log()
    finally:
        edge.popen.send_signal(signal.SIGTERM)
        edge.stop()
