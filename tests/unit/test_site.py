"""The request life cycle on Twisted's in-memory reactor and transports:
exact bytes in, exact bytes out, and a clock the tests move by hand."""

from __future__ import annotations

import json

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from matrix_edge.config.edge import parse_config
from matrix_edge.server.request import LINGER_SECONDS
from matrix_edge.server.site import EdgeSite
from matrix_edge.upstream.client import Upstream


@attrs.define
class Harness:
    clock: MemoryReactorClock
    site: EdgeSite
    client: StringTransport
    channel: object
    upstream: StringTransport | None = None
    upstream_protocol: object = None

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def connect_upstream(self) -> StringTransport:
        """Complete the edge's pending connection to Synapse."""
        host, port, factory, _timeout, _bind = self.clock.tcpClients.pop(0)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        self.upstream, self.upstream_protocol = transport, protocol
        return transport

    def upstream_says(self, data: bytes) -> None:
        self.upstream_protocol.dataReceived(data)

    def response(self) -> bytes:
        return self.client.value()


def make_harness(**overrides) -> Harness:
    document = {
        "listeners": [{"port": 8443, "bind_addresses": ["127.0.0.1"]}],
        "upstream": "http://127.0.0.1:8008",
    }
    document.update(overrides)
    config = parse_config(document)
    clock = MemoryReactorClock()
    upstream = Upstream(
        clock,
        config.upstream,
        config.upstream_pool,
        config.timeouts,
        endpoint=TCP4ClientEndpoint(clock, "127.0.0.1", 8008),
    )
    site = EdgeSite(config.listeners[0], config, upstream, clock)
    channel = site.buildProtocol(IPv4Address("TCP", "203.0.113.7", 50000))
    client = StringTransport(
        peerAddress=IPv4Address("TCP", "203.0.113.7", 50000),
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
    )
    channel.makeConnection(client)
    return Harness(clock, site, client, channel)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def test_request_bytes_and_response_relayed():
    h = make_harness()
    h.send(
        b"GET /_matrix/client/v3/rooms/%21r%3Ah/x? HTTP/1.1\r\n"
        b"Host: hs.example:8443\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    upstream = h.connect_upstream()
    request_id = h.channel._request.request_id.encode()
    assert upstream.value() == (
        b"GET /_matrix/client/v3/rooms/%21r%3Ah/x? HTTP/1.1\r\n"
        b"Host: hs.example:8443\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Request-ID: " + request_id + b"\r\n\r\n"
    )
    h.upstream_says(OK)
    assert h.response().startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nX-Request-ID: " + request_id + b"\r\n" in h.response()
    assert h.response().endswith(b"\r\n\r\n{}")
    assert not h.client.disconnecting


def test_body_streams_before_it_is_complete():
    h = make_harness()
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello"
    )
    upstream = h.connect_upstream()
    assert upstream.value().endswith(b"\r\n\r\nhello")
    assert b"Content-Length: 10\r\n" in upstream.value()
    h.send(b"world")
    assert upstream.value().endswith(b"helloworld")


def test_response_timeout_starts_after_the_body():
    h = make_harness(timeouts={"upstream_response": "30s", "body_idle": "60s"})
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab"
    )
    h.connect_upstream()
    h.clock.advance(45)  # a slow upload, within body_idle
    h.send(b"cd")
    h.clock.advance(29)
    assert h.response() == b""
    h.clock.advance(2)
    assert h.response().startswith(b"HTTP/1.1 504 ")
    assert json.loads(h.response().split(b"\r\n\r\n", 1)[1])["errcode"] == "M_UNKNOWN"
    assert h.upstream.disconnecting or h.upstream.disconnected


def test_long_poll_within_response_timeout():
    h = make_harness()
    h.send(b"GET /_matrix/client/v3/sync?timeout=30000 HTTP/1.1\r\nHost: h\r\n\r\n")
    h.connect_upstream()
    h.clock.advance(150)  # slow initial sync: still within 180s
    h.upstream_says(OK)
    assert h.response().startswith(b"HTTP/1.1 200 OK")


def test_stalled_upload_is_abandoned():
    h = make_harness(timeouts={"body_idle": "10s"})
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab"
    )
    upstream = h.connect_upstream()
    h.clock.advance(9)
    h.send(b"cd")
    h.clock.advance(9)
    assert not h.client.disconnecting
    h.clock.advance(2)
    assert h.client.disconnected or h.client.disconnecting
    assert upstream.disconnected or upstream.disconnecting


def _exchange_timers(h: Harness) -> list:
    return [
        call
        for call in h.clock.getDelayedCalls()
        if getattr(call.func, "__name__", "") == "_timer_fired"
    ]


