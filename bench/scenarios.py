"""The scenarios, and the three phases that run them.

Throughput scenarios (small JSON, 64 KiB, TLS, HTTP/2) run against proxies
started once in front of the fast upstream, warmed up, then measured in
interleaved rounds: in each round every scenario is run on every proxy in
turn (A B C A B C ...). Memory scenarios (parked long-polls, 50 MB bodies)
start each proxy afresh in front of the slow upstream, so that what one
measurement left in a process's heap does not count in the next.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import load
import procs
from servers import (
    BENCH_DIR,
    DOWNLOAD_PATH,
    HOST,
    LARGE_PATH,
    LARGE_SIZE,
    SMALL_PATH,
    UPLOAD_PATH,
    FastUpstream,
    Proxy,
    RunDir,
    SlowUpstream,
)

TRANSFER_SIZE = 50_000_000
MIB = 1024


@dataclass(frozen=True)
class Metric:
    """One measured quantity. C{better} is "higher" or "lower" for figures
    that get a ratio to nginx, None for counts that are only reported."""

    key: str
    label: str
    better: str | None
    digits: int = 0


RPS = Metric("rps", "req/s", "higher")
P50 = Metric("p50_ms", "p50 latency, ms", "lower", 2)
P99 = Metric("p99_ms", "p99 latency, ms", "lower", 2)
CPU_US = Metric("cpu_us_per_req", "proxy CPU per request, us", "lower", 1)
CPU_10K = Metric("cpu_s_per_10k", "proxy CPU s per 10,000 requests", "lower", 2)
ERRORS = Metric("errors", "errors (non-2xx, socket)", None)
RSS_PARKED = Metric("rss_parked_mib", "RSS while parked, MiB", "lower", 1)
KIB_PER_CONN = Metric("kib_per_conn", "KiB per parked connection", "lower", 1)
PARK_TIME = Metric("parked_in_s", "seconds until all were parked", "lower", 1)
ANSWERED = Metric("answered", "answered on time", None)
LOST = Metric("lost", "dropped, early or unanswered", None)
MB_PER_S = Metric("mb_per_s", "MB/s", "higher", 1)
PEAK_RSS = Metric("peak_rss_mib", "peak RSS (VmHWM), MiB", "lower", 1)

THROUGHPUT_METRICS = (RPS, P50, P99, CPU_US, CPU_10K, ERRORS)
PARKED_METRICS = (RSS_PARKED, KIB_PER_CONN, PARK_TIME, ANSWERED, LOST)
TRANSFER_METRICS = (MB_PER_S, PEAK_RSS, ERRORS)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    kind: str  # "throughput", "parked" or "transfer"
    metrics: tuple[Metric, ...]
    short: str = ""
    path: str = SMALL_PATH
    tls: bool = False
    http2: bool = False
    connections: int = 0


THROUGHPUT = (
    Scenario("small", "small JSON, HTTP/1.1 keep-alive, 50 connections", "throughput", THROUGHPUT_METRICS, "small JSON"),
    Scenario("64k", "64 KiB responses, HTTP/1.1, 50 connections", "throughput", THROUGHPUT_METRICS, "64 KiB", path=LARGE_PATH),
    Scenario("tls", "TLS termination, HTTP/1.1, 50 connections", "throughput", THROUGHPUT_METRICS, "TLS", tls=True),
    Scenario(
        "h2",
        f"HTTP/2 over TLS (h2load, {load.H2_CLIENTS} connections x {load.H2_STREAMS} streams)",
        "throughput",
        THROUGHPUT_METRICS,
        "HTTP/2",
        tls=True,
        http2=True,
    ),
)  # fmt: skip
TRANSFERS = (
    Scenario("upload", "50 MB upload", "transfer", TRANSFER_METRICS, path=UPLOAD_PATH),
    Scenario(
        "download", "50 MB download", "transfer", TRANSFER_METRICS, path=DOWNLOAD_PATH
    ),
)


def parked_scenario(connections: int) -> Scenario:
    return Scenario(
        f"parked-{connections}",
        f"{connections:,} idle connections parked on a long-poll",
        "parked",
        PARKED_METRICS,
        connections=connections,
    )


@dataclass
class Sample:
    """One measurement: a scenario on a proxy in one round."""

    scenario: str
    round: int
    proxy: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Settings:
    rounds: int
    duration: float
    warmup: float
    parked_sizes: tuple[int, ...]
    parked_rounds: int
    long_poll_delay: float
    access_log: bool
    quick: bool
    processes: int = 1
    """matrix-edge's ``processes``."""

    workers: bool = False
    """matrix-edge routes through a worker pool (the same upstream)."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def ensure_running(proxy: Proxy, upstream_port: int, sample: Sample) -> bool:
    """Restart a proxy that died since its last measurement, noting the
    crash and the end of its log in C{sample}. False if it will not start."""
    if proxy.alive():
        return True
    status = proxy.process.returncode if proxy.process else None
    sample.notes.append(
        f"{proxy.name} had exited (status {status}); log tail:\n"
        f"{log_tail(proxy.log_file('out'))}"
    )
    log(f"{proxy.name} had exited (status {status}); restarting it")
    try:
        proxy.start(upstream_port)
    except RuntimeError as e:
        sample.notes.append(str(e))
        return False
    return True


# Throughput -----------------------------------------------------------------


def _run_load(
    proxy: Proxy, scenario: Scenario, seconds: float, run: RunDir
) -> load.LoadResult:
    url = proxy.url(scenario.path, tls=scenario.tls)
    if scenario.http2:
        return load.h2load(url, seconds, run.file("h2load.log"))
    return load.wrk(url, seconds)


def measure_throughput(
    proxy: Proxy, scenario: Scenario, seconds: float, run: RunDir, sample: Sample
) -> None:
    """One load run, with the proxy's CPU time read around it."""
    members = procs.process_tree(proxy.pid)
    each_before = {pid: procs.cpu_seconds(pid, tree=False) for pid in members}
    cpu_before = procs.cpu_seconds(proxy.pid)
    result = _run_load(proxy, scenario, seconds, run)
    cpu = procs.cpu_seconds(proxy.pid) - cpu_before
    if getattr(proxy, "processes", 1) > 1 and cpu > 0:
        # Each process's share of the CPU, and so of the requests: the
        # figure per process for `processes: N`.
        shares = [
            (pid, procs.cpu_seconds(pid, tree=False) - before)
            for pid, before in each_before.items()
        ]
        sample.notes.append(
            f"{proxy.name} {scenario.name} round {sample.round}, per process: "
            + ", ".join(
                f"pid {pid} {used:.2f} CPU s ({used / cpu:.0%}, "
                f"~{result.rps * used / cpu:,.0f} req/s)"
                for pid, used in shares
            )
        )
    per_request = cpu / result.requests if result.requests else None
    sample.metrics.update(
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        requests=result.requests,
        cpu_s=cpu,
        cpu_us_per_req=per_request * 1e6 if per_request is not None else None,
        cpu_s_per_10k=per_request * 1e4 if per_request is not None else None,
        errors=result.errors,
    )
    if result.errors:
        sample.notes.append(f"{proxy.name}: {result.error_detail}")
    if not proxy.alive():
        sample.notes.append(f"{proxy.name} exited during the run")


