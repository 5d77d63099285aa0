"""One corpus of requests, sent over HTTP/2 by several real clients, must
reach Synapse exactly as its HTTP/1.1 twin does.

Each client first sends a case to a capture server, which records the
header list it really put on the wire (clients add, drop and move headers
of their own). The HTTP/1.1 twin is built from that list by RFC 9113
§8.2.3 and §8.3.1: the same lower-case names in the same order, with
``:authority`` as a first ``host`` header and a ``host`` equal to it not
repeated, cookie crumbs joined with "; " where the first one was, no
trailers, no body when HEADERS ended the stream, and a body without
``content-length`` sent chunked. Then the client sends the case to the
edge, the twin goes over HTTP/1.1 (TLS, the same listener), and the
recording upstream must see the same bytes for both: request line, header
lines (the request ID's value aside) and body.
"""

from __future__ import annotations

import base64
import difflib
import functools
import hashlib
import json
import re
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.clients.h2_capture import (
    CONTINUATION,
    DATA,
    HEADERS,
    PADDED,
    PRIORITY,
    PRIORITY_FLAG,
    PRIORITY_UPDATE,
    Captured,
    CaptureServer,
)
from tests.clients.h2_frames import FrameClient, Framing, Outgoing
from tests.clients.tools import ensure_nghttp
from tests.pki import make_pki
from tests.rawhttp import connect, read_response
from tests.recording_upstream import Recorded

MiB = 1024 * 1024
AUTHORITY = b"matrix.test"
TOKEN = b"Bearer syt_YWxpY2U_cOrPuStOkEn_1a2b3c"
JSON_BODY = b'{"msgtype":"m.text","body":"hello, corpus \\u00e9"}'
NODE_SCRIPT = Path(__file__).parent.parent / "clients" / "h2_node_client.mjs"
CLIENT_TIMEOUT = 180
LENGTH = b"<length>"
"""Stands for the body's length in a case's content-length header."""

Header = tuple[bytes, bytes]
PLAIN = Framing()


@attrs.frozen
class Request:
    method: bytes
    target: bytes
    headers: tuple[Header, ...]
    body: bytes | None = None


@attrs.frozen
class Case:
    """Requests sent on one connection, at once or one after another."""

    name: str
    requests: tuple[Request, ...]
    parallel: bool = False
    framing: Framing = PLAIN

    @property
    def plain(self) -> bool:
        return self.framing == PLAIN


def case(
    name: str,
    method: bytes,
    headers: Sequence[Header],
    body: bytes | None = None,
    count: int = 1,
    parallel: bool = False,
    framing: Framing = PLAIN,
    path: bytes | None = None,
) -> Case:
    """``count`` requests alike but for a query string that tells them
    apart; LENGTH in a content-length header becomes the body's length."""
    base = path or b"/_matrix/client/v3/corpus/" + name.encode()
    filled = tuple(
        (n, b"%d" % len(body or b"") if v == LENGTH else v) for n, v in headers
    )
    joiner = b"&" if b"?" in base else b"?"
    requests = tuple(
        Request(method, base + joiner + b"n=%d" % i, filled, body) for i in range(count)
    )
    return Case(name, requests, parallel, framing)


AUTH = (b"authorization", TOKEN)
CL = (b"content-length", LENGTH)
JSON_TYPE = (b"content-type", b"application/json")
UPLOAD = b"/_matrix/media/v3/upload?filename=corpus.bin"
BIG_BODY = bytes(range(256)) * (8 * MiB // 256)
CHROMIUM_POST = (
    CL,
    (b"sec-ch-ua-platform", b'"Linux"'),
    AUTH,
    (b"sec-ch-ua", b'"Chromium";v="156", "Not-A.Brand";v="24"'),
    (b"sec-ch-ua-mobile", b"?0"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) Chrome/156.0.0.0"),
    JSON_TYPE,
    (b"accept", b"*/*"),
    (b"origin", b"https://app.element.io"),
    (b"sec-fetch-site", b"cross-site"),
    (b"sec-fetch-mode", b"cors"),
    (b"sec-fetch-dest", b"empty"),
    (b"referer", b"https://app.element.io/"),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"accept-language", b"en-GB,en;q=0.9"),
    (b"priority", b"u=1, i"),
)

