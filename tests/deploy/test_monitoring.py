"""deploy/monitoring: the alert rules and their unit tests (`promtool`), the Prometheus
config, and the Grafana dashboard, checked offline. tests/e2e/test_prometheus.py runs
the same expressions on a real Prometheus scraping a running gateway."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.runtime.metrics import Metrics
from tests.deploy.tools import DEPLOY

MONITORING = DEPLOY / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts_test.yaml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
REQUIRE_ENV = "TOKENBOOTH_REQUIRE_PROMETHEUS"
# Grafana's variables, as the e2e test's Prometheus should see them ("All" for the rest).
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$model": ".*", "$org": ".*"}
# What a PromQL expression names that is not a metric.
_NOT_METRICS = frozenset({
    "sum", "max", "min", "count", "rate", "increase", "histogram_quantile", "vector", "by",
    "or", "and", "unless", "le", "on", "without", "group_left", "group_right", "bool"})


def prometheus_tool(name: str) -> str:
    """`promtool` or `prometheus` (Debian's `prometheus` package has both); skipped when
    missing, unless TOKENBOOTH_REQUIRE_PROMETHEUS=1 (CI) makes that a failure."""
    found = shutil.which(name)
    if found is None:
        msg = (f"{name} is not installed: `apt-get install -y prometheus` (Debian, Ubuntu) "
               "provides promtool and prometheus")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def run_tool(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression with Grafana's variables filled in) for every target."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def alert_rules() -> dict[str, str]:
    """alert name -> expression."""
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r["expr"] for g in doc["groups"] for r in g["rules"]}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label names and values left out)."""
    bare = re.sub(r"\{[^}]*\}", "", expr)  # selectors' label matchers
    bare = re.sub(r'"[^"]*"', "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)  # ranges
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare))
    return {n for n in names if n not in _NOT_METRICS and not n.isdigit()}


def exposed_names() -> set[str]:
    """Every sample name the services' registry can expose, and Prometheus' own `up`."""
    suffixes = {"counter": ("_total",), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count")}
    m = Metrics()
    m.enable_key_labels()
    return {"up"} | {f.name + s for f in m.registry.collect() for s in suffixes[f.type]}


# -- promtool ---------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    out = run_tool(prometheus_tool("promtool"), "check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_alert_unit_tests_pass() -> None:
    out = run_tool(prometheus_tool("promtool"), "test", "rules", str(ALERT_TESTS))
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test() -> None:
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    tested = {t["alertname"] for case in doc["tests"] for t in case["alert_rule_test"]
              if t["exp_alerts"]}
    assert tested == set(alert_rules())


def test_prometheus_config_passes_promtool_check() -> None:
    out = run_tool(prometheus_tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert "is valid prometheus config file syntax" in out


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    rules = [{"record": f"tokenbooth:dashboard_{i}", "expr": expr}
             for i, (_, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_tool(prometheus_tool("promtool"), "check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out


# -- names and shape --------------------------------------------------------------------


def test_the_dashboard_and_rules_name_only_metrics_that_exist() -> None:
    exposed = exposed_names()
    used = {(where, name) for where, expr in [*dashboard_queries(), *alert_rules().items()]
            for name in metric_names(expr)}
    assert {(where, name) for where, name in used if name not in exposed} == set()
    # And they watch every one the services export, but the opt-in per-key ones.
    assert exposed - {name for _, name in used} - {
        "tokenbooth_key_cost_usd_total", "tokenbooth_key_tokens_total"} <= {
        # Histograms are read through their buckets; sums and counts are for ad-hoc use.
        n for n in exposed if n.endswith(("_sum", "_count"))}


def test_metric_names_reads_selectors() -> None:
    assert metric_names(
        'histogram_quantile(0.5, sum by (le, model) (rate(a_bucket{x=~"y"}[1m])))'
        ' / on (model) b_total or vector(0)') == {"a_bucket", "b_total"}


def test_the_dashboard_is_well_formed() -> None:
    d = dashboard()
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in d["templating"]["list"]}
    assert variables == {"datasource", "org", "model"}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("requests", "status", "error", "refused", "duration", "first token",
                  "per output token", "tokens", "spend", "budget", "holds", "lost",
                  "spool", "replicas", "stores"):
        assert topic in titles, topic
