"""Upstream responses, fuzzed: a scripted upstream answers each request
with a response drawn from a grammar that mixes valid and hostile shapes
(status lines, header fields, Content-Length, chunked and close-delimited
bodies, cut ones, bytes after the end, interim 1xx responses first), to
a client sending one request per connection or several on a keep-alive
connection.

The reference is ``h11``, as a client. For each request:

- when h11 takes the upstream's bytes as one complete, valid response,
  the client sees exactly that response (status, body bytes);
- otherwise the client sees a 502 Matrix JSON error, or a visibly cut
  response: the head, part of the body, then the end of the connection
  before the end its framing announced;
- never a mix of two responses, and never a byte of one response in the
  answer to the next request (every body carries its own marker; stray
  bytes after a response say STRAY).

Where RFC 9110/9112 let a recipient either accept or refuse a shape (bare
LF line ends, obs-fold, duplicate equal Content-Length, odd status codes,
loose chunk lines) and h11 accepts it, the edge may also answer 502; if it
relays the response, the response must be exact. Such shapes are marked
"lenient" where they are drawn.
"""

from __future__ import annotations

import contextlib
import itertools

import attrs
import h11
import pytest
import pytest_twisted
from hypothesis import event, given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.adversarial.conftest import FUZZ, ScriptedProtocol, ScriptedUpstream
from tests.adversarial.wire import Conn, read_response
from tests.recording_upstream import Recorded

ANSWER = 10.0
STRAY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nSTRAY"

_examples = itertools.count(1)

# The grammar ------------------------------------------------------------------
#
# Each choice is (bytes, kind), kind being "valid", "lenient" (a recipient
# may take it or refuse it) or "hostile" (invalid). A response has at most
# two parts that are not valid.

VALID, LENIENT, HOSTILE = "valid", "lenient", "hostile"

STATUS_LINES = [
    (b"HTTP/1.1 %d OK", VALID),
    (b"HTTP/1.1 %d Whatever it is", VALID),
    (b"HTTP/1.1 %d ", VALID),
    (b"HTTP/1.0 %d OK", VALID),
    (b"HTTP/1.1 %d caf\xe9", VALID),
    (b"HTTP/1.1 %d", LENIENT),
    (b"HTTP/1.1 %d\tOK", LENIENT),
    (b"HTTP/1.1  %d OK", HOSTILE),
    (b"HTTX/1.1 %d OK", HOSTILE),
    (b"http/1.1 %d OK", HOSTILE),
    (b"HTTP/2 %d OK", HOSTILE),
    (b"HTTP/1.1 %d O\x00K", HOSTILE),
    (b"HTTP/1.1 -%d OK", HOSTILE),
    (b"HTTP/1.1 %d0 OK", HOSTILE),
    (b"garbage", HOSTILE),
    (b"", HOSTILE),
]
CODES = [200] * 6 + [201, 204, 301, 304, 400, 403, 404, 429, 500, 503]
ODD_CODES = [(20, HOSTILE), (600, LENIENT), (999, LENIENT), (99, HOSTILE)]

INTERIM = [
    (b"HTTP/1.1 100 Continue\r\n\r\n", VALID),
    (b"HTTP/1.1 102 Processing\r\n\r\n", VALID),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n", VALID),
    (b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n", LENIENT),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", HOSTILE),
    (b"HTTP/1.1 100 Continue\r\n", HOSTILE),
]

FIELDS = [
    ([b"Content-Type: application/json"], VALID),
    ([b"X-A:  \t spaced \t "], VALID),
    ([b"Set-Cookie: a=1", b"Set-Cookie: b=2"], VALID),
    ([b"Connection: close"], VALID),
    ([b"Connection: keep-alive", b"Keep-Alive: timeout=5"], VALID),
    ([b"X-Obs: caf\xe9"], VALID),
    ([b"X-Empty:"], VALID),
    ([b"X-Fold: a", b" X-Injected: 1"], LENIENT),
    ([b"X-Ctl: a\x01b"], LENIENT),
    ([b"X-Nul: a\x00b"], HOSTILE),
    ([b"X-Cr: a\rb"], HOSTILE),
    ([b"X Space: 1"], HOSTILE),
    ([b"X-Before : 1"], HOSTILE),
    ([b": empty-name"], HOSTILE),
]