CORPUS = [
    case("get", b"GET", [(b"accept", b"application/json"), AUTH]),
    case("head", b"HEAD", [AUTH, (b"accept", b"*/*")]),
    case("delete", b"DELETE", [AUTH, (b"x-reason", b"corpus")]),
    case(
        "options-preflight",
        b"OPTIONS",
        [
            (b"origin", b"https://app.element.io"),
            (b"access-control-request-method", b"POST"),
            (b"access-control-request-headers", b"authorization,content-type"),
        ],
    ),
    case("post-json", b"POST", [JSON_TYPE, CL, AUTH], JSON_BODY),
    case("put-json", b"PUT", [AUTH, JSON_TYPE, CL], JSON_BODY),
    case("auth-first", b"POST", [AUTH, JSON_TYPE, CL, (b"x-a", b"1")], JSON_BODY),
    case("auth-middle", b"POST", [JSON_TYPE, AUTH, CL, (b"x-a", b"1")], JSON_BODY),
    case("auth-last-after-length", b"PUT", [CL, JSON_TYPE, AUTH], JSON_BODY),
    case("chromium-order", b"POST", CHROMIUM_POST, JSON_BODY),
    case("json-without-length", b"POST", [JSON_TYPE, AUTH], JSON_BODY),
    case(
        "cookies",
        b"GET",
        [
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
            AUTH,
            (b"cookie", b"c=3"),
            (b"accept", b"*/*"),
        ],
    ),
    case(
        "cookies-after-length",
        b"POST",
        [CL, (b"cookie", b"sid=x"), (b"cookie", b"theme=dark"), JSON_TYPE, AUTH],
        JSON_BODY,
    ),
    case("host-header", b"GET", [(b"host", AUTHORITY), AUTH]),
    case("header-8k", b"GET", [AUTH, (b"x-large", b"v" * 8192), (b"x-after", b"1")]),
    case(
        "upload-8m-with-length",
        b"POST",
        [(b"content-type", b"application/octet-stream"), CL, AUTH],
        BIG_BODY,
        path=UPLOAD,
    ),
    case(
        "upload-8m-without-length",
        b"POST",
        [(b"content-type", b"application/octet-stream"), AUTH],
        BIG_BODY,
        path=UPLOAD,
    ),
    case("priority-header", b"GET", [(b"priority", b"u=1, i"), AUTH]),
    case(
        "parallel-50-get", b"GET", [AUTH, (b"accept", b"*/*")], count=50, parallel=True
    ),
    case(
        "parallel-50-post",
        b"POST",
        [CL, JSON_TYPE, AUTH],
        JSON_BODY,
        count=50,
        parallel=True,
    ),
    case(
        "hpack-reuse",
        b"POST",
        [
            JSON_TYPE,
            CL,
            (b"cookie", b"sid=x"),
            (b"cookie", b"y=z"),
            (
                b"user-agent",
                b"Element/1.11.99 (matrix-js-sdk; corpus; an indexable value)",
            ),
            AUTH,
        ],
        JSON_BODY,
        count=6,
    ),
    # Frame-level shapes, where the client can make them.
    case(
        "continuation",
        b"POST",
        [CL, AUTH, (b"x-fill-1", b"a" * 6000), (b"x-fill-2", b"b" * 6000), JSON_TYPE],
        JSON_BODY,
        framing=Framing(continuation=3),
    ),
    case("padded", b"POST", [JSON_TYPE, CL, AUTH], JSON_BODY, framing=Framing(pad=77)),
    case(
        "trailers",
        b"POST",
        [JSON_TYPE, AUTH],
        JSON_BODY,
        framing=Framing(trailers=((b"x-checksum", b"abc"),)),
    ),
    case(
        "trailers-with-length",
        b"POST",
        [CL, JSON_TYPE, AUTH],
        JSON_BODY,
        framing=Framing(trailers=((b"x-checksum", b"abc"),)),
    ),
    case(
        "priority-frames",
        b"POST",
        [CL, AUTH, JSON_TYPE],
        JSON_BODY,
        framing=Framing(priority=True),
    ),
    case(
        "priority-update",
        b"POST",
        [CL, (b"priority", b"u=5"), AUTH],
        JSON_BODY,
        framing=Framing(priority_update=b"u=1, i"),
    ),
]