def test_trickled_upload_gets_408_at_the_body_deadline():
    """Every byte within body_idle, but the whole body not within
    request_body: 408 as a Matrix error, and the upstream connection, which
    saw part of the body, closed. One timer bounds both."""
    h = make_harness(timeouts={"body_idle": "10s", "request_body": "30s"})
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n"
    )
    upstream = h.connect_upstream()
    for _ in range(5):
        h.clock.advance(5)
        h.send(b"x")
        assert len(_exchange_timers(h)) == 1
    h.clock.advance(4.5)  # 29.5s
    assert h.response() == b""
    assert not upstream.disconnecting
    h.clock.advance(1)
    head, body = h.response().split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"\r\nConnection: close" in head
    assert b"\r\nContent-Type: application/json" in head
    assert json.loads(body)["errcode"] == "M_UNKNOWN"
    assert upstream.disconnecting or upstream.disconnected
    assert _exchange_timers(h) == []


def test_body_deadline_sooner_than_body_idle():
    h = make_harness(timeouts={"body_idle": "60s", "request_body": "5s"})
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab"
    )
    upstream = h.connect_upstream()
    h.clock.advance(4)
    h.send(b"cd")
    assert h.response() == b""
    h.clock.advance(1.5)
    assert h.response().startswith(b"HTTP/1.1 408 ")
    assert upstream.disconnecting or upstream.disconnected


def test_body_deadline_ends_with_the_body():
    """A body that ends in time: upstream_response bounds what follows,
    from the body's end, and the deadline no longer applies."""
    h = make_harness(
        timeouts={"body_idle": "10s", "request_body": "30s", "upstream_response": "60s"}
    )
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab"
    )
    h.connect_upstream()
    h.clock.advance(8)
    h.send(b"cd")
    h.clock.advance(55)
    assert h.response() == b""
    h.upstream_says(OK)
    assert h.response().startswith(b"HTTP/1.1 200 OK")
    assert _exchange_timers(h) == []


def test_body_deadline_not_armed_without_a_body():
    h = make_harness(timeouts={"request_body": "1s"})
    h.send(b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: h\r\n\r\n")
    h.connect_upstream()
    h.clock.advance(30)
    h.upstream_says(OK)
    assert h.response().startswith(b"HTTP/1.1 200 OK")


def _second_client(h: Harness):
    channel = h.site.buildProtocol(IPv4Address("TCP", "203.0.113.8", 50001))
    client = StringTransport(
        peerAddress=IPv4Address("TCP", "203.0.113.8", 50001),
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8443),
    )
    channel.makeConnection(client)
    return channel, client


