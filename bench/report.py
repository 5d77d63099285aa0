"""Turning samples into the summary: medians, ratios to nginx in the same
round, the printed table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scenarios import (
    ANSWERED,
    CPU_10K,
    CPU_US,
    KIB_PER_CONN,
    MB_PER_S,
    PEAK_RSS,
    RPS,
    Metric,
    Sample,
    Scenario,
)

REFERENCE = "nginx"
Summary = dict[str, dict[str, dict[str, dict[str, Any]]]]


def _values(
    samples: Sequence[Sample], scenario: str, proxy: str, key: str
) -> dict[int, float]:
    """The metric's value in each round, where it was measured."""
    return {
        s.round: float(v)
        for s in samples
        if s.scenario == scenario and s.proxy == proxy
        and (v := s.metrics.get(key)) is not None
    }  # fmt: skip


def _ratio_median(
    values: dict[int, float], reference: dict[int, float]
) -> float | None:
    ratios = [v / reference[r] for r, v in values.items() if reference.get(r)]
    return statistics.median(ratios) if ratios else None


def summarise(
    samples: Sequence[Sample], scenarios: Sequence[Scenario], proxies: Sequence[str]
) -> Summary:
    """For each scenario, proxy and metric: the median over rounds, the
    median over rounds of the ratio to nginx in the same round, and the
    values of each round. Counts (errors, lost connections) are summed."""
    keys_by_scenario: dict[str, list[str]] = {}
    for s in samples:
        keys = keys_by_scenario.setdefault(s.scenario, [])
        keys.extend(k for k in s.metrics if k not in keys)
    summary: Summary = {}
    for scenario in scenarios:
        better = {m.key: m.better for m in scenario.metrics}
        counted = {m.key for m in scenario.metrics if m.better is None}
        for proxy in proxies:
            entry: dict[str, dict[str, Any]] = {}
            for key in keys_by_scenario.get(scenario.name, []):
                values = _values(samples, scenario.name, proxy, key)
                if not values:
                    continue
                reference = _values(samples, scenario.name, REFERENCE, key)
                entry[key] = {
                    "median": statistics.median(values.values()),
                    "total": sum(values.values()) if key in counted else None,
                    "ratio_to_nginx": (
                        _ratio_median(values, reference) if better.get(key) else None
                    ),
                    "rounds": [values[r] for r in sorted(values)],
                }
            summary.setdefault(scenario.name, {})[proxy] = entry
    return summary


# The table -------------------------------------------------------------------


def _format_number(value: float, digits: int) -> str:
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _cell(
    entry: dict[str, Any] | None, metric: Metric, scenario: Scenario, rounds: int
) -> str:
    if not entry:
        return "n/a"
    if metric.better is None:
        total = int(entry["total"])
        if metric is ANSWERED:
            return f"{total:,} of {scenario.connections * rounds:,}"
        return f"{total:,}"
    text = _format_number(entry["median"], metric.digits)
    if entry["ratio_to_nginx"] is not None:
        text += f" ({entry['ratio_to_nginx']:.2f}x)"
    return text


def _rounds_run(samples: Sequence[Sample], scenario: str, proxy: str) -> int:
    return len(
        {s.round for s in samples if s.scenario == scenario and s.proxy == proxy}
    )


