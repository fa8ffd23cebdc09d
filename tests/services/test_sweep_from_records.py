"""A replica killed between a request's usage record and its settlements, that never
comes back (`state: redis://…`): the record it delivered in between is the request's
only word on its cost. The lost-hold sweep of any replica reads it (the record's seen
key says what the request owes: policy/recorded.py) and settles the holds at that cost,
instead of charging them in full beside a real record (drift in `tokenbooth audit`).

Real parts throughout, as tests/services/test_resettle.py (whose harness this uses,
with `marks` on as the services run): a redis-server of the test's own, the Redis limit
store and usage sink, the lifecycle, the audit. Nothing restarts on the dead spool."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from authz.runtime.snapshot import Runtime, utc_now
from authz.services.lifecycle import Lifecycle
from authz.state.usage.records import USAGE_STREAM
from authz.state.usage.redis_sink import SWEEP_MARGIN_S, seen_prefix
from policy.keys import Principal
from policy.limits import Limits
from policy.recorded import from_seen_mark
from policy.usage import LOST
from tests.helpers import write_policy
from tests.redis_server import RedisServer
from tests.services.test_resettle import (
    BACKEND,
    CHAT,
    FREE,
    LATER,
    REAL_NANO,
    Process,
    audit,
    clean,
    real,
    records,
    redis_ledgers,
    runtime,
)

__all__ = ["runtime"]  # the fixture


async def sweep(url: str, tmp_path: Path, runtime: Runtime, ahead_s: float = LATER,
                delivered: bool = True) -> tuple[int, int]:
    """Another replica (as the services run), its clock `ahead_s` on, sweeps: (`lost`
    records written, holds settled from their records); waits for the `lost` records
    to be `delivered`."""
    other = Process(url, tmp_path / "sweeper", runtime, ahead_s=ahead_s, marks=True)
    await other.sink.start()
    try:
        lost = await other.admission.sweep()
        if delivered:
            await records(url, lambda recs: sum(r["status"] == LOST for r in recs) >= lost)
        return lost, other.store.settled_from_records
    finally:
        await other.stop()


async def recorded_and_settled(url: str, tmp_path: Path, runtime: Runtime, rid: str) -> None:
    """A request under `rid` recorded, delivered and settled by a replica that stops;
    then 50 ms pass (a later request under the id is admitted after it ended)."""
    a = Process(url, tmp_path / "a", runtime, marks=True)
    await a.sink.start()
    await (await a.request(rid)).settle()
    await records(url, real(rid))
    await a.stop()
    await asyncio.sleep(0.05)


async def test_a_delivered_record_settles_its_holds_when_its_replica_never_returns(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """Killed after its records reached Redis, before its settlements; never restarted.
    The sweep settles the key's and the org's holds at the records' cost, writes no
    `lost` record, and the audit is clean (it charged the whole holds before)."""
    url = own_redis.url
    first = Process(url, tmp_path / "spool", runtime, marks=True)
    await first.sink.start()
    await first.request("r1")
    await first.request("r2", FREE)  # no budget: only its org's ledger holds it
    await records(url, real("r1", "r2"))
    await first.die()

    assert await sweep(url, tmp_path, runtime) == (0, 4)  # r1's and r2's key and org
    after = await audit(url, real("r1", "r2"))
    assert clean(after), after
    assert after["k-a"].spent == REAL_NANO and after["org:acme"].spent == 2 * REAL_NANO
    assert after["org:acme"].live_holds == after["org:acme"].expired_holds == 0
    assert await sweep(url, tmp_path, runtime) == (0, 0)  # once


async def test_an_undelivered_record_leaves_the_hold_charged_in_full(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """Killed before its record left the spool: nothing in Redis says the cost, and
    the sweep charges the hold in full with its `lost` record, which is then the only
    record (ledger = records)."""
    url = own_redis.url
    first = Process(url, tmp_path / "spool", runtime, marks=True)
    await first.request("r1")
    await first.die()
    assert await sweep(url, tmp_path, runtime) == (1, 0)  # one record for both holds
    after = await audit(url, lambda recs: len(recs) == 1)
    assert clean(after), after
    assert after["k-a"].spent > REAL_NANO


async def test_a_live_hold_is_not_settled_and_a_later_request_under_the_id_is_charged(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """A client reusing its `x-request-id`: the first request recorded and settled; a
    second under the same id, admitted after, dies unsettled. Its hold outlives the
    first record's `latest`: the sweep charges it as lost (in full), never at the first
    record's cost (it would have been under-charged, its slot freed while it ran)."""
    url = own_redis.url
    await recorded_and_settled(url, tmp_path, runtime, "same")
    b = Process(url, tmp_path / "b", runtime, marks=True)
    await b.request("same")  # answered; its record never leaves its spool
    await b.die()

    assert await sweep(url, tmp_path, runtime, ahead_s=1.0) == (0, 0)  # leases live
    assert await sweep(url, tmp_path, runtime) == (1, 0)  # the key's and org's, charged
    ledgers = {led.owner: led for led in await redis_ledgers(url)}
    assert ledgers["k-a"].spent > 2 * REAL_NANO  # the first's cost and a whole hold