@attrs.frozen
class Reply:
    target: bytes
    status: int
    body: bytes | None
    """None when the client cannot tell which body was whose."""
    error: str | None = None


def _text(value: bytes) -> str:
    return value.decode("latin-1")


def _run(args: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run a client program, bounded in time."""
    return subprocess.run(
        args, input=stdin, capture_output=True, timeout=CLIENT_TIMEOUT, check=False
    )


def _tail(output: bytes) -> str:
    return " | ".join(output.decode("utf-8", "replace").strip().splitlines()[-3:])


class NodeClient:
    """node:http2 (nghttp2 inside), driven by tests/clients/h2_node_client.mjs."""

    name = "node"

    def unavailable(self) -> str | None:
        return None if shutil.which("node") else "node is not installed"

    def supports(self, case: Case) -> bool:
        return case.plain

    def send(self, case: Case, port: int, workdir: Path) -> list[Reply]:
        job = {
            "port": port,
            "servername": "localhost",
            "parallel": case.parallel,
            "requests": [
                {
                    "method": _text(r.method),
                    "target": _text(r.target),
                    "authority": _text(AUTHORITY),
                    "headers": [[_text(n), _text(v)] for n, v in r.headers],
                    "body": None
                    if r.body is None
                    else base64.b64encode(r.body).decode(),
                }
                for r in case.requests
            ],
        }
        done = _run(["node", str(NODE_SCRIPT)], json.dumps(job).encode())
        assert done.returncode == 0, f"node: {_tail(done.stderr)}"
        out = json.loads(done.stdout)
        assert out["alpn"] == "h2", out
        return [
            Reply(
                request.target,
                result["status"],
                base64.b64decode(result["body_base64"]),
                result["error"],
            )
            for request, result in zip(case.requests, out["results"], strict=True)
        ]


class CurlClient:
    """curl --http2, one invocation per case: its requests share one
    connection (``--next``), multiplexed with ``--parallel``."""

    name = "curl"

    def unavailable(self) -> str | None:
        return None if shutil.which("curl") else "curl is not installed"

    def supports(self, case: Case) -> bool:
        return case.plain

    def send(self, case: Case, port: int, workdir: Path) -> list[Reply]:
        args = ["curl", "-s"]
        if case.parallel:
            args += ["--parallel", "--parallel-max", str(len(case.requests))]
        outputs = {}
        for i, request in enumerate(case.requests):
            if i:
                args.append("--next")
            output = workdir / f"curl-out-{i}"
            output.unlink(missing_ok=True)
            outputs[request.target] = output
            args += [
                "--http2",
                "-sk",
                "-g",
                "--path-as-is",
                "--connect-to",
                f"{_text(AUTHORITY)}:443:127.0.0.1:{port}",
                "-o",
                str(output),
                "-w",
                "%{http_code} %{url_effective}\\n",
            ]
            args += (
                ["-I"] if request.method == b"HEAD" else ["-X", _text(request.method)]
            )
            names = {n for n, _ in request.headers}
            # Without these, curl adds headers of its own.
            for name in (b"user-agent", b"accept"):
                if name not in names:
                    args += ["-H", f"{_text(name)}:"]
            args += [
                a for n, v in request.headers for a in ("-H", f"{_text(n)}: {_text(v)}")
            ]
            if request.body is not None:
                body = workdir / f"curl-body-{i}"
                body.write_bytes(request.body)
                args += ["--data-binary", f"@{body}"]
                if b"content-type" not in names:
                    args += ["-H", "content-type:"]
                if b"content-length" not in names:
                    # Over HTTP/2 this only keeps curl from adding one.
                    args += ["-H", "transfer-encoding: chunked"]
            args.append(f"https://{_text(AUTHORITY)}{_text(request.target)}")
        done = _run(args)
        error = f"curl exited {done.returncode}" if done.returncode else None
        replies = []
        for line in done.stdout.decode().splitlines():
            code, _, url = line.partition(" ")
            target = url.removeprefix(f"https://{_text(AUTHORITY)}").encode("latin-1")
            method = next(r.method for r in case.requests if r.target == target)
            output = outputs[target]
            body = output.read_bytes() if output.exists() else b""
            replies.append(
                Reply(target, int(code), None if method == b"HEAD" else body, error)
            )
        return replies


class NghttpClient:
    """nghttp from nghttp2-client; it sends every URI of one invocation with
    the same headers and body, concurrently on one connection."""

    name = "nghttp"

    def unavailable(self) -> str | None:
        return _nghttp()[1] or None

    def supports(self, case: Case) -> bool:
        first = case.requests[0]
        alike = all(
            (r.method, r.headers, r.body) == (first.method, first.headers, first.body)
            for r in case.requests
        )
        framing = case.framing
        shaped = framing.continuation or framing.priority or framing.priority_update
        return alike and not shaped and (first.body is not None or not framing.trailers)

    def send(self, case: Case, port: int, workdir: Path) -> list[Reply]:
        first = case.requests[0]
        har = workdir / "nghttp.har"
        args = [
            _nghttp()[0] or "nghttp",
            "-y",
            "-t",
            "60s",
            "--no-content-length",
            "-r",
            str(har),
            "-H",
            f":authority: {_text(AUTHORITY)}",
            "-H",
            f":method: {_text(first.method)}",
        ]
        args += [a for n, v in first.headers for a in ("-H", f"{_text(n)}: {_text(v)}")]
        if first.body is not None:
            body = workdir / "nghttp-body"
            body.write_bytes(first.body)
            args += ["-d", str(body)]
        if case.framing.pad:
            args += ["-b", str(case.framing.pad)]
        for name, value in case.framing.trailers:
            args += ["--trailer", f"{_text(name)}: {_text(value)}"]
        origin = f"https://127.0.0.1:{port}"
        args += [origin + _text(r.target) for r in case.requests]
        har.unlink(missing_ok=True)
        done = _run(args)
        error = (
            f"nghttp exited {done.returncode}: {_tail(done.stderr)}"
            if done.returncode
            else None
        )
        assert har.exists(), error
        bodies = _json_documents(done.stdout)
        replies = []
        for entry in json.loads(har.read_text())["log"]["entries"]:
            target = entry["request"]["url"].removeprefix(origin).encode("latin-1")
            body = b"" if first.method == b"HEAD" else bodies.get(target, b"")
            replies.append(Reply(target, entry["response"]["status"], body, error))
        return replies


class H2LibClient:
    """The Python h2 library, with frames shaped as a case asks."""

    name = "h2"

    def unavailable(self) -> str | None:
        return None

    def supports(self, case: Case) -> bool:
        return True

    def send(self, case: Case, port: int, workdir: Path) -> list[Reply]:
        client = FrameClient(port)
        try:
            assert client.alpn == "h2"
            outgoing = [
                Outgoing(r.method, r.target, AUTHORITY, r.headers, r.body, case.framing)
                for r in case.requests
            ]
            responses = client.exchange(outgoing, case.parallel)
        finally:
            client.close()
        return [
            Reply(
                r.target,
                response.status,
                bytes(response.body),
                "stream reset" if response.reset else None,
            )
            for r, response in zip(case.requests, responses, strict=True)
        ]


@functools.cache
def _nghttp() -> tuple[str | None, str]:
    return ensure_nghttp()


def _json_documents(data: bytes) -> dict[bytes, bytes]:
    """The upstream's JSON bodies in concatenated output, by target."""
    text = data.decode("latin-1")
    decoder = json.JSONDecoder()
    found: dict[bytes, bytes] = {}
    at = 0
    while at < len(text):
        try:
            document, end = decoder.raw_decode(text, at)
        except ValueError:
            break
        if isinstance(document, dict) and "target" in document:
            found[document["target"].encode("latin-1")] = data[at:end]
        at = end
    return found


CLIENTS = {
    c.name: c for c in (NodeClient(), CurlClient(), NghttpClient(), H2LibClient())
}


def http11_twin(sent: Captured) -> bytes:
    """The HTTP/1.1 request that means what ``sent`` meant over HTTP/2."""
    method = sent.pseudo(b":method") or b""
    target = sent.pseudo(b":path") or b""
    authority = sent.pseudo(b":authority")
    regular = sent.regular
    lines = [method + b" " + target + b" HTTP/1.1"]
    if authority is not None:
        lines.append(b"host: " + authority)
    crumbs = [v for n, v in regular if n == b"cookie"]
    for name, value in regular:
        if name == b"host" and value == authority:
            continue
        if name == b"cookie":
            if crumbs:
                lines.append(b"cookie: " + b"; ".join(crumbs))
                crumbs = []
            continue
        lines.append(name + b": " + value)
    body = bytes(sent.body)
    if sent.ended_with_headers or any(n == b"content-length" for n, _ in regular):
        payload = body
    else:
        lines.append(b"transfer-encoding: chunked")
        chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        payload = chunk + b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def _send_twins(port: int, twins: Sequence[bytes]) -> list[int]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    statuses = []
    for raw in twins:
        with connect(port, tls=context, timeout=60) as sock:
            sock.sendall(raw)
            method = raw.split(b" ", 1)[0].decode()
            statuses.append(read_response(sock, method).status)
    return statuses


_REQUEST_ID = re.compile(rb"(?i)^(x-request-id:\s*).*$")


def _as_seen(recorded: Recorded | None) -> list[str]:
    """What the upstream received, as lines to compare and diff."""
    if recorded is None:
        return ["<nothing received>"]
    lines = [recorded.request_line]
    lines += [_REQUEST_ID.sub(rb"\1<id>", line) for line in recorded.header_lines]
    text = [_abbreviated(_text(line)) for line in lines]
    text.append(
        f"<body {recorded.body_length} bytes sha256 {recorded.body_sha256[:16]}"
        f" complete={recorded.complete}>"
    )
    return text


def _abbreviated(line: str) -> str:
    """A long header line cut short for a readable diff, its digest kept."""
    if len(line) <= 120:
        return line
    digest = hashlib.sha256(line.encode("latin-1")).hexdigest()[:16]
    return f"{line[:60]}...<{len(line)} chars, sha256 {digest}>"


def _upstream_answer(recorded: Recorded) -> bytes:
    """The body the recording upstream answers ``recorded`` with."""
    return json.dumps(
        {
            "target": _text(recorded.target),
            "body_length": recorded.body_length,
            "body_sha256": recorded.body_sha256,
            "connection": recorded.connection_id,
            "head": _text(recorded.head),
        }
    ).encode()


def _sent_as_intended(case: Case, captured: Sequence[Captured]) -> None:
    """The capture server got every request of the case, whole, on one
    connection, in the frames the case asks for."""
    assert sorted(c.pseudo(b":path") or b"" for c in captured) == sorted(
        r.target for r in case.requests
    )
    assert len({c.connection for c in captured}) == 1, "not one connection"
    framing = case.framing
    for sent in captured:
        request = next(r for r in case.requests if r.target == sent.pseudo(b":path"))
        assert sent.complete
        assert bytes(sent.body) == (request.body or b"")
        assert sent.pseudo(b":authority") == AUTHORITY
        if framing.continuation:
            assert sent.count(CONTINUATION) == framing.continuation
        if framing.pad:
            assert sent.count(HEADERS, PADDED) or sent.count(DATA, PADDED)
        if framing.trailers:
            assert sent.trailers == list(framing.trailers)
        if framing.priority:
            assert sent.count(PRIORITY) and sent.count(HEADERS, PRIORITY_FLAG)
        if framing.priority_update is not None:
            assert sent.count(PRIORITY_UPDATE) == 1
    if case.name == "hpack-reuse":
        # Later requests take the user-agent (at least) from the dynamic
        # table instead of spelling it out again.
        sizes = [
            c.header_block_size for c in sorted(captured, key=lambda c: c.stream_id)
        ]
        assert all(size <= sizes[0] - 40 for size in sizes[1:]), sizes


PARAMS = [
    pytest.param(name, case, id=f"{name}-{case.name}")
    for name, client in CLIENTS.items()
    for case in CORPUS
    if client.supports(case)
]


@pytest.mark.parametrize(("client_name", "case"), PARAMS)
@pytest_twisted.ensureDeferred
async def test_h2_request_reaches_upstream_as_its_http11_twin(
    make_stack, tmp_path, client_name, case
):
    client = CLIENTS[client_name]
    missing = await deferToThread(client.unavailable)
    if missing:
        pytest.skip(missing)

    pki = make_pki(tmp_path / "capture")
    capture = CaptureServer(pki.chain_path, pki.key_path)
    try:
        await deferToThread(client.send, case, capture.port, tmp_path)
    finally:
        capture.close()
    assert not capture.errors
    captured = list(capture.requests)
    _sent_as_intended(case, captured)

    stack = make_stack(tls=True)
    replies = await deferToThread(client.send, case, stack.port, tmp_path)
    over_h2 = {r.target: r for r in stack.upstream.requests}
    twins = [http11_twin(c) for c in captured]
    twin_statuses = await deferToThread(_send_twins, stack.port, twins)
    over_h1 = {r.target: r for r in stack.upstream.requests[len(over_h2) :]}
    assert twin_statuses == [200] * len(twins)

    differences = []
    for request in case.requests:
        expected = _as_seen(over_h1.get(request.target))
        actual = _as_seen(over_h2.get(request.target))
        if actual != expected:
            diff = difflib.unified_diff(
                expected, actual, "over HTTP/1.1", "over HTTP/2", lineterm="", n=30
            )
            differences.append(f"{_text(request.target)}:\n" + "\n".join(diff))

    answers = []
    replies_by_target = {r.target: r for r in replies}
    for request in case.requests:
        target = _text(request.target)
        reply = replies_by_target.get(request.target)
        recorded = over_h2.get(request.target)
        if reply is None:
            answers.append(f"{target}: no response")
        elif reply.status != 200 or reply.error:
            answers.append(f"{target}: status {reply.status} {reply.error or ''}")
        elif reply.body is not None and recorded is not None:
            expected_body = (
                b"" if request.method == b"HEAD" else _upstream_answer(recorded)
            )
            if reply.body != expected_body:
                answers.append(
                    f"{target}: response body {reply.body[:100]!r}... is not"
                    f" the upstream's {expected_body[:100]!r}..."
                )
    assert not (differences or answers), _summary(differences, answers)


def _summary(differences: list[str], answers: list[str]) -> str:
    parts = differences[:3]
    if len(differences) > 3:
        parts.append(f"...and {len(differences) - 3} more requests that differ")
    parts += answers[:5]
    if len(answers) > 5:
        parts.append(f"...and {len(answers) - 5} more bad responses")
    return "\n\n".join(parts)
