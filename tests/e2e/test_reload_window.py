"""A model added or removed moments ago, with several replicas: the one answering ext_proc
may name a cluster Envoy does not have (yet: the replica feeding Envoy's xDS has not
reloaded, or Envoy is warming the cluster; or any more: it has already dropped it). Envoy
then answers 404 `model_not_found`, never a 503 that says a backend is down. Real Envoy on
the rendered bootstrap, with bench's no-op servicers naming a cluster it lacks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.gateways import Gateway, start_noop, start_sim


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    sim_url, sim = start_sim(tmp_path)
    try:
        gw = start_noop(tmp_path, sim_url, noop_args=["--cluster", "model_not_in_envoy"])
        try:
            yield gw
        finally:
            gw.stop()
    finally:
        sim.terminate()
        sim.wait(10)


@pytest.mark.parametrize("stream", [False, True])
def test_a_cluster_envoy_lacks_is_a_404_model_not_found(gateway: Gateway,
                                                        stream: bool) -> None:
    headers = dict(h.split(": ", 1) for h in gateway.headers)
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4, "stream": stream}
    r = httpx.post(gateway.url, content=json.dumps(body),
                   headers={**headers, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert (err["code"], err["type"]) == ("model_not_found", "invalid_request_error")
    assert "retry-after" not in r.headers
