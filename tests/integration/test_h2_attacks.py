"""HTTP/2 attacks over real TLS on loopback, against the edge in this process:
what each costs the edge in memory and what reaches the upstream.

Every client runs in a thread with bounded frames and seconds; the
assertions are about outcomes and memory, never about how fast the edge is.
Memory is this process's RSS (the edge, the upstream and the client share
it), sampled every 50 ms while the attack runs.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest_twisted
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet.threads import deferToThread

from tests import recording_upstream
from tests.h2raw import RawH2

MiB = 1024 * 1024
ENHANCE_YOUR_CALM = 11
NO_ERROR = 0


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class PeakRss:
    """The highest VmRSS of this process while the block runs, as growth
    over its value at the start, in MiB."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib())

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_kib())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.start) / 1024


def normal_request(port: int) -> int | None:
    """The status a plain GET gets on a fresh connection."""
    client = RawH2(port)
    try:
        stream_id, frame = client.request()
        client.send(frame)
        client.wait(lambda: stream_id in client.ended, 10)
        return client.status.get(stream_id)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_rapid_reset_gets_enhance_your_calm(make_stack):
    """HEADERS+RST_STREAM pairs as fast as possible (CVE-2023-44487): the
    abuse budget (1000, 10 per reset of a stream in progress) closes the
    connection, and the upstream sees about one budget's worth of requests
    at most."""
    stack = make_stack(tls=True)

    def attack() -> tuple[int | None, int, int | None]:
        client = RawH2(stack.port)
        pairs = 0
        deadline = time.monotonic() + 10
        while pairs < 20000 and time.monotonic() < deadline and not client.closed:
            batch = b""
            for _ in range(20):
                stream_id, frame = client.request()
                batch += frame + RstStreamFrame(stream_id, error_code=8).serialize()
            if not client.send(batch):
                break
            pairs += 20
            client.poll()
            if client.goaway is not None:
                break
        client.wait(lambda: client.closed, 10)
        client.close()
        return client.goaway, pairs, normal_request(stack.port)

    goaway, pairs, after = await deferToThread(attack)
    assert goaway == ENHANCE_YOUR_CALM, (goaway, pairs)
    assert len(stack.upstream.requests) <= 111  # 100 resets + the normal request
    assert after == 200


@pytest_twisted.ensureDeferred
async def test_paced_rapid_reset_bounds_upstream_requests(make_stack):
    """Rapid reset paced so that each round of 100 requests reaches the
    upstream before it is reset: the budget still ends it after a round or
    two, so the upstream sees a bounded number of requests."""
    stack = make_stack(tls=True)

    def attack() -> tuple[int | None, int]:
        client = RawH2(stack.port)
        rounds = 0
        while rounds < 20 and not client.closed:
            ids, batch = [], b""
            for _ in range(100):
                stream_id, frame = client.request(b"/_matrix/hang")
                ids.append(stream_id)
                batch += frame
            client.send(batch)
            seen = len(stack.upstream.requests) + 100
            # Until they reached the upstream (bounded): then reset them all.
            client.wait(lambda s=seen: len(stack.upstream.requests) >= s, 5)
            client.send(
                b"".join(RstStreamFrame(i, error_code=8).serialize() for i in ids)
            )
            rounds += 1
            client.poll(0.05)
        client.wait(lambda: client.closed, 10)
        client.close()
        return client.goaway, rounds

    goaway, rounds = await deferToThread(attack)
    assert goaway == ENHANCE_YOUR_CALM, rounds
    assert rounds <= 3
    assert len(stack.upstream.requests) <= 300