def check_responses(proxy: Proxy, scenarios: Iterable[Scenario]) -> list[str]:
    """Fetch each scenario's URL once through the proxy and check the status
    and the body's size, so that a misrouted proxy is not benchmarked."""
    problems = []
    for scenario in scenarios:
        url = proxy.url(scenario.path, tls=scenario.tls)
        flags = ["--http2"] if scenario.http2 else ["--http1.1"]
        done = subprocess.run(
            [
                "curl",
                "-sk",
                *flags,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
        expected = LARGE_SIZE if scenario.path == LARGE_PATH else None
        status, _, size = done.stdout.partition(" ")
        if status != "200" or (expected is not None and size != str(expected)):
            problems.append(
                f"{proxy.name} {url}: status {status or '-'}, {size or 0} bytes"
            )
    return problems


def run_throughput(
    proxies: list[Proxy],
    scenarios: list[Scenario],
    settings: Settings,
    run: RunDir,
    notes: list[str],
) -> tuple[list[Sample], dict[str, bool]]:
    """Warm up, then measure every scenario on every proxy, round by round.

    Returns the samples, and for each proxy whether it negotiated h2.
    """
    upstream = FastUpstream(run)
    upstream.start()
    samples: list[Sample] = []
    try:
        for proxy in proxies:
            proxy.start(upstream.port)
        speaks_h2 = {
            p.name: load.negotiated_http_version(p.url(SMALL_PATH, tls=True)) == "2"
            for p in proxies
        }
        for proxy in proxies:
            runnable = [s for s in scenarios if speaks_h2[proxy.name] or not s.http2]
            notes.extend(check_responses(proxy, runnable))
        _warm_up(proxies, scenarios, speaks_h2, settings, run, notes)
        for round_number in range(1, settings.rounds + 1):
            for scenario in scenarios:
                for proxy in proxies:
                    samples.append(
                        _throughput_sample(
                            proxy,
                            scenario,
                            round_number,
                            speaks_h2,
                            settings,
                            run,
                            upstream.port,
                        )
                    )
    finally:
        for proxy in proxies:
            proxy.stop()
        upstream.stop()
    return samples, speaks_h2


def _warm_up(
    proxies: list[Proxy],
    scenarios: list[Scenario],
    speaks_h2: dict[str, bool],
    settings: Settings,
    run: RunDir,
    notes: list[str],
) -> None:
    if settings.warmup <= 0:
        return
    for scenario in scenarios:
        for proxy in proxies:
            if scenario.http2 and not speaks_h2[proxy.name]:
                continue
            log(f"warm-up {scenario.name} {proxy.name} ({settings.warmup:g}s)")
            try:
                _run_load(proxy, scenario, settings.warmup, run)
            except load.LoadError as e:
                notes.append(f"warm-up {scenario.name} on {proxy.name} failed: {e}")


def _throughput_sample(
    proxy: Proxy,
    scenario: Scenario,
    round_number: int,
    speaks_h2: dict[str, bool],
    settings: Settings,
    run: RunDir,
    upstream_port: int,
) -> Sample:
    sample = Sample(scenario.name, round_number, proxy.name)
    if scenario.http2 and not speaks_h2[proxy.name]:
        sample.notes.append(f"{proxy.name} does not negotiate h2 (ALPN): n/a")
        return sample
    if not ensure_running(proxy, upstream_port, sample):
        return sample
    log(f"round {round_number} {scenario.name} {proxy.name} ({settings.duration:g}s)")
    try:
        measure_throughput(proxy, scenario, settings.duration, run, sample)
    except load.LoadError as e:
        sample.notes.append(f"{proxy.name}: {e}")
        log(f"{scenario.name} on {proxy.name} failed: {e}")
    return sample


# Parked long-polls ----------------------------------------------------------


def _read_events(
    client: subprocess.Popen[bytes],
    deadline: float,
    on_event: Callable[[dict[str, object]], None],
) -> None:
    """Feed each JSON line the long-poll client prints to C{on_event} until it
    exits or the deadline passes."""
    assert client.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(client.stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.5):
                if client.poll() is not None:
                    return
                continue
            chunk = os.read(client.stdout.fileno(), 65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip().startswith(b"{"):
                    on_event(json.loads(line))
    finally:
        selector.close()


def measure_parked(
    proxy: Proxy,
    upstream: SlowUpstream,
    connections: int,
    settings: Settings,
    run: RunDir,
    sample: Sample,
) -> None:
    """Park C{connections} long-polls on a fresh proxy and read its memory
    while they are parked."""
    time.sleep(0.5)
    rss_idle = procs.rss_kib(proxy.pid)
    # Released within nginx's 60 s proxy_read_timeout even if parking stalls.
    grace, settle = 30.0, 30.0
    client = procs.start(
        [
            sys.executable, str(BENCH_DIR / "parked.py"),
            "--host", HOST, "--port", str(proxy.plain_port),
            "--count", str(connections), "--delay", str(settings.long_poll_delay),
            "--control-url", upstream.control_url, "--grace", str(grace),
            "--settle", str(settle),
        ],
        run.file("parked-client.err"),
        cpu=procs.CLIENT_CPU,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    events: dict[str, dict[str, object]] = {}

    def on_event(event: dict[str, object]) -> None:
        if event.get("event") == "parked":
            sample.metrics["rss_parked_mib"] = procs.rss_kib(proxy.pid) / MIB
            sample.metrics["pss_parked_mib"] = procs.pss_kib(proxy.pid) / MIB
        events[str(event.get("event"))] = event

    deadline = time.monotonic() + 90 + settle + settings.long_poll_delay + grace
    try:
        _read_events(client, deadline, on_event)
    finally:
        procs.stop(client)
    parked, done = events.get("parked"), events.get("done")
    if parked is None or done is None:
        sample.notes.append(
            f"{proxy.name}: the long-poll client did not finish; "
            f"{log_tail(run.file('parked-client.err'), 5)}"
        )
        return
    connected = int(parked["connected"])  # type: ignore[call-overload]
    sample.metrics["rss_idle_mib"] = rss_idle / MIB
    if connected and "rss_parked_mib" in sample.metrics:
        parked_kib = (sample.metrics["rss_parked_mib"] or 0) * MIB
        sample.metrics["kib_per_conn"] = (parked_kib - rss_idle) / connected
    _record_outcomes(proxy, connections, parked, done, sample)


def _record_outcomes(
    proxy: Proxy,
    connections: int,
    parked: dict[str, object],
    done: dict[str, object],
    sample: Sample,
) -> None:
    def count(event: dict[str, object], key: str) -> int:
        return int(event.get(key, 0))  # type: ignore[call-overload]

    lost = sum(
        count(done, k) for k in ("early", "dropped", "unanswered", "connect_failed")
    )
    sample.metrics.update(
        answered=count(done, "answered"),
        lost=lost,
        early=count(done, "early"),
        dropped=count(done, "dropped"),
        unanswered=count(done, "unanswered"),
        connect_failed=count(done, "connect_failed"),
        answered_before_rss=count(parked, "answered") + count(parked, "early"),
        opened_in_s=float(parked.get("opened_in_s", 0)),  # type: ignore[arg-type]
        parked_in_s=float(parked.get("settled_in_s", 0)),  # type: ignore[arg-type]
        upstream_pending=count(parked, "upstream_pending"),
    )
    if lost:
        detail = ", ".join(
            f"{k} {count(done, k)}"
            for k in ("early", "dropped", "unanswered", "connect_failed")
            if count(done, k)
        )
        statuses = done.get("statuses")
        sample.notes.append(
            f"{proxy.name}: {lost} of {connections:,} parked long-polls lost ({detail}; statuses {statuses})"
        )
    if count(parked, "upstream_pending") < count(parked, "connected"):
        sample.notes.append(
            f"{proxy.name}: only {count(parked, 'upstream_pending'):,} of "
            f"{count(parked, 'connected'):,} long-polls reached the upstream when memory was read"
        )


def run_parked(
    proxies: list[Proxy], scenarios: list[Scenario], settings: Settings, run: RunDir
) -> list[Sample]:
    """For each connection count, park that many long-polls on each proxy
    in turn, each proxy started afresh."""
    upstream = SlowUpstream(run, settings.long_poll_delay)
    upstream.start()
    samples = []
    try:
        for scenario in scenarios:
            for round_number in range(1, settings.parked_rounds + 1):
                for proxy in proxies:
                    log(f"round {round_number} {scenario.name} {proxy.name}")
                    sample = Sample(scenario.name, round_number, proxy.name)
                    samples.append(sample)
                    _with_fresh_proxy(
                        proxy,
                        upstream.port,
                        sample,
                        partial(
                            measure_parked,
                            proxy,
                            upstream,
                            scenario.connections,
                            settings,
                            run,
                            sample,
                        ),
                    )
    finally:
        upstream.stop()
    return samples


def _with_fresh_proxy(
    proxy: Proxy, upstream_port: int, sample: Sample, measure: Callable[[], None]
) -> None:
    """Start C{proxy}, run C{measure}, note a crash, and stop the proxy."""
    try:
        proxy.start(upstream_port)
    except RuntimeError as e:
        sample.notes.append(str(e))
        log(str(e))
        return
    try:
        measure()
        if not proxy.alive():
            sample.notes.append(
                f"{proxy.name} exited during the measurement; log tail:\n"
                f"{log_tail(proxy.log_file('out'))}"
            )
    except (load.LoadError, OSError, ValueError) as e:
        sample.notes.append(f"{proxy.name}: {e}")
        log(f"{sample.scenario} on {proxy.name} failed: {e}")
    finally:
        proxy.stop()


# 50 MB bodies ---------------------------------------------------------------


def make_upload_file(run: RunDir) -> Path:
    path = run.file("upload-50MB.bin")
    if not path.exists() or path.stat().st_size != TRANSFER_SIZE:
        block = bytes(range(256)) * 4096
        with path.open("wb") as f:
            for offset in range(0, TRANSFER_SIZE, len(block)):
                f.write(block[: TRANSFER_SIZE - offset])
    return path


def measure_transfer(
    proxy: Proxy, scenario: Scenario, source: Path, run: RunDir, sample: Sample
) -> None:
    """One 50 MB transfer through a fresh proxy, and the proxy's peak memory
    during it (VmHWM, reset once the proxy had started)."""
    time.sleep(0.3)
    sample.metrics["rss_before_mib"] = procs.rss_kib(proxy.pid) / MIB
    procs.reset_peak_rss(proxy.pid)
    url = proxy.url(scenario.path)
    if scenario.name == "upload":
        transfer = load.upload(url, source, run.file("upload-answer.json"))
    else:
        transfer = load.download(url)
    sample.metrics["peak_rss_mib"] = procs.peak_rss_kib(proxy.pid) / MIB
    sample.metrics["mb_per_s"] = transfer.mb_per_s
    sample.metrics["seconds"] = transfer.seconds
    problems = _transfer_problems(scenario, transfer)
    sample.metrics["errors"] = len(problems)
    sample.notes.extend(f"{proxy.name}: {p}" for p in problems)


def _transfer_problems(scenario: Scenario, transfer: load.Transfer) -> list[str]:
    problems = []
    if transfer.status != 200:
        problems.append(
            f"{scenario.name} answered {transfer.status}: {transfer.body[:200]}"
        )
    if transfer.size != TRANSFER_SIZE:
        problems.append(
            f"{scenario.name} moved {transfer.size:,} of {TRANSFER_SIZE:,} bytes"
        )
    if scenario.name == "upload" and transfer.status == 200:
        try:
            received = json.loads(transfer.body).get("received")
        except ValueError:
            received = None
        if received != TRANSFER_SIZE:
            problems.append(
                f"the upstream received {received} of {TRANSFER_SIZE:,} bytes"
            )
    return problems


def run_transfers(
    proxies: list[Proxy], scenarios: list[Scenario], settings: Settings, run: RunDir
) -> list[Sample]:
    """Each round: every transfer through every proxy, each proxy started
    afresh so that its peak memory belongs to that transfer alone."""
    upstream = SlowUpstream(run, settings.long_poll_delay)
    upstream.start()
    source = make_upload_file(run)
    samples = []
    try:
        for round_number in range(1, settings.rounds + 1):
            for scenario in scenarios:
                for proxy in proxies:
                    log(f"round {round_number} {scenario.name} {proxy.name}")
                    sample = Sample(scenario.name, round_number, proxy.name)
                    samples.append(sample)
                    _with_fresh_proxy(
                        proxy,
                        upstream.port,
                        sample,
                        partial(measure_transfer, proxy, scenario, source, run, sample),
                    )
    finally:
        upstream.stop()
    return samples
