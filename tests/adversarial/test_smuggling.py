"""Request smuggling shapes (report items 3 and 4): framing headers the edge
must refuse, and Connection tokens, checked against the exact bytes the
upstream received."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.adversarial.wire import Conn
from tests.http1_messages import assert_json_error, get

SMUGGLED = b"GET /_matrix/client/v3/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"


async def settle() -> None:
    await deferLater(reactor, 0.2, lambda: None)


async def warm(stack) -> None:
    """One request first, so that a pooled connection to Synapse is there
    to take at once whatever the edge would forward."""

    def run():
        with Conn(stack.port) as conn:
            conn.send(get(b"/_matrix/client/v3/warm"))
            return conn.response()

    assert (await deferToThread(run)).status == 200


# Item 3: Transfer-Encoding other than chunked ---------------------------------


@pytest.mark.parametrize(
    "coding",
    [b"identity", b"Identity", b"identity ", b"gzip", b"identity, chunked"],
)
@pytest_twisted.ensureDeferred
async def test_transfer_encoding_identity_with_a_body_is_refused(
    edge, tracebacks, coding
):
    """RFC 9112 section 6.3: a Transfer-Encoding whose last coding is not
    chunked makes a request's length unknowable: 400, nothing forwarded,
    and the body is never read as a request of its own."""
    stack = edge()
    await warm(stack)
    raw = (
        b"POST /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n"
        b"Transfer-Encoding: %s\r\n\r\n%s" % (coding, SMUGGLED)
    )

    def run():
        with Conn(stack.port) as conn:
            conn.send(raw)
            first = conn.response()
            return first, conn.closed()

    first, closed = await deferToThread(run)
    assert_json_error(first, 400)
    assert closed
    await settle()
    assert [r.target for r in stack.upstream.requests] == [b"/_matrix/client/v3/warm"]
    assert tracebacks == []


# Item 4: Connection tokens ----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"keep-alive,close",
        b"keep-alive, close",
        b"keep-alive ,\tclose",
        b"Keep-Alive,Close",
        b"x-foo,close",
        b"close,keep-alive",
    ],
)
@pytest_twisted.ensureDeferred
async def test_close_among_connection_tokens_closes(edge, value):
    """``close`` is a token of a comma-separated list, with optional
    whitespace around commas: the connection ends after the response, and a
    request pipelined behind it is never forwarded."""
    stack = edge()
    await warm(stack)
    raw = get(b"/_matrix/client/v3/a", b"Connection: %s\r\n" % value)
    raw += get(b"/_matrix/client/v3/after-close")

    def run():
        with Conn(stack.port) as conn:
            conn.send(raw)
            first = conn.response()
            return first, conn.closed()

    first, closed = await deferToThread(run)
    assert first.status == 200
    assert first.header(b"connection") == b"close"
    assert closed
    await settle()
    targets = [r.target for r in stack.upstream.requests]
    assert targets == [b"/_matrix/client/v3/warm", b"/_matrix/client/v3/a"]


@pytest.mark.parametrize(
    "value",
    [
        b"Host",
        b"host",
        b" HOST ",
        b"keep-alive, Host",
        b"Host, X-Forwarded-For, X-Forwarded-Proto, X-Request-ID",
        b"Content-Length, Transfer-Encoding, Host",
        b"X-Forwarded-For, X-Forwarded-Proto, X-Request-ID",
        b"Content-Length, Transfer-Encoding",
        b"Authorization-Not",
    ],
)
@pytest_twisted.ensureDeferred
async def test_connection_never_removes_what_the_edge_forwards(edge, value):
    """A Connection header may name end-to-end fields to drop, but never
    Host, nor the fields the edge sets itself (X-Forwarded-*, the request
    ID, the body's framing): the upstream's bytes, exactly."""
    stack = edge()
    body = b'{"msgtype":"m.text"}'
    raw = (
        b"PUT /_matrix/client/v3/rooms/%%21r%%3Ah/send/m.room.message/1 HTTP/1.1\r\n"
        b"Host: matrix.example.org:8448\r\n"
        b"Connection: %s\r\n"
        b"Authorization: Bearer tok\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (value, len(body), body)
    )

    def run():
        with Conn(stack.port) as conn:
            conn.send(raw)
            return conn.response()

    answer = await deferToThread(run)
    assert answer.status == 200
    [rec] = stack.upstream.requests
    [request_id] = rec.headers(b"x-request-id")
    assert rec.head == (
        b"PUT /_matrix/client/v3/rooms/%21r%3Ah/send/m.room.message/1 HTTP/1.1\r\n"
        b"Host: matrix.example.org:8448\r\n"
        b"Authorization: Bearer tok\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Request-ID: " + request_id + b"\r\n"
        b"Content-Length: %d" % len(body)
    )
    assert rec.complete and rec.body_length == len(body)


@pytest_twisted.ensureDeferred
async def test_connection_removes_a_listed_end_to_end_field(edge):
    """What Connection may legitimately do: drop the fields it names."""
    stack = edge()
    raw = get(
        b"/_matrix/client/v3/a",
        b"Connection: X-Hop, keep-alive\r\nX-Hop: 1\r\nX-Kept: 2\r\n",
    )

    def run():
        with Conn(stack.port) as conn:
            conn.send(raw)
            return conn.response()

    assert (await deferToThread(run)).status == 200
    [rec] = stack.upstream.requests
    [request_id] = rec.headers(b"x-request-id")
    assert rec.head == (
        b"GET /_matrix/client/v3/a HTTP/1.1\r\nHost: h\r\nX-Kept: 2\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Request-ID: " + request_id
    )


# Pipelining: a refusal keeps its place ----------------------------------------


@pytest.mark.parametrize(
    "refused",
    [
        b"POST /_matrix/client/v3/b HTTP/1.1\r\nHost: h\r\n"
        b"Transfer-Encoding: identity\r\n\r\n",
        b"GET /_matrix/client/v3/b HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
        b"Upgrade: h2c\r\nContent-Length: 1\r\n\r\nx",
    ],
    ids=["transfer-encoding-identity", "upgrade-with-body"],
)
@pytest_twisted.ensureDeferred
async def test_pipelined_refusal_keeps_the_answer_before_it(edge, refused):
    """A request pipelined behind another, refused in its head: the request
    before it, which the upstream received whole, is answered with the
    upstream's answer, and the refusal comes after it (RFC 9112 section
    9.3.2: responses in the order of the requests)."""
    stack = edge()
    await warm(stack)
    raw = get(b"/_matrix/client/v3/a") + refused

    def run():
        with Conn(stack.port) as conn:
            conn.send(raw)
            first = conn.response()
            return first, conn.response() if first.status == 200 else None

    first, second = await deferToThread(run)
    await settle()
    targets = [r.target for r in stack.upstream.requests]
    assert targets == [b"/_matrix/client/v3/warm", b"/_matrix/client/v3/a"]
    assert first.status == 200, f"the forwarded request was answered {first}"
    assert second is not None
    assert_json_error(second, 400)
