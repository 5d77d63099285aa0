"""A bounded soak of matrix-edge with faults: bench/soak [--minutes N].

One ``twistd matrix-edge`` (the default configuration plus a TLS listener
with HTTP/2, on loopback) in front of bench/soak_upstream.py, under mixed
traffic at a bounded rate, while the upstream is restarted, killed
mid-response and slowed, and the edge is reloaded with SIGHUP in between.
Every answer is checked against the request it belongs to (an ID echoed by
the upstream, the body's sha256), and each request ends as:

- ``ok``: the upstream's answer to that very request;
- ``edge_error``: a 502, 503 or 504 Matrix JSON error from the edge, which
  must fall in a fault window (the upstream down, killed or slow then, or
  up to GRACE_S seconds after it recovered) or it is a failure;
- ``lost``: no answer, a transport error or a body cut short, allowed only
  when the upstream process died while the request was in flight;
- ``wrong``: a status or body that does not belong to the request. Always
  a failure.

HTTP/2 streams that the edge did not take (above the last stream of a
GOAWAY, or refused) are sent again on a new connection, as clients do, and
counted as retried. The edge's RSS and open descriptors are read from /proc
at the start (after a warm-up, traffic stopped), through the run (peak) and
at the end (traffic stopped, connections closed), and must come back near
the start. A JSON summary goes to bench/results/soak-latest.json; the exit
status is 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from soak_upstream import body_for  # noqa: E402

from tests.pki import make_pki  # noqa: E402

HOST = "127.0.0.1"
GRACE_S = 5.0
"""An edge error up to this long after the upstream came back (or stopped
being slow) still belongs to the fault: the edge checks a failed upstream
every second."""
RSS_TOLERANCE_KIB = 20 * 1024
FD_TOLERANCE = 10
SETTLE_MAX_S = 90.0
"""How long the end measurement waits for the edge to settle: idle upstream
connections are kept for upstream_pool.idle_timeout (60 s)."""
CHUNK = 64 * 1024

# The two configurations a changing reload alternates between.
VARIANTS = [
    {"upstream_response": "30s", "well_known": "soak-a.test:443"},
    {"upstream_response": "34s", "well_known": "soak-b.test:443"},
]


class TransportError(Exception):
    """No complete answer: the connection or stream failed."""


class Retryable(Exception):
    """The server did not take the request (GOAWAY, REFUSED_STREAM)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


# HTTP/1.1 -------------------------------------------------------------------


class H1Conn:
    """One HTTP/1.1 connection, plain or TLS, requests one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.used = 0

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext | None) -> H1Conn:
        try:
            reader, writer = await asyncio.open_connection(
                HOST,
                port,
                ssl=context,
                server_hostname="localhost" if context else None,
                limit=1 << 20,
            )
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"connect: {type(e).__name__}: {e}") from None
        return cls(reader, writer)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    async def request(
        self,
        method: str,
        target: str,
        headers: list[str],
        body: bytes | None = None,
    ) -> Answer:
        lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        sender = asyncio.create_task(self._send(body)) if body else None
        reused = self.used > 0
        try:
            answer = await self._read_response()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            OSError,
            ssl.SSLError,
            ValueError,
        ) as e:
            self.close()
            partial = getattr(e, "partial", None)
            where = "reused keep-alive connection" if reused else "new connection"
            detail = f"{type(e).__name__} on a {where}"
            if partial is not None:
                detail += f" after {len(partial)} bytes"
            raise TransportError(detail) from None
        except asyncio.CancelledError:
            # Given up on (a timeout): what is left of the answer must not
            # be read as the next request's.
            self.close()
            raise
        finally:
            if sender is not None:
                if not sender.done():
                    # Answered before the body was taken: the connection
                    # cannot carry another request.
                    sender.cancel()
                    self.close()
                elif sender.cancelled() or sender.exception() is not None:
                    self.close()
        self.used += 1
        if answer.headers.get("connection", "").lower() == "close":
            self.close()
        return answer

    async def _send(self, body: bytes) -> None:
        for i in range(0, len(body), CHUNK):
            self.writer.write(body[i : i + CHUNK])
            await self.writer.drain()

    async def _read_response(self) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = (lines[0] + " ").split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"bad status line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    break
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        else:
            body = await self.reader.read()
            headers["connection"] = "close"
        return Answer(int(status), headers, body)


# HTTP/2 ---------------------------------------------------------------------


class GracefulH2Connection(h2.connection.H2Connection):
    """h2 closes its whole state machine on GOAWAY and then refuses every
    frame; RFC 9113 lets the streams the server took finish. This one
    reports the GOAWAY and carries on with them."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