@pytest_twisted.ensureDeferred
async def test_continuation_flood_closes_before_upstream(make_stack):
    """HEADERS without END_HEADERS and then CONTINUATION frames without
    end: the connection is closed and nothing reaches the upstream."""
    stack = make_stack(tls=True)

    def attack() -> tuple[int | None, int]:
        client = RawH2(stack.port)
        stream_id, frame = client.request(end_headers=False)
        client.send(frame)
        piece = b"\x00\x07x-flood\x7f\x81\x7c" + b"a" * 16000  # literal, 16 KB
        sent = 0
        while sent < 2000 and not client.closed and client.goaway is None:
            client.send(ContinuationFrame(stream_id, piece).serialize())
            sent += 1
            if sent % 8 == 0:
                client.poll()
        client.wait(lambda: client.closed, 10)
        client.close()
        return client.goaway, sent

    goaway, sent = await deferToThread(attack)
    assert goaway not in (None, NO_ERROR), sent
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_hpack_bomb_is_refused(make_stack):
    """A 4000-byte dynamic table entry, then a header block that references
    it 256,000 times (1 GB decoded): refused at the 64 KiB header list
    limit, and only the request that made the entry reaches the upstream."""
    stack = make_stack(tls=True)

    def attack() -> tuple[int | None, int | None]:
        client = RawH2(stack.port)
        first_id = client.next_stream
        client.next_stream += 2
        block = client.encoder.encode(
            [
                (b":method", b"GET"),
                (b":path", b"/_matrix/client/versions"),
                (b":scheme", b"https"),
                (b":authority", b"matrix.test"),
                (b"x-bomb", b"b" * 4000),
            ]
        )
        first = HeadersFrame(first_id, block)
        first.flags.add("END_HEADERS")
        first.flags.add("END_STREAM")
        client.send(first.serialize())
        client.wait(lambda: first_id in client.ended, 10)
        stream_id, frame = client.request(end_headers=False)
        references = b"\xbe" * 16000  # indexed field 62: the x-bomb entry
        frames = [ContinuationFrame(stream_id, references) for _ in range(16)]
        frames[-1].flags.add("END_HEADERS")
        client.send(frame + b"".join(f.serialize() for f in frames))
        client.wait(lambda: client.closed, 10)
        client.close()
        return client.status.get(first_id), client.goaway

    with PeakRss() as rss:
        first_status, goaway = await deferToThread(attack)
    assert first_status == 200
    assert goaway not in (None, NO_ERROR)
    assert len(stack.upstream.requests) == 1
    assert rss.growth_mib < 20, f"RSS grew {rss.growth_mib:.1f} MiB"


