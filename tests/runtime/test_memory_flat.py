"""Memory stays flat: what a request leaves behind is gone once it ends, whatever way it
ends (completed, cut by the client, refused, a backend error, an oversize event).

The short form of the soak (tests/e2e/test_memory_soak.py): batches of requests through
the real servicers over real gRPC; after each, with a garbage collection, the
per-request bookkeeping is back to its baseline and neither the traced Python heap nor
the live objects of any type grow with the number of requests.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import generate_latest

from authz.envoy_config.names import EXT_AUTHZ, EXT_PROC
from authz.services.ext_proc import ExternalProcessorService
from authz.services.principal_md import principal_metadata
from authz.state.limits.memory import MemoryLimitStore
from authz.state.usage.records import USAGE_FILE, read_records
from policy.keys import Principal
from policy.limits import Ask, Limits
from tests.grpc_harness import Running, serve_policy
from tests.services.test_ext_proc import CHAT, Stream, resp_body

BATCH = 120
FRAMES = 16
ROOT = str(Path(__file__).resolve().parents[2])
MAX_EVENT = 4096
TEXT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
USAGE = (b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}\n\n'
         b"data: [DONE]\n\n")
OVERSIZE = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 6000 + b'"}}]}\n\n'
# A key without limits, and one whose holds the limit store tracks (tokens, budget).
KEYS = {
    "free": Principal("k-free", "acme", frozenset(), frozenset(), Limits()),
    "held": Principal("k-held", "acme", frozenset(), frozenset(),
                      Limits(tpm=10**9, budget_nano=10**15, budget_period="total")),
}


def req_body(data: bytes, key: str, rid: str) -> Any:
    """The request-side message, with ext_authz's metadata for `key`."""
    msg = ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=True))
    msg.attributes[EXT_PROC].update({"request.path": "/v1/chat/completions",
                                     "request.method": "POST", "request.id": rid})
    msg.metadata_context.filter_metadata[EXT_AUTHZ].CopyFrom(principal_metadata(KEYS[key]))
    return msg


async def admit(s: Stream, key: str, rid: str) -> None:
    r = await s.send(req_body(json.dumps({**CHAT, "stream": True}).encode(), key, rid))
    assert r.HasField("request_body"), r


async def completed(running: Running, i: int, key: str) -> None:
    s = Stream(running)
    await admit(s, key, f"ok-{i}")
    await s.send(resp_body(TEXT, end=False))
    await s.send(resp_body(USAGE, end=True, status=None))
    await s.close()


async def cut(running: Running, i: int, key: str) -> None:
    """The client goes away mid-stream: Envoy resets the ext_proc stream."""
    s = Stream(running)
    await admit(s, key, f"cut-{i}")
    await s.send(resp_body(TEXT, end=False))
    s.call.cancel()


async def refused(running: Running, i: int, key: str) -> None:
    s = Stream(running)
    r = await s.send(req_body(b"{not json", key, rid=f"bad-{i}"))
    assert r.immediate_response.status.code == 400


async def oversize(running: Running, i: int, key: str) -> None:
    """An event over the limit, and no usage chunk: passed through, the record estimated."""
    s = Stream(running)
    await admit(s, key, f"big-{i}")
    await s.send(resp_body(OVERSIZE[:5000], end=False))
    await s.send(resp_body(OVERSIZE[5000:] + b"data: [DONE]\n\n", end=True, status=None))
    await s.close()


KINDS = (completed, cut, refused, oversize)
_IDS = itertools.count()


async def batch(running: Running, n: int) -> None:
    """`n` requests of every kind, 8 at a time, by a key without limits and one with."""
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            # Request ids never repeat, as Envoy's do not.
            await KINDS[i % len(KINDS)](running, next(_IDS), "free" if i % 2 else "held")

    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.sleep(0.2)  # the settlements of cut streams run apart


def bookkeeping(running: Running) -> dict[str, int]:
    """Every container that holds something per request in flight."""
    services = running.services
    admission = services._admission  # the containers are the point
    assert admission is not None
    [proc] = [o for o in gc.get_objects() if isinstance(o, ExternalProcessorService)
              and o._admission is admission]
    return {
        "settling": len(proc._settling),
        "holds_in_flight": len(services.metrics.holds._held),
        "local_admissions": len(admission._local_ids),
    }


