"""Chromium as a client of the HTTP/2 request corpus: what Synapse receives
for each request the browser sends over HTTP/2 must be what it receives for
the same request sent over HTTP/1.1.

Headless Chromium loads a page from http://127.0.0.1 (another site than the
edge's https://localhost, as for Element Web), whose script sends the corpus
with fetch(): simple and preflighted GET, HEAD, DELETE, POST and PUT with
JSON bodies and an access token, an 8 KiB header, an 8 MiB ArrayBuffer
upload, a streamed upload (no content-length, so the edge frames it
chunked), 50 requests at once, requests repeated to exercise HPACK's
dynamic table, and credentialed requests carrying cookies that the upstream
set through the edge (partitioned ones: the browser blocks third-party
cookies otherwise). Every CORS preflight the browser sends is part of the
corpus too.

The header list of each request is decoded from the HPACK blocks in the
plaintext that Chromium's NetLog records it writing to its TLS sockets, and
checked against the list the NetLog shows for the stream, which has the
cookie in one field where the wire has crumbs. The HTTP/1.1 twin is built
from that list by RFC 9113 §8.3.1 and §8.2.3: the same lower-case
names in the same order, ``:authority`` as a first ``host`` header, cookie
crumbs joined with "; " where the first one was, and a body without
``content-length`` sent chunked. The upstream must record the same bytes for
both (the request ID's value aside), and the page must have seen the
upstream's answers.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import functools
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import hpack
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.chromium import chromium_argv, trusting_home
from tests.e2e import environment
from tests.rawhttp import connect, read_response
from tests.recording_upstream import Recorded, UpstreamProtocol

PAGE = Path(__file__).resolve().parent.parent / "clients" / "chromium"
MiB = 1024 * 1024
RESULT_TIMEOUT = 45.0
TOKEN = "Bearer syt_Y2hyb21pdW0_cOrPuStOkEn_9z8y7x"
JSON_TEXT = '{"msgtype":"m.text","body":"hello, corpus é"}'
COOKIES = (b"corpus_sid=s3cr3t-1", b"corpus_theme=dark")
STREAM_CHUNKS = (1000, 65536, 300_000, 5)
REPEATS = 6
UPLOAD = "/_matrix/media/v3/upload?filename=corpus.bin&n="


@attrs.frozen
class Request:
    """One fetch() of the page."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: dict[str, Any] | None = None
    credentials: str = "same-origin"

    def page_form(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "headers": [list(h) for h in self.headers],
            "body": self.body,
            "credentials": self.credentials,
        }


def _pattern(size: int) -> bytes:
    """Bytes 0..255 over and over, as the page makes them."""
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def body_bytes(spec: dict[str, Any] | None) -> bytes:
    """The bytes the page sends for a body of ``spec``."""
    if spec is None:
        return b""
    if spec["kind"] == "text":
        return spec["text"].encode()
    if spec["kind"] == "pattern":
        return _pattern(spec["size"])
    return b"".join(_pattern(n) for n in spec["chunks"])


def _path(name: str, n: int = 0) -> str:
    return f"/_matrix/client/v3/corpus/{name}?n={n}"


AUTH = ("authorization", TOKEN)
JSON_TYPE = ("content-type", "application/json")
JSON = {"kind": "text", "text": JSON_TEXT}


