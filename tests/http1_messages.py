"""HTTP/1.1 requests to send and the responses read back, shared by the
in-memory and the socket tests of the edge's HTTP/1.1 framing."""

from __future__ import annotations

import json

import attrs

VERSIONS = b"/_matrix/client/versions"
X = b"/_matrix/client/v3/x"


def get(target: bytes = VERSIONS, extra: bytes = b"", version: bytes = b"1.1"):
    return b"GET %s HTTP/%s\r\nHost: h\r\n%s\r\n" % (target, version, extra)


def post(body: bytes, target: bytes = X, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n%s\r\n%s" % (
        target,
        len(body),
        extra,
        body,
    )


def post_chunked(chunks: bytes, target: bytes = X) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (
        target,
        chunks,
    )


@attrs.define
class Resp:
    version: bytes
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> dict:
        return json.loads(self.body)


def assert_json_error(resp: Resp, status: int) -> None:
    assert resp.status == status, resp
    assert resp.header(b"content-type") == b"application/json"
    assert {"errcode", "error"} <= set(resp.json())


def parse_head(buf: bytes) -> tuple[Resp, bytes] | None:
    """A response head from the front of ``buf`` and what follows it."""
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *lines = head.split(b"\r\n")
    version, code, _ = (status_line + b" ").split(b" ", 2)
    headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines]
    return Resp(version, int(code), headers, b""), rest  # type: ignore[arg-type]
