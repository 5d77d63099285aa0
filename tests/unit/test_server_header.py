"""The Server header: the edge's own answers name matrix-edge (or what
``server_header`` says, or nothing), over HTTP/1.1 and HTTP/2, while
responses from Synapse keep Synapse's."""

from __future__ import annotations

import h2.events
import pytest

from tests.h2_harness import H2Harness
from tests.unit.test_site import make_harness

SYNAPSE = (
    b"HTTP/1.1 200 OK\r\nServer: Synapse/1.120.0\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)
FROM_SYNAPSE = b"/_matrix/client/versions"


def _servers(response: bytes) -> list[bytes]:
    head = response.partition(b"\r\n\r\n")[0]
    return [
        line.partition(b": ")[2]
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"server:")
    ]


# HTTP/1.1 -------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/health",  # a local resource
        b"/nowhere",  # the edge's 404
        b"/_synapse/admin/v1/users",  # refused by routing
    ],
)
def test_the_edges_own_answers_name_it(target):
    h = make_harness()
    h.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    h.clock.advance(0)
    assert _servers(h.response()) == [b"matrix-edge"]
    assert b"TwistedWeb" not in h.response()


def test_a_gateway_timeout_names_the_edge():
    h = make_harness(timeouts={"upstream_response": "10s"})
    h.send(b"GET " + FROM_SYNAPSE + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    h.connect_upstream()
    h.clock.advance(11)
    assert h.response().startswith(b"HTTP/1.1 504 ")
    assert _servers(h.response()) == [b"matrix-edge"]


def test_a_malformed_request_is_answered_with_it():
    h = make_harness(server_header="edge.example")
    h.send(b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n")
    assert h.response().startswith(b"HTTP/1.1 400 ")
    assert _servers(h.response()) == [b"edge.example"]


def test_synapse_keeps_its_own_server_header():
    h = make_harness()
    h.send(b"GET " + FROM_SYNAPSE + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    h.connect_upstream()
    h.upstream_says(SYNAPSE)
    assert _servers(h.response()) == [b"Synapse/1.120.0"]


def test_a_synapse_response_without_one_gets_none():
    h = make_harness()
    h.send(b"GET " + FROM_SYNAPSE + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    h.connect_upstream()
    h.upstream_says(SYNAPSE.replace(b"Server: Synapse/1.120.0\r\n", b""))
    assert _servers(h.response()) == []


@pytest.mark.parametrize("setting", [False, ""])
@pytest.mark.parametrize("target", [b"/health", b"/nowhere"])
def test_none_when_turned_off(setting, target):
    h = make_harness(server_header=setting)
    h.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    h.clock.advance(0)
    assert h.response().startswith(b"HTTP/1.1 ")
    assert _servers(h.response()) == []


# HTTP/2 ---------------------------------------------------------------------


def _h2_servers(h: H2Harness, stream_id: int) -> list[bytes]:
    [response] = [
        event
        for event in h.events
        if isinstance(event, h2.events.ResponseReceived)
        and event.stream_id == stream_id
    ]
    return [value for name, value in response.headers if name == b"server"]


@pytest.mark.parametrize("path", [b"/health", b"/nowhere", b"/_synapse/admin/v1/x"])
def test_h2_the_edges_own_answers_name_it(path):
    h = H2Harness()
    stream_id = h.request(b"GET", path)
    h.clock.advance(0)
    h.receive()
    assert _h2_servers(h, stream_id) == [b"matrix-edge"]


def test_h2_synapse_keeps_its_own_server_header():
    h = H2Harness()
    stream_id = h.request(b"GET", FROM_SYNAPSE)
    h.connect_upstream()
    h.upstream_says(SYNAPSE)
    assert h.response(stream_id)[:3] == (200, b"{}", True)
    assert _h2_servers(h, stream_id) == [b"Synapse/1.120.0"]


def test_h2_none_when_turned_off():
    h = H2Harness(server_header=False)
    stream_id = h.request(b"GET", b"/health")
    h.clock.advance(0)
    h.receive()
    assert h.response(stream_id)[0] == 200
    assert _h2_servers(h, stream_id) == []