def corpus() -> list[list[Request]]:
    """Groups of requests: a group's requests go at once, the groups one
    after another."""
    octets = ("content-type", "application/octet-stream")
    groups = [
        # A simple request: no preflight, no credentials.
        [Request("GET", _path("get-simple"), credentials="omit")],
        [Request("GET", _path("get"), (("accept", "application/json"), AUTH))],
        [Request("HEAD", _path("head"), (AUTH,))],
        [Request("DELETE", _path("delete"), (AUTH, ("x-reason", "corpus")))],
        [Request("POST", _path("post-json"), (JSON_TYPE, AUTH), JSON)],
        [Request("PUT", _path("put-json"), (AUTH, JSON_TYPE), JSON)],
        # A simple request with a body: text/plain, no preflight.
        [Request("POST", _path("post-text"), body={"kind": "text", "text": "plain"})],
        [
            Request(
                "GET",
                _path("header-8k"),
                (AUTH, ("x-large", "v" * 8192), ("x-after", "1")),
            )
        ],
        [
            Request(
                "POST",
                UPLOAD + "0",
                (octets, AUTH),
                {"kind": "pattern", "size": 8 * MiB},
            )
        ],
        [
            Request(
                "POST",
                UPLOAD + "1",
                (octets, AUTH),
                {"kind": "stream", "chunks": list(STREAM_CHUNKS)},
            )
        ],
        [
            Request("GET", _path("parallel-50", n), (AUTH, ("accept", "*/*")))
            for n in range(50)
        ],
    ]
    client = ("x-client", "Element/1.11.99 (matrix-js-sdk; corpus; indexable)")
    groups += [
        [Request("POST", _path("repeated", n), (JSON_TYPE, client, AUTH), JSON)]
        for n in range(REPEATS)
    ]
    groups += [
        [Request("GET", _path("set-cookie"), credentials="include")],
        [Request("GET", _path("cookie-get"), (AUTH,), credentials="include")],
        [Request("POST", _path("cookie-post"), (JSON_TYPE, AUTH), JSON, "include")],
    ]
    return groups


class CorsUpstreamProtocol(UpstreamProtocol):
    """The recording upstream, answering with the CORS headers a browser
    needs to read the answers (credentialed ones included), and setting two
    cross-site cookies for ``/corpus/set-cookie``."""

    def _answer(self, rec: Recorded) -> None:
        self._answering = rec
        super()._answer(rec)

    def _respond(self, code: int, body: bytes, close: bool = False) -> None:
        assert self.transport is not None
        rec = self._answering
        origin = b"".join(rec.headers(b"origin")) or b"*"
        allowed = b"".join(rec.headers(b"access-control-request-headers"))
        cors = (
            b"Access-Control-Allow-Origin: %s\r\n"
            b"Access-Control-Allow-Credentials: true\r\n"
            b"Access-Control-Allow-Methods: GET, HEAD, POST, PUT, DELETE\r\n"
            b"Access-Control-Allow-Headers: %s\r\n"
            b"Vary: Origin\r\n" % (origin, allowed or b"authorization")
        )
        if b"/corpus/set-cookie" in rec.target:
            cors += b"".join(
                b"Set-Cookie: %s; Path=/; Secure; HttpOnly; SameSite=None; Partitioned\r\n"
                % c
                for c in COOKIES
            )
        self.transport.write(
            b"HTTP/1.1 %d Whatever\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (code, len(body), cors, body)
        )


class PageServer:
    """The page's origin: serves tests/clients/chromium and the corpus as
    /config.json, and keeps what the page posts to /result."""

    def __init__(self, config: dict[str, Any]):
        self.result: dict[str, Any] | None = None
        self.done = threading.Event()
        config_bytes = json.dumps(config).encode()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def end_headers(self) -> None:
                self.send_header("Cache-Control", "no-store")
                super().end_headers()

            def do_GET(self) -> None:
                if self.path != "/config.json":
                    super().do_GET()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(config_bytes)))
                self.end_headers()
                self.wfile.write(config_bytes)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length)
                self.send_response(204)
                self.end_headers()
                if self.path == "/result":
                    server.result = json.loads(data)
                    server.done.set()

        handler = functools.partial(Handler, directory=str(PAGE))
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


@attrs.define
class Sent:
    """A request as Chromium sent it on an HTTP/2 stream."""

    fields: list[tuple[str, str]]
    """Its header list, pseudo-headers first."""
    fin: bool
    """HEADERS ended the stream: no body."""

    def pseudo(self, name: str) -> str | None:
        return next((v for n, v in self.fields if n == name), None)

    @property
    def regular(self) -> list[tuple[str, str]]:
        return [(n, v) for n, v in self.fields if not n.startswith(":")]

    @property
    def key(self) -> tuple[str, str]:
        return (self.pseudo(":method") or "", self.pseudo(":path") or "")

    def joined(self) -> list[tuple[str, str]]:
        """The header list with its cookie crumbs joined into one field at
        the first one's place."""
        crumbs = [v for n, v in self.fields if n == "cookie"]
        out = []
        for name, value in self.fields:
            if name != "cookie":
                out.append((name, value))
            elif crumbs:
                out.append((name, "; ".join(crumbs)))
                crumbs = []
        return out


