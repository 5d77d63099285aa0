"""What the tests of contrib/ share: where its files are, the metrics the
edge exports, and the PromQL of the dashboard and the rules taken apart
into the series they select."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import yaml

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib"
DASHBOARD = CONTRIB / "grafana" / "matrix-edge.json"
RULES = CONTRIB / "prometheus" / "matrix-edge-rules.yml"
RULES_TESTS = CONTRIB / "prometheus" / "matrix-edge-rules.test.yml"
README = CONTRIB / "README.md"
JOB = "matrix-edge"

# The metric families the edge exports on its metrics listener, with their
# type and labels: these mirror the names and labels of the edge's metrics
# module. Every edge series also has a `process` label (one value per edge
# process), and Prometheus adds `job` and `instance`.
EDGE_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "matrix_edge_requests_total": (
        "counter",
        frozenset({"listener", "protocol", "method", "route", "status"}),
    ),
    "matrix_edge_request_duration_seconds": (
        "histogram",
        frozenset({"listener", "route"}),
    ),
    "matrix_edge_upstream_response_duration_seconds": (
        "histogram",
        frozenset({"upstream"}),
    ),
    "matrix_edge_received_bytes_total": ("counter", frozenset({"listener"})),
    "matrix_edge_sent_bytes_total": ("counter", frozenset({"listener"})),
    "matrix_edge_client_connections": (
        "gauge",
        frozenset({"listener", "protocol"}),
    ),
    "matrix_edge_requests_in_flight": ("gauge", frozenset({"listener"})),
    "matrix_edge_upstream_up": ("gauge", frozenset({"upstream", "member"})),
    "matrix_edge_upstream_connect_failures_total": (
        "counter",
        frozenset({"upstream", "member"}),
    ),
    "matrix_edge_upstream_errors_total": (
        "counter",
        frozenset({"upstream", "status", "cause"}),
    ),
    "matrix_edge_whoami_cache_requests_total": ("counter", frozenset({"result"})),
    "matrix_edge_tls_handshakes_total": (
        "counter",
        frozenset({"listener", "result"}),
    ),
    "matrix_edge_certificate_expiry_timestamp_seconds": (
        "gauge",
        frozenset({"listener", "certificate"}),
    ),
    "matrix_edge_build_info": ("gauge", frozenset({"version", "python"})),
    "matrix_edge_reloads_total": ("counter", frozenset({"result"})),
    "matrix_edge_metrics_scrape_errors_total": ("counter", frozenset()),
    # prometheus_client's process collector, one set per edge process.
    "process_cpu_seconds_total": ("counter", frozenset()),
    "process_resident_memory_bytes": ("gauge", frozenset()),
    "process_virtual_memory_bytes": ("gauge", frozenset()),
    "process_open_fds": ("gauge", frozenset()),
    "process_max_fds": ("gauge", frozenset()),
    "process_start_time_seconds": ("gauge", frozenset()),
}
TARGET_LABELS = frozenset({"job", "instance"})
PROCESS_LABEL = "process"


def exported_series() -> dict[str, frozenset[str]]:
    """Every series name a scrape of the edge can hold (histograms as their
    _bucket, _sum and _count series), with the labels it may carry; and
    Prometheus's own `up` for the scrape."""
    series: dict[str, frozenset[str]] = {"up": TARGET_LABELS}
    for name, (kind, labels) in EDGE_METRICS.items():
        labels = labels | TARGET_LABELS | {PROCESS_LABEL}
        if kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    return series


@attrs.frozen
class Selector:
    """A series selector of a PromQL expression: the metric name and the
    label names its matchers use."""

    name: str
    matched: frozenset[str]


@attrs.frozen
class Parsed:
    selectors: tuple[Selector, ...]
    # Label names of by (...), without (...), on (...), ignoring (...),
    # group_left (...) and group_right (...).
    grouping: frozenset[str]
    # Labels that label_replace and label_join write.
    made: frozenset[str]


_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_AGGREGATING = re.compile(r"(by|without)\s*\(")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
_MATCHER = re.compile(r"\s*([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"\"\s*,?")
_MADE = re.compile(r"label_(?:replace|join)\s*\(.*?,\s*\"(\w+)\"")


def parse(expr: str) -> Parsed:
    """The series selectors and label names of a PromQL expression.

    Enough of PromQL for the dashboard and the rules (promtool checks their
    syntax): string literals and ranges are blanked first, then each name
    is a function or an aggregation (followed by "(", or by "by (" or
    "without ("), a grouping keyword with its label list, an operator
    keyword, or a metric name with or without matchers.
    Grafana's $variables only occur inside strings and ranges."""
    made = frozenset(_MADE.findall(expr))
    text = _RANGE.sub("", _STRING.sub('""', expr))
    if "$" in text:
        raise ValueError(f"a variable outside a string or range: {expr}")
    selectors: list[Selector] = []
    grouping: set[str] = set()
    pos = 0
    while match := _IDENT.search(text, pos):
        name = match.group()
        pos = match.end()
        rest = text[pos:].lstrip()
        if name in _GROUPING and rest.startswith("("):
            close = rest.index(")")
            labels = rest[1:close].split(",")
            grouping.update(label.strip() for label in labels if label.strip())
            pos = len(text) - len(rest) + close + 1
        elif (
            rest.startswith("(")
            or _AGGREGATING.match(rest)
            or name in _GROUPING
            or name.lower() in _KEYWORDS
        ):
            continue
        elif rest.startswith("{"):
            close = rest.index("}")
            body = rest[1:close]
            matched = _MATCHER.findall(body)
            if _MATCHER.sub("", body).strip():
                raise ValueError(f"matchers not understood: {{{body}}} in {expr}")
            selectors.append(Selector(name, frozenset(matched)))
            pos = len(text) - len(rest) + close + 1
        else:
            selectors.append(Selector(name, frozenset()))
    if re.search(r"(?<![\w:])\{", text):
        raise ValueError(f"a selector without a metric name: {expr}")
    return Parsed(tuple(selectors), frozenset(grouping), made)


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target of the dashboard."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]


_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<series>.*),)?\s*(?P<label>\w+)\)$")


def variable_queries(
    dashboard: dict[str, Any],
) -> Iterator[tuple[str, str | None, str]]:
    """(where, PromQL or None, label) for every label_values() variable."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text.strip())
        if match is None:
            raise ValueError(f"variable {variable['name']}: not label_values(): {text}")
        yield f"variable {variable['name']}", match["series"], match["label"]


def rule_queries(rules: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            yield f"rule {name}", rule["expr"]


GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
}


def as_prometheus(expr: str, variables: dict[str, str]) -> str:
    """A dashboard query with Grafana's variables replaced by values that
    Prometheus takes: the built-in intervals by durations, the dashboard's
    own variables by the given values."""
    for name, value in {**GRAFANA_VARIABLES, **variables}.items():
        expr = expr.replace(name, value)
    return expr


def readme_yaml_blocks() -> list[Any]:
    """The ```yaml blocks of contrib/README.md, loaded."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.DOTALL)
    return [yaml.safe_load(block) for block in blocks]
