"""A replica killed between a request's usage record and its settlements (`state:
redis://…`): the lost-hold sweep charged the whole hold while the record says the real
cost, and the audit showed drift. A restart on the same spool settles again the holds
of the records written last (authz/state/limits/resettle.py): ledgers = records.

Real parts throughout: a redis-server of the test's own, the Redis limit store, the
Redis usage sink on a spool on disk, the lifecycle that admits and records, the audit
of `tokenbooth audit`. A "process" is a sink, a store and an admission; it dies by
dropping them without settling (the sink's spool stays, as a killed process's does).
The sweeping replica's clock is past the leases; nothing sleeps for them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from authz.cli.audit import redis_ledgers
from authz.runtime.metrics import Metrics
from authz.runtime.recorder import Recorder
from authz.runtime.snapshot import Runtime
from authz.services.lifecycle import Lifecycle
from authz.state.limits import resettle
from authz.state.limits.admission import Admission
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.usage.records import USAGE_STREAM, one_per_request
from authz.state.usage.redis_sink import RedisUsageSink, read_stream, seen_prefix
from policy.admission import Settled
from policy.audit import LedgerAudit, audit_ledgers
from policy.keys import Principal
from policy.limits import Ask, Limits
from policy.recorded import Owes
from policy.usage import LOST
from tests.grpc_harness import serve_policy
from tests.helpers import write_policy
from tests.redis_server import RedisServer

BACKEND = "http://127.0.0.1:8000"
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
ANSWER = json.dumps({"id": "c", "object": "chat.completion", "choices": [],
                     "usage": {"prompt_tokens": 7, "completion_tokens": 3}}).encode()
REAL_NANO = 8_000_000  # 7 prompt tokens at $0.50/1k, 3 completion at $1.50/1k
ORGS = {"acme": {"budget_usd": "100", "budget_period": "month"}}
# A key with a budget, in an org with one; and a key without limits, in the same org.
KEY = Principal("k-a", "acme", frozenset(), frozenset(),
                Limits(budget_nano=10 * 10**9, budget_period="day"))
FREE = Principal("k-free", "acme", frozenset(), frozenset())
PERIODS = {"k-a": "day", "org:acme": "month"}
LATER = 3600.0  # the sweeping replica's clock: every lease has ended


class Process:
    """One tokenbooth process's state: its usage sink on `spool`, its limit store and
    admission (`admission` to replace the Admission class)."""

    def __init__(self, url: str, spool: Path, runtime: Runtime,
                 admission: type[Admission] = Admission, ahead_s: float = 0.0,
                 marks: bool = False) -> None:
        # `marks`: as the services run, records say what their requests owe in their seen
        # keys and the sweep settles from them (test_sweep_from_records.py); off here, so
        # that the sweep charges as a release before that did, for the restart to correct.
        self.url, self.runtime = url, runtime
        lease = runtime.snapshot.config.envoy.hold_lease_s if marks else None
        self.sink = RedisUsageSink(url, spool, stream=USAGE_STREAM, lease_s=lease)
        self.store = RedisLimitStore(url, timeout_s=2.0, seen_prefix=seen_prefix(
            USAGE_STREAM) if marks else None)
        self.recorder = Recorder(self.sink, Metrics())
        self.admission = admission(self.store, on_lost=self.recorder.lost,
                                   clock=lambda: time.time() + ahead_s)
        self.owed: list[resettle.Owed] = []

    async def request(self, rid: str, principal: Principal = KEY) -> Lifecycle:
        """A request admitted and answered: its record is written, its settlement owed."""
        life = Lifecycle(self.runtime, self.recorder, self.admission)
        life.identify("POST", "/v1/chat/completions", rid, None, principal)
        await life.request_body(json.dumps(CHAT).encode())
        life.delivered = True
        life.response_start(200, BACKEND)
        life.response_chunk(ANSWER, end=True)
        assert life.record is not None and life.settle_pending
        return life

    async def die(self) -> None:
        """Killed: nothing more is settled or delivered; the spool stays."""
        self.sink.close()
        await self.sink._redis.aclose()
        await self.store.close()

    async def stop(self) -> None:
        await self.sink.aclose()
        await self.store.close()

    async def resettle(self) -> tuple[int, int]:
        """What `Services.start` does: the previous process's last records, read before
        the sink starts, then settled again."""
        self.owed = await asyncio.to_thread(lambda: resettle.owed(
            self.sink.previous_records(resettle.HORIZON_S, resettle.MAX_RECORDS)))
        await self.sink.start()
        return await self.resettle_again()

    async def resettle_again(self) -> tuple[int, int]:
        return await resettle.resettle(self.store, self.owed, time.time)


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    return Runtime.from_file(write_policy(tmp_path, BACKEND, orgs=ORGS))


async def records(url: str, until: Callable[[list[dict[str, Any]]], bool],
                  within: float = 8.0) -> list[dict[str, Any]]:
    """The stream's records, one per request, once `until` holds of them."""
    deadline = time.monotonic() + within
    while True:
        got = list(one_per_request(await read_stream(url, USAGE_STREAM)))
        if until(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


async def audit(url: str, until: Callable[[list[dict[str, Any]]], bool]
                ) -> dict[str, LedgerAudit]:
    """`tokenbooth audit`'s ledgers against the records, by owner (ledgers first)."""
    ledgers = await redis_ledgers(url)
    recs = await records(url, until)
    return {a.owner: a for a in audit_ledgers(ledgers, recs, PERIODS, datetime.now(UTC))}


def real(*rids: str) -> Callable[[list[dict[str, Any]]], bool]:
    """The stream holds the real record of each of `rids`."""
    return lambda recs: {r["request_id"] for r in recs if r["status"] != LOST} >= set(rids)


async def one_hold(url: str, n: int) -> int:
    """What one request's hold charged its org, which `n` holds charged in full (every
    request here holds the same)."""
    org = next(a for a in await redis_ledgers(url) if a.owner == "org:acme")
    assert org.spent % n == 0
    return org.spent // n


def clean(audits: dict[str, LedgerAudit]) -> bool:
    return all(not a.problems(strict=True) for a in audits.values())


async def sweep(url: str, tmp_path: Path, runtime: Runtime, lost: int) -> None:
    """Another replica, its clock past every lease, sweeps: `lost` holds claimed, their
    `lost` records delivered."""
    other = Process(url, tmp_path / "other-spool", runtime, ahead_s=LATER)
    await other.sink.start()
    try:
        assert await other.admission.sweep() == lost
        await records(url, lambda recs: sum(r["status"] == LOST for r in recs) >= lost)
    finally:
        await other.stop()


async def test_a_restart_corrects_what_the_sweep_charged_in_full(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """Killed after the records, before the settlements; the leases end and the sweep
    charges the holds in full (key's and org's): drift. The restart on the same spool
    corrects both charges to the records' cost."""
    url, spool = own_redis.url, tmp_path / "spool"
    first = Process(url, spool, runtime)
    await first.request("r1")
    await first.request("r2", FREE)  # no budget: only its org's ledger is charged
    await first.die()  # its records not delivered yet: they are, by the restart
    await sweep(url, tmp_path, runtime, lost=2)
    hold = await one_hold(url, 2)
    assert hold > REAL_NANO

    # The defect: the records (delivered by a restart as it was) say the real cost, the
    # ledgers the whole hold.
    second = Process(url, spool, runtime)
    await second.sink.start()
    before = await audit(url, real("r1", "r2"))
    await second.stop()
    assert before["k-a"].drift_nano == hold - REAL_NANO
    assert before["org:acme"].drift_nano == 2 * (hold - REAL_NANO)
    assert not clean(before)

    # The restart on the same spool (the records of the process before: in the segment
    # the last one delivered, kept).
    third = Process(url, spool, runtime)
    # r1's key and org, r2's org and its key's lease (a key without limits keeps one too,
    # for a concurrency limit set meanwhile): corrected
    assert await third.resettle() == (0, 4)
    after = await audit(url, real("r1", "r2"))
    assert clean(after), after
    assert after["k-a"].spent == REAL_NANO and after["org:acme"].spent == 2 * REAL_NANO
    assert await third.resettle_again() == (0, 0)  # once
    await third.stop()


async def test_a_restart_before_the_leases_end_settles_the_holds(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """The restart comes while the holds are live (the records were delivered before
    the kill): they are settled at the records' cost, and the sweep finds nothing."""
    url, spool = own_redis.url, tmp_path / "spool"
    first = Process(url, spool, runtime)
    await first.sink.start()
    await first.request("r1")
    await first.request("r2", FREE)
    await records(url, real("r1", "r2"))  # delivered: it does not matter
    await first.die()
    held = {a.owner: a for a in audit_ledgers(await redis_ledgers(url), [], PERIODS,
                                              datetime.now(UTC))}
    assert held["k-a"].live_holds == 1 and held["org:acme"].live_holds == 2

    second = Process(url, spool, runtime)
    # r1's key and org, r2's org and its key's lease (the org's hold carries its record)
    assert await second.resettle() == (4, 0)
    await sweep(url, tmp_path, runtime, lost=0)
    after = await audit(url, real("r1", "r2"))
    assert clean(after), after
    assert after["k-a"].spent == REAL_NANO and after["org:acme"].spent == 2 * REAL_NANO
    assert after["org:acme"].live_holds == after["org:acme"].expired_holds == 0
    await second.stop()


async def test_a_restart_after_settlements_that_completed_changes_nothing(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    url, spool = own_redis.url, tmp_path / "spool"
    first = Process(url, spool, runtime)
    for rid, who in (("r1", KEY), ("r2", FREE)):
        await (await first.request(rid, who)).settle()
    await first.stop()
    ledgers = await redis_ledgers(url)
    assert {(led.owner, led.spent) for led in ledgers} == {("k-a", REAL_NANO),
                                                           ("org:acme", 2 * REAL_NANO)}

    second = Process(url, spool, runtime)
    assert await second.resettle() == (0, 0)
    assert await redis_ledgers(url) == ledgers
    assert clean(await audit(url, real("r1", "r2")))
    await second.stop()


class Died(Exception):
    """The process is killed here."""


class DiesBeforeTheOrg(Admission):
    """Killed between a request's two settlements: its key's is made, its org's never."""

    async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                     now: datetime) -> Settled:
        if ask.key_id.startswith("org:"):
            raise Died
        return await super().settle(limits, ask, used_tokens, cost_nano, now)


async def test_a_restart_corrects_the_org_when_only_the_key_settled(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """The org's hold, left to the sweep (it carries the record material: its `lost`
    record), is corrected by the restart to the record's cost."""
    url, spool = own_redis.url, tmp_path / "spool"
    first = Process(url, spool, runtime, DiesBeforeTheOrg)
    life = await first.request("r1")
    with pytest.raises(Died):
        await life.settle()
    await first.die()
    await sweep(url, tmp_path, runtime, lost=1)  # the org's hold: a `lost` record
    ledgers = {led.owner: led for led in await redis_ledgers(url)}
    assert ledgers["k-a"].spent == REAL_NANO and ledgers["org:acme"].spent > REAL_NANO

    second = Process(url, spool, runtime)
    assert await second.resettle() == (0, 1)
    after = await audit(url, real("r1"))
    assert clean(after), after
    assert after["k-a"].spent == after["org:acme"].spent == REAL_NANO
    await second.stop()


async def test_only_recent_real_records_are_settled_again(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """A record that ended more than the horizon before the last one is not settled
    again (its hold stays charged as the sweep charged it), nor is a `lost` record:
    settling it would take out the lost charge that the real settlement, late, is to
    correct."""
    url, spool = own_redis.url, tmp_path / "spool"
    then = Runtime.from_file(write_policy(tmp_path / "then", BACKEND, orgs=ORGS))
    then.clock = lambda: datetime.fromtimestamp(time.time() - 3 * resettle.HORIZON_S, UTC)
    old = Process(url, spool, then)
    await old.request("r-old")
    await old.die()
    first = Process(url, spool, runtime)
    await first.request("r-new")
    await first.die()
    # A request of another replica that died too; this spool gets its `lost` record.
    other = Process(url, tmp_path / "other-spool", runtime)
    await other.request("r-other", FREE)
    await other.die()
    sweeper = Process(url, spool, runtime, ahead_s=LATER)
    assert await sweeper.admission.sweep() == 3
    await sweeper.die()
    hold = await one_hold(url, 3)

    second = Process(url, spool, runtime)
    assert await second.resettle() == (0, 2)  # r-new's key and org, no more
    audits = await audit(url, lambda recs: real("r-old", "r-new")(recs) and len(recs) == 3)
    assert audits["k-a"].drift_nano == hold - REAL_NANO  # r-old: its whole hold
    assert audits["k-a"].lost_charges == 1
    assert audits["org:acme"].drift_nano == hold - REAL_NANO  # (r-other: lost, as said)
    assert audits["org:acme"].lost_charges == 2  # r-old's, and r-other's still there
    # r-other's real settlement comes late after all (here: its replica's restart): it
    # still corrects the lost charge.
    third = Process(url, tmp_path / "other-spool", runtime)
    assert await third.resettle() == (0, 2)  # its org's charge and its key's lease
    audits = await audit(url, real("r-old", "r-new", "r-other"))
    assert audits["org:acme"].drift_nano == hold - REAL_NANO  # r-old's alone
    assert audits["org:acme"].lost_charges == 1
    await second.stop()
    await third.stop()


async def test_a_redis_outage_at_start_delays_the_resettlement(
        tmp_path: Path, runtime: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    """Redis away at the restart: the re-settlement waits in the background (one
    warning), and is made once Redis answers."""
    own_redis = RedisServer(tmp_path, persist=True)  # it keeps its data through a stop
    own_redis.start()
    try:
        await outage_at_start(own_redis, tmp_path / "spool", runtime, caplog)
    finally:
        own_redis.stop()


async def outage_at_start(own_redis: RedisServer, spool: Path, runtime: Runtime,
                          caplog: pytest.LogCaptureFixture) -> None:
    url = own_redis.url
    first = Process(url, spool, runtime)
    await first.sink.start()
    await first.request("r1")
    await records(url, real("r1"))
    await first.die()
    own_redis.stop()
    second = Process(url, spool, runtime)
    owed = resettle.owed(second.sink.previous_records(resettle.HORIZON_S,
                                                      resettle.MAX_RECORDS))
    with caplog.at_level(logging.INFO, "tokenbooth.limits"):
        task = asyncio.create_task(resettle.resettle(second.store, owed, time.time,
                                                     retry_s=0.1))
        await asyncio.sleep(0.5)
        assert not task.done()
        own_redis.start()
        assert await asyncio.wait_for(task, 10.0) == (2, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "trying again" in warnings[0].getMessage()
    assert "re-settled" in caplog.text
    assert clean(await audit(url, real("r1")))
    await second.stop()


async def test_the_services_settle_again_at_their_start(
        tmp_path: Path, own_redis: RedisServer) -> None:
    """`serve` started on the data_dir of a process killed mid-settlement: its start
    settles the holds again, in the background."""
    url = own_redis.url
    runtime = Runtime.from_file(write_policy(tmp_path, BACKEND, orgs=ORGS, state=url))
    first = Process(url, runtime.snapshot.config.data_dir / "spool", runtime)
    await first.request("r1")
    await first.die()
    await sweep(url, tmp_path, runtime, lost=1)
    async with serve_policy(tmp_path, orgs=ORGS, state=url) as running:
        task = running.services._resettling
        assert task is not None
        assert await asyncio.wait_for(task, 10.0) == (0, 2)
        assert clean(await audit(url, real("r1")))
    # That one stopped whole: the next start has nothing to settle again (a start after
    # every clean stop sent tens of thousands of settlements to the shared Redis).
    async with serve_policy(tmp_path, orgs=ORGS, state=url) as running:
        assert running.services._resettling is None
        assert running.services.sink is not None
    # Killed again (no stop): the start after it looks again.
    crashed = Process(url, runtime.snapshot.config.data_dir / "spool", runtime)
    assert crashed.sink.previous_records(resettle.HORIZON_S, resettle.MAX_RECORDS) == []
    await crashed.sink.start()  # it runs: if it dies now, the next start looks
    await crashed.request("r2")
    await crashed.die()
    nxt = Process(url, runtime.snapshot.config.data_dir / "spool", runtime)
    got = nxt.sink.previous_records(resettle.HORIZON_S, resettle.MAX_RECORDS)
    assert [r["request_id"] for r in got][:1] == ["r2"]
    await nxt.stop()


def test_a_record_names_the_holds_its_admission_took() -> None:
    """The key's and the org's hold, each in the budget period its record names (an
    owner without a budget: the default kind, whose ledger holds nothing of it), at
    the record's exact cost; no org, no org hold; a record that does not say: none."""
    rec: dict[str, Any] = {
        "request_id": "r1", "key_id": "k-a", "org": "acme", "total_tokens": 10,
        "cost_usd": "0.000000007", "started_at": "2026-12-06T23:59:59.5Z",
        "key_budget_period": None, "org_budget_period": "day:2026-12-06"}
    end = datetime(2026, 12, 6, 23, 59, 59, 500000, UTC).timestamp() + 1.25
    latest = end + 90 + resettle.SLACK_S  # its end, plus the lease it was held under

    def lease(stream: bool) -> float:
        return 90.0 if stream else 30.0

    rec |= {"duration_ms": 1250, "stream": True}
    owes = Owes(10, 7, latest, end - 1.25, "k-a", "acme")
    assert resettle.settlements(rec, lease) == [
        (Ask("r1", "k-a", "acme", 0, 0, "month:2026-12", 0.0), owes),
        (Ask("r1", "org:acme", "acme", 0, 0, "day:2026-12-06", 0.0), owes)]
    assert [a.key_id for a, *_ in resettle.settlements(rec | {"org": ""})] == ["k-a"]
    bad = [rec | {"cost_usd": "x"}, rec | {"total_tokens": -1}, rec | {"started_at": "?"},
           {k: v for k, v in rec.items() if k != "request_id"}]
    assert resettle.owed([*bad, rec], lease) == resettle.settlements(rec, lease)


async def test_a_later_request_under_the_same_id_is_not_settled(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime) -> None:
    """A client reusing its `x-request-id`: the request of the restarted process's record
    was settled; another, admitted since under the same id in another replica, holds.
    Its hold was admitted after that record's end, so its lease ends later: the restart
    leaves it alone (it settled it at the old record's cost: its own real cost was then
    never charged, and its concurrency slot came back while it ran)."""
    a = Process(own_redis.url, tmp_path / "a", runtime)
    await (await a.request("same")).settle()
    await a.stop()
    before = {led.owner: led.spent for led in await redis_ledgers(own_redis.url)}
    b = Process(own_redis.url, tmp_path / "b", runtime)
    await b.sink.start()
    later = Lifecycle(b.runtime, b.recorder, b.admission)
    later.identify("POST", "/v1/chat/completions", "same", None, KEY)
    await asyncio.sleep(0.05)  # admitted after the first one's end (its settlement)
    await later.request_body(json.dumps(CHAT).encode())
    restarted = Process(own_redis.url, tmp_path / "a", runtime)
    assert await restarted.resettle() == (0, 0)
    later.delivered = True
    later.response_start(200, BACKEND)
    later.response_chunk(ANSWER, end=True)
    await later.settle()
    after = {led.owner: led.spent for led in await redis_ledgers(own_redis.url)}
    assert {o: after[o] - before[o] for o in after} == {"k-a": REAL_NANO,
                                                       "org:acme": REAL_NANO}
    await restarted.stop()
    await b.stop()


async def test_a_batch_the_store_refuses_is_passed_over(
        tmp_path: Path, own_redis: RedisServer, runtime: Runtime,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A batch Redis answers with an error (here WRONGTYPE: r1's hold key is not a hash)
    is not waited out: retrying it every 5 s forever left every later batch unsent."""
    monkeypatch.setattr(resettle, "BATCH", 2)  # one request's key and org holds a batch
    first = Process(own_redis.url, tmp_path / "spool", runtime)
    await first.request("r1")
    await first.request("r2")
    await first.die()
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(own_redis.url)
    await r.delete("tb:{k:k-a}:res:r1")
    await r.set("tb:{k:k-a}:res:r1", "not a hold")
    await r.aclose()
    second = Process(own_redis.url, tmp_path / "spool", runtime)
    with caplog.at_level(logging.ERROR, "tokenbooth.limits"):
        settled, _ = await asyncio.wait_for(second.resettle(), 10.0)
    assert settled == 2  # r2's key and org (r1's batch: not counted, whatever it did)
    assert "answered with an error" in caplog.text and "WRONGTYPE" in caplog.text
    await second.stop()


async def test_a_stop_that_left_settlements_under_way_is_not_whole(
        tmp_path: Path, own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop whose drain gave up on settlements still under way (its bound passed) does
    not mark its spool stopped whole: their records are written, their holds maybe not,
    and the next start must look."""
    from authz.services.ext_proc import ExternalProcessorService
    from authz.state.usage.redis_sink import STOPPED_FILE

    url = own_redis.url
    async with serve_policy(tmp_path, orgs=ORGS, state=url) as running:
        spool = running.services.runtime.snapshot.config.data_dir / "spool"
        monkeypatch.setattr(ExternalProcessorService, "unfinished", property(lambda _: 1))
    assert not (spool / STOPPED_FILE).exists()
    monkeypatch.undo()
    async with serve_policy(tmp_path, orgs=ORGS, state=url):
        pass
    assert (spool / STOPPED_FILE).exists()
