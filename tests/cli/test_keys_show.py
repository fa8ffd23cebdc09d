"""`tokenbooth keys show`: the current period's spend, reserved and remaining budget and
the limits' state, read from the state the real stores wrote (memory and Redis)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from authz.state.limits.base import LimitStore
from authz.state.limits.durable import DurableMemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.orgs import make_org_store
from policy.config import OrgLimits, load_config
from policy.limits import Ask, period_id
from policy.quota import limits_from, org_hold
from tests.helpers import free_port, write_policy
from tests.redis_server import RedisServer

KEY = "k-show"
KEYS = [{"id": KEY, "org": "acme", "sha256": "2" * 64, "rpm": 10, "tpm": 1000,
         "max_concurrent": 2, "budget_usd": "10", "budget_period": "total"},
        {"id": "k-plain", "org": "beta", "sha256": "3" * 64}]
ORGS = {"acme": {"budget_usd": "100", "budget_period": "month"}}
NANO = 10**9


def show(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "authz.cli", "keys", "show", "--config",
                           str(config), *args], capture_output=True, text=True, timeout=60)


async def traffic(config: Path, store: LimitStore) -> float:
    """Three requests of 100 tokens and $1 held each, against the key and its org: two
    settled at 50 tokens and $0.50, one still in flight. Returns when they were admitted."""
    cfg = load_config(config)
    [key] = [k for k in cfg.keys if k.id == KEY]
    limits, now = limits_from(key), datetime.now(UTC)
    for i in range(3):
        ask = Ask(f"r{i}", KEY, "acme", 100, NANO, period_id("total", now), 600.0)
        held = [org_hold(cfg.orgs["acme"], ask, now), (limits, ask)]
        for lim, a in held:
            assert (await store.admit(lim, a, now.timestamp())).allowed
        for lim, a in held if i < 2 else []:
            assert (await store.settle(lim, a, 50, NANO // 2, now.timestamp())).applied
    await store.close()
    return now.timestamp()


def check_state(state: dict[str, Any], admitted: float) -> None:
    waited = datetime.fromisoformat(state["at"]).timestamp() - admitted
    key = state["key"]
    assert key["budget"] == {"period": "total", "budget_usd": "10", "spent_usd": "1",
                             "reserved_usd": "1", "remaining_usd": "8", "resets_at": None}
    # Three requests taken, refilled at 10 a minute since.
    assert key["requests"]["limit"] == 10
    assert abs(key["requests"]["remaining"] - min(10, 7 + math.floor(waited / 6))) <= 1
    assert 0 < key["requests"]["reset_s"] <= 18
    # 300 tokens taken, 100 given back, refilled at 1000 a minute since.
    assert abs(key["tokens"]["remaining"] - min(1000, 800 + waited * 1000 / 60)) <= 2
    assert key["concurrency"] == {"limit": 2, "in_flight": 1}
    org = state["org"]
    assert org["budget"]["spent_usd"] == "1" and org["budget"]["reserved_usd"] == "1"
    assert org["budget"]["remaining_usd"] == "98" and org["budget"]["resets_at"]
    assert org["requests"] is None and org["tokens"] is None and org["concurrency"] is None


def test_show_reads_the_memory_state(tmp_path: Path) -> None:
    config = write_policy(tmp_path, "http://127.0.0.1:8000", keys=KEYS, orgs=ORGS)
    store = DurableMemoryLimitStore(tmp_path / "data")

    async def run() -> float:
        await store.start()
        return await traffic(config, store)

    admitted = asyncio.run(run())
    r = show(config, KEY, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["id"] == KEY and out["source"] == "config"
    assert out["state"]["source"].startswith("memory ")
    check_state(out["state"], admitted)
    text = show(config, KEY).stdout
    assert "key budget total: $1 spent, $1 reserved, $8 of $10 left" in text
    assert "key concurrency: 1 of 2 in flight" in text
    assert "org budget month:" in text


def test_a_key_without_limits_and_without_any_state(tmp_path: Path) -> None:
    config = write_policy(tmp_path, "http://127.0.0.1:8000", keys=KEYS, orgs=ORGS)
    (tmp_path / "data").mkdir()  # a gateway's (one missing is warned of: test_cli.py)
    r = show(config, "k-plain", "--json")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)["state"]
    assert state["key"] == {"budget": None, "requests": None, "tokens": None,
                            "concurrency": None}
    assert state["org"] is None  # beta has no limits
    assert "key budget: none" in show(config, "k-plain").stdout
    r = show(config, "k-nobody")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no key" in r.stderr


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_show_uses_the_org_limits_stored_over_the_admin_api(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Org limits set with PUT /v1/orgs/{org} are the ones in force: `keys show` prints
    them, as `keys show --admin-url` does, not the config's (or none)."""
    config = (request.getfixturevalue("redis_config") if backend == "redis" else
              write_policy(tmp_path, "http://127.0.0.1:8000", keys=KEYS, orgs=ORGS))

    async def store_limits() -> None:
        orgs = make_org_store(load_config(config))
        await orgs.put("beta", OrgLimits(rpm=7, budget_usd=Decimal(3), budget_period="day"))
        await orgs.put("acme", OrgLimits(budget_usd=Decimal(50), budget_period="total"))
        await orgs.close()

    asyncio.run(store_limits())
    for key, budget, period, rpm in (("k-plain", "3", "day", 7), (KEY, "50", "total", None)):
        r = show(config, key, "--json")
        assert r.returncode == 0, r.stderr
        org = json.loads(r.stdout)["state"]["org"]
        assert org is not None, f"{key}: the stored org limits were not shown"
        assert org["budget"]["budget_usd"] == budget
        assert org["budget"]["period"].split(":")[0] == period
        assert (org["requests"] or {}).get("limit") == rpm


@pytest.fixture
def redis_config(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield write_policy(tmp_path, "http://127.0.0.1:8000", state=server.url, keys=KEYS,
                           orgs=ORGS)
    finally:
        server.stop()


def test_show_reads_the_redis_state(redis_config: Path) -> None:
    url = load_config(redis_config).state
    admitted = asyncio.run(traffic(redis_config, RedisLimitStore(url, timeout_s=2.0)))
    r = show(redis_config, KEY, "--json")
    assert r.returncode == 0, r.stderr
    state = json.loads(r.stdout)["state"]
    assert state["source"].startswith("redis redis://127.0.0.1:")
    check_state(state, admitted)


def test_an_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    config = write_policy(tmp_path, "http://127.0.0.1:8000", keys=KEYS,
                          state=f"redis://127.0.0.1:{free_port()}/0")
    t0 = time.monotonic()
    r = show(config, KEY)
    # (The key store also logs its warning line before the error.)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("tokenbooth: error: ")
    assert time.monotonic() - t0 < 30
