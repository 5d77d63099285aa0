"""A blocking HTTP client for tests that must control every byte sent, and
see every byte (or the lack of them) that comes back. Run it in a thread
(``deferToThread``) so the reactor under test keeps running."""

from __future__ import annotations

import http.client
import socket
import ssl

import attrs


@attrs.define
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool
    """False when the connection ended before the body did."""

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def connect(
    port: int,
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 30.0,
) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
    return sock


def read_response(sock: socket.socket, method: str = "GET") -> RawResponse:
    """Read one response from ``sock``, which stays usable for the next."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    complete = True
    try:
        body = response.read()
    except http.client.IncompleteRead as e:
        body, complete = e.partial, False
    except (ConnectionResetError, ConnectionAbortedError):
        body, complete = b"", False
    return RawResponse(
        status=response.status,
        headers=list(response.getheaders()),
        body=body,
        complete=complete,
    )


def exchange(
    port: int,
    raw: bytes,
    host: str = "127.0.0.1",
    method: str = "GET",
    tls: ssl.SSLContext | None = None,
) -> RawResponse:
    """Send ``raw`` as it is, and read one response."""
    with connect(port, host, tls) as sock:
        sock.sendall(raw)
        return read_response(sock, method)


def closed_without_response(port: int, raw: bytes) -> bool:
    """Send ``raw``; True when the server closes without answering."""
    with connect(port) as sock:
        sock.sendall(raw)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
