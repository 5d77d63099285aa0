"""The load generators: wrk (HTTP/1.1), h2load (HTTP/2) and curl (50 MB
bodies), each pinned to the client CPU, and the parsing of what they print."""

from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import procs

WRK_CONNECTIONS = 50
# HTTP/2: 50 requests in flight as with wrk, multiplexed five to a
# connection, as a client with several requests outstanding would.
H2_CLIENTS = 10
H2_STREAMS = 5


@dataclass
class LoadResult:
    """What one load run measured on the client side."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_detail: str = ""


class LoadError(RuntimeError):
    """The load generator failed or printed something unexpected."""


def _pinned(argv: list[str]) -> list[str]:
    return ["taskset", "-c", procs.CLIENT_CPU, *argv]


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(
            _pinned(argv), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise LoadError(f"{argv[0]} ran past {timeout:.0f}s") from None
    if done.returncode != 0:
        raise LoadError(
            f"{' '.join(argv)} exited {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-500:]}"
        )
    return done.stdout


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise LoadError(f"unexpected duration {text!r} from wrk")
    return float(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    """Requests, rate, median and 99th percentile latency, and errors from
    ``wrk --latency`` output."""
    requests = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (requests and rate and p50 and p99):
        raise LoadError(f"cannot parse wrk output:\n{output}")
    seconds = _duration_ms(requests.group(2) + requests.group(3)) / 1000
    errors, detail = 0, []
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
        detail.append(f"{non_2xx.group(1)} non-2xx")
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket:
        counts = [int(n) for n in socket.groups()]
        errors += sum(counts)
        detail.append(socket.group(0))
    return LoadResult(
        requests=int(requests.group(1)),
        seconds=seconds,
        rps=float(rate.group(1)),
        p50_ms=_duration_ms(p50.group(1)),
        p99_ms=_duration_ms(p99.group(1)),
        errors=errors,
        error_detail="; ".join(detail),
    )


def wrk(url: str, duration: float, connections: int = WRK_CONNECTIONS) -> LoadResult:
    """``wrk -t1 -c50 -dNs --latency``: HTTP/1.1 keep-alive; with an https
    URL, TLS without ALPN, one handshake per connection."""
    seconds = max(1, round(duration))
    output = _run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        timeout=seconds + 30,
    )
    return parse_wrk(output)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(
        len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1)
    )
    return sorted_values[index]


def parse_h2load(output: str, log_file: Path) -> LoadResult:
    """Rate and failures from h2load's summary; latency percentiles from its
    per-request log (h2load prints no percentiles of its own)."""
    finished = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", output)
    counts = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        output,
    )
    protocol = re.search(r"Application protocol: (\S+)", output)
    if not (finished and counts):
        raise LoadError(f"cannot parse h2load output:\n{output}")
    if not protocol or protocol.group(1) != "h2":
        raise LoadError(f"h2load did not negotiate h2:\n{output}")
    latencies = []
    with log_file.open() as lines:
        for line in lines:
            fields = line.split("\t")
            if len(fields) >= 3:
                latencies.append(int(fields[2]) / 1000)
    if not latencies:
        raise LoadError("h2load logged no requests")
    latencies.sort()
    done, failed = int(counts.group(3)), int(counts.group(5))
    statuses = re.search(
        r"status codes: \d+ 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output
    )
    non_2xx = sum(int(n) for n in statuses.groups()) if statuses else 0
    errors = failed + non_2xx
    return LoadResult(
        requests=done,
        seconds=float(finished.group(1)),
        rps=float(finished.group(2)),
        p50_ms=statistics.median(latencies),
        p99_ms=_percentile(latencies, 0.99),
        errors=errors,
        error_detail=(
            f"{counts.group(0)}; {statuses.group(0) if statuses else ''}"
            if errors
            else ""
        ),
    )


def h2load(url: str, duration: float, log_file: Path) -> LoadResult:
    """``h2load`` over TLS with ALPN h2: 10 connections, 5 streams each."""
    seconds = max(1, round(duration))
    log_file.unlink(missing_ok=True)
    output = _run(
        [
            "h2load", "-t1", f"-c{H2_CLIENTS}", f"-m{H2_STREAMS}",
            f"-D{seconds}", f"--log-file={log_file}", url,
        ],
        timeout=seconds + 30,
    )  # fmt: skip
    try:
        return parse_h2load(output, log_file)
    finally:
        log_file.unlink(missing_ok=True)


def negotiated_http_version(url: str) -> str:
    """The HTTP version curl ends up with when it offers h2 by ALPN: "2" once
    the server speaks HTTP/2, "1.1" otherwise."""
    done = subprocess.run(
        ["curl", "--http2", "-sk", "-o", "/dev/null", "-w", "%{http_version}", url],
        capture_output=True,
        text=True,
        timeout=15,
    )
    return done.stdout.strip()


@dataclass
class Transfer:
    """One 50 MB upload or download as curl saw it."""

    status: int
    seconds: float
    size: int
    body: str

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds else 0.0


def _curl_transfer(argv: list[str], keep_body: Path | None, timeout: float) -> Transfer:
    """Run one curl transfer. With C{keep_body}, the (small) response body is
    written there and returned; otherwise it is discarded."""
    output_to = str(keep_body) if keep_body is not None else "/dev/null"
    output = _run(
        ["curl", "-sS", "-o", output_to, "--max-time", str(int(timeout)), *argv],
        timeout=timeout + 10,
    )
    status, seconds, size = output.split()
    body = ""
    if keep_body is not None and keep_body.exists():
        body = keep_body.read_text(errors="replace")[:4096]
        keep_body.unlink()
    return Transfer(int(status), float(seconds), int(float(size)), body)


def upload(url: str, source: Path, body_file: Path, timeout: float = 120) -> Transfer:
    """POST C{source} as a media upload, streamed, without ``Expect:
    100-continue`` (browsers and Matrix clients do not send it). The
    upstream's answer, which says how many bytes arrived, is returned."""
    return _curl_transfer(
        [
            "-X", "POST", "-T", str(source), "-H", "Expect:",
            "-H", "Content-Type: application/octet-stream",
            "-w", "%{http_code} %{time_total} %{size_upload}", url,
        ],
        body_file,
        timeout,
    )  # fmt: skip


def download(url: str, timeout: float = 120) -> Transfer:
    """GET the 50 MB media download; the body is counted, not kept."""
    return _curl_transfer(
        ["-w", "%{http_code} %{time_total} %{size_download}", url], None, timeout
    )