@pytest_twisted.ensureDeferred
async def test_slow_headers_closed_at_the_header_deadline(make_stack):
    """HEADERS without END_HEADERS, then a small CONTINUATION every 0.3 s:
    each keeps the connection busy, but the header deadline
    (``timeouts.request_headers``) closes it; nothing reaches the
    upstream."""
    stack = make_stack(tls=True, timeouts={"request_headers": "1s"})

    def attack() -> tuple[int | None, bool, int]:
        client = RawH2(stack.port)
        stream_id, frame = client.request(end_headers=False)
        client.send(frame)
        piece = b"\x00\x06x-slow\x05sssss"  # a literal field, not indexed
        sent = 0
        deadline = time.monotonic() + 15
        while not client.closed and time.monotonic() < deadline:
            if client.wait(lambda: client.goaway is not None, 0.3):
                break
            client.send(ContinuationFrame(stream_id, piece).serialize())
            sent += 1
        client.wait(lambda: client.closed, 10)
        client.close()
        return client.goaway, client.closed, sent

    goaway, closed, sent = await deferToThread(attack)
    assert goaway == NO_ERROR, sent
    assert closed
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_non_reading_client_with_huge_window_keeps_memory_bounded(make_stack):
    """Windows of 2^31-1 and four 20 MiB responses to a client that never
    reads its socket: the edge stops at its send buffer and pauses the
    upstream connections instead of holding 80 MiB."""
    stack = make_stack(tls=True)

    def attack() -> tuple[int, int | None]:
        client = RawH2(
            stack.port,
            settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1},
            connection_window=2**31 - 1 - 65535,
        )
        data = b"".join(client.request(b"/_matrix/big?mb=20")[1] for _ in range(4))
        client.send(data)
        # Until the four requests are upstream, then not reading for 4 s.
        deadline = time.monotonic() + 10
        while len(stack.upstream.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(4)
        requests = len(stack.upstream.requests)
        client.close()
        return requests, normal_request(stack.port)

    with PeakRss() as rss:
        requests, after = await deferToThread(attack)
    assert requests == 4
    assert rss.growth_mib < 40, f"RSS grew {rss.growth_mib:.1f} MiB for 80 MiB"
    assert after == 200


@pytest_twisted.ensureDeferred
async def test_writing_after_goaway_is_cut_off(make_stack):
    """A protocol error, then DATA frames over TLS for up to 10 s, going on
    after the edge's GOAWAY and close_notify: the edge closes the TCP
    connection (it aborts after ``CLOSE_GRACE``) and buffers none of it."""
    stack = make_stack(tls=True)

    def attack() -> tuple[int | None, bool, bool, int]:
        client = RawH2(stack.port)
        bad = HeadersFrame(2, client.request()[1][9:])  # an even stream ID
        bad.flags.add("END_HEADERS")
        bad.flags.add("END_STREAM")
        client.send(bad.serialize())
        block = DataFrame(1, b"x" * 16000).serialize() * 16
        sent = 0
        deadline = time.monotonic() + 10
        while client.tcp_closed_at is None and time.monotonic() < deadline:
            if client.send(block, timeout=0.5, after_eof=True):
                sent += len(block)
            client.poll()
        client.close()
        return (
            client.goaway,
            client.closed_at is not None,
            client.tcp_closed_at is not None,
            sent,
        )

    with PeakRss() as rss:
        goaway, tls_closed, tcp_closed, sent = await deferToThread(attack)
    assert goaway not in (None, NO_ERROR)
    assert tls_closed
    assert tcp_closed, f"still open after {sent / MiB:.0f} MiB written"
    assert rss.growth_mib < 20, f"RSS grew {rss.growth_mib:.1f} MiB"
    assert stack.upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_zero_window_streams_pause_the_upstream(make_stack, monkeypatch):
    """100 streams of 10 MiB each with the client's stream windows at zero:
    each stream holds at most about ``OUTBOX_HIGH`` and its upstream
    connection is paused, so the upstream stops producing (what it did
    produce sits in kernel socket buffers) and the edge's memory stays
    bounded, far below the 1000 MiB asked for."""
    stack = make_stack(tls=True)
    produced = [0]
    original = recording_upstream._Zeros.resumeProducing

    def counting(self) -> None:
        produced[0] += 1
        original(self)

    monkeypatch.setattr(recording_upstream._Zeros, "resumeProducing", counting)

    def attack() -> tuple[int, int, bool, int]:
        client = RawH2(stack.port, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
        client.send(
            b"".join(client.request(b"/_matrix/big?mb=10")[1] for _ in range(100))
        )
        # Until the upstream has stopped producing for a second (bounded).
        last, still, deadline = -1, 0, time.monotonic() + 20
        while still < 4 and time.monotonic() < deadline:
            client.poll(0.25)
            now = produced[0]
            still = still + 1 if now == last else 0
            last = now
        answered = len(client.status)
        client.close()
        return answered, last, still >= 4, len(stack.upstream.requests)

    with PeakRss() as rss:
        answered, chunks, stopped, requests = await deferToThread(attack)
    assert requests == 100
    assert answered == 100
    assert stopped, f"upstream still producing after {chunks * 64 // 1024} MiB"
    assert chunks * recording_upstream.CHUNK < 500 * MiB
    assert rss.growth_mib < 40, f"RSS grew {rss.growth_mib:.1f} MiB"


@pytest_twisted.ensureDeferred
async def test_hpack_encoder_table_bounded_whatever_the_client_advertises(make_stack):
    """A client may advertise SETTINGS_HEADER_TABLE_SIZE up to 2^32-1; the
    edge's HPACK encoder must still keep its dynamic table small (RFC 7541
    section 4.2: the encoder may use less than the peer allows). Every
    response carries a fresh X-Request-ID that the encoder indexes; without
    a cap the table, and the encoder's linear search through it, grow with
    every response on the connection. The client's decoder mirrors the
    edge's encoder table, so its size is the edge's."""
    stack = make_stack(tls=True)

    def attack() -> tuple[int, int, int]:
        client = RawH2(
            stack.port, settings={SettingsFrame.HEADER_TABLE_SIZE: 2**32 - 1}
        )
        client.decoder.max_allowed_table_size = 2**32 - 1
        done = 0
        while done < 2000 and not client.closed:
            ids, batch = [], b""
            for _ in range(100):
                stream_id, frame = client.request()
                ids.append(stream_id)
                batch += frame
            client.send(batch)
            # Every stream of the batch, not just the last: streams end in
            # any order, and a 101st open stream would break the limit.
            if not client.wait(lambda ids=ids: client.ended.issuperset(ids), 30):
                break
            done += 100
        table = client.decoder.header_table
        client.close()
        return done, len(table.dynamic_entries), table._current_size

    done, entries, size = await deferToThread(attack)
    assert done == 2000
    assert size <= 64 * 1024, f"edge's HPACK table: {entries} entries, {size} bytes"
