"""Malformed, truncated and random input: the edge answers or closes, and
never logs a traceback."""

from __future__ import annotations

import random
import socket

import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

STRUCTURED = [
    b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX: y\r\n\r\n",
    b"GET /_matrix/client/versions HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello",
    b"GET /_matrix/client/versions HTTP/9.9\r\nHost: h\r\n\r\n",
    b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n"
    + b"X-A: b\r\n" * 600
    + b"\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"get /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nshort",
    b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n",  # headers never end
    b"GET /_matrix/client/ver",
]


def _cases() -> list[bytes]:
    rng = random.Random(1)
    cases = list(STRUCTURED)
    template = (
        b"POST /_matrix/client/v3/rooms/%21a%3Ab/send/m.room.message/1 HTTP/1.1\r\n"
        b"Host: h\r\nContent-Length: 2\r\n\r\n{}"
    )
    for _ in range(30):
        cases.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
        mutated = bytearray(template)
        for _ in range(3):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        cases.append(bytes(mutated))
    return cases


def _send_all(port: int, cases: list[bytes]) -> list[bytes]:
    answers = []
    for case in cases:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(case)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            try:
                while chunk := sock.recv(65536):
                    data += chunk
            except ConnectionResetError:
                pass
            answers.append(data)
    return answers


@pytest_twisted.ensureDeferred
async def test_no_traceback_on_bad_input(make_stack):
    stack = make_stack()
    failures = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        answers = await deferToThread(_send_all, stack.port, _cases())
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == []
    # Whatever was answered is HTTP, and every error the edge wrote is JSON.
    for answer in answers:
        if answer:
            assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:60]
            status = answer[9:12]
            if status.startswith(b"4") and b"Content-Type" in answer:
                assert b"Content-Type: application/json" in answer
