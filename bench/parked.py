"""Park N long-polls on a proxy and account for every one of them.

Opens N connections to the proxy, sends one ``/sync`` long-poll on each,
waits until the upstream reports all N pending, and prints one JSON line
``{"event": "parked", ...}``: the proxy's memory is read at that moment by
the caller. It then asks the upstream to answer them all --delay seconds
later, waits for every answer and prints ``{"event": "done", ...}`` with how
each connection ended:

  answered   200 after at least 90% of the upstream's delay
  early      answered sooner, or with another status (a proxy timeout)
  dropped    closed or reset by the proxy without a response
  unanswered still waiting when the deadline passed
  connect_failed  never connected

Source ports are left to connect(), not bind(): a port taken by bind() is
withheld from every later connect() on the machine, the proxy's own
connections to the upstream included, while connect() shares each port
among destinations. Run pinned to the load generator's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from dataclasses import dataclass


@dataclass
class Outcome:
    kind: str = "pending"
    status: int = 0
    seconds: float = 0.0


async def read_response(reader: asyncio.StreamReader) -> int:
    """Status code of one response, after reading its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def long_poll(
    index: int,
    args: argparse.Namespace,
    connect_slots: asyncio.Semaphore,
    sent: asyncio.Event,
    outcome: Outcome,
) -> None:
    """One connection: connect, send the long-poll, wait for its answer."""
    async with connect_slots:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(args.host, args.port, limit=64 * 1024),
                timeout=10,
            )
        except (OSError, asyncio.TimeoutError):
            outcome.kind = "connect_failed"
            sent.set()
            return
        request = (
            f"GET /_matrix/client/v3/sync?timeout=30000&since=s{index} HTTP/1.1\r\n"
            f"Host: localhost\r\nUser-Agent: bench-parked\r\n"
            f"Authorization: Bearer bench_{index}\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        started = time.monotonic()
        sent.set()
    try:
        status = await read_response(reader)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        outcome.kind = "dropped"
        outcome.seconds = time.monotonic() - started
        return
    finally:
        writer.close()
    outcome.status = status
    outcome.seconds = time.monotonic() - started
    on_time = outcome.seconds >= 0.9 * args.delay
    outcome.kind = "answered" if status == 200 and on_time else "early"


def upstream_get(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        result: dict[str, object] = json.load(response)
        return result


def upstream_pending(control_url: str) -> int:
    return int(upstream_get(control_url + "/status")["pending"])  # type: ignore[call-overload]


async def wait_until_parked(args: argparse.Namespace, expected: int) -> int:
    """Poll the upstream until C{expected} long-polls are pending there, for
    at most --settle seconds; return the last count seen."""
    deadline = time.monotonic() + args.settle
    pending = 0
    while time.monotonic() < deadline:
        pending = await asyncio.to_thread(upstream_pending, args.control_url)
        if pending >= expected:
            break
        await asyncio.sleep(0.1)
    return pending


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {
        k: 0 for k in ("answered", "early", "dropped", "unanswered", "connect_failed")
    }
    for outcome in outcomes:
        counts["unanswered" if outcome.kind == "pending" else outcome.kind] += 1
    return counts


def emit(event: dict[str, object]) -> None:
    print(json.dumps(event), flush=True)


async def run(args: argparse.Namespace) -> None:
    await asyncio.to_thread(upstream_get, args.control_url + "/reset")
    outcomes = [Outcome() for _ in range(args.count)]
    connect_slots = asyncio.Semaphore(args.concurrency)
    sent_events = [asyncio.Event() for _ in range(args.count)]
    began = time.monotonic()
    tasks = [
        asyncio.create_task(
            long_poll(i, args, connect_slots, sent_events[i], outcomes[i])
        )
        for i in range(args.count)
    ]
    await asyncio.gather(*(e.wait() for e in sent_events))
    opened_in = time.monotonic() - began
    connected = sum(o.kind != "connect_failed" for o in outcomes)
    pending = await wait_until_parked(args, connected)
    emit(
        {
            "event": "parked",
            "connected": connected,
            "upstream_pending": pending,
            "opened_in_s": round(opened_in, 2),
            "settled_in_s": round(time.monotonic() - began, 2),
            **tally(outcomes),
        }
    )
    await asyncio.to_thread(
        upstream_get, f"{args.control_url}/release?after={args.delay}"
    )
    await asyncio.wait(tasks, timeout=args.delay + args.grace)
    for task in tasks:
        task.cancel()
    emit(
        {
            "event": "done",
            "total_s": round(time.monotonic() - began, 2),
            "statuses": sorted({o.status for o in outcomes if o.status}),
            **tally(outcomes),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--delay", type=float, required=True)
    parser.add_argument(
        "--control-url", required=True, help="the upstream's /bench endpoints"
    )
    parser.add_argument("--grace", type=float, default=30.0)
    parser.add_argument(
        "--settle",
        type=float,
        default=60.0,
        help="seconds to wait for all long-polls to reach the upstream",
    )
    parser.add_argument("--concurrency", type=int, default=100)
    try:
        asyncio.run(run(parser.parse_args()))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
