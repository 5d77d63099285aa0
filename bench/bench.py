"""matrix-edge, nginx, HAProxy and Caddy side by side, through the same scenarios.

Run it with ``bench/run`` (which installs what it needs); see
bench/README.md for the method. Prints one table of medians and of ratios
to nginx in the same round, and writes bench/results/latest.json and
bench/results/latest.png, with timestamped copies, so that a change can be
compared with the last run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import procs
import report
from scenarios import (
    THROUGHPUT,
    TRANSFERS,
    Sample,
    Scenario,
    Settings,
    log,
    parked_scenario,
    run_parked,
    run_throughput,
    run_transfers,
)
from servers import (
    BENCH_DIR,
    HOST,
    PROXY_CLASSES,
    Proxy,
    RunDir,
    make_certificate,
    make_proxy,
    ports_in_use,
)

PROXIES = ("matrix-edge", "nginx", "haproxy", "caddy")
RESULTS_DIR = BENCH_DIR / "results"
REPO_DIR = BENCH_DIR.parent
GROUPS = {
    "throughput": [s.name for s in THROUGHPUT],
    "parked": ["parked"],
    "transfer": [s.name for s in TRANSFERS],
    "cost": ["small", "64k", "tls", "h2"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark matrix-edge against nginx, HAProxy and Caddy.",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per load run (default 10; 2 with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of warm-up per proxy and scenario (default 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast sanity run: 1 round of 2 s, 500 parked connections held 5 s",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenarios or groups: small, 64k, tls, h2, parked, "
        "parked-N, upload, download; throughput, transfer, cost",
    )
    parser.add_argument(
        "--proxies",
        default=",".join(PROXIES),
        help="comma-separated (default: all four); raw-proxy and twisted-web "
        "add the floors of bench/floors.py to the throughput scenarios",
    )
    parser.add_argument(
        "--parked",
        default=None,
        help="parked connection counts, comma-separated (default 2000,10000; 500 with --quick)",
    )
    parser.add_argument(
        "--parked-rounds",
        type=int,
        default=1,
        help="rounds of the parked scenarios (default 1)",
    )
    parser.add_argument(
        "--long-poll-delay",
        type=float,
        default=None,
        help="seconds the upstream holds a long-poll (default 20; 5 with --quick)",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="turn every proxy's access log off (default: on for all of them)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run matrix-edge with `processes: N` and report each process's "
        "share of the work (default 1; the others always run one process)",
    )
    parser.add_argument(
        "--workers",
        action="store_true",
        help="give matrix-edge a `workers:` section whose client_reader pool "
        "is the same upstream, so every request goes through the routing "
        "table and a pool lease (the others are unchanged)",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep bench/results/run/ (configs and logs)",
    )
    return parser.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    duration = args.duration or (2.0 if quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    if args.parked:
        sizes = tuple(int(n) for n in args.parked.split(","))
    else:
        sizes = (500,) if quick else (2000, 10000)
    delay = args.long_poll_delay or (5.0 if quick else 20.0)
    return Settings(
        rounds=max(1, rounds),
        duration=duration,
        warmup=warmup,
        parked_sizes=sizes,
        parked_rounds=max(1, args.parked_rounds),
        long_poll_delay=delay,
        access_log=not args.no_access_log,
        quick=quick,
        processes=max(1, args.processes),
        workers=args.workers,
    )


def cap_parked(counts: list[int]) -> tuple[list[int], list[str]]:
    """Lower parked connection counts that the open-files limit cannot hold:
    a proxy needs two descriptors per parked long-poll, and only a process
    with CAP_SYS_RESOURCE can raise the hard limit. Returns the counts and a
    note saying what was lowered."""
    most = procs.max_proxied_connections()
    capped = list(dict.fromkeys(min(n, most) for n in counts))
    if all(n <= most for n in counts):
        return capped, []
    return capped, [
        f"parked connections capped at {most:,}: the open-files limit is "
        f"{procs.open_files_limit():,} (a hard limit here; raising it needs "
        "CAP_SYS_RESOURCE), and a proxy holds two descriptors per parked long-poll"
    ]


def select_scenarios(only: str, settings: Settings) -> tuple[list[Scenario], list[str]]:
    """The scenarios named by ``--only`` (all when empty), in suite order,
    and notes on parked counts lowered to fit the open-files limit."""
    wanted: set[str] = set()
    for name in (n.strip() for n in only.split(",") if n.strip()):
        wanted.update(GROUPS.get(name, [name]))
    counts = list(settings.parked_sizes)
    if only and "parked" not in wanted:
        counts = [int(n.split("-", 1)[1]) for n in wanted if n.startswith("parked-")]
    counts, notes = cap_parked(sorted(counts))
    settings.parked_sizes = tuple(counts)
    parked = [parked_scenario(n) for n in counts]
    every = [*THROUGHPUT, *parked, *TRANSFERS]
    if not only:
        return every, notes
    known = {s.name for s in [*THROUGHPUT, *TRANSFERS]} | {"parked"}
    unknown = {
        n for n in wanted if n not in known and not re.fullmatch(r"parked-\d+", n)
    }
    if unknown:
        raise SystemExit(f"bench: unknown scenario(s): {', '.join(sorted(unknown))}")
    return [s for s in every if s.name in wanted or s.kind == "parked"], notes


def _command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else ""


def describe_environment() -> dict[str, str]:
    """Versions and machine facts recorded with the results."""
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = _command_output(
        ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"]
    )
    dirty = _command_output(
        ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "matrix_edge"]
    )
    try:
        import twisted

        twisted_version = twisted.__version__
    except ImportError:
        twisted_version = "?"
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": str(len(os.sched_getaffinity(0))),
        "python": platform.python_version() + " " + platform.python_implementation(),
        "twisted": twisted_version,
        "nginx": _command_output(["nginx", "-v"]),
        "haproxy": _command_output(["haproxy", "-v"]),
        "caddy": _command_output(["caddy", "version"]),
        "wrk": _command_output(["wrk", "-v"]),
        "h2load": _command_output(["h2load", "--version"]),
        "curl": _command_output(["curl", "--version"]),
    }


def check_tools(proxy_names: list[str]) -> None:
    # nginx is also the fast upstream; HAProxy and Caddy only when run.
    tools = ["nginx", "wrk", "h2load", "curl", "openssl", "taskset"]
    tools += [p for p in ("haproxy", "caddy") if p in proxy_names]
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}: run bench/run, which installs them"
        )
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench: needs two CPUs (servers on CPU 0, load on CPU 1)")
    busy = ports_in_use()
    if busy:
        raise SystemExit(
            f"bench: ports already in use on {HOST}: {', '.join(map(str, busy))}"
        )


def busy_cpu_percent(seconds: float = 1.0) -> float:
    """How busy the machine's CPUs are, as a percentage of all of them:
    other work on a shared machine skews absolute figures, less so ratios."""

    def sample() -> tuple[int, int]:
        fields = [
            int(f) for f in Path("/proc/stat").read_text().split("\n")[0].split()[1:]
        ]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total_before, idle_before = sample()
    time.sleep(seconds)
    total_after, idle_after = sample()
    total = total_after - total_before
    return 100.0 * (1 - (idle_after - idle_before) / total) if total else 0.0


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_suite(
    scenarios: list[Scenario], proxy_names: list[str], settings: Settings, run: RunDir
) -> tuple[list[Sample], list[str], dict[str, bool]]:
    """Run the three phases for the selected scenarios."""
    notes: list[str] = []
    samples: list[Sample] = []
    speaks_h2: dict[str, bool] = {}
    cert = make_certificate(run)
    proxies = [
        make_proxy(
            name, run, cert, settings.access_log, settings.processes, settings.workers
        )
        for name in proxy_names
    ]
    throughput = [s for s in scenarios if s.kind == "throughput"]
    parked = [s for s in scenarios if s.kind == "parked"]
    transfers = [s for s in scenarios if s.kind == "transfer"]
    if throughput:
        found, speaks_h2 = run_throughput(proxies, throughput, settings, run, notes)
        samples += found
    # The floors of bench/floors.py hold no long-polls and pass no bodies.
    proxying = [p for p in proxies if not getattr(p, "throughput_only", False)]
    if parked:
        samples += run_parked(proxying, parked, settings, run)
    if transfers:
        samples += run_transfers(proxying, transfers, settings, run)
    notes += scan_logs(proxies)
    return samples, notes, speaks_h2


def scan_logs(proxies: list[Proxy]) -> list[str]:
    """Tracebacks and errors the proxies logged, as notes."""
    notes = []
    for proxy in proxies:
        path = proxy.log_file("out")
        if not path.exists():
            continue
        bad = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if "Traceback" in line
            or "Unhandled" in line
            or "[critical]" in line.lower()
        ]
        if bad:
            notes.append(
                f"{proxy.name} logged {len(bad)} error line(s), first: {bad[0][:300]}"
            )
    return notes


def heading(settings: Settings, environment: dict[str, str], started: str) -> str:
    log_state = "on" if settings.access_log else "off"
    workers = "; matrix-edge routes through a worker pool" if settings.workers else ""
    return (
        f"matrix-edge benchmark {started}, commit {environment['commit']}; "
        f"{settings.rounds} round(s) x {settings.duration:g}s, warm-up {settings.warmup:g}s, "
        f"access logs {log_state}; servers on CPU 0, load on CPU 1{workers}\n"
        "Medians over rounds; (N.NNx) = median over rounds of the ratio to nginx in the same round."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    proxy_names = [p.strip() for p in args.proxies.split(",") if p.strip()]
    unknown = set(proxy_names) - set(PROXY_CLASSES)
    if unknown:
        raise SystemExit(f"bench: unknown proxies: {', '.join(sorted(unknown))}")
    check_tools(proxy_names)
    procs.raise_open_files_limit()
    scenarios, limit_notes = select_scenarios(args.only, settings)
    # Also when started where SIGINT is ignored, as from a background job.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)

    now = datetime.datetime.now(datetime.timezone.utc)
    environment = describe_environment()
    run_path = RESULTS_DIR / "run"
    shutil.rmtree(run_path, ignore_errors=True)
    run = RunDir(run_path)
    began = time.monotonic()
    log(
        f"scenarios: {', '.join(s.name for s in scenarios)}; proxies: {', '.join(proxy_names)}"
    )
    busy = busy_cpu_percent()
    environment["busy_cpu_percent_at_start"] = f"{busy:.0f}"
    if busy > 10:
        limit_notes.append(
            f"the machine was {busy:.0f}% busy before the run started: other work "
            "shares these CPUs, which skews absolute figures more than ratios"
        )
    finished = False
    try:
        samples, notes, speaks_h2 = run_suite(scenarios, proxy_names, settings, run)
        finished = True
    except KeyboardInterrupt:
        log("interrupted; stopping every process started")
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"failed: {e}")
        log(f"configurations and logs kept in {run_path}")
        return 1
    finally:
        procs.stop_all()
        if finished and not args.keep_logs:
            shutil.rmtree(run_path, ignore_errors=True)
    elapsed = time.monotonic() - began
    report_results(
        samples,
        [*limit_notes, *notes],
        speaks_h2,
        scenarios,
        proxy_names,
        settings,
        environment,
        now,
        elapsed,
    )
    return 0


def report_results(
    samples: list[Sample],
    notes: list[str],
    speaks_h2: dict[str, bool],
    scenarios: list[Scenario],
    proxy_names: list[str],
    settings: Settings,
    environment: dict[str, str],
    now: datetime.datetime,
    elapsed: float,
) -> None:
    """Print the table, its notes and the comparison with the last run, and
    write the JSON and the chart with timestamped copies."""
    started = now.strftime("%Y-%m-%d %H:%M UTC")
    summary = report.summarise(samples, scenarios, proxy_names)
    table = report.format_table(
        summary,
        samples,
        scenarios,
        proxy_names,
        heading(settings, environment, started),
    )
    all_notes = report.collect_notes(samples, notes)
    print(table)
    if all_notes:
        print("\nNotes:")
        for note in all_notes:
            print("  - " + note.replace("\n", "\n    "))

    latest_json = RESULTS_DIR / "latest.json"
    previous = _load_previous(latest_json)
    if previous and "matrix-edge" in proxy_names:
        comparison = report.format_comparison(summary, previous, "matrix-edge")
        if comparison:
            print("\n" + comparison)

    document = {
        "schema": 1,
        "started": now.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "settings": vars(settings),
        "environment": environment,
        "proxies": proxy_names,
        "scenarios": {s.name: s.title for s in scenarios},
        "h2_negotiated": speaks_h2,
        "summary": summary,
        "samples": [vars(s) for s in samples],
        "notes": all_notes,
        "table": table,
    }
    stamp = now.strftime("%Y%m%d-%H%M%S")
    report.write_json(latest_json, document)
    shutil.copyfile(latest_json, RESULTS_DIR / f"bench-{stamp}.json")
    others = ", ".join(p for p in proxy_names if p != "matrix-edge")
    chart_title = f"matrix-edge vs {others}, {started}, commit {environment['commit']}"
    try:
        report.write_chart(
            RESULTS_DIR / "latest.png", summary, proxy_names, chart_title
        )
        shutil.copyfile(RESULTS_DIR / "latest.png", RESULTS_DIR / f"bench-{stamp}.png")
    except ImportError:
        log("matplotlib is not installed: no chart (bench/run installs it)")
    print(
        f"\nResults: {latest_json}, {RESULTS_DIR / 'latest.png'} "
        f"(copies bench-{stamp}.*); {elapsed / 60:.1f} min"
    )


def _load_previous(path: Path) -> dict[str, Any] | None:
    try:
        previous: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return previous


if __name__ == "__main__":
    sys.exit(main())
