"""Request framing, fuzzed: HTTP/1.1 request messages (and short pipelined
sequences of them) drawn from a grammar that mixes valid and hostile
shapes, sent over a raw socket to one edge before a recording upstream
that keeps the exact bytes it receives.

The reference is ``h11``, a strict HTTP/1.1 parser. Whatever the edge
does, the upstream sees only requests the client framed, as h11 frames
them:

- each request h11 takes whole from the client's bytes is either
  forwarded (same method, the target byte for byte, the same body bytes)
  or refused by the edge with a 4xx Matrix error; after a refusal that
  ends the connection nothing more is forwarded;
- where h11 refuses the bytes, or they end inside a request, the upstream
  sees at most the head and part of the body of the request h11 was
  reading, as an unfinished request on a connection the edge then closes,
  and the client gets a 4xx, nothing, or the end of the connection; never
  a request h11 would have framed otherwise.

The edge may refuse more than h11 takes: that is allowed (a 4xx, and the
upstream sees nothing of it), never the other way round.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re

import attrs
import h11
import pytest
import pytest_twisted
from hypothesis import event, given
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread

from tests.adversarial.conftest import FUZZ
from tests.adversarial.test_upstream_faults import pause, until
from tests.adversarial.wire import Conn, read_response
from tests.http1_messages import Resp
from tests.recording_upstream import Recorded

NONCE = b"@@NONCE@@"
"""Replaced in every request by the example's own number (``X-Fuzz``), so
that the upstream's records of one example are told from the others'."""
ANSWER = 5.0
"""Seconds a request h11 took whole may take to be answered."""
QUIET = 0.3
"""Seconds to wait for an answer the edge may or may not give (to bytes
h11 refuses, or to an unfinished request)."""

_examples = itertools.count(1)

# The grammar ------------------------------------------------------------------
#
# Each part of a request is drawn from valid shapes, unless the request is
# one of those where that part is hostile: a request has at most two
# hostile parts, so that most examples get past the first line and reach
# the framing, the body and the requests pipelined after it.

SMUGGLED = (
    b"GET /_matrix/client/v3/smuggled HTTP/1.1\r\nHost: h\r\nX-Fuzz: "
    + NONCE
    + b"\r\n\r\n"
)

PARTS = {
    "method": (
        [b"GET"] * 4
        + [b"POST"] * 3
        + [b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]
        + [b"HEAD"],
        [b"get", b"FOO", b"CONNECT", b"TRACE", b"G\x00T", b"GET\x7f"],
    ),
    "prefix": (
        [b"/_matrix/client/v3/fuzz"] * 4
        + [
            b"/_matrix/client/v3/rooms/%21r%3Ah/send/m.room.message/1",
            b"/_matrix/federation/v1/send/1",
            b"/_synapse/client/fuzz",
        ],
        [
            b"/_synapse/admin/v1/fuzz",
            b"/_matrix",
            b"/elsewhere",
            b"//_matrix/client/v3",
            b"http://h/_matrix/client/v3/fuzz",
            b"*",
            b"",
        ],
    ),
    "segment": (
        [b"a", b"b%20c", b"%21x%3Ay", b"~", b"a;b", b"@", b"+", b"%25"],
        [
            b"..",
            b".",
            b"%2e%2e",
            b"%2E%2e",
            b".%2e",
            b"%2f",
            b"%2F",
            b"..%2f",
            b"%5f",
            b"",
            b"%00",
            b"%",
            b"%zz",
            b"\xff",
            b"a b",
            b"\x00",
            b"\t",
            b"\x7f",
        ],
    ),
    "query": (
        [b""] * 4 + [b"?", b"?a=1", b"?a=%2F&b", b"?a=.."],
        [b"#frag", b"?a=\x7f", b"?a b", b"?\x00"],
    ),
    "separator": ([b" "], [b"  ", b"\t", b" \t"]),
    "version": (
        [b"HTTP/1.1"] * 6 + [b"HTTP/1.0"],
        [b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/01.1", b"HTTP/1"],
    ),
    "eol": ([b"\r\n"], [b"\r\n"] * 4 + [b"\n", b"\r", b"\r\r\n", b"\n\r"]),
    "host": (
        [[b"Host: h"]] * 4 + [[b"host: matrix.example.org:8448"], [b"HOST:h"]],
        [
            [],
            [b"Host: h", b"Host: h"],
            [b"Host: h", b"Host: other"],
            [b"Host:"],
            [b"Host: h h"],
            [b"Host : h"],
            [b"Host: h\x00"],
        ],
    ),
    # Header fields, each a group of lines that stay together (a folded
    # line follows the line it continues).
    "field": (
        [
            [b"Accept: */*"],
            [b"User-Agent: fuzz/1.0"],
            [b"Authorization: Bearer tok"],
            [b"X-Odd:  \t spaced \t "],
            [b"X-Obs: caf\xe9"],
            [b"X-Empty:"],
            [b"X-Colons: a:b:c"],
            [b"Connection: close"],
            [b"Connection: keep-alive"],
            [b"Connection: X-Hop", b"X-Hop: 1"],
            [b"Expect: 100-continue"],
            [b"Keep-Alive: timeout=5"],
            [b"TE: trailers"],
            [b"Content-Type: application/json"],
        ],
        [
            [b"X-Fold: a", b" b"],
            [b"X-Fold: a", b"\tb"],
            [b"X-Nul: a\x00b"],
            [b"X-Cr: a\rb"],
            [b"X-Ctl: a\x01b"],
            [b"X Space: 1"],
            [b"X-Before : 1"],
            [b": empty-name"],
            [b"X-\xff: 1"],
            [b"Connection: Upgrade", b"Upgrade: h2c"],
            [b"Upgrade: websocket"],
            [b"Connection: close, keep-alive"],
        ],
    ),
    "content-length": (
        [b"%d"] * 4 + [b"%05d", b" %d ", b"%d\t"],
        [
            b"+%d",
            b"%d, %d",
            b"%d,%d",
            b"0x%x",
            b"%d.0",
            b"-%d",
            b"%d\x00",
            b"%d%d",
            b"",
        ],
    ),
    "coding": (
        [b"chunked"] * 4 + [b"Chunked", b"CHUNKED", b"chunked "],
        [
            b" chunked",
            b"\tchunked",
            b"chunked, chunked",
            b"gzip, chunked",
            b"chunked, identity",
            b"identity",
            b"gzip",
            b"chunked;q=1",
            b'"chunked"',
            b"chunked\x0b",
            b"xchunked",
            b"",
        ],
    ),
    "chunk-size": (
        [b"%x"] * 4 + [b"%X", b"%04x", b"%x;ext=1", b"%x;e", b'%x;a="b c"'],
        [
            b"0x%x",
            b"+%x",
            b" %x",
            b"%x ",
            b"%x;",
            b"%x;a\x01",
            b"-%x",
            b"%x%x",
            # No chunk size beyond 20 digits: h11's own limit, not the
            # RFC's, and the edge reads them (zeros first) as RFC 9112 says.
        ],
    ),
    "chunk-end": ([b"\r\n"], [b"\n", b"", b"xx", b"\r"]),
    "last-chunk": (
        [b"0"] * 4 + [b"000", b"0;x=y"],
        [b"0 ", b"", b"0x0"],
    ),
    "trailers": (
        [[]] * 4 + [[b"X-T: 1"]],
        [[b"Content-Length: 5"], [b"X Bad: 1"], [SMUGGLED.rstrip(b"\r\n")]],
    ),
    "body-end": ([b"\r\n"], [b"\n", b""]),
    # The body against what the head announces: longer, shorter, other.
    "length-delta": ([0], [-1, 1, 3, -3]),
    "chunk-delta": ([b""], [b"y", b"yy", b"-"]),
    "extra-framing": (
        [[]],
        [
            [b"Content-Length: 0"],
            [b"Content-Length: 1"],
            [b"Content-Length: 3"],
            [b"Transfer-Encoding: chunked"],
            [b"Transfer-Encoding: identity"],
        ],
    ),
    "unframed-body": ([b""], [SMUGGLED, b"x", b"\r\n"]),
}

PAYLOADS = [b"", b"x", b"hello", b'{"a": 1}', b"a" * 300, SMUGGLED]
PAYLOADS += [b"0\r\n\r\n", b"\r\n\r\n", b"\x00\xff"]


class Parts:
    """Draws each part of one request, hostile where the request says so."""

    def __init__(self, draw: st.DrawFn):
        self.draw = draw
        self.hostile = draw(st.sets(st.sampled_from(sorted(PARTS)), max_size=2))

    def __call__(self, part: str):
        valid, hostile = PARTS[part]
        return self.draw(st.sampled_from(hostile if part in self.hostile else valid))


def _fill(form: bytes, n: int) -> bytes:
    return form % tuple([n] * form.count(b"%"))


def chunked_body(draw: st.DrawFn, pick: Parts, payload: bytes) -> bytes:
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=2)))
    out = b""
    for a, b in itertools.pairwise([0, *cuts, len(payload)]):
        piece = payload[a:b]
        if not piece:
            continue
        delta = pick("chunk-delta")
        data = piece[:-1] if delta == b"-" else piece + delta
        out += _fill(pick("chunk-size"), len(piece)) + b"\r\n"
        out += data + pick("chunk-end")
    out += pick("last-chunk") + b"\r\n"
    for line in pick("trailers"):
        out += line + b"\r\n"
    return out + pick("body-end")


def framing(draw: st.DrawFn, pick: Parts) -> tuple[list[list[bytes]], bytes]:
    """Body framing header groups, and the bytes after the head."""
    kind = draw(st.sampled_from(["none", "length", "chunked"]))
    payload = draw(st.sampled_from(PAYLOADS))
    if kind == "none":
        return [
            *([pick("extra-framing")] if "extra-framing" in pick.hostile else [])
        ], pick("unframed-body")
    groups = [pick("extra-framing")]
    if kind == "length":
        announced = max(0, len(payload) + pick("length-delta"))
        form = pick("content-length")
        groups.append([b"Content-Length: " + _fill(form, announced)])
        return groups, payload
    groups.append([b"Transfer-Encoding: " + pick("coding")])
    if "chunk-delta" in pick.hostile and draw(st.booleans()):
        return groups, payload  # not chunked at all
    return groups, chunked_body(draw, pick, payload)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    pick = Parts(draw)
    segments = [pick("segment") for _ in range(draw(st.integers(0, 3)))]
    target = pick("prefix") + b"".join(b"/" + s for s in segments) + pick("query")
    line = pick("method") + pick("separator") + target + b" " + pick("version")
    framing_groups, body = framing(draw, pick)
    fields = [pick("field") for _ in range(draw(st.integers(0, 3)))]
    groups = [pick("host"), *fields, *framing_groups]
    groups = [g for g in draw(st.permutations(groups)) if g]
    lines = [line, b"X-Fuzz: " + NONCE, *itertools.chain.from_iterable(groups)]
    head = b"".join(part + pick("eol") for part in lines)
    return head + pick("eol") + body


PIPELINES = st.lists(request(), min_size=1, max_size=3).map(b"".join)


@pytest.fixture(scope="module")
def fuzz_stack(module_edge):
    return module_edge()


# The reference ------------------------------------------------------------------


@attrs.define
class Framed:
    """A request as h11 reads it."""

    method: bytes
    target: bytes
    version: bytes
    persistent: bool
    body: bytes = b""
    bad_host: bool = False
    """No Host field, or several, in an HTTP/1.1 request: RFC 9112
    section 3.2 asks for a 400."""


@attrs.define
class Reference:
    requests: list[Framed]
    """The requests h11 takes whole, up to one that ends the connection."""
    tail: str
    """What follows them: "clean" (nothing), "closed" (the last request
    ends the connection: what follows is not read), "partial" (an
    unfinished request), "error" (bytes h11 refuses)."""
    partial: Framed | None
    """The request h11 was reading when the bytes ended or broke."""


def _persistent(event: h11.Request) -> bool:
    """Whether the connection goes on after this request. h11 never keeps
    an HTTP/1.0 connection; RFC 9112 appendix C.2.2 lets a server honour
    ``Connection: keep-alive`` there, and the edge does."""
    tokens = {
        token.strip().lower()
        for name, value in event.headers
        if name == b"connection"
        for token in value.split(b",")
    }
    if b"close" in tokens:
        return False
    return event.http_version == b"1.1" or b"keep-alive" in tokens


def _read_one(data: bytes) -> tuple[str, Framed | None, bytes]:
    """How h11 reads the request at the front of ``data``: "whole",
    "partial", "error", or "host" (refused for its Host fields alone); the
    request as far as read; the bytes after it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    current: Framed | None = None
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                current = Framed(
                    event.method, event.target, event.http_version, _persistent(event)
                )
            elif isinstance(event, h11.Data):
                assert current is not None
                current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return "whole", current, conn.trailing_data[0]
            else:
                return "partial", current, b""
    except h11.RemoteProtocolError as error:
        if "Host: header" in str(error):
            return "host", current, b""
        if "illegal request line" in str(error):
            return "line", current, b""
        return "error", current, b""


