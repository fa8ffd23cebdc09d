"""A real Prometheus scrapes a running gateway (deploy/monitoring/prometheus.yaml, its
target and intervals rewritten) and evaluates the alert rules; every query of the
Grafana dashboard returns series, and every metric the alerts watch has some."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import yaml

from authz.runtime.procs import http_ok, stop, wait_until
from tests.deploy.test_monitoring import (
    ALERTS,
    PROMETHEUS_CONFIG,
    alert_rules,
    dashboard_queries,
    metric_names,
    prometheus_tool,
)
from tests.e2e.conftest import Gateway, run_gateway
from tests.helpers import free_port

MESSAGES = [{"role": "user", "content": "Say something."}]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Prometheus]]:
    exe = prometheus_tool("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    (root / "gw").mkdir()
    with run_gateway(root / "gw", orgs={"acme": {"budget_usd": "100"}}) as gw:
        drive(gw)
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(ALERTS)]
        [job] = config["scrape_configs"]
        job["static_configs"] = [{"targets": [gw.side_url.removeprefix("http://")]}]
        (root / "prometheus.yaml").write_text(yaml.safe_dump(config))
        listen = f"127.0.0.1:{free_port()}"
        with (root / "prometheus.log").open("wb") as log:
            proc = subprocess.Popen(
                [exe, f"--config.file={root / 'prometheus.yaml'}",
                 f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address={listen}"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            prom = Prometheus(f"http://{listen}")
            wait_until(lambda: http_ok(f"{prom.url}/-/ready"), "prometheus", timeout=30,
                       alive=[proc])
            # Scraped after the requests, several times (rates need two samples).
            wait_until(lambda: _scrapes(prom) >= 4, "4 scrapes", timeout=30, alive=[proc])
            yield gw, prom
        finally:
            stop([proc])


def drive(gw: Gateway) -> None:
    """Requests of each kind the dashboard shows: JSON, streams, a refusal."""
    client = gw.client()
    client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8)
    for _ in range(2):
        stream = client.chat.completions.create(model="demo", messages=MESSAGES,
                                                max_tokens=6, stream=True)
        assert len([c for c in stream if c.choices and c.choices[0].delta.content]) > 1
    list(client.completions.create(model="other", prompt="Once", max_tokens=5, stream=True))
    with pytest.raises(openai.AuthenticationError):
        gw.client("sk-tb-not-a-key-0123456789abcdefghijklmnopqr").models.list()


def _scrapes(prom: Prometheus) -> int:
    got = prom.query('count_over_time(up{job="tokenbooth"}[1m])')
    return int(float(got[0]["value"][1])) if got else 0


def test_the_target_is_up_and_the_genai_metrics_are_in(
    monitored: tuple[Gateway, Prometheus],
) -> None:
    _, prom = monitored
    [target] = prom.get("/api/v1/targets")["activeTargets"]
    assert (target["labels"]["job"], target["health"]) == ("tokenbooth", "up")
    streams = prom.query('sum(gen_ai_server_time_to_first_token_seconds_count'
                         '{gen_ai_request_model="demo",gen_ai_provider_name="vllm"})')
    assert float(streams[0]["value"][1]) == 2
    ops = {r["metric"]["gen_ai_operation_name"] for r in prom.query(
        "gen_ai_server_request_duration_seconds_count")}
    assert ops == {"chat", "text_completion"}
    spent = prom.query('tokenbooth_cost_usd_total{org="acme",model="demo"}')
    assert float(spent[0]["value"][1]) > 0


@pytest.mark.parametrize("title,expr", dashboard_queries(),
                         ids=[f"{i}-{t}" for i, (t, _) in enumerate(dashboard_queries())])
def test_every_dashboard_query_returns_series(
    monitored: tuple[Gateway, Prometheus], title: str, expr: str,
) -> None:
    _, prom = monitored
    assert prom.query(expr), f"{title}: no series for {expr}"


def test_the_alert_rules_evaluate_and_watch_metrics_with_series(
    monitored: tuple[Gateway, Prometheus],
) -> None:
    _, prom = monitored
    rules = alert_rules()

    def evaluated() -> bool:
        groups = prom.get("/api/v1/rules", type="alert")["groups"]
        return {r["name"] for g in groups for r in g["rules"]
                if r.get("lastEvaluation", "").startswith("20")} == set(rules)

    wait_until(evaluated, "rule evaluation", timeout=10)
    groups = prom.get("/api/v1/rules", type="alert")["groups"]
    health = {r["name"]: (r["health"], r.get("lastError", "")) for g in groups
              for r in g["rules"]}
    assert health == {name: ("ok", "") for name in rules}
    missing = {(name, metric) for name, expr in rules.items()
               for metric in metric_names(expr)
               if not prom.query(f'count({{__name__="{metric}"}})')}
    assert missing == set()
    # Nothing is wrong with this gateway: no alert fires or waits.
    assert prom.get("/api/v1/alerts")["alerts"] == []


def test_prometheus_config_in_the_repository_is_what_ran() -> None:
    """The test rewrote only the target, the intervals and the rules' path."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == [ALERTS.name]
    [job] = config["scrape_configs"]
    assert (job["job_name"], job["metrics_path"]) == ("tokenbooth", "/metrics")