EOL = [(b"\r\n", VALID), (b"\n", LENIENT), (b"\r", HOSTILE), (b"\n\r", HOSTILE)]

CONTENT_LENGTHS = [
    ([b"%d"], VALID),
    ([b"%05d"], VALID),
    ([b" %d "], VALID),
    ([b"%d", b"%d"], LENIENT),
    ([b"%d, %d"], LENIENT),
    ([b"%d", b"%d0"], HOSTILE),
    ([b"+%d"], HOSTILE),
    ([b"0x%x"], HOSTILE),
    ([b"-%d"], HOSTILE),
    ([b""], HOSTILE),
]
CODINGS = [
    (b"chunked", VALID),
    (b"Chunked", VALID),
    # Not chunked last: the body runs to the close (RFC 9112 section 6.3),
    # which h11 refuses to read.
    (b"identity", LENIENT),
    # Codings the edge cannot relay as they are meant: a 502.
    (b"gzip, chunked", HOSTILE),
    (b"chunked, chunked", HOSTILE),
]
CHUNK_SIZES = [
    (b"%x", VALID),
    (b"%X", VALID),
    (b"%04x", VALID),
    (b"%x;ext=1", VALID),
    (b'%x;a="b c"', VALID),
    (b"%x ", LENIENT),
    (b"%x;a\x01", LENIENT),
    (b"0x%x", HOSTILE),
    (b"+%x", HOSTILE),
    (b"-%x", HOSTILE),
    (b"%x%x", HOSTILE),
]
LAST_CHUNKS = [
    (b"0\r\n\r\n", VALID),
    (b"000\r\n\r\n", VALID),
    (b"0;x=y\r\nX-Trailer: 1\r\n\r\n", VALID),
    (b"0\r\n\n", LENIENT),
    (b"0\r\n" + STRAY + b"\r\n\r\n", HOSTILE),
    (b"0\r\nX Bad: 1\r\n\r\n", HOSTILE),
]
CHUNK_ENDS = [(b"\r\n", VALID), (b"\n", HOSTILE), (b"", HOSTILE), (b"xx", HOSTILE)]
LENGTH_DELTAS = [(0, VALID), (-1, HOSTILE), (-5, HOSTILE), (1, HOSTILE), (7, HOSTILE)]
AFTER = [
    (b"", VALID),
    (b"junk", HOSTILE),
    (b"\r\n", HOSTILE),
    (STRAY, HOSTILE),
]
BODY_SIZES = [0, 2, 10, 100, 3000, 70000]


@attrs.define
class Plan:
    """One response as the upstream sends it, and what the grammar meant."""

    raw: bytes
    ending: str
    """After writing: "keep" the connection, "close" it, or "reset" it."""
    status: int
    payload: bytes
    kinds: set[str]

    @property
    def lenient(self) -> bool:
        return LENIENT in self.kinds or HOSTILE in self.kinds


class Picker:
    def __init__(self, draw: st.DrawFn):
        self.draw = draw
        self.kinds: set[str] = set()
        self.odd_left = draw(st.integers(0, 2))
        self.parts: list[str] = []

    def __call__(self, name: str, choices: list) -> object:
        allowed = [c for c in choices if c[1] == VALID or self.odd_left > 0]
        value, kind = self.draw(st.sampled_from(allowed))
        if kind != VALID:
            self.odd_left -= 1
            self.kinds.add(kind)
            self.parts.append(f"{name}:{kind}")
        return value


def _fill(form: bytes, n: int) -> bytes:
    return form % tuple([n] * form.count(b"%"))


