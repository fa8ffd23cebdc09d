"""Org limits are shared by every key of the org, and checked before the key's own."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.grpc_harness import Running, serve_policy
from tests.services.test_ext_proc import CHAT, Stream, immediate, req_body


@pytest.fixture
async def org_running(tmp_path: Path) -> AsyncIterator[Running]:
    async with serve_policy(
        tmp_path,
        orgs={"acme": {"rpm": 3, "max_concurrent": 2},
              "beta": {"budget_usd": "0.001", "budget_period": "day"}},
    ) as r:
        yield r


async def send(running: Running, key_id: str, rid: str) -> object:
    s = Stream(running)
    return await s.send(req_body(json.dumps({**CHAT, "max_tokens": 5}).encode(), key_id, rid))


async def test_org_limits_are_shared_by_its_keys(org_running: Running) -> None:
    # Streams left open: each holds one of acme's two concurrency slots until it ends.
    assert (await send(org_running, "k-main", "a1")).HasField("request_body")
    assert (await send(org_running, "k-metered", "a2")).HasField("request_body")
    status, body = immediate(await send(org_running, "k-main", "a3"))
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    assert "in flight" in body["error"]["message"]


async def test_org_rpm_counts_every_key(org_running: Running) -> None:
    for rid in ("r1", "r2", "r3"):  # each stream ends at once: only the rate counts
        s = Stream(org_running)
        key_id = "k-main" if rid != "r2" else "k-metered"
        assert (await s.send(req_body(json.dumps(CHAT).encode(), key_id, rid))).HasField(
            "request_body")
        s.call.cancel()
    status, body = immediate(await send(org_running, "k-main", "r4"))
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    assert "requests per minute" in body["error"]["message"]


async def test_a_key_refusing_a_flood_leaves_its_org_s_request_rate_to_the_others(
        org_running: Running) -> None:
    """acme admits 3 requests a minute; k-metered, 1 in flight. Its refusals took a
    slot of acme's rate each (a hold given back keeps it), so one key retrying against
    its own limit used up the org's rate, and another key of the org was refused though
    acme had admitted one request."""
    assert (await send(org_running, "k-metered", "f1")).HasField("request_body")
    for rid in ("f2", "f3", "f4"):
        status, body = immediate(await send(org_running, "k-metered", rid))
        assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
        assert "in flight for this API key" in body["error"]["message"]
    assert (await send(org_running, "k-main", "f5")).HasField("request_body")
    # The org refuses first, as before, when both would: acme's 2 in flight are taken.
    status, body = immediate(await send(org_running, "k-metered", "f6"))
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    assert "in flight for this organization" in body["error"]["message"]


async def test_org_budget_refuses_with_insufficient_quota(org_running: Running) -> None:
    # beta's budget ($0.001) is below one request's worst case at $1.50/1k output tokens.
    status, body = immediate(await send(org_running, "k-limited", "b2"))
    assert (status, body["error"]["code"]) == (429, "insufficient_quota")


async def test_a_key_refusal_gives_the_org_hold_back(org_running: Running) -> None:
    """k-metered allows one request in flight: its refusal must not keep acme's hold."""
    assert (await send(org_running, "k-metered", "m1")).HasField("request_body")
    status, body = immediate(await send(org_running, "k-metered", "m2"))
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
    store = org_running.services.limits
    assert store is not None
    import time

    from policy.limits import Ask, Limits

    # acme allows 2 in flight: m1 holds one, so exactly one more fits, not two.
    org = Limits(max_concurrent=2)

    def probe(rid: str) -> Ask:
        return Ask(request_id=rid, key_id="org:acme", org="acme", tokens=0, cost_nano=0,
                   period="total", lease_s=60)

    assert (await store.admit(org, probe("p1"), time.time())).allowed
    assert not (await store.admit(org, probe("p2"), time.time())).allowed