def product(snap: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    """The allocations made on behalf of the gateway's code (a frame of it on the stack),
    not the test's own (its counters, its client) nor one-time caches of the stdlib."""
    return snap.filter_traces([tracemalloc.Filter(True, f"{ROOT}/{package}/*", all_frames=True)
                               for package in ("authz", "policy")])


def live_by_type() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


POLICY: dict[str, Any] = {"envoy": {"max_event_bytes": MAX_EVENT}}


@pytest.fixture
async def budgeted(tmp_path: Path) -> AsyncIterator[Running]:
    async with serve_policy(tmp_path, **POLICY) as r:
        yield r


@pytest.mark.timeout(300)  # four batches under tracemalloc: ~2 min on a 2-core CI machine
async def test_per_request_state_returns_to_baseline(budgeted: Running) -> None:
    running = budgeted
    await batch(running, BATCH)  # warm-up: caches, metric series, code paths
    base = bookkeeping(running)
    assert base == {"settling": 0, "holds_in_flight": 0, "local_admissions": 0}
    tracemalloc.start(FRAMES)
    try:
        await batch(running, BATCH)  # what is allocated once, now traced
        gc.collect()
        snaps = [product(tracemalloc.take_snapshot())]
        counts = [live_by_type()]
        for _ in range(2):
            await batch(running, BATCH)
            counts.append(live_by_type())  # collects garbage first
            snaps.append(product(tracemalloc.take_snapshot()))
    finally:
        tracemalloc.stop()
    assert bookkeeping(running) == base
    # Objects a request leaves behind grow in every batch; a cache filling once (the
    # ABCs' after a class registration elsewhere, say) grows in one only.
    steps = [{t: after[t] - before[t] for t in after}
             for before, after in itertools.pairwise(counts)]
    grown = {t: [d.get(t, 0) for d in steps] for t in steps[0]
             if all(d.get(t, 0) > BATCH // 4 for d in steps)}
    assert grown == {}, grown
    # A leak of one small object per request is ~100 B a request, in every batch; allow a
    # fraction of it (what the last requests leave until the next ones reuse it is bounded).
    grew = [after.compare_to(before, "traceback") for before, after in itertools.pairwise(snaps)]
    growth = min(sum(g.size_diff for g in step) for step in grew)
    sites = "\n".join(f"{g.size_diff:+} B {g.count_diff:+}: " + " <- ".join(
        f"{f.filename}:{f.lineno}" for f in reversed(g.traceback)) for g in grew[-1][:8])
    assert growth / BATCH < 64, f"{growth} B grown a batch; top sites:\n{sites}"
    recs = list(read_records(running.data_dir / USAGE_FILE))
    assert len(recs) == 4 * BATCH * 3 // 4  # every admitted request: one record
    big = [r for r in recs if r["request_id"].startswith("big-")]
    assert big and all(r["estimated"] and r["completion_tokens"] > 1 for r in big)
    text = generate_latest(running.services.metrics.registry).decode()
    assert f'tokenbooth_sse_oversize_events_total{{model="demo"}} {float(len(big))}' in text


def test_the_sweep_heap_follows_the_keys_not_the_requests() -> None:
    """One entry per key with holds, however many holds came and went; lost holds are
    still found when their lease ends."""
    store = MemoryLimitStore()
    limits = Limits(tpm=10**9)

    def ask(rid: str, lease_s: float) -> Ask:
        return Ask(request_id=rid, key_id="k", org="o", tokens=1, cost_nano=0,
                   period="total", lease_s=lease_s)

    async def run() -> None:
        for i in range(5000):
            a = ask(f"r{i}", 100.0)
            await store.admit(limits, a, float(i))
            await store.settle(limits, a, 1, 0, float(i))
        assert len(store._due) <= 2  # the bound is the point
        await store.admit(limits, ask("lost-late", 600.0), 5000.0)
        await store.admit(limits, ask("lost-soon", 50.0), 5001.0)
        assert await store.sweep(5050.0) == []
        assert [a.request_id for a in await store.sweep(5052.0)] == ["lost-soon"]
        assert [a.request_id for a in await store.sweep(5601.0)] == ["lost-late"]
        assert await store.sweep(10**6) == []
        assert len(store._due) == 0

    asyncio.run(run())


async def test_the_stream_ends_after_the_last_answer(budgeted: Running) -> None:
    """Envoy resets the ext_proc stream when the HTTP stream ends: a servicer still
    waiting to read then (or sending its status after that) leaks native memory in
    grpc.aio (grpc/grpc#43360), ~100 B a request. Ending first avoids both."""
    s = Stream(budgeted)
    await admit(s, "held", "last")
    await s.send(resp_body(USAGE, end=True))
    code = await asyncio.wait_for(s.call.code(), 2)
    assert code.name == "OK"
