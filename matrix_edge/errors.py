"""Matrix-style JSON errors for every response matrix-edge makes itself."""

from __future__ import annotations

import json
import math

import attrs
from twisted.web.http import RESPONSES

# The CORS headers Synapse puts on its own responses, so that browser
# clients can read the errors the edge answers in its place.
CORS_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Allow-Methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    (
        b"Access-Control-Allow-Headers",
        b"X-Requested-With, Content-Type, Authorization, Date",
    ),
    (b"Access-Control-Expose-Headers", b"Synapse-Trace-Id, Server"),
)


# Phrases of RFC 9110 that Twisted's table lacks or words otherwise.
_PHRASES = {
    408: b"Request Timeout",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}


def reason_phrase(code: int) -> bytes:
    return _PHRASES.get(code) or RESPONSES.get(code, b"Error")


@attrs.frozen
class MatrixError:
    """An error response: HTTP status, Matrix ``errcode`` and a message."""

    code: int
    errcode: str
    msg: str
    retry_after: float | None = None
    """Seconds, sent as ``Retry-After``."""

    def body(self) -> bytes:
        document: dict[str, object] = {"errcode": self.errcode, "error": self.msg}
        if self.errcode == "M_LIMIT_EXCEEDED" and self.retry_after is not None:
            document["retry_after_ms"] = round(self.retry_after * 1000)
        return json.dumps(document).encode()


def bad_request(msg: str) -> MatrixError:
    return MatrixError(400, "M_UNKNOWN", msg)


def not_found() -> MatrixError:
    return MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")


def forbidden(msg: str) -> MatrixError:
    return MatrixError(403, "M_FORBIDDEN", msg)


def unavailable(msg: str, retry_after: float) -> MatrixError:
    return MatrixError(503, "M_UNKNOWN", msg, retry_after=retry_after)


def limit_exceeded(retry_after: float) -> MatrixError:
    """Too many requests for the process that would take this one."""
    return MatrixError(
        429, "M_LIMIT_EXCEEDED", "Too many requests", retry_after=retry_after
    )


def too_large(limit: int) -> MatrixError:
    return MatrixError(
        413, "M_TOO_LARGE", f"Request body is larger than the limit of {limit} bytes"
    )


def body_timeout(seconds: float) -> MatrixError:
    """A request body that did not end within ``timeouts.request_body``."""
    return MatrixError(
        408, "M_UNKNOWN", f"The request body did not arrive within {seconds:g}s"
    )


def bad_gateway() -> MatrixError:
    return MatrixError(502, "M_UNKNOWN", "The homeserver could not be reached")


def gateway_timeout() -> MatrixError:
    return MatrixError(504, "M_UNKNOWN", "The homeserver did not answer in time")


def closing_response(error: MatrixError, server: bytes | None) -> bytes:
    """The whole HTTP/1.1 response for ``error``, ending the connection:
    for answers written before there is a request object to answer with
    (a malformed head, plain HTTP on a TLS port)."""
    body = error.body()
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (error.code, reason_phrase(error.code)),
            b"Server: %s\r\n" % server if server is not None else b"",
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n",
            body,
        ]
    )


def error_headers(error: MatrixError) -> list[tuple[bytes, bytes]]:
    """The headers of the edge's answer ``error``, but for its length (the
    client side frames the body) and the request ID (the request adds it)."""
    headers = [
        (b"Content-Type", b"application/json"),
        (b"Cache-Control", b"no-cache, no-store, must-revalidate"),
        *CORS_HEADERS,
    ]
    if error.retry_after is not None:
        headers.append((b"Retry-After", b"%d" % math.ceil(error.retry_after)))
    return headers
