"""Two `tokenbooth serve` replicas sharing one redis-server behind one Envoy (the services
cluster has both as endpoints). Under steady load from the openai SDK (no client
retries), one replica is SIGKILLed: Envoy's retries on the other replica, outlier
ejection and gRPC health checks keep the clients' error rate below 1 %.

A few seconds of load by default; TOKENBOOTH_LONG_FAULTS=1 measures the full 10 s."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.bootstrap import render_yaml
from authz.runtime.procs import http_ok, spawn, stop, wait_until
from policy.config import load_config
from tests.e2e.conftest import _backend_healthy
from tests.helpers import SECRET, free_port, policy_dict
from tests.redis_server import RedisServer

pytestmark = pytest.mark.e2e
LONG = os.environ.get("TOKENBOOTH_LONG_FAULTS") == "1"
WINDOW_S = 10.0 if LONG else 4.0  # measured after the kill
THREADS = 6
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


@dataclass
class Cluster:
    base_url: str
    admin: str
    serves: list[subprocess.Popen[bytes]]
    sides: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    configs: list[Path] = field(default_factory=list)  # each replica's config file


def _replica_config(root: Path, base: dict[str, Any], grpc: str, http: str) -> Path:
    root.mkdir(parents=True)
    path = root / "tokenbooth.yaml"
    path.write_text(yaml.safe_dump({**base, "services": {"grpc_listen": grpc,
                                                         "http_listen": http}}))
    return path


@contextmanager
def two_replicas(root: Path, state: str,
                 replica: Callable[[int], dict[str, Any]] = lambda i: {}) -> Iterator[Cluster]:
    """Envoy + two `serve` replicas on `state` + the sim. `replica(i)`: settings of
    replica i's config file beside the shared ones (its admin API's port, say)."""
    sim_url = f"http://127.0.0.1:{free_port()}"
    grpcs = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    https = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    base = policy_dict(sim_url, listen=listen, state=state,
                       envoy={"admin_listen": admin, "services_addresses": grpcs})
    paths = [_replica_config(root / f"r{i}", {**base, **replica(i)}, grpcs[i], https[i])
             for i in range(2)]
    (root / "envoy.yaml").write_text(render_yaml(load_config(paths[0])))
    logs = root / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (logs / f"{name}.log").open("wb") as log:
            procs.append(spawn(argv, stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    py = [sys.executable, "-m", "authz.cli"]
    try:
        start("sim", [*py, "sim", "--listen", sim_url.removeprefix("http://"),
                      "--model", "tiny-llama", "--model", "tiny-llama-2"])
        serves = [start(f"serve{i}", [*py, "serve", "--config", str(p)])
                  for i, p in enumerate(paths)]
        for h in https:
            wait_until(lambda h=h: http_ok(f"http://{h}/readyz"), "serve", alive=procs)  # type: ignore[misc]
        start("envoy", [str(envoy_path()), "-c", str(root / "envoy.yaml"),
                        "--log-level", "warn", "--use-dynamic-base-id"])
        wait_until(lambda: _services_healthy(f"http://{admin}") == 2 and
                   _backend_healthy(f"http://{admin}"), "envoy and its clusters",
                   timeout=60, alive=procs)
        yield Cluster(f"http://{listen}", f"http://{admin}", serves,
                      [f"http://{h}" for h in https], procs, paths)
    finally:
        stop(procs)


def _services_healthy(admin: str) -> int:
    """How many of the services cluster's endpoints Envoy counts healthy."""
    try:
        with urllib.request.urlopen(f"{admin}/clusters", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0
    return sum(1 for line in text.splitlines()
               if line.startswith("tokenbooth_services::") and "health_flags::healthy" in line)


def _checks_served(side: str) -> float:
    with urllib.request.urlopen(f"{side}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^tokenbooth_decision_seconds_count\{service="ext_authz"\} (\S+)$', text,
                  re.MULTILINE)
    return float(m.group(1)) if m else 0.0


class Load:
    """Requests from a thread pool (every third one a stream, read to its end), each
    outcome with the time it ended."""

    def __init__(self, base_url: str) -> None:
        self.client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=SECRET, max_retries=0,
                                    timeout=30)
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[tuple[float, str]] = []

    def _one(self, n: int) -> None:
        if n % 3:
            self.client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
            return
        for _ in self.client.chat.completions.create(model="demo", messages=MESSAGES,
                                                     max_tokens=3, stream=True):
            pass

    def worker(self, first: int) -> None:
        n = first
        while not self.done.is_set():
            n += THREADS
            try:
                self._one(n)
                outcome = ""
            except (openai.APIError, ValueError, OSError) as e:
                outcome = f"{type(e).__name__}: {getattr(e, 'status_code', '')} {e}"[:200]
            with self.lock:
                self.outcomes.append((time.monotonic(), outcome))

    def between(self, t0: float, t1: float) -> tuple[int, list[str]]:
        with self.lock:
            seen = [o for t, o in self.outcomes if t0 <= t < t1]
        return len(seen), [o for o in seen if o]


