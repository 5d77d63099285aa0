"""The slow side of the fixed upstream: long-polls and 50 MB bodies.

nginx serves the fast responses; it cannot hold a request for 20 seconds,
and it would buffer a 50 MB upload to disk before looking at it. This small
asyncio server does those parts, speaking just enough HTTP/1.1 (keep-alive,
Content-Length and chunked request bodies):

  GET  /_matrix/client/v3/sync...            held, then answered (see below)
  POST /_matrix/media/v3/upload...            body counted and discarded
  GET  /_matrix/media/v3/download/bench.test/50m   --download-size bytes
  GET  /_matrix/client/versions               a small JSON body (readiness)
  GET  /health                                "OK", as Synapse's health check
  GET  /bench/status                          pending and answered counts
  GET  /bench/release?after=S                 answer held long-polls S s from now
  GET  /bench/reset                           forget the last release

A long-poll is held at least --delay seconds after it arrives, and until
the benchmark releases the held ones once all of them have arrived, so that
a proxy slow to open N connections still has all N parked at one moment.
None is held beyond --max-hold seconds, shorter than the proxies' upstream
timeouts, so that a forgotten release cannot hang a run.

Run as ``python upstream.py --port 18009 --delay 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

CHUNK = 256 * 1024
VERSIONS = b'{"versions":["v1.1","v1.2","v1.3","v1.4","v1.5"],"unstable_features":{}}'


class Batch:
    """The long-polls of one measurement, released together."""

    def __init__(self) -> None:
        self.pending = 0
        self.release_at: float | None = None
        self.released = asyncio.Event()

    def release(self, after: float) -> None:
        self.release_at = time.monotonic() + after
        self.released.set()


class Counters:
    """What the benchmark asks about while connections are parked."""

    def __init__(self) -> None:
        self.batch = Batch()
        self.answered = 0
        self.uploads: list[int] = []

    def reset(self) -> None:
        """Start a new batch, answering what an earlier one still holds (a
        proxy that gave up on them leaves them here)."""
        self.batch.release(0)
        self.batch = Batch()


class BadRequest(Exception):
    pass


async def read_head(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str]] | None:
    """Method, target and lower-cased headers of the next request, or None
    when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise BadRequest("truncated request head") from None
        return None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        raise BadRequest(f"bad request line {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def discard_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    """Read the request body, whatever its framing, and return its length."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return total
            await reader.readexactly(size + 2)
            total += size
    remaining = int(headers.get("content-length", "0"))
    total = remaining
    while remaining:
        data = await reader.read(min(remaining, CHUNK))
        if not data:
            raise BadRequest("body cut short")
        remaining -= len(data)
    return total


def response_head(status: str, length: int, content_type: str) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode("ascii")


async def send_json(writer: asyncio.StreamWriter, status: str, body: bytes) -> None:
    writer.write(response_head(status, len(body), "application/json") + body)
    await writer.drain()


async def send_download(writer: asyncio.StreamWriter, size: int) -> None:
    """Send C{size} bytes, waiting for the socket to drain between chunks so
    that this server never holds more than a chunk or two."""
    writer.write(response_head("200 OK", size, "application/octet-stream"))
    chunk = bytes(range(256)) * (CHUNK // 256)
    remaining = size
    while remaining:
        piece = chunk if remaining >= CHUNK else chunk[:remaining]
        writer.write(piece)
        remaining -= len(piece)
        await writer.drain()


async def hold_long_poll(
    writer: asyncio.StreamWriter, counters: Counters, args: argparse.Namespace
) -> None:
    """Answer a /sync long-poll as Synapse does when nothing happens: after
    C{args.delay} seconds at least, and not before the release time."""
    batch = counters.batch
    batch.pending += 1
    started = time.monotonic()
    try:
        await asyncio.sleep(args.delay)
        remaining = args.max_hold - (time.monotonic() - started)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(batch.released.wait(), max(0.0, remaining))
        if batch.release_at is not None:
            until = min(batch.release_at, started + args.max_hold)
            await asyncio.sleep(max(0.0, until - time.monotonic()))
    finally:
        batch.pending -= 1
    held = time.monotonic() - started
    body = json.dumps({"next_batch": "s1", "held_s": round(held, 3)}).encode()
    await send_json(writer, "200 OK", body)
    counters.answered += 1


async def handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    counters: Counters,
    args: argparse.Namespace,
) -> None:
    """Serve requests on one connection until the client closes it."""
    try:
        while True:
            request = await read_head(reader)
            if request is None:
                break
            _method, target, headers = request
            path = target.split("?", 1)[0]
            length = await discard_body(reader, headers)
            if path.startswith("/_matrix/client/v3/sync"):
                await hold_long_poll(writer, counters, args)
            elif path.startswith("/_matrix/media/v3/upload"):
                counters.uploads.append(length)
                body = json.dumps(
                    {"content_uri": "mxc://bench.test/upload", "received": length}
                ).encode()
                await send_json(writer, "200 OK", body)
            elif path == "/_matrix/media/v3/download/bench.test/50m":
                await send_download(writer, args.download_size)
            elif path == "/_matrix/client/versions":
                await send_json(writer, "200 OK", VERSIONS)
            elif path == "/health":
                writer.write(response_head("200 OK", 2, "text/plain") + b"OK")
                await writer.drain()
            elif path == "/bench/release":
                after = float(target.partition("after=")[2] or args.delay)
                counters.batch.release(after)
                await send_json(writer, "200 OK", b"{}")
            elif path == "/bench/reset":
                counters.reset()
                await send_json(writer, "200 OK", b"{}")
            elif path == "/bench/status":
                status = {
                    "pending": counters.batch.pending,
                    "answered": counters.answered,
                    "uploads": counters.uploads[-5:],
                }
                await send_json(writer, "200 OK", json.dumps(status).encode())
            else:
                body = b'{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'
                await send_json(writer, "404 Not Found", body)
            if headers.get("connection", "").lower() == "close":
                break
    except (BadRequest, ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    counters = Counters()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, counters, args),
        args.host,
        args.port,
        backlog=4096,
        limit=64 * 1024,
    )
    print(f"upstream listening on {args.host}:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=20.0)
    parser.add_argument("--max-hold", type=float, default=150.0)
    parser.add_argument("--download-size", type=int, default=50_000_000)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