async def test_a_real_records_mark_outlives_its_holds_lease(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """The seen key of a stream's record lives past the stream's hold lease (longer than
    the dedup horizon by default), and says what the request owes."""
    url = own_redis.url
    first = Process(url, tmp_path / "spool", runtime, marks=True)
    await first.sink.start()
    await first.request("r1")
    await records(url, real("r1"))
    await first.die()
    client = aioredis.from_url(url)
    try:
        key = seen_prefix(USAGE_STREAM) + "r1"
        owes = from_seen_mark(await client.get(key))
        ttl = await client.ttl(key)
    finally:
        await client.aclose()
    lease = runtime.snapshot.config.envoy.hold_lease_s(False)
    assert owes is not None and owes.cost_nano == REAL_NANO
    assert time.time() < owes.latest <= time.time() + lease + 1
    assert ttl >= max(600, lease + SWEEP_MARGIN_S) - 5


ORGS = {"acme": {"budget_usd": "100", "budget_period": "month"},
        "beta": {"budget_usd": "100", "budget_period": "month"}}
BETA = Principal("k-b", "beta", frozenset(), frozenset(),
                 Limits(budget_nano=10 * 10**9, budget_period="day"))


async def test_another_keys_record_under_the_same_id_settles_nothing(
        tmp_path: Path, own_redis: RedisServer) -> None:
    """Two keys of two orgs hold one `x-request-id` at once (the duplicate check is per
    key; a mesh keeps the client's id). B's replica dies unsettled; A's request is
    recorded and settled. B's holds are B's: charged in full (they were settled at A's
    record's cost: $0.000008 for a 256-token hold, and to $0 behind a GET)."""
    url = own_redis.url
    rt = Runtime.from_file(write_policy(tmp_path, BACKEND, orgs=ORGS))
    a = Process(url, tmp_path / "a", rt, marks=True)
    b = Process(url, tmp_path / "b", rt, marks=True)
    await a.sink.start()
    life = Lifecycle(b.runtime, b.recorder, b.admission)
    life.identify("POST", "/v1/chat/completions", "shared", None, BETA)
    await life.request_body(json.dumps(dict(CHAT, max_tokens=256)).encode())
    await b.die()  # admitted; never answered, recorded or settled
    await (await a.request("shared")).settle()
    await records(url, real("shared"))
    await a.stop()

    # B's `lost` record is written, and dropped at delivery behind A's record under the
    # same id (README, "Use with a service mesh": one id, one record).
    assert await sweep(url, tmp_path, rt, delivered=False) == (1, 0)
    ledgers = {led.owner: led.spent for led in await redis_ledgers(url)}
    assert ledgers["k-b"] == ledgers["org:beta"] > 256 * 1_500  # the whole hold
    assert ledgers["k-a"] == ledgers["org:acme"] == REAL_NANO


@pytest.mark.parametrize("skew_s", [-0.1, 0.1])
async def test_a_reused_id_on_a_replica_whose_clock_is_off_is_charged_its_own(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime, skew_s: float) -> None:
    """The first request under an id is recorded and settled on one replica; the same
    key reuses the id 50 ms later on another whose clock is 100 ms off, which dies. The
    hold is told from the record's by its admission time, exact, not by lease ends on
    two clocks (behind, the second hold's lease ended before the first record's and it
    was settled at that record's cost)."""
    url = own_redis.url
    await recorded_and_settled(url, tmp_path, runtime, "same")
    off = dataclasses.replace(runtime, clock=lambda: utc_now() + timedelta(seconds=skew_s))
    b = Process(url, tmp_path / "b", off, marks=True, ahead_s=skew_s)
    await b.request("same")
    await b.die()
    assert await sweep(url, tmp_path, runtime) == (1, 0)
    ledgers = {led.owner: led.spent for led in await redis_ledgers(url)}
    assert ledgers["k-a"] > 2 * REAL_NANO  # the first's cost and a whole hold
