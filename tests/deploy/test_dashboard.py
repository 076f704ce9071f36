"""deploy/base/dashboard.json: a Grafana dashboard whose panels fit the grid, whose
variables are defined, and whose queries Prometheus parses and answers as meant
(the metric names against the daemon: tests/deploy/test_alerts.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.kustomize import DEPLOY

DASHBOARD = json.loads((DEPLOY / "base" / "dashboard.json").read_text())
PANELS = DASHBOARD["panels"]
QUERY_PANELS = [panel for panel in PANELS if panel["type"] != "row"]
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool missing: scripts/test --container installs it (Debian package prometheus)",
)


def variables() -> dict[str, dict]:
    return {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}


def test_the_dashboard_has_an_identity_and_a_prometheus_data_source_to_choose():
    assert DASHBOARD["uid"] == "restrackfs" and DASHBOARD["title"]
    assert isinstance(DASHBOARD["schemaVersion"], int)
    source = variables()["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    node = variables()["node"]
    assert node["includeAll"] and node["allValue"] == ".*"  # hosts without a node label too
    assert node["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_panels_have_unique_ids_and_fit_the_grid_without_overlap():
    ids = [panel["id"] for panel in PANELS]
    assert len(set(ids)) == len(ids)
    taken: set[tuple[int, int]] = set()
    for panel in PANELS:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_query_panel_reads_the_chosen_data_source():
    for panel in QUERY_PANELS:
        assert panel["title"] and panel["description"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()


def test_every_variable_used_is_defined():
    used = {
        name
        for panel in QUERY_PANELS
        for target in panel["targets"]
        for name in re.findall(r"\$\{?(\w+)", target["expr"] + target["legendFormat"])
    }
    assert "node" in used
    assert used <= set(variables()) | set(GRAFANA_VARIABLES), used


def as_prometheus_sees_it(expr: str) -> str:
    """The query with the variables filled in, as Grafana sends it (all nodes)."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(f"${name}", value)
    return expr.replace("$node", ".*")


def panel_expr(title: str, ref: str = "A") -> str:
    (panel,) = [panel for panel in QUERY_PANELS if panel["title"] == title]
    (target,) = [target for target in panel["targets"] if target["refId"] == ref]
    return as_prometheus_sees_it(target["expr"])


def promtool(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@needs_promtool
def test_prometheus_parses_every_query(tmp_path):
    """Each query as a recording rule: `promtool check rules` parses its PromQL."""
    rules = [
        {"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr}
        for panel in QUERY_PANELS
        for target in panel["targets"]
        for expr in [as_prometheus_sees_it(target["expr"])]
    ]
    (tmp_path / "queries.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = promtool(tmp_path, "check", "rules", "queries.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


SERIES = 'job="restrackfs",instance="node1:9464",node="node1"'


def answers(tmp_path: Path, series: list[dict], cases: list[dict]) -> None:
    """promtool evaluates the queries over the series and compares the answers."""
    (tmp_path / "none.yaml").write_text("groups: []\n")
    test = {
        "rule_files": ["none.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test, width=1000))
    result = promtool(tmp_path, "test", "rules", "test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_actions_by_process_count_a_series_born_at_its_first_action(tmp_path):
    """A process's counter appears at 1 with its first kill: that kill is counted in
    its step (increase() would see nothing), the steps after count 0 until the next."""
    expr = panel_expr("Quota actions by process name")
    labels_in = f'{SERIES},action="kill",quota="files",comm="leaky"'
    name = f"restrack_process_enforcements_total{{{labels_in}}}"
    labels = '{action="kill",comm="leaky",quota="files"}'
    answers(
        tmp_path,
        [{"series": name, "values": "_ _ 1 1 1 2 2"}],
        [
            {"expr": expr, "eval_time": "2m", "exp_samples": [{"labels": labels, "value": 1}]},
            {"expr": expr, "eval_time": "3m", "exp_samples": [{"labels": labels, "value": 0}]},
            {"expr": expr, "eval_time": "5m", "exp_samples": [{"labels": labels, "value": 1}]},
        ],
    )


@needs_promtool
def test_hours_to_the_quota_at_the_last_hours_growth(tmp_path):
    """One descriptor a minute, 60 of 300 used at minute 60: 4 hours left; a process
    that does not grow, or is past its quota already, is not listed."""
    expr = panel_expr("Hours to the open-file quota")
    grower = f'{SERIES},pid="1",comm="leaky"'
    flat = f'{SERIES},pid="2",comm="flat"'
    past = f'{SERIES},pid="3",comm="past"'
    answers(
        tmp_path,
        [
            {"series": f"restrack_open_files{{{grower}}}", "values": "0+1x60"},
            {"series": f"restrack_open_files_quota{{{grower}}}", "values": "300x60"},
            {"series": f"restrack_open_files{{{flat}}}", "values": "10x60"},
            {"series": f"restrack_open_files_quota{{{flat}}}", "values": "300x60"},
            {"series": f"restrack_open_files{{{past}}}", "values": "400+1x60"},
            {"series": f"restrack_open_files_quota{{{past}}}", "values": "300x60"},
        ],
        [
            {
                "expr": expr,
                "eval_time": "60m",
                "exp_samples": [{"labels": "{" + grower + "}", "value": 4}],
            }
        ],
    )


@needs_promtool
def test_quota_use_per_pod_is_its_process_nearest_its_quota(tmp_path):
    expr = panel_expr("Open files: use of the quota, highest process per pod")
    series = []
    for pid, used in (("1", 50), ("2", 90)):
        labels = f'{SERIES},pid="{pid}",comm="app",pod="uid-a"'
        series += [
            {"series": f"restrack_open_files{{{labels}}}", "values": f"{used}x5"},
            {"series": f"restrack_open_files_quota{{{labels}}}", "values": "100x5"},
        ]
    answers(
        tmp_path,
        series,
        [
            {
                "expr": expr,
                "eval_time": "5m",
                "exp_samples": [{"labels": '{node="node1",pod="uid-a"}', "value": 0.9}],
            }
        ],
    )