def _one_host(data: bytes) -> bytes:
    """``data`` with exactly one Host field in its first head (the others
    renamed): h11 refuses an HTTP/1.1 head without a Host field or with
    several, where nothing is wrong with the framing; so fixed, it tells
    where the request ends."""
    ends = [i for i in (data.find(b"\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if not ends:
        return data
    end = min(ends)
    head = re.sub(rb"(?im)^host(?=[ \t]*:)", b"Xost", data[:end])
    line_end = head.find(b"\n") + 1
    return head[:line_end] + b"Host: h\r\n" + head[line_end:] + data[end:]


def _single_spaces(data: bytes) -> bytes:
    """``data`` with runs of spaces in its first line made single: RFC 9112
    section 3 lets a recipient split the request line on whitespace runs,
    as the edge's parser does for spaces (it sends Synapse a request line
    of its own, single-spaced); h11 wants single spaces."""
    line, eol, rest = data.partition(b"\n")
    return re.sub(rb" +", b" ", line) + eol + rest


def reference(data: bytes) -> Reference:
    requests: list[Framed] = []
    rest = data
    while True:
        # RFC 9112 section 2.2: a server SHOULD ignore empty lines before
        # a request line. h11 refuses them; the edge's parser (llhttp)
        # skips any CR and LF there, and so does the reference.
        rest = rest.lstrip(b"\r\n")
        if not rest:
            return Reference(requests, "clean", None)
        how, current, after = _read_one(rest)
        if how == "line":
            rest = _single_spaces(rest)
            how, current, after = _read_one(rest)
        if how == "host":
            how, current, after = _read_one(_one_host(rest))
            if current is not None:
                current.bad_host = True
        if how == "line":
            how = "error"
        if how != "whole":
            return Reference(requests, how, current)
        assert current is not None
        requests.append(current)
        if not current.persistent:
            return Reference(requests, "closed", None)
        rest = after


# The exchange ---------------------------------------------------------------------


@attrs.define
class Outcome:
    responses: list[Resp]
    ended: str
    """How reading stopped: "closed" (the edge ended the connection),
    "quiet" (no further answer came), "done" (every expected answer came)."""


def exchange(port: int, data: bytes, ref: Reference) -> Outcome:
    responses: list[Resp] = []
    with Conn(port, timeout=ANSWER) as conn:
        # The edge may refuse, and close, before it has taken it all.
        with contextlib.suppress(OSError):
            conn.send(data)
        while True:
            i = len(responses)
            if i < len(ref.requests):
                method, timeout = ref.requests[i].method, ANSWER
            elif ref.tail == "clean":
                return Outcome(responses, "done")
            elif ref.tail == "closed":
                method, timeout = b"GET", ANSWER
            else:
                method, timeout = b"GET", QUIET
            resp, how = read_response(conn, method.upper(), timeout)
            if resp is not None and how == "complete":
                responses.append(resp)
                continue
            if resp is not None:
                responses.append(resp)
            if how == "timeout":
                assert i >= len(ref.requests) and ref.tail != "closed", (
                    f"no answer to request {i} in {timeout}s",
                    responses,
                )
                return Outcome(responses, "quiet")
            return Outcome(responses, "closed")


def _same(rec: Recorded, framed: Framed) -> bool:
    return (
        rec.complete
        and rec.request_line.split(b" ")[0] == framed.method
        and rec.target == framed.target
        and rec.body_length == len(framed.body)
        and rec.body_sha256 == hashlib.sha256(framed.body).hexdigest()
    )


def _refusal(resp: Resp, method: bytes) -> bool:
    """An answer of the edge's own that refuses a request: a 4xx Matrix
    error, or 505 (RFC 9110 section 15.6.6) to a version it does not serve
    (to HEAD, without its body)."""
    if not (400 <= resp.status < 500 or resp.status == 505):
        return False
    if resp.header(b"content-type") != b"application/json":
        return False
    if method.upper() == b"HEAD" and resp.body == b"":
        return True
    return {"errcode", "error"} <= set(resp.json())


@given(data=PIPELINES)
@FUZZ
@pytest_twisted.ensureDeferred
async def test_upstream_sees_exactly_the_requests_h11_frames(fuzz_stack, data):
    """See the module docstring: checked against the upstream's exact
    records, request by request, in order."""
    stack = fuzz_stack
    nonce = b"%d" % next(_examples)
    data = data.replace(NONCE, nonce)
    ref = reference(data)
    start = len(stack.upstream.requests)
    outcome = await deferToThread(exchange, stack.port, data, ref)
    await pause(0.02)
    records = stack.upstream.requests[start:]
    context = {"data": data, "ref": ref, "outcome": outcome, "records": records}

    taken = 0
    for i, resp in enumerate(outcome.responses):
        if resp.header(b"x-upstream") is not None:
            assert i < len(ref.requests), ("answered by the upstream", context)
            assert not ref.requests[i].bad_host, ("Host not checked", context)
            assert taken < len(records), ("an upstream answer unrecorded", context)
            assert _same(records[taken], ref.requests[i]), (
                f"request {i} forwarded otherwise than h11 frames it",
                context,
            )
            taken += 1
        else:
            method = ref.requests[i].method if i < len(ref.requests) else b"GET"
            assert _refusal(resp, method), (
                f"answer {i} is neither forwarded nor a 4xx",
                context,
            )
            assert i <= len(ref.requests), ("more than one answer to the tail", context)
            if i == len(ref.requests):
                assert ref.tail in ("partial", "error"), ("an answer too many", context)

    answered = len(outcome.responses)
    if answered < len(ref.requests):
        # The edge stopped early: it refused a request (and closed), or
        # closed at once (its refusal may be lost to the reset).
        assert outcome.ended == "closed", ("requests left unanswered", context)
        if answered:
            assert outcome.responses[-1].header(b"x-upstream") is None, context
    if ref.tail == "closed" and answered == len(ref.requests):
        assert outcome.ended == "closed", ("connection kept after close", context)

    event(f"h11: {len(ref.requests)} whole, then {ref.tail}")
    event(f"edge: {taken} forwarded, {answered - taken} refused, {outcome.ended}")
    unanswered = records[taken:]
    if unanswered:
        # Only the request the edge was reading when it stopped (the one
        # it refused, or the one h11 was reading when the bytes ended or
        # broke), unfinished, on an upstream connection the edge closes.
        assert len(unanswered) == 1, ("forwarded beyond what h11 frames", context)
        [rec] = unanswered
        candidates = [*ref.requests[max(0, answered - 1) :], ref.partial]
        method = rec.request_line.split(b" ")[0]
        framed = next(
            (
                f
                for f in candidates
                if f is not None and (f.method, f.target) == (method, rec.target)
            ),
            None,
        )
        assert framed is not None, ("a request h11 never framed", context)
        assert not rec.complete, ("an unfinished request forwarded whole", context)
        if framed is not ref.partial or ref.tail == "partial":
            assert rec.body_length <= len(framed.body), context
        await until(lambda: rec.connection_id in stack.upstream.lost)


@pytest_twisted.ensureDeferred
async def test_the_fuzzer_reaches_the_upstream(fuzz_stack):
    """The setting the fuzzer relies on: a plain request of its grammar is
    forwarded, and its record found under its nonce."""
    data = (
        b"POST /_matrix/client/v3/fuzz HTTP/1.1\r\nX-Fuzz: 0\r\nHost: h\r\n"
        b"Content-Length: 5\r\n\r\nhelloGET /_matrix/client/v3/fuzz?b HTTP/1.1\r\n"
        b"X-Fuzz: 0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    ref = reference(data)
    assert ref.tail == "clean" and len(ref.requests) == 2
    outcome = await deferToThread(exchange, fuzz_stack.port, data, ref)
    assert [r.status for r in outcome.responses] == [200, 200]
    records = [
        r for r in fuzz_stack.upstream.requests if r.headers(b"x-fuzz") == [b"0"]
    ]
    assert [_same(r, f) for r, f in zip(records, ref.requests, strict=True)] == [
        True,
        True,
    ]
