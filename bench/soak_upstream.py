"""The upstream of the soak (bench/soak.py): a stand-in for Synapse that
echoes what identifies each request, so that the soak can tell an answer
that belongs to another request from the right one.

Served on --port (what matrix-edge forwards to):

  GET  /_matrix/client/v3/soak/echo?id=ID     {"id", "method", "target", "xfp", ...}
  GET  /_matrix/client/v3/sync?id=ID&hold=S   held S seconds, then {"id", "held", ...}
  POST /_matrix/media/v3/upload?id=ID         body read and hashed: {"id", "length", "sha256"}
  GET  /_matrix/media/v3/download/soak.test/ID?size=N
                                              N bytes of body_for(ID, N), header X-Soak-Id
  GET  /health                                "OK" (never slowed)

Every answer also carries ``X-Soak-Id``. Downloads are paced (128 KiB every
10 ms) so that some are always in flight when the soak kills this process.

Served on --control-port (the soak itself, never through the edge):

  GET /slow?delay=S      delay every answer under /_matrix by S seconds (0: off)
  GET /die-mid-download  SIGKILL this process once a download is part-way
                         through its body and a long-poll is held
  GET /stats             requests by kind, and what is in flight

SIGTERM stops it as a graceful restart would: the port closes, idle
connections close, held long-polls are answered at once (an empty sync, as
a server going down may give), transfers get up to 5 s to finish, then the
process exits.

Run as ``python soak_upstream.py --port P --control-port C``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

sys.path.insert(0, str(Path(__file__).resolve().parent))

from upstream import BadRequest, read_head, response_head

CHUNK = 128 * 1024
PACE_S = 0.01
BLOCK = 64 * 1024


def body_for(request_id: str, size: int) -> bytes:
    """The bytes of request C{request_id}'s upload or download: a 64 KiB
    block drawn from the ID, repeated. Another request's body differs from
    its first byte on."""
    block = random.Random(request_id).randbytes(BLOCK)
    whole, rest = divmod(size, BLOCK)
    return block * whole + block[:rest]


class State:
    def __init__(self) -> None:
        self.slow = 0.0
        self.draining = False
        self.drained = asyncio.Event()
        self.served: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.downloads_mid_body = 0
        self.die_armed = False
        self.connections: set[asyncio.StreamWriter] = set()
        self.busy: set[asyncio.StreamWriter] = set()

    def maybe_die(self) -> None:
        if (
            self.die_armed
            and self.downloads_mid_body > 0
            and self.in_flight["sync"] > 0
        ):
            print(f"SIGKILL at {time.monotonic():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


async def read_body(
    reader: asyncio.StreamReader, headers: dict[str, str]
) -> tuple[int, str]:
    """Read the request body, whatever its framing: its length and sha256."""
    digest = hashlib.sha256()
    total = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return total, digest.hexdigest()
            data = await reader.readexactly(size + 2)
            digest.update(data[:-2])
            total += size
    remaining = int(headers.get("content-length", "0"))
    while remaining:
        data = await reader.read(min(remaining, CHUNK))
        if not data:
            raise BadRequest("body cut short")
        digest.update(data)
        total += len(data)
        remaining -= len(data)
    return total, digest.hexdigest()


def head(status: str, length: int, content_type: str, request_id: str) -> bytes:
    base = response_head(status, length, content_type)
    return base[:-2] + f"X-Soak-Id: {request_id}\r\n\r\n".encode("ascii")


async def send_json(
    writer: asyncio.StreamWriter, document: dict[str, object], request_id: str = ""
) -> None:
    body = json.dumps(document).encode()
    writer.write(head("200 OK", len(body), "application/json", request_id) + body)
    await writer.drain()


async def wait_or_drain(state: State, seconds: float) -> None:
    """Sleep, cut short when the server starts draining."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(state.drained.wait(), max(0.0, seconds))