def _split(line: str) -> tuple[str, str]:
    name, _, value = line[1:].partition(": ")
    return line[0] + name, value


@attrs.define
class NetLog:
    logged: list[Sent]
    """The header lists Chromium logged, as its HTTP/2 session had them
    before encoding (cookie crumbs still joined)."""
    wire: list[tuple[Sent, int]]
    """The header lists decoded from the HPACK blocks Chromium wrote to its
    TLS sockets, with the size of each block."""
    most_in_flight: dict[str, int]
    """For each path, the most requests to it that were waiting for their
    response heads at one time."""


def read_netlog(path: Path) -> NetLog:
    """The HTTP/2 requests in Chromium's NetLog, from the header lists it
    logged and from the plaintext it wrote to its TLS sockets. A file the
    browser did not close is cut after its last whole event."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        data = json.loads(text[: text.rfind("},\n") + 1] + "]}")
    names = {n: name for name, n in data["constants"]["logEventTypes"].items()}
    logged = []
    plaintext: dict[int, bytearray] = {}
    waiting: dict[tuple[int, int], str] = {}
    most_in_flight: dict[str, int] = {}
    for event in data["events"]:
        params = event.get("params") or {}
        name = names.get(event["type"])
        stream = (event["source"]["id"], params.get("stream_id", 0))
        if name == "HTTP2_SESSION_SEND_HEADERS":
            fields = [_split(line) for line in params["headers"]]
            logged.append(Sent(fields, params["fin"]))
            path = dict(fields)[":path"].partition("?")[0]
            waiting[stream] = path
            in_flight = sum(p == path for p in waiting.values())
            most_in_flight[path] = max(most_in_flight.get(path, 0), in_flight)
        elif name == "HTTP2_SESSION_RECV_HEADERS":
            waiting.pop(stream, None)
        elif name == "SSL_SOCKET_BYTES_SENT" and "bytes" in params:
            buffer = plaintext.setdefault(event["source"]["id"], bytearray())
            buffer += base64.b64decode(params["bytes"])
    wire = []
    for buffer in plaintext.values():
        if buffer.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
            wire += _header_blocks(bytes(buffer[24:]))
    return NetLog(logged, wire, most_in_flight)


def _header_blocks(frames: bytes) -> Iterator[tuple[Sent, int]]:
    """Decode the HPACK blocks of a client's HTTP/2 frames."""
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 1 << 20
    block = b""
    at = 0
    while at + 9 <= len(frames):
        length = int.from_bytes(frames[at : at + 3], "big")
        kind, flags = frames[at + 3], frames[at + 4]
        payload = frames[at + 9 : at + 9 + length]
        at += 9 + length
        if kind == 0x1:  # HEADERS
            if flags & 0x8:  # PADDED
                payload = payload[1 : len(payload) - payload[0]]
            if flags & 0x20:  # PRIORITY
                payload = payload[5:]
            block = payload
        elif kind == 0x9:  # CONTINUATION
            block += payload
        else:
            continue
        if flags & 0x4:  # END_HEADERS
            decoded = decoder.decode(block, raw=True)
            fields = [(n.decode(), v.decode()) for n, v in decoded]
            yield Sent(fields, bool(flags & 0x1)), len(block)


