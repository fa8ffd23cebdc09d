"""A hold charged as lost by the sweep (its lease ended while the request still ran) and
then corrected by the request's own settlement: one request, so one count in the
contract's metrics (interface.md §6: requests, tokens) and in the cost counters. The
sweep's `lost` record was counted as it was written, and counters cannot go down, so
the real record that corrects it is not counted again (the usage records and the
ledgers carry the correction). Two replicas share one store (memory: one object; Redis:
a real redis-server); the sweeping replica's clock is past the lease, nothing sleeps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from authz.runtime.metrics import Metrics
from authz.runtime.recorder import Recorder
from authz.runtime.snapshot import Runtime
from authz.services.lifecycle import Lifecycle
from authz.state.limits.admission import Admission
from authz.state.limits.base import LimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.usage.records import JsonlUsageLog, read_records
from policy.keys import Principal
from policy.usage import LOST
from tests.helpers import write_policy

BACKEND = "http://127.0.0.1:8000"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
ANSWER = json.dumps({"id": "c", "object": "chat.completion", "choices": [],
                     "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()


def total(m: Metrics, name: str) -> float:
    """The sum of a counter's samples over every label set."""
    return sum(s.value for f in m.registry.collect() if f.name == name
               for s in f.samples if s.name == f"{name}_total")


async def test_a_corrected_lost_hold_is_counted_once(
        tmp_path: Path, two_limit_stores: list[LimitStore]) -> None:
    runtime = Runtime.from_file(write_policy(tmp_path, BACKEND))
    metrics, log = Metrics(), JsonlUsageLog(tmp_path / "data")
    recorder = Recorder(log, metrics)
    serving = Admission(two_limit_stores[0], on_lost=recorder.lost)
    # Another replica, its sweep an hour on: the serving replica's lease has ended.
    sweeper = Admission(two_limit_stores[1], on_lost=recorder.lost,
                        clock=lambda: time.time() + 3600)

    async def request(rid: str) -> Lifecycle:
        life = Lifecycle(runtime, recorder, serving)
        life.identify("POST", "/v1/chat/completions", rid, None,
                      Principal("k-main", "acme", frozenset(), frozenset()))
        await life.request_body(json.dumps(CHAT).encode())
        life.delivered = True
        life.response_start(200, BACKEND)
        return life

    late = await request("late")
    assert await sweeper.sweep() == 1  # charged in full, its `lost` record counted
    lost: dict[str, Any] = dict(next(read_records(tmp_path / "data" / "usage.jsonl")))
    assert lost["status"] == LOST
    late.response_chunk(ANSWER, end=True)  # the real record, then the settlement
    await late.settle()
    assert late.record is not None and late.record.total_tokens == 10
    assert total(metrics, "inference_requests") == 1
    assert metrics.registry.get_sample_value(
        "inference_requests_total",
        {"model": "demo", "endpoint": "chat", "status": LOST}) == 1
    assert total(metrics, "tokens_processed") == lost["total_tokens"]  # once: the hold
    assert total(metrics, "tokenbooth_lost_holds") == 1

    # A request its settlement reaches in time is counted as it ended.
    ok = await request("ok")
    ok.response_chunk(ANSWER, end=True)
    await ok.settle()
    assert total(metrics, "inference_requests") == 2
    assert metrics.registry.get_sample_value(
        "inference_requests_total", {"model": "demo", "endpoint": "chat", "status": "200"}) == 1
    assert total(metrics, "tokens_processed") == lost["total_tokens"] + 10
    log.close()


async def test_a_key_hold_swept_without_the_orgs_is_still_counted(
        tmp_path: Path, own_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The org's hold carries the record (admit_all), so the key's own hold has none. A
    sweep that claims the key's hold but not (yet) the org's (one claim batch ends
    between them: the two share their lease end, and the key's index entry sorts first)
    writes no `lost` record and counts nothing; the late settlement corrects the key's
    hold and settles the org's in time. The request is counted once, as it ended: the
    correction of a hold that carried no record must not skip the count (it was
    counted nowhere)."""
    from authz.state.limits import redis_limits
    from policy.limits import Limits

    monkeypatch.setattr(redis_limits, "SWEEP_BATCH", 1)
    monkeypatch.setattr(redis_limits, "SWEEP_BATCHES", 1)
    runtime = Runtime.from_file(write_policy(tmp_path, BACKEND,
                                             orgs={"acme": {"budget_usd": "100"}}))
    metrics, log = Metrics(), JsonlUsageLog(tmp_path / "data")
    recorder = Recorder(log, metrics)
    stores = [RedisLimitStore(own_redis.url, timeout_s=2.0) for _ in range(2)]
    serving = Admission(stores[0], on_lost=recorder.lost)
    sweeper = Admission(stores[1], on_lost=recorder.lost, clock=lambda: time.time() + 3600)
    try:
        life = Lifecycle(runtime, recorder, serving)
        life.identify("POST", "/v1/chat/completions", "late", None,
                      Principal("k-main", "acme", frozenset(), frozenset(),
                                Limits(tpm=100_000)))
        await life.request_body(json.dumps(CHAT).encode())
        life.delivered = True
        life.response_start(200, BACKEND)
        assert await sweeper.sweep() == 0  # the key's hold: claimed, no record material
        life.response_chunk(ANSWER, end=True)
        await life.settle()
        assert life.record is not None and life.record.total_tokens == 10
        assert total(metrics, "inference_requests") == 1
        assert total(metrics, "tokens_processed") == 10
        assert total(metrics, "tokenbooth_lost_holds") == 0
    finally:
        for s in stores:
            await s.close()
        log.close()
