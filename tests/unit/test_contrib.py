"""contrib/: the Grafana dashboard follows Grafana's dashboard model, and
every series that it and the Prometheus rules select is one the edge
exports, with labels it has. tests/integration/test_contrib_promtool.py runs
promtool on the rules and the queries."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest

from matrix_edge.config.edge import parse_config
from tests import contrib

DATASOURCE_REF = {
    "type": "object",
    "required": ["type", "uid"],
    "properties": {
        "type": {"const": "prometheus"},
        "uid": {"const": "${datasource}"},
    },
}

GRID_POS = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}

TARGET = {
    "type": "object",
    "required": ["datasource", "expr", "refId"],
    "properties": {
        "datasource": DATASOURCE_REF,
        "expr": {"type": "string", "minLength": 1},
        "refId": {"type": "string", "pattern": "^[A-Z]$"},
        "legendFormat": {"type": "string"},
        "instant": {"type": "boolean"},
        "range": {"type": "boolean"},
        "format": {"enum": ["time_series", "table", "heatmap"]},
    },
}

PANEL = {
    "type": "object",
    "required": ["id", "type", "title", "gridPos"],
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"enum": ["row", "timeseries", "stat", "gauge", "table"]},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "gridPos": GRID_POS,
        "datasource": DATASOURCE_REF,
        "targets": {"type": "array", "minItems": 1, "items": TARGET},
        "fieldConfig": {
            "type": "object",
            "required": ["defaults", "overrides"],
            "properties": {
                "defaults": {"type": "object"},
                "overrides": {"type": "array"},
            },
        },
        "options": {"type": "object"},
        "transformations": {"type": "array"},
        "collapsed": {"type": "boolean"},
        "panels": {"type": "array"},
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {
        "required": ["collapsed", "panels"],
        "properties": {"gridPos": {"properties": {"h": {"const": 1}}}},
        "not": {"required": ["targets"]},
    },
    "else": {
        "required": ["datasource", "targets", "fieldConfig", "options"],
        "properties": {"description": {"minLength": 1}},
    },
}

VARIABLE = {
    "type": "object",
    "required": ["name", "type", "label", "hide", "skipUrlSync"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z_]+$"},
        "type": {"enum": ["datasource", "query", "textbox", "custom", "constant"]},
        "label": {"type": "string"},
        "hide": {"enum": [0, 1, 2]},
        "skipUrlSync": {"type": "boolean"},
        "multi": {"type": "boolean"},
        "includeAll": {"type": "boolean"},
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": "datasource"}}},
            "then": {
                "required": ["query"],
                "properties": {"query": {"const": "prometheus"}},
            },
        },
        {
            "if": {"properties": {"type": {"const": "query"}}},
            "then": {
                "required": ["datasource", "query", "definition", "refresh"],
                "properties": {
                    "datasource": DATASOURCE_REF,
                    "query": {
                        "type": "object",
                        "required": ["query", "refId"],
                        "properties": {"query": {"type": "string"}},
                    },
                    "refresh": {"enum": [1, 2]},
                },
            },
        },
        {
            "if": {"properties": {"type": {"const": "textbox"}}},
            "then": {
                "required": ["query", "current"],
                "properties": {"query": {"type": "string", "minLength": 1}},
            },
        },
    ],
}

# The part of Grafana's dashboard model (schemaVersion 39) that the
# dashboard uses.
DASHBOARD_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "title",
        "uid",
        "schemaVersion",
        "panels",
        "templating",
        "time",
        "annotations",
        "editable",
        "tags",
        "version",
    ],
    "properties": {
        "id": {"type": "null"},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "schemaVersion": {"const": 39},
        "version": {"type": "integer"},
        "editable": {"type": "boolean"},
        "graphTooltip": {"enum": [0, 1, 2]},
        "refresh": {"type": "string"},
        "timezone": {"type": "string"},
        "time": {
            "type": "object",
            "required": ["from", "to"],
            "properties": {
                "from": {"type": "string"},
                "to": {"type": "string"},
            },
        },
        "annotations": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array"}},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {"list": {"type": "array", "items": VARIABLE}},
        },
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
    },
}

# Grafana's own variables that the queries may use.
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return contrib.load_dashboard()


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    return contrib.load_rules()


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(DASHBOARD_SCHEMA)


def test_dashboard_matches_grafanas_dashboard_model(dashboard):
    jsonschema.Draft202012Validator(DASHBOARD_SCHEMA).validate(dashboard)


def test_the_schema_rejects_what_grafana_would(dashboard):
    validator = jsonschema.Draft202012Validator(DASHBOARD_SCHEMA)
    panel = next(p for p in dashboard["panels"] if p["type"] == "timeseries")
    broken: list[dict[str, Any]] = [
        {**dashboard, "schemaVersion": 16},
        {**dashboard, "panels": [{**panel, "type": "graph"}]},
        {
            **dashboard,
            "panels": [{**panel, "gridPos": {"h": 8, "w": 25, "x": 0, "y": 0}}],
        },
        {**dashboard, "panels": [{**panel, "targets": [{"refId": "A"}]}]},
        {
            **dashboard,
            "panels": [{**panel, "datasource": {"type": "prometheus", "uid": "abc"}}],
        },
    ]
    for document in broken:
        assert not validator.is_valid(document)


def test_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, label in (("instance", "instance"), ("listener", "listener")):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"] == variables[name]["query"]["query"]
        assert re.fullmatch(
            rf"label_values\(\w+(\{{.*\}})?, {label}\)",
            variables[name]["query"]["query"],
        )


def test_every_variable_a_query_uses_is_defined(dashboard):
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    queries = [*contrib.dashboard_queries(dashboard)]
    queries += [(w, s) for w, s, _ in contrib.variable_queries(dashboard) if s]
    for where, expr in queries:
        used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", expr))
        assert used <= defined, (where, used - defined)


def test_panels_have_unique_ids_and_do_not_overlap(dashboard):
    ids = [panel["id"] for panel in contrib.panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in contrib.panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_targets_of_a_panel_have_distinct_ref_ids(dashboard):
    for panel in contrib.panels(dashboard):
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_the_parser_finds_selectors_and_labels():
    parsed = contrib.parse(
        'sum by (le, route) (rate(a_bucket{route!~"$x", l="y"}[$__rate_interval]))'
        " / on (route) group_left b_total > bool 1e3 and time() - c offset 5m"
    )
    assert parsed.selectors == (
        contrib.Selector("a_bucket", frozenset({"route", "l"})),
        contrib.Selector("b_total", frozenset()),
        contrib.Selector("c", frozenset()),
    )
    assert parsed.grouping == {"le", "route"}
    made = contrib.parse('label_replace(x{a="b"}, "cls", "$1", "status", "(.)")')
    assert made.made == {"cls"}
    with pytest.raises(ValueError):
        contrib.parse('sum({__name__="x"})')


def _unknown(where: str, expr: str) -> list[str]:
    """What an expression selects that the edge does not export."""
    exported = contrib.exported_series()
    known_labels = set().union(*exported.values())
    parsed = contrib.parse(expr)
    problems = []
    for selector in parsed.selectors:
        labels = exported.get(selector.name)
        if labels is None:
            problems.append(f"{where}: no such series {selector.name}")
        elif not selector.matched <= labels:
            extra = sorted(selector.matched - labels)
            problems.append(f"{where}: {selector.name} has no label {extra}")
    extra_grouping = parsed.grouping - known_labels - parsed.made
    if extra_grouping:
        problems.append(f"{where}: no series has label {sorted(extra_grouping)}")
    return problems


def test_dashboard_selects_only_what_the_edge_exports(dashboard):
    problems = []
    for where, expr in contrib.dashboard_queries(dashboard):
        problems += _unknown(where, expr)
    exported = contrib.exported_series()
    for where, series, label in contrib.variable_queries(dashboard):
        assert series is not None, where
        problems += _unknown(where, series)
        for selector in contrib.parse(series).selectors:
            if label not in exported.get(selector.name, ()):
                problems.append(f"{where}: {selector.name} has no label {label}")
    assert problems == []


def test_rules_select_only_what_the_edge_exports(rules):
    problems = []
    for where, expr in contrib.rule_queries(rules):
        problems += _unknown(where, expr)
    assert problems == []


def test_the_check_finds_a_misspelt_name_or_label():
    assert _unknown("x", "rate(matrix_edge_request_total[5m])")
    assert _unknown("x", 'matrix_edge_upstream_up{pool="main"}')
    assert _unknown("x", "sum by (pool) (matrix_edge_upstream_up)")
    assert _unknown("x", "rate(matrix_edge_upstream_up_bucket[5m])")
    assert not _unknown("x", 'up{job="matrix-edge"}')


def test_dashboard_shows_every_metric_the_edge_exports(dashboard):
    used = {
        selector.name
        for _, expr in contrib.dashboard_queries(dashboard)
        for selector in contrib.parse(expr).selectors
    }
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    # The process collector's virtual memory size says little about a
    # Python process.
    missing = set(contrib.EDGE_METRICS) - families - {"process_virtual_memory_bytes"}
    assert missing == set()


_AGGREGATION = re.compile(r"\b(sum|min|max|avg|count)\s*(by\s*\([^)]*\)\s*)?\(")


def test_dashboard_sums_over_processes_except_in_per_process_panels(dashboard):
    """Every query aggregates the process label away, except those whose
    legend names the process and the tables that list processes."""
    for panel in contrib.panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            aggregated = _AGGREGATION.search(expr)
            if "{{process}}" in target["legendFormat"] or (
                target.get("format") == "table" and not aggregated
            ):
                continue
            assert aggregated, (panel["title"], expr)
            assert "process" not in contrib.parse(expr).grouping, panel["title"]


EXPECTED_ALERTS = {
    "MatrixEdgeDown": "critical",
    "MatrixEdgeMainUpstreamDown": "critical",
    "MatrixEdgeUpstreamMemberDown": "warning",
    "MatrixEdgeHigh5xxRatio": "warning",
    "MatrixEdgeUpstreamErrors": "warning",
    "MatrixEdgeCertificateExpiresSoon": "warning",
    "MatrixEdgeCertificateExpiresVerySoon": "critical",
    "MatrixEdgeSlowRequests": "warning",
    "MatrixEdgeTLSHandshakeFailures": "warning",
    "MatrixEdgeFileDescriptorsNearLimit": "warning",
    "MatrixEdgeReloadFailed": "warning",
}


def test_rules_group_alerts_and_their_labels(rules):
    (group,) = rules["groups"]
    assert group["name"] == "matrix-edge"
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert len(alerts) == len(group["rules"])
    assert {name: rule["labels"]["severity"] for name, rule in alerts.items()} == (
        EXPECTED_ALERTS
    )
    for name, rule in alerts.items():
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert all(rule["annotations"].values()), name
    assert 'up{job="matrix-edge"} == 0' in alerts["MatrixEdgeDown"]["expr"]
    assert 'route!~".*sync.*"' in alerts["MatrixEdgeSlowRequests"]["expr"]
    assert alerts["MatrixEdgeUpstreamMemberDown"]["for"] == "2m"
    assert alerts["MatrixEdgeMainUpstreamDown"]["for"] == "1m"
    assert alerts["MatrixEdgeHigh5xxRatio"]["for"] == "10m"


def test_rules_on_shared_series_select_the_edges_job(rules):
    """`up` and process_* come from every target; the rules pick the
    edge's job, the one contrib/README.md configures."""
    for where, expr in contrib.rule_queries(rules):
        for selector in contrib.parse(expr).selectors:
            if not selector.name.startswith("matrix_edge_"):
                assert "job" in selector.matched, (where, selector.name)
                assert f'job="{contrib.JOB}"' in expr, where


def test_readme_scrapes_the_job_the_rules_name():
    blocks = contrib.readme_yaml_blocks()
    scrape = [b for b in blocks if isinstance(b, dict) and "scrape_configs" in b]
    assert len(scrape) == 1
    (job,) = scrape[0]["scrape_configs"]
    assert job["job_name"] == contrib.JOB
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_readmes_metrics_listener_is_a_valid_configuration():
    (block,) = [
        b
        for b in contrib.readme_yaml_blocks()
        if isinstance(b, dict) and "listeners" in b
    ]
    client = {"port": 8443, "bind_addresses": ["127.0.0.1"], "type": "client"}
    config = parse_config(
        {
            "listeners": [client, *block["listeners"]],
            "upstream": "http://127.0.0.1:8008",
        }
    )
    (metrics,) = [
        listener for listener in config.listeners if listener.type.value == "metrics"
    ]
    assert set(metrics.bind_addresses) <= {"127.0.0.1", "::1"}