@st.composite
def response(draw: st.DrawFn, marker: bytes) -> Plan:
    pick = Picker(draw)
    code = draw(st.sampled_from(CODES))
    if pick.odd_left and draw(st.integers(0, 9)) == 0:
        code = pick("code", ODD_CODES)  # type: ignore[assignment]
    bodiless = code in (204, 304)
    size = draw(st.sampled_from(BODY_SIZES))
    payload = b"" if bodiless else (marker + b"." * size)
    raw = b"".join(
        pick("interim", INTERIM)  # type: ignore[misc]
        for _ in range(draw(st.integers(0, 2)))
    )
    eol = pick("eol", EOL)
    assert isinstance(eol, bytes)
    lines = [_fill(pick("status", STATUS_LINES), code)]  # type: ignore[arg-type]
    for _ in range(draw(st.integers(0, 2))):
        lines += pick("field", FIELDS)  # type: ignore[arg-type]
    framing = (
        "none" if bodiless else draw(st.sampled_from(["length", "chunked", "close"]))
    )
    if bodiless and draw(st.booleans()):
        framing = "length"  # a 204 or 304 that announces a length anyway
    body = b""
    until_close = False
    complete_framing = framing != "close"
    if framing == "length":
        delta = pick("length-delta", LENGTH_DELTAS)
        assert isinstance(delta, int)
        announced = max(0, len(payload) + delta)
        for form in pick("content-length", CONTENT_LENGTHS):  # type: ignore[attr-defined]
            lines.append(b"Content-Length: " + _fill(form, announced))
        body = payload
        complete_framing = delta <= 0 or bodiless
    elif framing == "chunked":
        coding = pick("coding", CODINGS)
        assert isinstance(coding, bytes)
        lines.append(b"Transfer-Encoding: " + coding)
        until_close = coding == b"identity"
        cut_at = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=2)))
        for a, b in itertools.pairwise([0, *cut_at, len(payload)]):
            if a == b:
                continue
            size = pick("chunk-size", CHUNK_SIZES)
            body += _fill(size, b - a) + b"\r\n" + payload[a:b]  # type: ignore[arg-type]
            body += pick("chunk-end", CHUNK_ENDS)  # type: ignore[operator]
        body += pick("last-chunk", LAST_CHUNKS)  # type: ignore[operator]
    raw += b"".join(line + eol for line in lines) + eol
    after = pick("after", AFTER)
    assert isinstance(after, bytes)
    if framing == "chunked" and until_close:
        payload = body + after  # all of it, as it is, to the close
        complete_framing = False
    raw += body + after
    if pick.odd_left and draw(st.integers(0, 3)) == 0:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
        pick.kinds.add(HOSTILE)
        pick.parts.append("truncated")
        complete_framing = False
    framing_odd = any(
        p.split(":")[0]
        in ("length-delta", "content-length", "coding", "chunk-size", "chunk-end")
        or p.startswith(("last-chunk", "truncated", "status", "eol", "interim"))
        for p in pick.parts
    )
    if complete_framing and not framing_odd:
        ending = draw(st.sampled_from(["keep", "keep", "close"]))
    else:
        # The upstream gives an end the edge can see: it would wait for
        # the rest of a response otherwise, as it should.
        ending = draw(st.sampled_from(["close", "close", "reset"]))
    for part in pick.parts:
        event(part)
    return Plan(raw, ending, code, payload, pick.kinds)


@st.composite
def exchanges(draw: st.DrawFn) -> list[Plan]:
    """One to three responses, each body starting with a marker of its own
    (a tag that differs from example to example, and its place)."""
    count = draw(st.integers(1, 3))
    tag = draw(st.integers(100_000, 999_999))
    return [draw(response(b"<%d.%d>" % (tag, k))) for k in range(count)]


# The reference ------------------------------------------------------------------


@attrs.define
class Judged:
    status: int
    body: bytes


