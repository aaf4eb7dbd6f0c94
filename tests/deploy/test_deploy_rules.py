"""The shipped rules and dashboard, checked without a running mesh: promtool accepts the rules
and passes the alerts' unit tests, every alert has a test that fires it and one that does not,
and the dashboard names only documented series and recording rules that exist."""

from __future__ import annotations

import json
import re
import subprocess

from deploy_testing import (
    ALERTS,
    DASHBOARD,
    METRICS_DOC,
    PROMETHEUS_DIR,
    ROOT,
    RULES,
    SCRAPE_CONFIG,
    binary,
    dashboard_queries,
    family,
    names_in,
    recorded_names,
)
from prometheus_client.utils import floatToGoString

from meshd.metrics import LATENCY_BUCKETS


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES), str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert_both_ways() -> None:
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    result = promtool("test", "rules", *map(str, tests))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.M))
    assert len(alerts) >= 8
    fires, quiet = set(), set()
    for test in tests:
        # each alert_rule_test case: its alert name, then either "exp_alerts: []" or alerts
        for name, expected in re.findall(r"alertname: (\w+)\n\s+exp_alerts:(.*)",
                                         test.read_text()):
            (quiet if expected.strip() == "[]" else fires).add(name)
    assert alerts == fires, f"alerts never tested firing: {alerts - fires}"
    assert alerts == quiet, f"alerts never tested staying quiet: {alerts - quiet}"


def test_istio_latency_buckets_cover_meshds_buckets() -> None:
    """The millisecond buckets are mapped bound by bound: a bucket added to meshd's histogram
    must be added to the recording rule too."""
    mapped = set(re.findall(r'"le", "[0-9.]+", "le", "([0-9\\.]+)"', RULES.read_text()))
    exposed = {floatToGoString(b).replace(".", "\\\\.") for b in LATENCY_BUCKETS}
    assert mapped == exposed


def test_dashboard_names_only_documented_series_and_existing_rules() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["title"] for p in dashboard["panels"] if p["type"] == "row"} >= {
        "Mesh overview", "Hosts: resources", "Certificates"}
    names = names_in(dashboard_queries())
    recorded = set(recorded_names())
    doc = METRICS_DOC.read_text()
    for name in sorted(names):
        if ":" in name:
            assert name in recorded, f"the dashboard reads {name}, which no rule records"
        else:
            assert f"`{family(name)}`" in doc or f"`{name}`" in doc, (
                f"the dashboard reads {name}, which docs/metrics.md does not describe")
    for name in recorded:
        assert f"`{family(name)}`" in doc, f"recording rule {name} is not in docs/metrics.md"


def test_the_vm_guides_scrape_jobs_are_the_shipped_example() -> None:
    """Each scrape job docs/vm-install.md shows is in deploy/prometheus/prometheus.yml as it
    is (comments aside), which the Prometheus test runs against a real mesh."""
    guide = (ROOT / "docs" / "vm-install.md").read_text()
    section = guide[guide.index("\n## Prometheus\n"):]
    section = section[:section.index("\n## ", 1)]
    jobs = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(jobs) >= 4

    def bare(text: str) -> str:
        return "\n".join(line.partition("#")[0].rstrip() for line in text.splitlines()
                         if line.partition("#")[0].strip())

    example = bare(SCRAPE_CONFIG.read_text())
    for job in jobs:
        assert bare(job) in example, job
