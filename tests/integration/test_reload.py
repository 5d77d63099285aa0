"""SIGHUP applies every change to the configuration, as ``nginx -s reload``
does, and loses nothing: clients sending requests in a loop through the
reloads see no error and no refused connection, a long-poll in flight
finishes on the configuration it started with, new requests use the new
one, and a file that does not validate changes nothing."""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import attrs
import pytest
from cryptography import x509

from tests import processes
from tests.pki import make_pki
from tests.rawhttp import read_response

LONG_POLL = b"GET /_matrix/slow?s=3 HTTP/1.1\r\nHost: x\r\n\r\n"


@attrs.define
class Loop:
    """Requests to ``port`` in a loop from a thread, on one keep-alive
    connection (as a client library sends them) or a new connection each
    (as curl in a shell loop), counting which upstream answered."""

    port: int
    keep_alive: bool
    answered_by: Counter[str] = attrs.Factory(Counter)
    errors: list[str] = attrs.Factory(list)
    _stop: threading.Event = attrs.Factory(threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Loop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    def _run(self) -> None:
        connection = None
        while not self._stop.is_set():
            if connection is None or not self.keep_alive:
                connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=10
                )
            try:
                connection.request("GET", "/_matrix/client/versions")
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                connection.close()
                connection = None
                continue
            if response.status != 200:
                self.errors.append(f"status {response.status}")
            self.answered_by[response.getheader("X-Upstream") or "?"] += 1
            if not self.keep_alive:
                connection.close()
        if connection is not None:
            connection.close()


def answered_by(port: int) -> str | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/_matrix/client/versions")
        response = connection.getresponse()
        response.read()
        return response.getheader("X-Upstream")
    finally:
        connection.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def listener(port: int, **settings: object) -> dict[str, object]:
    return {"port": port, "bind_addresses": ["127.0.0.1"], **settings}


@pytest.mark.parametrize("edge_processes", [1, 2])
def test_sighup_applies_every_change_and_loses_nothing(
    tmp_path: Path, edge_processes: int
) -> None:
    ports = {name: processes.free_port() for name in ("a", "b", "edge", "added")}
    upstreams = [
        processes.start_upstream(ports[name], tmp_path / f"{name}.log", name=name)
        for name in ("a", "b")
    ]
    config_path = tmp_path / "edge.yaml"

    def write(document: dict[str, object]) -> None:
        processes.write_config(config_path, {"processes": edge_processes, **document})

    first = {
        "listeners": [listener(ports["edge"])],
        "upstream": f"http://127.0.0.1:{ports['a']}",
    }
    write(first)
    edge = processes.start_edge(
        config_path, tmp_path / "edge.log", wait=("127.0.0.1", ports["edge"])
    )
    loops = [Loop(ports["edge"], keep_alive=k).start() for k in (True, False, False)]
    try:
        processes.wait_until(lambda: all(loop.answered_by["a"] > 20 for loop in loops))
        polling = socket.create_connection(("127.0.0.1", ports["edge"]), timeout=10)
        polling.sendall(LONG_POLL)
        time.sleep(0.5)  # the long-poll reaches upstream a

        # Another upstream, a listener more, other timeouts and well-known.
        second = {
            "listeners": [listener(ports["edge"]), listener(ports["added"])],
            "upstream": f"http://127.0.0.1:{ports['b']}",
            "timeouts": {"request_headers": "20s"},
            "well_known": {"server": "matrix.example.org:443"},
        }
        write(second)
        edge.popen.send_signal(signal.SIGHUP)
        processes.wait_until(lambda: answered_by(ports["edge"]) == "b")
        processes.wait_until(lambda: not refused(ports["added"]))
        assert answered_by(ports["added"]) == "b"
        # The long-poll finishes where it started, as its connection's last.
        answer = read_response(polling)
        assert (answer.status, answer.body) == (200, b'{"slow": true}')
        assert answer.header("X-Upstream") == "a"
        log = edge.log()
        assert (
            "listeners, upstream, timeouts.request_headers, well_known.server now in effect"
            in log
        ), log

        # A file that does not validate changes nothing.
        config_path.write_text("upstream: 12\n")
        edge.popen.send_signal(signal.SIGHUP)
        processes.wait_until(lambda: "Not reloading" in edge.log())
        assert answered_by(ports["edge"]) == "b"
        assert answered_by(ports["added"]) == "b"

        # A listener taken away stops listening; the others carry on.
        write({**second, "listeners": [listener(ports["edge"])]})
        edge.popen.send_signal(signal.SIGHUP)
        processes.wait_until(lambda: refused(ports["added"]))
        time.sleep(1)
    finally:
        for loop in loops:
            loop.stop()
        edge.stop()
        for upstream in upstreams:
            upstream.stop()

    for loop in loops:
        kind = "keep-alive" if loop.keep_alive else "new connections"
        print(f"{kind}: {dict(loop.answered_by)}, errors: {loop.errors}")
        assert loop.errors == [], loop.errors
        assert loop.answered_by["a"] > 20 and loop.answered_by["b"] > 20
    assert "Traceback" not in edge.log()


def test_a_file_that_does_not_validate_still_lets_certificates_renew(
    tmp_path: Path,
) -> None:
    """Renewed certificate files (certbot's deploy hook, or the edge's own
    ACME client) are put in service by SIGHUP even while the configuration
    file holds an unrelated mistake: the configuration stays as it runs,
    the files are re-read."""
    pki = make_pki(tmp_path / "pki")
    chain, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    pki.leaf.install(chain, key)
    port, upstream_port = processes.free_port(), processes.free_port()
    upstream = processes.start_upstream(upstream_port, tmp_path / "upstream.log")
    config = {
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "tls": {"certificate_path": str(chain), "private_key_path": str(key)},
            }
        ],
        "upstream": f"http://127.0.0.1:{upstream_port}",
    }
    config_path = processes.write_config(tmp_path / "edge.yaml", config)
    edge = processes.start_edge(config_path, tmp_path / "edge.log", ("127.0.0.1", port))

    def serial() -> int:
        context = ssl.create_default_context(cafile=str(pki.ca_cert_path))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            der = sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    try:
        before = serial()
        renewed = pki.issue_leaf("renewed")
        renewed.install(chain, key)
        config_path.write_text(config_path.read_text() + "typo_key: 1\n")
        edge.popen.send_signal(signal.SIGHUP)
        processes.wait_until(lambda: "Not reloading" in edge.log())
        assert "certificates and the access log re-read" in edge.log()
        after = serial()
        assert after != before
        assert after == renewed.certificate.serial_number
    finally:
        edge.stop()
        upstream.stop()
