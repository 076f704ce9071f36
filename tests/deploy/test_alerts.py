"""deploy/alerts.yaml: the rules name metrics the daemon exports, and promtool passes them."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.paths import CHECKOUT

DEPLOY = CHECKOUT / "deploy"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool missing: scripts/test --container installs it (Debian package prometheus)",
)


def rule_expressions() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_rules_name_only_metrics_the_daemon_exports(daemon, spawn):
    capped = spawn()
    daemon.register(capped.pid)
    daemon.write("heap=1G files=100", capped.pid, "quota")
    exported = {
        (sample.name, label, value)
        for family in text_string_to_metric_families(daemon.read("metrics"))
        for sample in family.samples
        for label, value in [*sample.labels.items(), ("", "")]
    }
    names = {name for name, _, _ in exported}
    wanted = {name for expr in rule_expressions() for name in re.findall(r"restrack_\w+", expr)}
    assert wanted and wanted <= names, wanted - names
    for expr in rule_expressions():
        for name, label, value in re.findall(r'(restrack_\w+)\{(\w+)="([^"]*)"\}', expr):
            assert (name, label, value) in exported, (name, label, value)


@needs_promtool
def test_promtool_checks_the_rules():
    result = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yaml"], cwd=DEPLOY, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    """deploy/alerts_test.yaml: fires at 90 % for 5 min, on a kill for 10 min (across a
    daemon restart), on 2 min of failed scrapes; and not on the near misses."""
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yaml"], cwd=DEPLOY, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def readme_fleet_configs() -> list[str]:
    """The prometheus.yml snippets of the README's Fleet section."""
    readme = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    fleet = readme.split("\n## Fleet\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", fleet, re.S)
    return [textwrap.dedent(block) for block in blocks]


@needs_promtool
def test_the_readmes_scrape_configs_pass_promtool(tmp_path):
    """Both snippets parse; the static one passes `promtool check config` with the
    rules. Debian's promtool is built without Kubernetes service discovery
    ("field kubernetes_sd_configs not found"), so the other is checked for shape."""
    static, kubernetes = readme_fleet_configs()
    for config in (static, kubernetes):
        parsed = yaml.safe_load(config)
        assert parsed["rule_files"] == ["restrackfs-alerts.yaml"]
        assert [job["job_name"] for job in parsed["scrape_configs"]] == ["restrackfs"]
    (job,) = yaml.safe_load(kubernetes)["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep, address, _ = job["relabel_configs"]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    pattern = re.compile(address["regex"])
    assert pattern.fullmatch("10.1.2.3:8080;9464").expand("\\1:\\2") == "10.1.2.3:9464"
    assert pattern.fullmatch("10.1.2.3;9464").expand("\\1:\\2") == "10.1.2.3:9464"
    shutil.copy(DEPLOY / "alerts.yaml", tmp_path / "restrackfs-alerts.yaml")
    (tmp_path / "prometheus.yml").write_text(static)
    result = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout
