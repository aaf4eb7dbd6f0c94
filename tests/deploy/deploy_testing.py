"""What the tests of deploy/ read from the shipped files: the dashboard's queries, the metric
names they use, the recording rules' names. (Plain text and JSON: no YAML parser needed.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

from proc_testing import required_program

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES = PROMETHEUS_DIR / "meshd-rules.yml"
ALERTS = PROMETHEUS_DIR / "meshd-alerts.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "meshd-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

# Grafana's variables, as the test queries them: every destination and instance, a rate window
# that several 1 s scrapes fill
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$destination": ".*", "$instance": ".*"}
NAME = re.compile(r"\b((?:meshd|process|istio)_[a-z0-9_]+|meshd:[a-z0-9_:]+)\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def binary(name: str) -> str:
    """The path of a Prometheus binary (Debian's package ``prometheus``)."""
    return required_program(name, "prometheus")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    filled = []
    for expr in exprs:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a dashboard variable the test does not know: {expr}"
        filled.append(expr)
    return filled


def recorded_names() -> list[str]:
    return re.findall(r"^\s*- record: (\S+)$", RULES.read_text(), re.M)


def names_in(exprs: list[str]) -> set[str]:
    return {m.group(1) for expr in exprs for m in NAME.finditer(expr)}


def family(name: str) -> str:
    """The name a metric is documented and exposed under (a histogram's, a counter's)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name