@dataclass
class H2Stream:
    done: asyncio.Future[Answer]
    window: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class H2Conn:
    """One HTTP/2 connection over TLS, shared by several tasks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = GracefulH2Connection(config=config)
        self.streams: dict[int, H2Stream] = {}
        self.goaway_last: int | None = None
        self.goaways: list[str] = []
        self.dead: str | None = None
        self.conn.initiate_connection()
        self._flush()
        self._reading = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> H2Conn:
        try:
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=context, server_hostname="localhost", limit=1 << 20
            )
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"connect: {type(e).__name__}: {e}") from None
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn != "h2":
            writer.close()
            raise TransportError(f"ALPN chose {alpn!r}, not h2")
        return cls(reader, writer)

    def usable(self) -> bool:
        return self.dead is None and self.goaway_last is None and len(self.streams) < 90

    def close(self) -> None:
        if self.dead is None:
            self.dead = "closed by the client"
        self.writer.close()
        self._reading.cancel()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None = None,
    ) -> Answer:
        if not self.usable():
            raise Retryable("connection going away before the request")
        stream_id = self.conn.get_next_available_stream_id()
        stream = H2Stream(done=asyncio.get_running_loop().create_future())
        self.streams[stream_id] = stream
        block = [
            (":method", method),
            (":scheme", "https"),
            (":path", path),
            (":authority", "localhost"),
            *headers,
        ]
        if body is not None:
            block.append(("content-length", str(len(body))))
        self.conn.send_headers(
            stream_id,
            [(k.encode(), v.encode()) for k, v in block],
            end_stream=not body,
        )
        self._flush()
        sender = (
            asyncio.create_task(self._send_body(stream_id, stream, body))
            if body
            else None
        )
        try:
            return await stream.done
        finally:
            if sender is not None:
                sender.cancel()
            if not stream.done.done():
                # Given up on (a timeout): cancel the stream.
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                    self._flush()
            self.streams.pop(stream_id, None)
            if self.goaway_last is not None and not self.streams:
                self.close()

    async def _send_body(self, stream_id: int, stream: H2Stream, body: bytes) -> None:
        position = 0
        while position < len(body) and self.dead is None and not stream.done.done():
            try:
                window = min(
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                    len(body) - position,
                )
                if window <= 0:
                    stream.window.clear()
                    await stream.window.wait()
                    continue
                end = position + window == len(body)
                self.conn.send_data(
                    stream_id, body[position : position + window], end_stream=end
                )
            except h2.exceptions.ProtocolError:
                return  # the stream was reset or closed under us
            position += window
            self._flush()
            await self.writer.drain()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    raise TransportError("connection closed")
                for event in self.conn.receive_data(data):
                    self._handle(event)
                self._flush()
        except asyncio.CancelledError:
            reason = self.dead or "closed by the client"
            self._fail_all(reason)
            raise
        except Exception as e:
            self._fail_all(f"{type(e).__name__}: {e}")
            self.writer.close()

    def _fail_all(self, reason: str) -> None:
        self.dead = reason
        for stream in self.streams.values():
            if not stream.done.done():
                stream.done.set_exception(TransportError(f"h2 connection: {reason}"))
            stream.window.set()

    def _handle(self, event: Any) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream:
            for name, value in event.headers:
                stream.headers[name.decode().lower()] = value.decode("latin-1")
            stream.status = int(stream.headers[":status"])
        elif isinstance(event, h2.events.DataReceived):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
            if stream:
                stream.body += event.data
        elif isinstance(event, h2.events.StreamEnded) and stream:
            if not stream.done.done():
                stream.done.set_result(
                    Answer(stream.status, stream.headers, bytes(stream.body))
                )
            stream.window.set()
        elif isinstance(event, h2.events.StreamReset) and stream:
            if not stream.done.done():
                if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    stream.done.set_exception(Retryable("REFUSED_STREAM"))
                else:
                    stream.done.set_exception(
                        TransportError(f"stream reset: {event.error_code!r}")
                    )
            stream.window.set()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for each in self.streams.values():
                each.window.set()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for each in self.streams.values():
                    each.window.set()
            elif stream:
                stream.window.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            last = event.last_stream_id
            self.goaways.append(f"{event.error_code!r} last={last}")
            self.goaway_last = (
                last if self.goaway_last is None else min(last, self.goaway_last)
            )
            for stream_id, each in self.streams.items():
                if stream_id > self.goaway_last and not each.done.done():
                    each.done.set_exception(Retryable("GOAWAY, stream not taken"))


class H2Session:
    """The connection a group of tasks shares; a new one once the edge has
    sent GOAWAY or the connection failed."""

    def __init__(self, port: int, context: ssl.SSLContext):
        self.port = port
        self.context = context
        self.current: H2Conn | None = None
        self.all: list[H2Conn] = []
        self.lock = asyncio.Lock()
        self.opened = 0

    async def get(self) -> H2Conn:
        async with self.lock:
            if self.current is None or not self.current.usable():
                self.current = await H2Conn.open(self.port, self.context)
                self.all.append(self.current)
                self.opened += 1
                self.all = [c for c in self.all if c.dead is None]
            return self.current

    def close(self) -> None:
        for conn in self.all:
            conn.close()
        self.all = []
        self.current = None


# Accounting -----------------------------------------------------------------


@dataclass
class Record:
    id: str
    protocol: str
    kind: str
    phase: str
    start: float
    end: float = 0.0
    outcome: str = ""
    status: int = 0
    detail: str = ""
    retries: list[str] = field(default_factory=list)
    cause: str = ""
    note: str = ""


@dataclass
class Fault:
    kind: str
    start: float
    end: float
    death_from: float | None = None
    died_at: float | None = None
    detail: str = ""

    def window(self) -> tuple[float, float]:
        return self.start, self.end + GRACE_S


@dataclass
class Reload:
    at: float
    changed: bool
    variant: int
    confirmed_after_s: float | None = None


@dataclass
class Sample:
    at: float
    rss_kib: int
    fds: int


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.records: list[Record] = []
        self.faults: list[Fault] = []
        self.reloads: list[Reload] = []
        self.samples: list[Sample] = []
        self.phase = "warmup"
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.sessions: list[H2Session] = []
        self.h1_conns: set[H1Conn] = set()
        self.variant = 0
        self.well_known_history: list[tuple[float, str]] = []
        self.upstream: subprocess.Popen[bytes] | None = None
        self.edge: subprocess.Popen[bytes] | None = None
        self.t0 = time.monotonic()
        self.counter = 0

    # Processes ----------------------------------------------------------------

    def setup(self) -> None:
        self.run = RESULTS / "soak-run"
        shutil.rmtree(self.run, ignore_errors=True)
        self.run.mkdir(parents=True)
        self.pki = make_pki(self.run / "pki")
        self.upstream_port = free_port()
        self.control_port = free_port()
        self.plain_port = free_port()
        self.tls_port = free_port()
        self.config_path = self.run / "edge.yaml"
        self.edge_log = self.run / "edge.log"
        self.upstream_log = self.run / "upstream.log"
        self.h1_context = self._context(["http/1.1"])
        self.h2_context = self._context(["h2"])

    def _context(self, alpn: list[str]) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert_path))
        context.set_alpn_protocols(alpn)
        return context

    def write_config(self, variant: int) -> None:
        values = VARIANTS[variant]
        document = {
            "listeners": [
                {"port": self.plain_port, "bind_addresses": [HOST], "type": "client"},
                {
                    "port": self.tls_port,
                    "bind_addresses": [HOST],
                    "type": "client",
                    "tls": {
                        "certificate_path": str(self.pki.chain_path),
                        "private_key_path": str(self.pki.key_path),
                    },
                },
            ],
            "upstream": f"http://{HOST}:{self.upstream_port}",
            "timeouts": {"upstream_response": values["upstream_response"]},
            "well_known": {"server": values["well_known"]},
        }
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n")
        temporary.replace(self.config_path)
        self.well_known_history.append((time.monotonic(), values["well_known"]))

    async def start_upstream(self) -> float:
        """Start the upstream on its port; when it listens."""
        log = open(self.upstream_log, "ab")  # noqa: SIM115 - owned by the child
        self.upstream = subprocess.Popen(
            [
                sys.executable,
                str(BENCH / "soak_upstream.py"),
                "--port", str(self.upstream_port),
                "--control-port", str(self.control_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        await wait_port(self.upstream_port, self.upstream, 20)
        await wait_port(self.control_port, self.upstream, 20)
        return time.monotonic()

    async def wait_upstream_exit(self, timeout: float) -> float | None:
        assert self.upstream is not None
        deadline = time.monotonic() + timeout
        while self.upstream.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.005)
        return time.monotonic()

    async def start_edge(self) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        log = open(self.edge_log, "ab")  # noqa: SIM115 - owned by the child
        self.edge = subprocess.Popen(
            [
                str(twistd), "-n", "--pidfile=", "matrix-edge",
                "--config", str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        await wait_port(self.plain_port, self.edge, 30)
        await wait_port(self.tls_port, self.edge, 30)

    def stop_processes(self) -> None:
        for process in (self.edge, self.upstream):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    async def control(self, path: str) -> dict[str, Any]:
        conn = await H1Conn.open(self.control_port, None)
        try:
            answer = await asyncio.wait_for(conn.request("GET", path, []), 10)
        finally:
            conn.close()
        return dict(json.loads(answer.body))

    # Traffic ------------------------------------------------------------------

    def next_id(self, protocol: str, kind: str) -> str:
        self.counter += 1
        return f"{protocol}.{kind}.{self.counter}"

    async def one(
        self,
        protocol: str,
        kind: str,
        send: Callable[[Record, dict[str, Any]], Awaitable[Answer]],
        rng: random.Random,
    ) -> str:
        """Send one request of C{kind}, with retries of what the edge did
        not take, and record how it ended; the outcome."""
        record = Record(
            id=self.next_id(protocol, kind),
            protocol=protocol,
            kind=kind,
            phase=self.phase,
            start=time.monotonic(),
        )
        self.records.append(record)
        request = self.build(record, rng)
        timeout = 120.0 if kind in ("sync", "upload", "download") else 60.0
        for _attempt in range(5):
            try:
                answer = await asyncio.wait_for(send(record, request), timeout)
            except Retryable as e:
                record.retries.append(str(e))
                continue
            except TransportError as e:
                self.finish(record, "lost", 0, str(e))
                return record.outcome
            except asyncio.TimeoutError:
                self.finish(record, "lost", 0, f"no answer in {timeout:.0f}s")
                return record.outcome
            except Exception as e:
                # A fault of this client, not of the edge.
                self.finish(record, "client_error", 0, f"{type(e).__name__}: {e}")
                return record.outcome
            self.judge(record, request, answer)
            return record.outcome
        self.finish(record, "lost", 0, "not taken after 5 attempts")
        return record.outcome

    def build(self, record: Record, rng: random.Random) -> dict[str, Any]:
        rid = record.id
        if record.kind == "echo":
            return {"method": "GET", "target": f"/_matrix/client/v3/soak/echo?id={rid}"}
        if record.kind == "sync":
            hold = round(rng.uniform(2, 20), 1)
            return {
                "method": "GET",
                "target": f"/_matrix/client/v3/sync?id={rid}&hold={hold}&timeout={int(hold * 1000)}",
                "hold": hold,
            }
        if record.kind == "upload":
            size = rng.randint(1 << 20, 4 << 20)
            body = body_for(rid, size)
            return {
                "method": "POST",
                "target": f"/_matrix/media/v3/upload?id={rid}",
                "body": body,
                "sha256": hashlib.sha256(body).hexdigest(),
                "headers": [("content-type", "application/octet-stream")],
            }
        if record.kind == "download":
            size = rng.randint(1 << 20, 4 << 20)
            return {
                "method": "GET",
                "target": f"/_matrix/media/v3/download/soak.test/{rid}?size={size}",
                "size": size,
            }
        if record.kind == "wellknown":
            return {"method": "GET", "target": "/.well-known/matrix/server"}
        raise ValueError(record.kind)

    def finish(self, record: Record, outcome: str, status: int, detail: str) -> None:
        record.end = time.monotonic()
        record.outcome = outcome
        record.status = status
        record.detail = detail

    def judge(self, record: Record, request: dict[str, Any], answer: Answer) -> None:
        status = answer.status
        if status in (502, 503, 504):
            try:
                document = json.loads(answer.body)
                matrix = isinstance(document.get("errcode"), str) and isinstance(
                    document.get("error"), str
                )
            except (ValueError, AttributeError):
                matrix = False
            if matrix:
                self.finish(record, "edge_error", status, document["errcode"])
            else:
                self.finish(
                    record, "wrong", status, f"not Matrix JSON: {answer.body[:100]!r}"
                )
            return
        if status != 200:
            self.finish(record, "wrong", status, f"body {answer.body[:200]!r}")
            return
        problem = self.check_body(record, request, answer)
        if problem:
            self.finish(record, "wrong", status, problem)
        else:
            self.finish(record, "ok", status, "")

    def check_body(
        self, record: Record, request: dict[str, Any], answer: Answer
    ) -> str:
        """What is wrong with a 200 answer to C{record}, or ''."""
        if record.kind == "download":
            if answer.headers.get("x-soak-id") != record.id:
                return f"X-Soak-Id {answer.headers.get('x-soak-id')!r}"
            if len(answer.body) != request["size"]:
                return f"{len(answer.body)} bytes, not {request['size']}"
            expected = hashlib.sha256(body_for(record.id, request["size"])).hexdigest()
            if hashlib.sha256(answer.body).hexdigest() != expected:
                return "download sha256 differs"
            return ""
        try:
            document = json.loads(answer.body)
        except ValueError:
            return f"not JSON: {answer.body[:100]!r}"
        if record.kind == "wellknown":
            allowed = self.allowed_well_known(record.start, time.monotonic())
            value = document.get("m.server")
            if value not in allowed:
                return f"well-known {value!r}, expected one of {sorted(allowed)}"
            return ""
        if document.get("id") != record.id:
            return f"answer to {document.get('id')!r}"
        if answer.headers.get("x-soak-id") != record.id:
            return f"X-Soak-Id {answer.headers.get('x-soak-id')!r}"
        if document.get("target") != request["target"]:
            return f"upstream saw target {document.get('target')!r}"
        tls = record.protocol != "h1" and record.protocol != "h1-newconn"
        if document.get("xfp") != ("https" if tls else "http"):
            return f"X-Forwarded-Proto {document.get('xfp')!r}"
        if record.kind == "upload" and (
            document.get("sha256") != request["sha256"]
            or document.get("length") != len(request["body"])
        ):
            return f"upload reached upstream as {document.get('length')} bytes, sha256 {document.get('sha256')}"
        if record.kind == "sync":
            elapsed = time.monotonic() - record.start
            if float(document.get("held", 0)) > elapsed + 0.5:
                return f"held {document.get('held')}s, longer than the request took"
        return ""

    def allowed_well_known(self, start: float, end: float) -> set[str]:
        allowed = set()
        for at, value in self.well_known_history:
            if at <= start - 1:
                allowed = {value}
            elif at <= end:
                allowed.add(value)
        return allowed

    async def send_h1(
        self, conn_holder: list[H1Conn | None], port: int, tls: bool, keep: bool
    ) -> Callable[[Record, dict[str, Any]], Awaitable[Answer]]:
        context = self.h1_context if tls else None

        async def send(record: Record, request: dict[str, Any]) -> Answer:
            conn = conn_holder[0]
            if conn is None or conn.closed:
                conn = await H1Conn.open(port, context)
                self.h1_conns.add(conn)
                conn_holder[0] = conn
            headers = [f"{k}: {v}" for k, v in request.get("headers", [])]
            try:
                return await conn.request(
                    request["method"], request["target"], headers, request.get("body")
                )
            finally:
                if not keep or conn.closed:
                    conn.close()
                    self.h1_conns.discard(conn)
                    conn_holder[0] = None

        return send

    def send_h2(
        self, session: H2Session
    ) -> Callable[[Record, dict[str, Any]], Awaitable[Answer]]:
        async def send(record: Record, request: dict[str, Any]) -> Answer:
            conn = await session.get()
            return await conn.request(
                request["method"],
                request["target"],
                list(request.get("headers", [])),
                request.get("body"),
            )

        return send

    async def loop(
        self,
        protocol: str,
        kind: str,
        interval: float,
        send: Callable[[Record, dict[str, Any]], Awaitable[Answer]],
        seed: int,
        cleanup: Callable[[], None] = lambda: None,
    ) -> None:
        rng = random.Random(seed)
        # Spread the tasks' starts over one interval.
        next_at = time.monotonic() + rng.uniform(0, interval)
        try:
            while not self.stopping.is_set():
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), delay)
                    if self.stopping.is_set():
                        break
                next_at = max(next_at + interval, time.monotonic())
                if await self.one(protocol, kind, send, rng) != "ok":
                    # Back off as a client does after an error, so that a
                    # down upstream's fast 502s do not become a flood.
                    next_at = max(next_at, time.monotonic() + 1.0)
        finally:
            cleanup()

    async def start_traffic(self) -> None:
        """The mix: about 250 small requests a second, 20 long-polls held
        at any time, and a few MB-sized uploads and downloads a second."""
        self.stopping = asyncio.Event()
        seed = self.rng.randrange(1 << 30)
        specs: list[tuple[str, str, float, int]] = [
            # protocol, kind, seconds between requests, tasks
            ("h1", "echo", 1 / 25, 4),
            ("h1", "sync", 0.0, 6),
            ("h1", "upload", 3.0, 1),
            ("h1", "download", 3.0, 1),
            ("h1", "wellknown", 1.0, 1),
            ("h1-newconn", "echo", 1 / 15, 2),
            ("h1-tls", "echo", 1 / 20, 2),
            ("h1-tls", "sync", 0.0, 2),
            ("h1-tls", "upload", 4.0, 1),
            ("h1-tls", "download", 4.0, 1),
            ("h1-tls-newconn", "echo", 0.5, 1),
        ]
        index = 0
        for protocol, kind, interval, count in specs:
            for _ in range(count):
                holder: list[H1Conn | None] = [None]
                tls = protocol.startswith("h1-tls")
                keep = not protocol.endswith("newconn")
                port = self.tls_port if tls else self.plain_port
                send = await self.send_h1(holder, port, tls, keep)

                def cleanup(holder: list[H1Conn | None] = holder) -> None:
                    if holder[0] is not None:
                        holder[0].close()

                index += 1
                self.tasks.append(
                    asyncio.create_task(
                        self.loop(protocol, kind, interval, send, seed + index, cleanup)
                    )
                )
        # Two HTTP/2 connections, each with small requests, long-polls and
        # transfers on streams side by side.
        self.sessions = [H2Session(self.tls_port, self.h2_context) for _ in range(2)]
        h2_specs = [
            ("echo", 1 / 10, 4),
            ("sync", 0.0, 4),
            ("upload", 4.0, 1),
            ("download", 4.0, 1),
        ]
        for number, session in enumerate(self.sessions):
            mix = [*h2_specs, ("wellknown", 1.0, 1)] if number == 0 else h2_specs
            for kind, interval, count in mix:
                for _ in range(count):
                    index += 1
                    self.tasks.append(
                        asyncio.create_task(
                            self.loop(
                                "h2",
                                kind,
                                interval,
                                self.send_h2(session),
                                seed + index,
                            )
                        )
                    )

    async def stop_traffic(self) -> None:
        """Let every task finish the request it is on, then close every
        connection."""
        self.stopping.set()
        done, pending = await asyncio.wait(self.tasks, timeout=150)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                print(f"soak: a client task failed: {task.exception()!r}")
        self.tasks = []
        for session in self.sessions:
            session.close()
        for conn in list(self.h1_conns):
            conn.close()
        self.h1_conns.clear()
        await asyncio.sleep(0.5)

    # Faults and reloads -------------------------------------------------------

    async def fault_restart(self) -> None:
        assert self.upstream is not None
        start = time.monotonic()
        self.upstream.send_signal(signal.SIGTERM)
        died = await self.wait_upstream_exit(15)
        detail = ""
        if died is None:
            self.upstream.kill()
            died = await self.wait_upstream_exit(5)
            detail = "did not stop on SIGTERM; killed"
        back = await self.start_upstream()
        self.faults.append(
            Fault("restart", start, back, death_from=start, died_at=died, detail=detail)
        )

    async def fault_kill(self) -> None:
        assert self.upstream is not None
        armed = time.monotonic()
        # It may die before it has answered.
        with contextlib.suppress(TransportError, ValueError, asyncio.TimeoutError):
            await self.control("/die-mid-download")
        died = await self.wait_upstream_exit(20)
        detail = "SIGKILL with a download part-way and a long-poll held"
        if died is None:
            self.upstream.kill()
            died = await self.wait_upstream_exit(5)
            detail = "no download part-way within 20 s; SIGKILL anyway"
        assert died is not None
        death_from = max(armed, died - 0.05)
        for line in reversed(self.upstream_log.read_text().splitlines()):
            if line.startswith("SIGKILL at "):
                death_from = min(death_from, float(line.split()[2]))
                break
        down = self.rng.uniform(2, 6)
        await asyncio.sleep(down)
        back = await self.start_upstream()
        self.faults.append(
            Fault(
                "kill",
                death_from,
                back,
                death_from=death_from,
                died_at=died,
                detail=f"{detail}; down {down:.1f}s",
            )
        )

    async def fault_slow(self) -> None:
        delay = round(self.rng.uniform(6, 15), 1)
        duration = self.rng.uniform(15, 30)
        start = time.monotonic()
        await self.control(f"/slow?delay={delay}")
        await asyncio.sleep(duration)
        await self.control("/slow?delay=0")
        stopped = time.monotonic()
        # What arrived just before the end is answered up to delay later.
        self.faults.append(
            Fault(
                "slow", start, stopped + delay, detail=f"+{delay}s for {duration:.0f}s"
            )
        )

    async def reload(self, changed: bool) -> None:
        assert self.edge is not None
        before = self.edge_log.read_text(errors="replace").count("now in effect")
        if changed:
            self.variant ^= 1
            self.write_config(self.variant)
        at = time.monotonic()
        self.edge.send_signal(signal.SIGHUP)
        entry = Reload(at, changed, self.variant)
        self.reloads.append(entry)
        if changed:
            deadline = at + 10
            while time.monotonic() < deadline:
                text = self.edge_log.read_text(errors="replace")
                if text.count("now in effect") > before:
                    entry.confirmed_after_s = round(time.monotonic() - at, 3)
                    break
                await asyncio.sleep(0.05)

    async def run_faults(self, seconds: float) -> None:
        """Faults in a shuffled rotation, each after a reload, until a quiet
        last half-minute."""
        end = time.monotonic() + seconds
        quiet_tail = min(30.0, seconds / 4)
        rotation: list[str] = []
        changed = True
        while True:
            gap = self.rng.uniform(6, 12)
            if time.monotonic() + 2 * gap + 40 > end - quiet_tail:
                break
            await asyncio.sleep(gap)
            await self.reload(changed)
            changed = not changed
            await asyncio.sleep(self.rng.uniform(6, 12))
            if not rotation:
                rotation = ["restart", "kill", "slow"]
                self.rng.shuffle(rotation)
            kind = rotation.pop()
            print(f"soak: {time.monotonic() - self.t0:6.0f}s {kind}", flush=True)
            await {
                "restart": self.fault_restart,
                "kill": self.fault_kill,
                "slow": self.fault_slow,
            }[kind]()
        await asyncio.sleep(max(0.0, end - time.monotonic()))

    # Measurements -------------------------------------------------------------

    def sample(self) -> Sample:
        assert self.edge is not None
        pid = self.edge.pid
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return Sample(time.monotonic(), rss, fds)

    def vmhwm(self) -> int:
        assert self.edge is not None
        for line in Path(f"/proc/{self.edge.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    async def monitor(self) -> None:
        while True:
            self.samples.append(self.sample())
            await asyncio.sleep(1)

    async def settle(self, baseline: Sample | None) -> tuple[Sample, float]:
        """Wait until the edge is back near C{baseline} (or, without one,
        until its descriptors stop changing); the sample and the wait."""
        start = time.monotonic()
        last = self.sample()
        steady = 0
        while time.monotonic() - start < SETTLE_MAX_S:
            await asyncio.sleep(1)
            current = self.sample()
            if baseline is not None:
                if (
                    current.fds <= baseline.fds + FD_TOLERANCE
                    and current.rss_kib <= baseline.rss_kib + RSS_TOLERANCE_KIB
                ):
                    return current, time.monotonic() - start
            else:
                steady = steady + 1 if current.fds == last.fds else 0
                if steady >= 3:
                    return current, time.monotonic() - start
            last = current
        return last, time.monotonic() - start

    # The run ------------------------------------------------------------------

    async def run_all(self) -> dict[str, Any]:
        args = self.args
        self.setup()
        self.write_config(0)
        await self.start_upstream()
        await self.start_edge()
        print(
            f"soak: matrix-edge PID {self.edge.pid if self.edge else '?'} on "
            f"{self.plain_port} (HTTP) and {self.tls_port} (TLS, h2), upstream "
            f"on {self.upstream_port}; warm-up {args.warmup:.0f}s, then "
            f"{args.minutes:g} minutes with faults (seed {args.seed})",
            flush=True,
        )
        await self.start_traffic()
        await asyncio.sleep(args.warmup)
        await self.stop_traffic()
        baseline, _ = await self.settle(None)
        print(
            f"soak: baseline RSS {baseline.rss_kib} KiB, {baseline.fds} fds", flush=True
        )
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.edge.pid if self.edge else 0}/clear_refs").write_text(
                "5"
            )

        self.phase = "soak"
        monitor = asyncio.create_task(self.monitor())
        await self.start_traffic()
        soak_started = time.monotonic()
        await self.run_faults(args.minutes * 60)
        print("soak: stopping traffic", flush=True)
        await self.stop_traffic()
        soak_ended = time.monotonic()
        monitor.cancel()
        peak_hwm = self.vmhwm()
        end, waited = await self.settle(baseline)
        print(
            f"soak: end RSS {end.rss_kib} KiB, {end.fds} fds after {waited:.0f}s",
            flush=True,
        )
        edge_alive = self.edge is not None and self.edge.poll() is None
        self.stop_processes()
        return self.summary(
            baseline, end, waited, peak_hwm, soak_started, soak_ended, edge_alive
        )

    # The report ---------------------------------------------------------------

    def attribute(self, record: Record) -> None:
        """Which fault, if any, an edge error or a lost request belongs to."""
        if record.outcome == "edge_error":
            # Where windows overlap (a slow window's tail and a restart), the
            # upstream being down explains a 502 before its being slow does.
            order = {"kill": 0, "restart": 1, "slow": 2}
            for fault in sorted(self.faults, key=lambda f: order[f.kind]):
                start, end = fault.window()
                if record.start <= end and record.end >= start:
                    record.cause = fault.kind
                    return
            record.cause = "none"
        elif record.outcome == "lost":
            for fault in self.faults:
                if fault.death_from is None or fault.died_at is None:
                    continue
                if record.start < fault.died_at and record.end >= fault.death_from:
                    record.cause = f"upstream died in flight ({fault.kind})"
                    return
            record.cause = "none"
            before = [r for r in self.reloads if r.at <= record.start]
            if before:
                last = before[-1]
                record.note = (
                    f"last SIGHUP {record.start - last.at:.2f}s before, "
                    f"{'changed' if last.changed else 'unchanged'} file"
                )

    def summary(
        self,
        baseline: Sample,
        end: Sample,
        waited: float,
        peak_hwm: int,
        soak_started: float,
        soak_ended: float,
        edge_alive: bool,
    ) -> dict[str, Any]:
        for record in self.records:
            self.attribute(record)
        by_protocol: dict[str, Counter[str]] = defaultdict(Counter)
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        errors_by_cause: dict[str, Counter[str]] = defaultdict(Counter)
        lost_by_cause: dict[str, Counter[str]] = defaultdict(Counter)
        retried: Counter[str] = Counter()
        latencies: dict[str, list[float]] = defaultdict(list)
        for record in self.records:
            by_protocol[record.protocol][record.outcome] += 1
            by_protocol[record.protocol]["total"] += 1
            by_kind[record.kind][record.outcome] += 1
            by_kind[record.kind]["total"] += 1
            if record.retries:
                by_protocol[record.protocol]["retried"] += 1
                for reason in record.retries:
                    retried[reason] += 1
            if record.outcome == "edge_error":
                errors_by_cause[record.cause][f"{record.status} {record.detail}"] += 1
            if record.outcome == "lost":
                lost_by_cause[record.cause][f"{record.kind}: {record.detail}"] += 1
            if record.outcome == "ok":
                latencies[record.kind].append(record.end - record.start)
        wrong = [r for r in self.records if r.outcome == "wrong"]
        lost_outside = [
            r for r in self.records if r.outcome == "lost" and r.cause == "none"
        ]
        errors_outside = [
            r for r in self.records if r.outcome == "edge_error" and r.cause == "none"
        ]
        unfinished = [r for r in self.records if not r.outcome]
        client_errors = [r for r in self.records if r.outcome == "client_error"]
        peak_rss = max([s.rss_kib for s in self.samples] + [baseline.rss_kib])
        peak_fds = max([s.fds for s in self.samples] + [baseline.fds])
        log = self.edge_log.read_text(errors="replace")
        tracebacks = log.count("Traceback (most recent call last)")
        unconfirmed = [
            r for r in self.reloads if r.changed and r.confirmed_after_s is None
        ]

        def check(ok: bool, detail: str) -> dict[str, Any]:
            return {"ok": ok, "detail": detail}

        invariants = {
            "no wrong answers": check(not wrong, f"{len(wrong)} wrong"),
            "no lost request outside a fault": check(
                not lost_outside,
                f"{len(lost_outside)} lost with no upstream death in flight",
            ),
            "no edge error outside a fault window": check(
                not errors_outside,
                f"{len(errors_outside)} outside (grace {GRACE_S:g}s)",
            ),
            "every request ended": check(
                not unfinished, f"{len(unfinished)} unfinished"
            ),
            "no error in the soak's own clients": check(
                not client_errors,
                "; ".join(sorted({r.detail for r in client_errors})[:5]) or "none",
            ),
            "RSS back near the start": check(
                end.rss_kib - baseline.rss_kib <= RSS_TOLERANCE_KIB,
                f"{end.rss_kib - baseline.rss_kib:+d} KiB (tolerance {RSS_TOLERANCE_KIB} KiB)",
            ),
            "fds back near the start": check(
                end.fds - baseline.fds <= FD_TOLERANCE,
                f"{end.fds - baseline.fds:+d} (tolerance {FD_TOLERANCE})",
            ),
            "no traceback in the edge's log": check(
                not tracebacks, f"{tracebacks} tracebacks"
            ),
            "every changing reload applied": check(
                not unconfirmed, f"{len(unconfirmed)} without 'now in effect' in 10 s"
            ),
            "edge still running": check(
                edge_alive, "alive" if edge_alive else "exited"
            ),
        }

        def pct(values: list[float], q: float) -> float:
            values = sorted(values)
            return round(values[min(len(values) - 1, int(q * len(values)))], 3)

        def relative(t: float) -> float:
            return round(t - self.t0, 3)

        return {
            "settings": {
                "minutes": self.args.minutes,
                "warmup_s": self.args.warmup,
                "seed": self.args.seed,
                "grace_s": GRACE_S,
                "rss_tolerance_kib": RSS_TOLERANCE_KIB,
                "fd_tolerance": FD_TOLERANCE,
                "variants": VARIANTS,
            },
            "soak_seconds": round(soak_ended - soak_started, 1),
            "passed": all(v["ok"] for v in invariants.values()),
            "invariants": invariants,
            "totals": {
                "requests": len(self.records),
                "by_protocol": {k: dict(v) for k, v in sorted(by_protocol.items())},
                "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
                "retried": dict(retried),
                "by_phase": dict(Counter(r.phase for r in self.records)),
            },
            "wrong_answers": [asdict(r) for r in wrong[:50]],
            "lost": {
                "by_cause": {k: dict(v) for k, v in lost_by_cause.items()},
                "outside_faults": [asdict(r) for r in lost_outside[:50]],
            },
            "edge_errors_by_cause": {k: dict(v) for k, v in errors_by_cause.items()},
            "edge_errors_outside_faults": [asdict(r) for r in errors_outside[:50]],
            "latency_s": {
                kind: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "max": round(max(v), 3)}
                for kind, v in sorted(latencies.items())
                if v
            },
            "faults": [
                {
                    "kind": f.kind,
                    "at_s": relative(f.start),
                    "until_s": relative(f.end),
                    "died_at_s": relative(f.died_at) if f.died_at else None,
                    "detail": f.detail,
                }
                for f in self.faults
            ],
            "reloads": [
                {
                    "at_s": relative(r.at),
                    "changed": r.changed,
                    "variant": r.variant,
                    "confirmed_after_s": r.confirmed_after_s,
                }
                for r in self.reloads
            ],
            "edge": {
                "rss_kib": {
                    "start": baseline.rss_kib,
                    "peak": peak_rss,
                    "peak_vmhwm": peak_hwm,
                    "end": end.rss_kib,
                },
                "fds": {"start": baseline.fds, "peak": peak_fds, "end": end.fds},
                "settle_s": round(waited, 1),
                "samples": [
                    [relative(s.at), s.rss_kib, s.fds] for s in self.samples[::5]
                ],
            },
            "h2_connections_opened": sum(s.opened for s in self.sessions),
            "rates": {
                "ok_per_second": round(
                    sum(
                        1
                        for r in self.records
                        if r.outcome == "ok" and r.phase == "soak"
                    )
                    / max(1.0, soak_ended - soak_started),
                    1,
                ),
                "sync_hold_median_s": round(
                    statistics.median(latencies["sync"]) if latencies["sync"] else 0, 2
                ),
            },
            "run_directory": str(self.run),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def wait_port(
    port: int, process: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"PID {process.pid} exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s")


def print_report(summary: dict[str, Any]) -> None:
    totals = summary["totals"]
    columns = ["total", "ok", "edge_error", "lost", "wrong", "retried"]
    print()
    print(f"{'protocol':16}" + "".join(f"{c:>12}" for c in columns))
    for protocol, counts in totals["by_protocol"].items():
        print(f"{protocol:16}" + "".join(f"{counts.get(c, 0):>12}" for c in columns))
    print(f"{'kind':16}" + "".join(f"{c:>12}" for c in columns))
    for kind, counts in totals["by_kind"].items():
        print(f"{kind:16}" + "".join(f"{counts.get(c, 0):>12}" for c in columns))
    print(
        f"\nrequests: {totals['requests']}; retried (not taken by the edge): {totals['retried']}"
    )
    print("edge errors by cause:")
    for cause, counts in summary["edge_errors_by_cause"].items():
        print(f"  {cause}: {counts}")
    print("lost requests by cause:")
    for cause, counts in summary["lost"]["by_cause"].items():
        print(f"  {cause}: {counts}")
    kinds = Counter(f["kind"] for f in summary["faults"])
    reloads = summary["reloads"]
    print(
        f"faults: {dict(kinds)}; reloads: {len(reloads)} "
        f"({sum(r['changed'] for r in reloads)} changing the file)"
    )
    edge = summary["edge"]
    print(
        f"edge RSS KiB start {edge['rss_kib']['start']}, peak {edge['rss_kib']['peak']} "
        f"(VmHWM {edge['rss_kib']['peak_vmhwm']}), end {edge['rss_kib']['end']}; "
        f"fds start {edge['fds']['start']}, peak {edge['fds']['peak']}, end "
        f"{edge['fds']['end']} (settled in {edge['settle_s']}s)"
    )
    print("latency of ok answers (s):", summary["latency_s"])
    print("\ninvariants:")
    for name, result in summary["invariants"].items():
        print(f"  {'ok  ' if result['ok'] else 'FAIL'} {name}: {result['detail']}")
    for title, key in (("wrong answers", "wrong_answers"),):
        for record in summary[key][:10]:
            print(f"  {title}: {record}")
    for record in summary["lost"]["outside_faults"][:10]:
        print(f"  lost outside a fault: {record}")
    for record in summary["edge_errors_outside_faults"][:10]:
        print(f"  edge error outside a fault: {record}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    soak = Soak(args)
    try:
        summary = asyncio.run(soak.run_all())
    except KeyboardInterrupt:
        print("soak: interrupted")
        return 130
    finally:
        soak.stop_processes()
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(summary, indent=2) + "\n"
    (RESULTS / "soak-latest.json").write_text(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"soak-{stamp}.json").write_text(text)
    print_report(summary)
    print(
        f"\nsummary: {RESULTS / 'soak-latest.json'}; logs: {summary['run_directory']}"
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