def http11_twin(sent: Sent, body: bytes) -> bytes:
    """The HTTP/1.1 request that means what ``sent`` meant over HTTP/2."""
    method, target = sent.key
    lines = [f"{method} {target} HTTP/1.1".encode()]
    authority = sent.pseudo(":authority")
    if authority is not None:
        lines.append(f"host: {authority}".encode())
    regular = [(n, v) for n, v in sent.joined() if not n.startswith(":")]
    lines += [f"{name}: {value}".encode() for name, value in regular]
    if sent.fin:
        payload = b""
    elif any(n == "content-length" for n, _ in regular):
        payload = body
    else:
        lines.append(b"transfer-encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def send_twins(port: int, ca: Path, twins: list[bytes]) -> list[int]:
    """Send each twin on a TLS connection of its own, ALPN http/1.1."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["http/1.1"])
    statuses = []
    for raw in twins:
        with connect(
            port, tls=context, server_hostname="localhost", timeout=10
        ) as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"  # type: ignore[attr-defined]
            sock.sendall(raw)
            method = raw.split(b" ", 1)[0].decode()
            statuses.append(read_response(sock, method).status)
    return statuses


_REQUEST_ID = re.compile(rb"(?i)^(x-request-id:\s*).*$")


def as_seen(recorded: Recorded | None) -> list[str]:
    """What the upstream received, as lines to compare and diff."""
    if recorded is None:
        return ["<nothing received>"]
    lines = [recorded.request_line]
    lines += [_REQUEST_ID.sub(rb"\1<id>", line) for line in recorded.header_lines]
    text = [_short(line.decode("latin-1")) for line in lines]
    text.append(
        f"<body {recorded.body_length} bytes sha256 {recorded.body_sha256[:16]}"
        f" complete={recorded.complete}>"
    )
    return text


def _short(line: str) -> str:
    return line if len(line) <= 120 else f"{line[:60]}...<{len(line)} chars>"


def upstream_answer(recorded: Recorded) -> str:
    """The body the recording upstream answers ``recorded`` with."""
    return json.dumps(
        {
            "target": recorded.target.decode("latin-1"),
            "body_length": recorded.body_length,
            "body_sha256": recorded.body_sha256,
            "connection": recorded.connection_id,
            "head": recorded.head.decode("latin-1"),
        }
    )


def _by_key(recordings: list[Recorded]) -> dict[tuple[str, str], Recorded]:
    found = {}
    for rec in recordings:
        method, target = rec.request_line.decode("latin-1").split(" ")[:2]
        assert (method, target) not in found, f"{method} {target} arrived twice"
        found[method, target] = rec
    return found


def run_chromium(argv: list[str], home: Path, log: Path, page: PageServer) -> None:
    """Run the browser until the page posts its result (bounded), then stop
    it so that it closes its NetLog."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            env={**os.environ, "HOME": str(home)},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        waited = 0.0
        while not page.done.wait(0.25):
            waited += 0.25
            assert process.poll() is None, f"Chromium exited {process.returncode}"
            assert waited < RESULT_TIMEOUT, "the page did not finish in time"
    finally:
        # The browser process alone: it stops its network service, which
        # then closes the NetLog.
        process.terminate()
        try:
            process.wait(15)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@pytest_twisted.ensureDeferred
async def test_chromium_h2_requests_reach_upstream_as_their_http11_twins(
    make_stack, tmp_path
):
    try:
        chromium, certutil = await deferToThread(environment.ensure_chromium)
    except environment.Unavailable as e:
        pytest.fail(f"Chromium cannot run here: {e}")
    stack = make_stack(tls=True)
    stack.upstream.protocol = CorsUpstreamProtocol
    ca = tmp_path / "pki" / "ca.pem"
    edge = f"https://localhost:{stack.port}"
    authority = f"localhost:{stack.port}"
    groups = corpus()
    requests = [r for group in groups for r in group]
    bodies = {(r.method, r.target): body_bytes(r.body) for r in requests}

    page = PageServer(
        {"edge": edge, "groups": [[r.page_form() for r in g] for g in groups]}
    )
    netlog_path = tmp_path / "netlog.json"
    try:
        home = trusting_home(tmp_path / "home", certutil, ca)
        argv = chromium_argv(
            chromium,
            tmp_path / "profile",
            netlog_path,
            f"http://127.0.0.1:{page.port}/index.html",
            {"localhost": "127.0.0.1"},
            # The NetLog keeps credentials and the bytes sent, to read the
            # header lists Chromium really wrote.
            extra=["--net-log-capture-mode=Everything"],
        )
        await deferToThread(run_chromium, argv, home, tmp_path / "chromium.log", page)
    finally:
        page.close()
    result = page.result
    assert result is not None
    assert "failed" not in result, result["failed"]

    netlog = read_netlog(netlog_path)
    logged = [s for s in netlog.logged if s.pseudo(":authority") == authority]
    sent = [s for s, _ in netlog.wire if s.pseudo(":authority") == authority]
    keys = [s.key for s in sent]
    assert len(set(keys)) == len(keys), "a request went twice"
    assert {(r.method, r.target) for r in requests} <= set(keys)
    block_sizes = {s.key: size for s, size in netlog.wire}
    # The header lists on the wire are the ones the NetLog shows, but for
    # the cookie, which the NetLog shows in one field.
    assert {s.key: (s.fields, s.fin) for s in logged} == {
        s.key: (s.joined(), s.fin) for s in sent
    }

    over_h2 = _by_key(stack.upstream.requests)
    assert set(over_h2) == set(keys)
    twins = [http11_twin(s, bodies.get(s.key, b"")) for s in sent]
    statuses = await deferToThread(send_twins, stack.port, ca, twins)
    assert statuses == [200] * len(twins)
    over_h1 = _by_key(stack.upstream.requests[len(over_h2) :])

    differences = []
    for key in keys:
        expected, actual = as_seen(over_h1.get(key)), as_seen(over_h2.get(key))
        if actual != expected:
            diff = difflib.unified_diff(
                expected, actual, "over HTTP/1.1", "over HTTP/2", lineterm="", n=30
            )
            differences.append(f"{' '.join(key)}:\n" + "\n".join(diff))
    assert not differences, "\n\n".join(differences[:3]) + (
        f"\n\n...{len(differences)} requests differ" if len(differences) > 3 else ""
    )

    # The browser got the upstream's answers.
    answers = {(r["method"], r["target"]): r for r in result["results"]}
    for request in requests:
        key = (request.method, request.target)
        answer = answers[key]
        assert answer.get("status") == 200, answer
        expected = "" if request.method == "HEAD" else upstream_answer(over_h2[key])
        assert answer["body"] == expected, key
        assert over_h2[key].body_length == len(bodies[key]), key
        assert over_h2[key].body_sha256 == _sha256(bodies[key]), key

    # Preflights for the requests that needed them, and none for the others.
    preflighted = {t for m, t in keys if m == "OPTIONS"}
    simple = {_path("get-simple"), _path("post-text"), _path("set-cookie")}
    assert preflighted == {r.target for r in requests} - simple

    # The cookies set through the edge came back on the credentialed
    # requests, sent as crumbs, and reached the upstream in one field.
    by_key = {s.key: s for s in sent}
    for key in (("GET", _path("cookie-get")), ("POST", _path("cookie-post"))):
        crumbs = [v for n, v in by_key[key].regular if n == "cookie"]
        assert crumbs == [c.decode() for c in COOKIES], crumbs
        assert over_h2[key].headers(b"cookie") == [b"; ".join(COOKIES)]

    # Bodies framed as Chromium sent them: the ArrayBuffer with a length,
    # the stream without one (so chunked to the upstream); and the order
    # that sets browsers apart, content-length ahead of authorization.
    assert over_h2["POST", UPLOAD + "0"].headers(b"content-length") == [
        b"%d" % (8 * MiB)
    ]
    assert over_h2["POST", UPLOAD + "1"].headers(b"transfer-encoding") == [b"chunked"]
    names = [n for n, _ in by_key["POST", _path("post-json")].regular]
    assert names.index("content-length") < names.index("authorization"), names

    # The 50 parallel requests were in flight together.
    parallel = netlog.most_in_flight[_path("parallel-50").partition("?")[0]]
    assert parallel >= 10, parallel

    # Repeated requests reuse HPACK's dynamic table: later header blocks
    # are much smaller than the first.
    repeated = [block_sizes["POST", _path("repeated", n)] for n in range(REPEATS)]
    assert all(size <= repeated[0] // 2 for size in repeated[1:]), repeated


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
