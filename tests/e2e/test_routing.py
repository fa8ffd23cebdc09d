"""One alias, two weighted backends: Envoy balances by weight, and when one backend dies
its health checks and outlier detection take it out while the other serves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.state.usage.records import USAGE_FILE, read_records
from tests.e2e.conftest import run_gateway
from tests.helpers import free_port

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "hi"}]


def served(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_sim/requests", timeout=5) as r:
        return sum(1 for q in json.loads(r.read()) if q["path"] == "/v1/chat/completions")


def test_weighted_backends_and_failover(tmp_path_factory: pytest.TempPathFactory) -> None:
    port = free_port()
    second = f"http://127.0.0.1:{port}"
    sim2 = spawn([sys.executable, "-m", "authz.cli", "sim", "--listen", f"127.0.0.1:{port}",
                  "--model", "tiny-llama"], stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: http_ok(f"{second}/health"), "second sim", alive=[sim2])
        with run_gateway(tmp_path_factory.mktemp("gw-routing"), sim_weight=3,
                         extra_backends=[{"url": second, "weight": 1}]) as gw:
            deadline = time.monotonic() + 20  # both endpoints pass their first check
            while served(second) == 0 or served(gw.sim_url) == 0:
                assert time.monotonic() < deadline, "a backend never received traffic"
                gw.client().chat.completions.create(model="demo", messages=MESSAGES,
                                                    max_tokens=1)
            for url in (gw.sim_url, second):  # the sims keep only their last 256 requests
                req = urllib.request.Request(f"{url}/_sim/requests", method="DELETE")
                urllib.request.urlopen(req, timeout=5).close()
            for _ in range(120):
                gw.client().chat.completions.create(model="demo", messages=MESSAGES,
                                                    max_tokens=1)
            a, b = served(gw.sim_url), served(second)
            assert 0.6 < a / (a + b) < 0.9, (a, b)  # weights 3:1
            backends = {r["backend"] for r in read_records(gw.data_dir / USAGE_FILE)}
            assert backends == {gw.sim_url, second}

            stop([sim2])  # the weight-1 backend dies
            failures = 0
            for _ in range(100):
                try:
                    gw.client().chat.completions.create(model="demo", messages=MESSAGES,
                                                        max_tokens=1)
                except openai.APIStatusError:
                    failures += 1
            # Connect failures are retried on the other host; none reach the client.
            assert failures == 0
    finally:
        stop([sim2])
