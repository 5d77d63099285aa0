"""contrib/ as Prometheus reads it: promtool checks the alerting rules and
runs their unit tests, parses every query of the Grafana dashboard, and
checks the scrape configuration that contrib/README.md gives.

promtool comes from Debian's ``prometheus`` package, installed with apt-get
when it is missing (as root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests import contrib
from tests.e2e import environment

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# What the dashboard's own variables stand for when its queries are given
# to promtool: "All" for the instance and listener, the default for the
# long-poll routes.
DASHBOARD_VALUES = {
    "$instance": ".*",
    "$listener": ".*",
    "$long_poll": ".*sync.*",
}


@contextlib.contextmanager
def _services_not_started() -> Iterator[None]:
    """While packages are installed, a policy-rc.d that exits 101 keeps
    Debian's maintainer scripts from starting the Prometheus server; one
    already in place is left as it is."""
    if POLICY_RC_D.exists() or os.geteuid() != 0:
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def promtool() -> Path:
    found = shutil.which("promtool")
    if found:
        return Path(found)
    try:
        with _services_not_started():
            return environment.apt_install(
                ["prometheus"], "promtool", "/usr/bin/promtool"
            )
    except environment.Unavailable as e:
        pytest.fail(f"promtool cannot run here: {e}")


def _run(promtool: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_the_rules(promtool):
    (group,) = contrib.load_rules()["groups"]
    output = _ok(_run(promtool, "check", "rules", contrib.RULES))
    assert f"SUCCESS: {len(group['rules'])} rules found" in output


def test_promtool_runs_the_rules_unit_tests(promtool):
    output = _ok(_run(promtool, "test", "rules", contrib.RULES_TESTS))
    assert "SUCCESS" in output


@pytest.mark.parametrize(
    ("original", "changed"),
    [
        pytest.param("< 14 * 86400", "< 7 * 86400", id="certificate-warning"),
        pytest.param("< 3 * 86400", "< 1 * 86400", id="certificate-critical"),
        pytest.param('{upstream="main"}', '{upstream="synchrotron"}', id="main"),
        pytest.param('{upstream!="main"}', "", id="member"),
        pytest.param("> 0.05", "> 0.2", id="5xx-fires"),
        pytest.param("> 0.05", "> 0.01", id="5xx-quiet"),
    ],
)
def test_the_unit_tests_fail_when_a_rule_changes(promtool, tmp_path, original, changed):
    text = contrib.RULES.read_text()
    assert original in text
    (tmp_path / contrib.RULES.name).write_text(text.replace(original, changed))
    shutil.copy(contrib.RULES_TESTS, tmp_path)
    result = _run(promtool, "test", "rules", tmp_path / contrib.RULES_TESTS.name)
    assert result.returncode != 0, result.stdout


def test_promtool_parses_every_dashboard_query(promtool, tmp_path):
    dashboard = contrib.load_dashboard()
    queries = [
        (where, contrib.as_prometheus(expr, DASHBOARD_VALUES))
        for where, expr in contrib.dashboard_queries(dashboard)
    ]
    queries += [
        (where, contrib.as_prometheus(series, DASHBOARD_VALUES))
        for where, series, _ in contrib.variable_queries(dashboard)
        if series
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{n}", "expr": expr}
                    for n, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    output = _ok(_run(promtool, "check", "rules", path))
    assert f"SUCCESS: {len(queries)} rules found" in output


def test_promtool_checks_the_readmes_scrape_configuration(promtool, tmp_path):
    (config,) = [
        block
        for block in contrib.readme_yaml_blocks()
        if isinstance(block, dict) and "scrape_configs" in block
    ]
    (rule_file,) = config["rule_files"]
    assert Path(rule_file).name == contrib.RULES.name
    config["rule_files"] = [str(contrib.RULES)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    output = _ok(_run(promtool, "check", "config", path))
    assert "SUCCESS" in output