async def serve_one(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    state: State,
    method: str,
    target: str,
    headers: dict[str, str],
) -> None:
    path, _, query = target.partition("?")
    args = {k: v[0] for k, v in parse_qs(query).items()}
    length, sha256 = await read_body(reader, headers)
    if path == "/health":
        writer.write(response_head("200 OK", 2, "text/plain") + b"OK")
        await writer.drain()
        return
    started = time.monotonic()
    if path.startswith("/_matrix/media/v3/download/soak.test/"):
        kind, request_id = "download", path.rsplit("/", 1)[1]
    elif path.startswith("/_matrix/client/v3/sync"):
        kind, request_id = "sync", args.get("id", "")
    elif path.startswith("/_matrix/media/v3/upload"):
        kind, request_id = "upload", args.get("id", "")
    else:
        kind, request_id = "echo", args.get("id", "")
    state.served[kind] += 1
    state.in_flight[kind] += 1
    try:
        if state.slow and not state.draining:
            await wait_or_drain(state, state.slow)
        echo: dict[str, object] = {
            "id": request_id,
            "method": method,
            "target": target,
            "xfp": headers.get("x-forwarded-proto", ""),
            "request_id": headers.get("x-request-id", ""),
        }
        if kind == "sync":
            state.maybe_die()
            # Held for its whole timeout after any slowness, as a /sync
            # that sees nothing new.
            await wait_or_drain(state, float(args.get("hold", "0")))
            echo["held"] = round(time.monotonic() - started, 3)
            echo["next_batch"] = f"s{state.served['sync']}"
            await send_json(writer, echo, request_id)
        elif kind == "upload":
            echo.update(length=length, sha256=sha256)
            await send_json(writer, echo, request_id)
        elif kind == "download":
            size = int(args.get("size", "0"))
            await send_download(writer, state, request_id, size)
        else:
            echo.update(length=length, sha256=sha256)
            await send_json(writer, echo, request_id)
    finally:
        state.in_flight[kind] -= 1


async def send_download(
    writer: asyncio.StreamWriter, state: State, request_id: str, size: int
) -> None:
    body = body_for(request_id, size)
    writer.write(head("200 OK", size, "application/octet-stream", request_id))
    sent = 0
    while sent < size:
        writer.write(body[sent : sent + CHUNK])
        sent += CHUNK
        await writer.drain()
        if sent < size:
            state.downloads_mid_body += 1
            try:
                state.maybe_die()
                await asyncio.sleep(PACE_S)
            finally:
                state.downloads_mid_body -= 1


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: State
) -> None:
    state.connections.add(writer)
    try:
        while not state.draining:
            request = await read_head(reader)
            if request is None:
                break
            method, target, headers = request
            state.busy.add(writer)
            try:
                await serve_one(reader, writer, state, method, target, headers)
            finally:
                state.busy.discard(writer)
            if headers.get("connection", "").lower() == "close":
                break
    except (BadRequest, ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        state.connections.discard(writer)
        state.busy.discard(writer)
        writer.close()


async def control(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: State
) -> None:
    try:
        request = await read_head(reader)
        if request is None:
            return
        _method, target, _headers = request
        path, _, query = target.partition("?")
        args = {k: v[0] for k, v in parse_qs(query).items()}
        if path == "/slow":
            state.slow = float(args.get("delay", "0"))
        elif path == "/die-mid-download":
            state.die_armed = True
        document = {
            "slow": state.slow,
            "served": dict(state.served),
            "in_flight": dict(state.in_flight),
            "connections": len(state.connections),
        }
        body = json.dumps(document).encode()
        writer.write(response_head("200 OK", len(body), "application/json") + body)
        await writer.drain()
    except (BadRequest, ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    state = State()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, state), args.host, args.port, backlog=1024
    )
    control_server = await asyncio.start_server(
        lambda r, w: control(r, w, state), args.host, args.control_port
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"soak upstream listening on {args.host}:{args.port}", flush=True)
    await stop.wait()
    # A graceful restart: stop listening, close what is idle, answer held
    # long-polls now, give transfers a few seconds.
    state.draining = True
    state.drained.set()
    server.close()
    control_server.close()
    for writer in list(state.connections - state.busy):
        writer.close()
    deadline = time.monotonic() + 5
    while state.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    print(f"stopped, {len(state.busy)} connections still busy", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