def test_the_only_upstream_known_down_is_still_tried():
    """The last check said down and there is no other process: one request
    at a time tries it (others fail fast meanwhile); its success marks it
    up at once, and every request goes again."""
    h = make_harness()
    upstream = h.site.upstream
    upstream.watched = True
    upstream.mark(False, "refused")
    h.send(b"GET /_matrix/client/v3/a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert len(h.clock.tcpClients) == 1  # tried
    channel, client = _second_client(h)
    channel.dataReceived(b"GET /_matrix/client/v3/b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 502 ")  # while the first tries
    assert len(h.clock.tcpClients) == 1
    h.connect_upstream()
    h.upstream_says(OK)
    assert h.response().startswith(b"HTTP/1.1 200 OK")
    assert upstream.healthy is True and not upstream.known_down
    channel, client = _second_client(h)
    channel.dataReceived(b"GET /_matrix/client/v3/c HTTP/1.1\r\nHost: h\r\n\r\n")
    assert client.value() == b""  # forwarded, on the pooled connection
    assert h.upstream.value().endswith(b"\r\n\r\n")
    assert b"GET /_matrix/client/v3/c " in h.upstream.value()


def test_the_only_upstream_still_down_gives_502_and_is_tried_again():
    h = make_harness()
    upstream = h.site.upstream
    upstream.watched = True
    upstream.mark(False, "refused")
    for _ in range(2):
        channel, client = _second_client(h)
        channel.dataReceived(b"GET /_matrix/client/v3/a HTTP/1.1\r\nHost: h\r\n\r\n")
        _host, _port, factory, _timeout, _bind = h.clock.tcpClients.pop(0)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        assert client.value().startswith(b"HTTP/1.1 502 ")
        assert upstream.known_down


def test_reader_that_stops_reading_is_dropped():
    h = make_harness(timeouts={"body_idle": "10s"})
    h.send(b"GET /_matrix/media/v3/download/x/y HTTP/1.1\r\nHost: h\r\n\r\n")
    h.connect_upstream()
    h.upstream_says(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    h.clock.advance(11)
    assert h.client.disconnected
    # Abandoning the response closes the upstream connection.
    assert h.upstream.disconnected


def test_no_content_type_added_to_proxied_responses():
    h = make_harness()
    h.send(b"GET /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\n\r\n")
    h.connect_upstream()
    h.upstream_says(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
    assert b"Content-Type" not in h.response()
    assert h.response().startswith(b"HTTP/1.1 204 No Content\r\n")


def test_client_idle_timeout():
    h = make_harness(timeouts={"client_idle": "20s"})
    h.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
    assert h.response().endswith(b"OK")
    h.clock.advance(19)
    assert not h.client.disconnecting
    h.clock.advance(2)
    assert h.client.disconnecting


def test_too_large_answered_without_the_body_then_closed():
    h = make_harness(max_upload_size="1K")
    h.send(
        b"POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: h\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
    )
    h.clock.advance(0)  # refusals are written on the next reactor turn
    assert h.response().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in h.response()
    assert h.clock.tcpClients == []
    h.send(b"x" * 1000)  # read and dropped while lingering
    assert not h.client.disconnecting
    h.clock.advance(LINGER_SECONDS + 1)
    assert h.client.disconnecting


def test_access_log_line():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = make_harness()
        h.send(
            b"GET /_matrix/client/v3/sync?access_token=syt_secret&since=s1 HTTP/1.1\r\n"
            b"Host: h\r\nUser-Agent: Element/1.0\r\n\r\n"
        )
        h.connect_upstream()
        h.clock.advance(1)
        h.upstream_says(OK)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [
        e for e in events if e.get("log_namespace") == "matrix_edge.access.client-8443"
    ]
    from twisted.logger import formatEvent

    line = formatEvent(event)
    assert line.startswith("203.0.113.7 - client-8443 - ")
    assert "syt_secret" not in line
    assert (
        '"GET /_matrix/client/v3/sync?access_token=<redacted>&since=s1 HTTP/1.1"'
        in line
    )
    assert " 200 " in line and "2B" in line and '"Element/1.0"' in line
    assert "upstream 1.000sec" in line


@pytest.mark.parametrize(
    ("method", "expected"),
    [(b"GET", b"200"), (b"HEAD", b"200"), (b"POST", b"405")],
)
def test_health_methods(method, expected):
    h = make_harness()
    h.send(method + b" /health HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    assert h.response().startswith(b"HTTP/1.1 " + expected)
    assert h.clock.tcpClients == []


def test_health_with_query_or_suffix_is_not_health():
    h = make_harness()
    h.send(b"GET /health/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert h.response().startswith(b"HTTP/1.1 404 ")


def test_well_known_on_client_listener():
    h = make_harness(well_known={"server": "hs1.test:8448"})
    h.send(b"GET /.well-known/matrix/server HTTP/1.1\r\nHost: h\r\n\r\n")
    head, body = h.response().split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Type: application/json" in head
    assert b"Access-Control-Allow-Origin: *" in head
    assert b"Cache-Control: public, max-age=3600" in head
    assert json.loads(body) == {"m.server": "hs1.test:8448"}


def test_well_known_write_methods_refused():
    h = make_harness(well_known={"server": "hs1.test:8448"})
    h.send(
        b"PUT /.well-known/matrix/server HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
    )
    assert h.response().startswith(b"HTTP/1.1 405 ")


def test_well_known_not_on_federation_listener():
    h = make_harness(
        listeners=[{"port": 8448, "type": "federation"}],
        well_known={"server": "hs1.test:8448"},
    )
    h.send(b"GET /.well-known/matrix/server HTTP/1.1\r\nHost: h\r\n\r\n")
    assert h.response().startswith(b"HTTP/1.1 404 ")


def test_well_known_matched_on_raw_path():
    h = make_harness(well_known={"server": "hs1.test:8448"})
    h.send(b"GET /.well-known/matrix/%73erver HTTP/1.1\r\nHost: h\r\n\r\n")
    assert h.response().startswith(b"HTTP/1.1 404 ")


def test_overlong_header_line_is_a_json_error():
    h = make_harness()
    h.send(b"GET /_matrix/x HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert h.response().startswith(b"HTTP/1.1 431 ")
    assert b'"errcode": "M_UNKNOWN"' in h.response()
    assert h.client.disconnecting


def test_http10_without_host_gets_one():
    h = make_harness()
    h.send(b"GET /_matrix/client/versions HTTP/1.0\r\n\r\n")
    upstream = h.connect_upstream()
    assert b"\r\nHost: 127.0.0.1:8443\r\n" in upstream.value()


def test_no_timer_outlives_its_request():
    h = make_harness(timeouts={"client_idle": "20s"})
    for _ in range(3):
        h.send(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n")
        if h.upstream is None:
            h.connect_upstream()
        h.upstream_says(OK)
    assert h.response().count(b"HTTP/1.1 200 OK") == 3
    # What remains is the client connection's idle timeout and the pooled
    # upstream connection's, and the site's header-deadline sweep, which
    # holds no connection: nothing holding a finished request alive.
    assert len(h.site.header_deadlines) == 0
    pending = [
        call.func
        for call in h.clock.getDelayedCalls()
        if call.func != h.site.header_deadlines._sweep
    ]
    assert len(pending) <= 2, pending
    h.clock.advance(180)
    assert b"HTTP/1.1 504 " not in h.response()


def test_access_log_file_batches_and_reopens(tmp_path):
    from matrix_edge.server.accesslog_file import FLUSH_SECONDS, AccessLogFile

    path = tmp_path / "access.log"
    h = make_harness(access_log={"path": str(path)})
    log_file = AccessLogFile(h.clock, str(path))
    log_file.startService()
    h.site.access_log._file = log_file
    h.send(
        b"GET /_matrix/client/versions?access_token=secret HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    h.connect_upstream()
    h.upstream_says(OK)
    h.send(b"GET /health HTTP/1.1\r\nHost: h\r\n\r\n")
    assert path.read_text() == ""  # batched
    h.clock.advance(FLUSH_SECONDS)
    [line] = path.read_text().splitlines()
    assert (
        "client-8443" in line and "access_token=<redacted>" in line and " 200 " in line
    )
    assert "secret" not in line
    # logrotate moves the file away; SIGHUP reopens at the path.
    path.rename(tmp_path / "access.log.1")
    assert log_file.reopen()
    h.send(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n")
    h.upstream_says(OK)
    log_file.stopService()
    assert len(path.read_text().splitlines()) == 1


def test_connection_lost_before_the_headers_are_complete():
    h = make_harness()
    h.send(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n")
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    h.channel.connectionLost(Failure(ConnectionDone()))  # must not raise


def test_headers_trickled_too_slowly_get_408():
    """Each byte resets the idle timeout; the header deadline still ends
    a request whose headers do not complete in time."""
    h = make_harness(timeouts={"client_idle": "20s", "request_headers": "30s"})
    for byte in b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n":
        h.send(bytes([byte]))
        h.clock.advance(1)
        if h.client.disconnecting:
            break
    assert h.response().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    body = h.response().split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["errcode"] == "M_UNKNOWN"
    assert h.client.disconnecting
    assert h.clock.tcpClients == []  # nothing went to Synapse


def test_the_header_deadline_restarts_with_each_request():
    """Time spent on earlier requests of a connection, or idle between
    them, does not count against the next request's headers."""
    h = make_harness(timeouts={"client_idle": "120s", "request_headers": "30s"})
    for _ in range(3):
        h.send(b"GET /_matrix/client/versions HTTP/1.1\r\n")
        h.clock.advance(20)
        h.send(b"Host: h\r\n\r\n")
        if h.upstream is None:
            h.connect_upstream()
        h.upstream_says(OK)
        h.clock.advance(25)
    assert h.response().count(b"HTTP/1.1 200 OK") == 3
    assert not h.client.disconnecting


def test_reading_resumes_for_the_next_request_after_a_paused_upload():
    """Synapse's connection paused the upload just before its end: the
    client connection must still be read for its next request."""
    h = make_harness()
    h.send(
        b"PUT /_matrix/client/v3/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab"
    )
    upstream = h.connect_upstream()
    upstream.producer.pauseProducing()
    assert h.client.producerState == "paused"
    h.send(b"cd")
    h.upstream_says(OK)
    assert h.response().endswith(b"\r\n\r\n{}")
    assert h.client.producerState == "producing"


def test_a_small_request_costs_one_timer():
    """Once the connection and the pool are set up, a small forwarded
    request arms one timer (Synapse's answer), cancelled when relayed."""
    h = make_harness()
    request = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: h\r\n\r\n"
    h.send(request)
    h.connect_upstream()
    h.upstream_says(OK)
    armed: list[float] = []
    call_later = h.clock.callLater

    def counting(delay, *args, **kwargs):
        armed.append(delay)
        return call_later(delay, *args, **kwargs)

    h.clock.callLater = counting  # type: ignore[method-assign]
    for _ in range(3):
        h.send(request)
        h.upstream_says(OK)
    assert h.response().count(b"HTTP/1.1 200 OK") == 4
    assert len(armed) == 3, armed