def format_table(
    summary: Summary,
    samples: Sequence[Sample],
    scenarios: Sequence[Scenario],
    proxies: Sequence[str],
    heading: str,
) -> str:
    """The table of medians, each with its ratio to nginx in the same round
    (median over rounds), one section per scenario, then the cost per
    request of each throughput scenario."""
    label_width = 36
    width = max(18, *(len(p) + 2 for p in proxies))
    lines = [heading, ""]
    header = " " * label_width + "".join(p.rjust(width) for p in proxies)
    lines += [header, "-" * len(header)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(
            ("  " + label).ljust(label_width) + "".join(c.rjust(width) for c in cells)
        )

    for scenario in scenarios:
        lines.append(scenario.title)
        for metric in scenario.metrics:
            if metric.key in ("cpu_us_per_req", "cpu_s_per_10k"):
                continue  # shown together under "cost per request"
            entries = [
                summary.get(scenario.name, {}).get(p, {}).get(metric.key)
                for p in proxies
            ]
            if metric.key == "errors" and not any(e and e["total"] for e in entries):
                continue
            row(
                metric.label,
                [
                    _cell(e, metric, scenario, _rounds_run(samples, scenario.name, p))
                    for e, p in zip(entries, proxies, strict=True)
                ],
            )
    throughput = [s for s in scenarios if s.kind == "throughput"]
    if throughput:
        lines.append(
            "cost per request: proxy CPU seconds (user+sys) per 10,000 requests"
            " (x100 = us per request)"
        )
        for scenario in throughput:
            entries = [
                summary.get(scenario.name, {}).get(p, {}).get(CPU_10K.key)
                for p in proxies
            ]
            row(
                scenario.short or scenario.name,
                [_cell(e, CPU_10K, scenario, 0) for e in entries],
            )
    return "\n".join(lines)


def collect_notes(samples: Sequence[Sample], notes: Sequence[str]) -> list[str]:
    """Every note once, in the order first seen."""
    seen: dict[str, None] = {}
    for note in [*notes, *(n for s in samples for n in s.notes)]:
        seen.setdefault(note, None)
    return list(seen)


# Comparison with the previous run ------------------------------------------

_COMPARED = (
    ("small", RPS), ("64k", RPS), ("tls", RPS), ("h2", RPS),
    ("small", CPU_US), ("tls", CPU_US),
    ("parked-*", KIB_PER_CONN),
    ("upload", MB_PER_S), ("download", MB_PER_S),
    ("upload", PEAK_RSS), ("download", PEAK_RSS),
)  # fmt: skip


def format_comparison(summary: Summary, previous: dict[str, Any], proxy: str) -> str:
    """C{proxy}'s ratios to nginx now and in the previous run, so that a
    change shows against the machine's noise (ratios hold; absolute figures
    swing between runs)."""
    before = previous.get("summary", {})
    lines = []
    for pattern, metric in _COMPARED:
        scenarios = (
            sorted(
                (n for n in summary if n.startswith("parked-")),
                key=lambda n: int(n[7:]),
            )
            if pattern == "parked-*"
            else [pattern]
        )
        for scenario in scenarios:
            now = summary.get(scenario, {}).get(proxy, {}).get(metric.key)
            then = before.get(scenario, {}).get(proxy, {}).get(metric.key)
            if not now or not then:
                continue
            if now.get("ratio_to_nginx") is None or then.get("ratio_to_nginx") is None:
                continue
            lines.append(
                f"  {scenario + ' ' + metric.label:<44}"
                f"{then['ratio_to_nginx']:>8.2f}x -> {now['ratio_to_nginx']:.2f}x"
                f"   ({_format_number(then['median'], metric.digits)} -> "
                f"{_format_number(now['median'], metric.digits)})"
            )
    if not lines:
        return ""
    started = previous.get("started", "?")
    commit = previous.get("environment", {}).get("commit", "?")
    settings = previous.get("settings", {})
    shape = f"{settings.get('rounds', '?')} round(s) x {settings.get('duration', '?')}s"
    header = (
        f"{proxy} against the last run ({started}, commit {commit}, {shape}): "
        "ratio to nginx then -> now (medians then -> now)"
    )
    return "\n".join([header, *lines])


# JSON and PNG ------------------------------------------------------------------


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


_CHART_HIGHER = (
    ("small", RPS, "small JSON req/s"),
    ("64k", RPS, "64 KiB req/s"),
    ("tls", RPS, "TLS req/s"),
    ("h2", RPS, "HTTP/2 req/s"),
    ("upload", MB_PER_S, "50 MB upload MB/s"),
    ("download", MB_PER_S, "50 MB download MB/s"),
)
_CHART_LOWER = (
    ("small", CPU_US, "CPU/request, small JSON"),
    ("64k", CPU_US, "CPU/request, 64 KiB"),
    ("tls", CPU_US, "CPU/request, TLS"),
    ("h2", CPU_US, "CPU/request, HTTP/2"),
    ("parked-*", KIB_PER_CONN, "KiB per parked connection"),
    ("upload", PEAK_RSS, "peak RSS, 50 MB upload"),
    ("download", PEAK_RSS, "peak RSS, 50 MB download"),
)


def _chart_rows(
    summary: Summary, spec: Sequence[tuple[str, Metric, str]], proxies: Sequence[str]
) -> list[tuple[str, dict[str, float | None]]]:
    rows = []
    for scenario_pattern, metric, label in spec:
        names = (
            [n for n in summary if n.startswith("parked-")]
            if scenario_pattern == "parked-*"
            else [scenario_pattern]
        )
        for name in names:
            if name not in summary:
                continue
            suffix = (
                f" ({name.split('-')[1]})" if scenario_pattern == "parked-*" else ""
            )
            ratios = {
                p: summary[name].get(p, {}).get(metric.key, {}).get("ratio_to_nginx")
                for p in proxies
            }
            rows.append((label + suffix, ratios))
    return rows


def write_chart(
    path: Path, summary: Summary, proxies: Sequence[str], title: str
) -> None:
    """Horizontal bars of each proxy's ratio to nginx per scenario, on a
    log scale around 1: throughput on the left (higher is better), costs on
    the right (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compared = [p for p in proxies if p != REFERENCE]
    colours = {"matrix-edge": "#d62728", "haproxy": "#1f77b4", "caddy": "#2ca02c"}
    panels = [
        (
            "throughput: ratio to nginx (higher is better)",
            _chart_rows(summary, _CHART_HIGHER, compared),
        ),
        (
            "cost: ratio to nginx (lower is better)",
            _chart_rows(summary, _CHART_LOWER, compared),
        ),
    ]
    height = 1.2 + 0.45 * max(len(rows) for _, rows in panels) * max(1, len(compared))
    fig, axes = plt.subplots(1, 2, figsize=(15, max(4.0, height)))
    for ax, (panel_title, rows) in zip(axes, panels, strict=True):
        _draw_panel(ax, panel_title, rows, compared, colours)
    fig.suptitle(title, fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="upper right",
            ncol=len(labels),
            fontsize=9,
            title="nginx = 1 (black line)",
            title_fontsize=9,
        )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_panel(
    ax: Any,
    title: str,
    rows: list[tuple[str, dict[str, float | None]]],
    proxies: Sequence[str],
    colours: dict[str, str],
) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    if not rows or not proxies:
        ax.text(
            0.5, 0.5, "no ratios (nginx not run)", ha="center", transform=ax.transAxes
        )
        return
    bar = 0.8 / len(proxies)
    values = [v for _, r in rows for v in r.values() if v]
    low, high = min([0.5, *values]) / 2.5, max([2.0, *values]) * 2.5
    for i, proxy in enumerate(proxies):
        positions = [
            row + (i - (len(proxies) - 1) / 2) * bar for row in range(len(rows))
        ]
        ratios = [r.get(proxy) for _, r in rows]
        # Bars grow from nginx's 1.0: left when below it, right when above.
        ax.barh(
            positions,
            [abs(w - 1) if w else float("nan") for w in ratios],
            height=bar,
            left=[min(w, 1) if w else 1 for w in ratios],
            color=colours.get(proxy, "grey"),
            label=proxy,
        )
        for y, w in zip(positions, ratios, strict=True):
            if not w:
                ax.text(1.03, y, "n/a", va="center", fontsize=8, color="grey")
            elif w >= 1:
                ax.text(w * 1.03, y, _ratio_text(w), va="center", fontsize=8)
            else:
                ax.text(
                    w / 1.03, y, _ratio_text(w), va="center", ha="right", fontsize=8
                )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(low, high)
    candidates: tuple[float, ...] = (0.001, 0.01, 0.1, 1, 10, 100, 1000)
    if high / low < 1000:
        candidates = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
    ticks = [t for t in candidates if low <= t <= high]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}x" for t in ticks])
    ax.grid(axis="x", alpha=0.3)


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"
