"""`envoy.max_heap_bytes` through the real Envoy: with its heap past the bound, Envoy
answers new requests with an OpenAI-shaped 503 (and `retry-after`) and stays up,
instead of growing until it is OOM-killed with every stream in flight."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from authz.envoy_config.bootstrap import FIXED_HEAP
from authz.runtime.procs import wait_until
from policy.config import MIN_ENVOY_HEAP_BYTES, load_config
from tests.e2e.conftest import Gateway, run_gateway
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e

# Far below what Envoy uses at idle: the heap's pressure is past every threshold from
# the overload manager's first refresh. (The config refuses such a bound; the rendered
# bootstrap is edited instead.)
TINY_HEAP_BYTES = 1 << 20


def _tiny_heap(bootstrap: dict[str, Any]) -> None:
    (monitor,) = [m for m in bootstrap["overload_manager"]["resource_monitors"]
                  if m["name"] == FIXED_HEAP]
    monitor["typed_config"]["max_heap_size_bytes"] = str(TINY_HEAP_BYTES)


def _get(url: str, key: str | None = SECRET) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _admin_stats(gw: Gateway) -> dict[str, str]:
    admin = load_config(gw.config_path).envoy.admin_listen
    with urllib.request.urlopen(f"http://{admin}/stats?filter=^overload\\.", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


def test_past_its_heap_bound_envoy_refuses_new_requests_with_an_openai_503(
        tmp_path: Path) -> None:
    with run_gateway(tmp_path, envoy={"max_heap_bytes": MIN_ENVOY_HEAP_BYTES},
                     edit_bootstrap=_tiny_heap) as gw:
        models = f"{gw.base_url}/v1/models"
        # The overload manager acts at its first refresh; until then requests pass.
        wait_until(lambda: _get(models)[0] == 503, "the overload 503")
        for key in (SECRET, None):  # refused before any key is read
            status, headers, body = _get(models, key)
            assert status == 503, body
            assert headers["content-type"] == "application/json"
            assert headers["retry-after"] == "1"
            err = json.loads(body)["error"]
            assert (err["code"], err["type"]) == ("service_unavailable", "server_error")
            assert "overloaded" in err["message"]
        stats = _admin_stats(gw)
        # Envoy is up and says why: the actions are saturated, not the process dead.
        assert stats["overload.envoy.overload_actions.stop_accepting_requests.active"] == "1"
        assert stats["overload.envoy.overload_actions.shrink_heap.active"] == "1"