def test_a_replica_sigkilled_under_load_costs_clients_under_1_percent(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        with two_replicas(tmp_path / "gw", redis.url) as c, \
                ThreadPoolExecutor(THREADS) as pool:
            load = Load(c.base_url)
            futures = [pool.submit(load.worker, i) for i in range(THREADS)]
            time.sleep(1.5)
            assert all(_checks_served(s) > 0 for s in c.sides), "a replica got no traffic"
            c.serves[0].kill()  # SIGKILL
            killed = time.monotonic()
            time.sleep(WINDOW_S)
            load.done.set()
            for f in futures:
                f.result()
            load.client.close()
            total, failed = load.between(killed, killed + WINDOW_S)
            _, failed_before = load.between(0, killed)
        assert not failed_before, failed_before[:5]
        assert total >= 50 * WINDOW_S / 4, f"too little load to measure: {total}"
        assert len(failed) < 0.01 * total, (len(failed), total, failed[:10])
    finally:
        redis.stop()


def _ads_replica(logs: Path) -> int:
    """Which replica serves Envoy's ADS stream now (the last to send it a version)."""
    last = {i: (logs / f"serve{i}.log").read_text().rfind("xds: sending version")
            for i in range(2)}
    assert max(last.values()) >= 0, "no replica sent Envoy its resources"
    return max(last, key=lambda i: last[i])


def test_a_frozen_ads_replica_does_not_keep_config_changes_from_envoy(
        tmp_path: Path) -> None:
    """The replica feeding Envoy's ADS stream is frozen (SIGSTOP: a hung process, a
    half-open connection): Envoy marked it unhealthy but kept the stream on it, so a model
    added to the config answered 404 until the replica died. HTTP/2 PINGs now close the
    connection of a replica that answers none, and the stream reopens on the other."""
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        with two_replicas(tmp_path / "gw", redis.url) as c:
            frozen = c.serves[_ads_replica(tmp_path / "gw" / "logs")]
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                for path in c.configs:
                    d = yaml.safe_load(path.read_text())
                    d["models"]["fresh"] = {**d["models"]["other"], "max_tokens": 8}
                    tmp = path.with_suffix(".new")
                    tmp.write_text(yaml.safe_dump(d))
                    tmp.replace(path)
                client = openai.OpenAI(base_url=f"{c.base_url}/v1", api_key=SECRET,
                                       max_retries=0, timeout=5)
                t0 = time.monotonic()
                while True:
                    try:
                        out = client.chat.completions.create(model="fresh",
                                                             messages=MESSAGES, max_tokens=2)
                        break
                    except (openai.APIStatusError, openai.APIConnectionError):
                        # PING every 5 s, 5 s to answer: ~10 s, then a new stream.
                        assert time.monotonic() - t0 < 25, "the new model never answered"
                        time.sleep(0.2)
                assert out.model == "tiny-llama-2"
                client.close()
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
    finally:
        redis.stop()
