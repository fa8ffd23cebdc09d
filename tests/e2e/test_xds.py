"""Live Envoy config over ADS, through the real Envoy: models and backends edited in the
running gateway's config file reach Envoy within seconds, with no restart and no failed
request; an invalid file changes nothing."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import openai
import pytest
import yaml

from authz.envoy_config.xds_resources import CLUSTER_TYPE, build_resources
from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.state.usage.records import USAGE_FILE, read_records
from policy.config import load_config
from policy.routing import model_cluster_name
from tests.e2e.conftest import Gateway, run_gateway
from tests.helpers import free_port

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "hi"}]
_CDS_VERSION = re.compile(r'^cluster_manager\.cds\.version_text: "([^"]*)"$', re.M)


@dataclass
class Live:
    gw: Gateway
    second: str  # the second backend of `demo`
    admin: str  # Envoy's admin URL

    def cds_version(self) -> str:
        """The cluster version Envoy runs (its ADS ACK)."""
        with urllib.request.urlopen(f"{self.admin}/stats?filter=cds.version_text",
                                    timeout=5) as r:
            m = _CDS_VERSION.search(r.read().decode())
        return m.group(1) if m else ""

    def wait_for_envoy(self, timeout: float = 10) -> float:
        """Seconds until Envoy runs the clusters of the file as it is now."""
        want = build_resources(load_config(self.gw.config_path))[CLUSTER_TYPE].version
        t0 = time.monotonic()
        wait_until(lambda: self.cds_version() == want, "Envoy's clusters", timeout=timeout)
        return time.monotonic() - t0

    def cds_update_time(self) -> float:
        """When Envoy last applied a cluster update (epoch seconds)."""
        url = f"{self.admin}/stats?filter=cluster_manager.cds.update_time$"
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.read().decode().split(":")[1]) / 1000

    def hosts(self, alias: str) -> dict[str, int]:
        """The endpoints Envoy has in an alias's cluster, with their weights."""
        prefix = model_cluster_name(alias) + "::"
        with urllib.request.urlopen(f"{self.admin}/clusters", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return {parts[1]: int(parts[3]) for line in lines
                if line.startswith(prefix) and (parts := line.split("::"))[2] == "weight"}


@pytest.fixture(scope="module")
def gateway_with_two_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A gateway whose `demo` alias has two backends: the session's sim and a second."""
    port = free_port()
    second = f"http://127.0.0.1:{port}"
    sim2 = spawn([sys.executable, "-m", "authz.cli", "sim", "--listen", f"127.0.0.1:{port}",
                  "--model", "tiny-llama"], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_ok(f"{second}/health"), "second sim", alive=[sim2])
        with run_gateway(tmp_path_factory.mktemp("gw-xds"),
                         extra_backends=[{"url": second, "weight": 1}]) as gw:
            yield Live(gw, second, f"http://{load_config(gw.config_path).envoy.admin_listen}")
    finally:
        stop([sim2])


@pytest.fixture
def live(gateway_with_two_backends: Live) -> Iterator[Live]:
    """The gateway; its original config is put back (and reaches Envoy) afterwards."""
    path = gateway_with_two_backends.gw.config_path
    original = path.read_text()
    yield gateway_with_two_backends
    path.write_text(original)
    gateway_with_two_backends.wait_for_envoy()


def edit(gw: Gateway, change: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load(gw.config_path.read_text())
    change(data)
    gw.config_path.write_text(yaml.safe_dump(data, sort_keys=False))


def served(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_sim/requests", timeout=5) as r:
        return sum(1 for q in json.loads(r.read()) if q["path"] == "/v1/chat/completions")


def host(url: str) -> str:
    return url.removeprefix("http://")


def started(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["started_at"]).timestamp()


def clear(url: str) -> None:
    req = urllib.request.Request(f"{url}/_sim/requests", method="DELETE")
    urllib.request.urlopen(req, timeout=5).close()


def test_a_model_added_to_the_file_is_served_within_seconds(live: Live) -> None:
    gw, before = live.gw, live.cds_version()
    edit(gw, lambda d: d["models"].update(fresh={
        "upstream_model": "tiny-llama-2", "max_tokens": 32,
        "backends": [{"url": gw.sim_url}]}))
    t0 = time.monotonic()
    took = live.wait_for_envoy()
    assert took < 3, f"the new cluster reached Envoy after {took:.1f} s"
    while True:  # until its backend passed the first health check
        try:
            out = gw.client().chat.completions.create(model="fresh", messages=MESSAGES,
                                                      max_tokens=2)
            break
        except openai.APIStatusError:
            assert time.monotonic() - t0 < 5, "the new model never answered"
            time.sleep(0.05)
    assert out.model == "tiny-llama-2"
    assert "fresh" in [m.id for m in gw.client().models.list()]
    assert live.cds_version() != before


class Load:
    """Streams back to back from a few threads; each must end with a finish reason."""

    def __init__(self, gw: Gateway, threads: int = 6) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=gw.client().api_key,
                                     max_retries=0)
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stream = self._client.chat.completions.create(
                    model="demo", messages=MESSAGES, max_tokens=10, stream=True,
                    extra_headers={"x-sim-tpot-ms": "60"})  # ~0.6 s in flight
                finish = [c.choices[0].finish_reason for c in stream if c.choices]
                assert finish[-1] == "length", finish
                self.ok += 1
            except Exception as e:  # every failure counts, whatever its kind
                self.failures.append(repr(e))

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        for t in self._threads:
            t.start()
        try:
            yield self
        finally:
            self._stop.set()
            for t in self._threads:
                t.join(10)
            self._client.close()


def test_backends_reweighted_and_removed_under_load(live: Live) -> None:
    """Weight 5 to the second backend, then remove it, while streams run: none fails,
    and streams in flight on the removed backend finish there."""
    gw, second = live.gw, live.second
    assert live.hosts("demo") == {host(gw.sim_url): 1, host(second): 1}
    with Load(gw).running() as load:
        time.sleep(1)
        edit(gw, lambda d: d["models"]["demo"]["backends"][1].update(weight=5))
        assert live.wait_for_envoy() < 3
        clear(gw.sim_url)
        clear(second)
        time.sleep(2)
        first_share, second_share = served(gw.sim_url), served(second)
        weights = live.hosts("demo")
        edit(gw, lambda d: d["models"]["demo"].update(backends=[{"url": gw.sim_url}]))
        assert live.wait_for_envoy() < 3
        removed_at = live.cds_update_time()
        time.sleep(1.5)  # streams already on the removed backend finish there
        clear(second)
        time.sleep(1.5)
        after_removal = served(second)
    assert load.failures == []
    assert load.ok > 20
    assert weights == {host(gw.sim_url): 1, host(second): 5}
    # Least request weighs by active requests too: not 5:1 with six streams in flight.
    assert second_share > first_share, (first_share, second_share)
    assert after_removal == 0
    assert live.hosts("demo") == {host(gw.sim_url): 1}
    spanning = [r for r in read_records(gw.data_dir / USAGE_FILE)
                if r["backend"] == second and r["status"] == 200
                and started(r) < removed_at < started(r) + r["duration_ms"] / 1000]
    assert spanning, "no stream was in flight on the removed backend"


def test_an_invalid_config_keeps_the_last_good_clusters(live: Live) -> None:
    gw, before = live.gw, live.cds_version()
    gw.config_path.write_text("models: [this is not, a mapping]\n")
    time.sleep(2.5)  # two reload periods
    assert live.cds_version() == before
    out = gw.client().chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    assert out.choices[0].finish_reason == "length"
    assert "config reload refused" in (gw.logs / "serve.log").read_text()