def judge(plan: Plan) -> Judged | None:
    """The response h11 reads from the upstream's bytes, if it reads one
    complete and valid response."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/x", headers=[("Host", "h")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(plan.raw)
    if plan.ending == "close":
        conn.receive_data(b"")
    status = None
    body = b""
    try:
        while True:
            got = conn.next_event()
            if isinstance(got, h11.InformationalResponse):
                if got.status_code == 101:
                    return None  # a switch nobody asked for
                continue
            if isinstance(got, h11.Response):
                status = got.status_code
            elif isinstance(got, h11.Data):
                body += bytes(got.data)
            elif isinstance(got, h11.EndOfMessage):
                assert status is not None
                return Judged(status, body)
            else:
                return None
    except (h11.RemoteProtocolError, h11.LocalProtocolError):
        return None


# The exchange ---------------------------------------------------------------------

PLANS: dict[bytes, Plan] = {}
"""The plan for each request target the upstream may get."""
PLANS_KEY: dict[int, bytes] = {}
"""The request target of each plan."""


def answer(proto: ScriptedProtocol, rec: Recorded, nth: int) -> bool:
    plan = PLANS.get(rec.target)
    if plan is None:
        return False
    proto.write(plan.raw)
    if plan.ending == "close":
        proto.close()
    elif plan.ending == "reset":
        reactor.callLater(0.05, proto.reset)  # once the bytes are out
    return True


@pytest.fixture(scope="module")
def fuzz_stack(module_edge):
    return module_edge(ScriptedUpstream(answer))


def run(port: int, plans: list[Plan], keep_alive: bool) -> list[tuple]:
    """Each plan's request, in turn; what the client saw of each answer,
    and the bytes that came after it before the next request."""
    seen = []
    conn: Conn | None = None
    try:
        for plan in plans:
            if conn is None or not keep_alive:
                if conn is not None:
                    conn.close()
                conn = Conn(port, timeout=ANSWER)
            conn.send(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % PLANS_KEY[id(plan)])
            resp, how = read_response(conn, b"GET", ANSWER)
            stray = conn.buf
            if how == "complete" and not stray:
                # Anything more on the wire before the next request?
                conn.sock.settimeout(0.02)
                with contextlib.suppress(TimeoutError):
                    conn._fill()
                stray = conn.buf
            seen.append((resp, how, stray))
            closes = resp is None or how != "complete"
            closes = closes or (resp.header(b"connection") or b"").lower() == b"close"
            if closes:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()
    return seen


@given(plans=exchanges(), keep_alive=st.booleans())
@FUZZ
@pytest_twisted.ensureDeferred
async def test_client_sees_exactly_the_response_h11_reads(
    fuzz_stack, plans, keep_alive
):
    """See the module docstring."""
    example = next(_examples)
    for k, plan in enumerate(plans):
        key = b"/_matrix/client/v3/fuzz?r=%d.%d" % (example, k)
        PLANS[key] = plan
        PLANS_KEY[id(plan)] = key
    try:
        seen = await deferToThread(run, fuzz_stack.port, plans, keep_alive)
    finally:
        for plan in plans:
            PLANS.pop(PLANS_KEY.pop(id(plan)), None)
    for k, (plan, (resp, how, stray)) in enumerate(zip(plans, seen, strict=True)):
        judged = judge(plan)
        context = {"how": how, "resp": resp, "k": k, "judged": judged}
        context |= {"raw": plan.raw, "ending": plan.ending}
        assert how not in ("timeout", "eof"), ("no answer", context)
        assert resp is not None
        assert stray == b"", ("bytes after the answer", stray, context)
        assert b"STRAY" not in resp.body, ("another response's bytes", context)
        assert resp.header(b"x-injected") is None, ("a folded line relayed", context)
        exact = how == "complete" and (resp.status, resp.body) == (
            (judged.status, judged.body) if judged else (plan.status, plan.payload)
        )
        bad_gateway = how == "complete" and resp.status == 502 and _matrix_error(resp)
        cut = (
            how == "cut"
            and resp.status == plan.status
            and plan.payload.startswith(resp.body)
        )
        if judged is not None and not plan.lenient:
            event("h11 takes it; relayed" if exact else "h11 takes it; not relayed")
            assert exact, ("a valid response not relayed as it is", context)
        elif judged is not None:
            # RFC 9112 lets a recipient refuse these shapes; h11 takes them.
            # Refused once the head is out, the response can only be cut.
            event("lenient; relayed" if exact else "lenient; 502 or cut")
            assert exact or bad_gateway or cut, (
                "not relayed, nor 502, nor cut",
                context,
            )
        else:
            event(f"h11 refuses it; {'502' if bad_gateway else how}")
            # What h11 refuses may still be a shape the edge can relay
            # as meant (lenient ones), and exactly.
            relayed = LENIENT in plan.kinds and exact
            assert bad_gateway or cut or relayed, ("neither 502 nor cut", context)


def _matrix_error(resp) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return resp.header(b"content-type") == b"application/json" and {
        "errcode",
        "error",
    } <= set(body)
