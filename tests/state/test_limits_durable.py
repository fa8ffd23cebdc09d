"""The durable embedded limit store: state survives a restart, and in-flight holds at a
kill become lost charges with one record each, never two."""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from authz.state.limits.durable import (
    JOURNAL_FILE,
    DurableMemoryLimitStore,
    lost_record_writer,
)
from authz.state.limits.memory import MemoryLimitStore
from authz.state.usage.records import USAGE_FILE, JsonlUsageLog, log_lines, read_records
from policy.admission import KeyState, Ledger
from policy.limits import Ask, HoldRecord, Limits
from policy.usage import LOST, UsageRecord

T0 = 1_764_670_000.0
LIMITS = Limits(rpm=5, tpm=1000, max_concurrent=3, budget_nano=10_000, budget_period="total")
NO_RPM = replace(LIMITS, rpm=None)
ORG = Limits(budget_nano=1_000_000, budget_period="total")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def ask(i: int, key: str = "k-1", cost: int = 1000, tokens: int = 100, lease: float = 150.0,
        record: bool = True, at: float = T0) -> Ask:
    material = HoldRecord(
        model="demo", upstream_model="tiny-llama", endpoint="chat", stream=True,
        prompt_tokens=40, completion_tokens=60,
        started_at=iso(at)) if record else None
    return Ask(request_id=f"r{i}", key_id=key, org="acme", tokens=tokens, cost_nano=cost,
               period="total", lease_s=lease, record=material)


def kill(store: DurableMemoryLimitStore) -> None:
    """What SIGKILL leaves: the files as they are, no snapshot at close, the lock freed."""
    for name in ("_fd", "_lock_fd"):
        fd = getattr(store, name)
        if fd is not None:
            os.close(fd)
            setattr(store, name, None)


async def opened(data_dir: Path, **kw: Any) -> DurableMemoryLimitStore:
    kw.setdefault("on_lost", lost_record_writer(data_dir))
    store = DurableMemoryLimitStore(data_dir, **kw)
    await store.start()
    return store


def state(store: MemoryLimitStore | DurableMemoryLimitStore) -> Any:
    """The state without the heaps (their stale entries are an implementation detail)."""
    mem = store._mem if isinstance(store, DurableMemoryLimitStore) else store
    keys, ledgers = mem.state()

    def key(k: KeyState) -> Any:
        return (k.requests, k.rts, k.level, k.ts, k.holds, k.leased, k.ended)

    def led(x: Ledger) -> Any:
        return (x.spent, x.reserved, x.holds, x.lost)

    return ({k: key(v) for k, v in keys.items()},
            {k: led(v) for k, v in ledgers.items()})


def rotated(data_dir: Path) -> list[str]:
    return [n for n in os.listdir(data_dir) if n.startswith(f"{JOURNAL_FILE}.")]


async def snapshots_written(data_dir: Path) -> None:
    """Wait for the snapshot threads: until no rotated journal is left (two fsyncs each,
    which a shared CI disk can make slow)."""
    for _ in range(3000):
        if not rotated(data_dir):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"rotated journals left: {rotated(data_dir)}")


def records(data_dir: Path) -> list[dict[str, Any]]:
    return list(read_records(data_dir / USAGE_FILE))


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    ref, store = MemoryLimitStore(), await opened(tmp_path)
    for i in range(7):  # rpm 5: the last two are refused
        for s in (ref, store):
            await s.admit(LIMITS, ask(i), T0 + i / 10)
            await s.settle(LIMITS, ask(i), 30 + i, 300 + i, T0 + i / 10 + 0.05)
    await store.consume(LIMITS, "k-1", 2, 50, T0 + 1)
    await ref.consume(LIMITS, "k-1", 2, 50, T0 + 1)
    kill(store)
    again = await opened(tmp_path)
    assert state(again) == state(ref)
    assert await again.budget("k-1", "acme", "total", T0 + 2) == (300 + 301 + 302 + 303 + 304, 0)
    d = await again.admit(LIMITS, ask(10), T0 + 2)
    assert (d.allowed, d.reason) == (False, "requests")  # the GCRA state came back
    assert d.remaining_tokens == (await ref.admit(LIMITS, ask(10), T0 + 2)).remaining_tokens
    await again.close()


@pytest.mark.parametrize("gone", ["journal", "snapshot", "both"])
async def test_a_journal_or_snapshot_deleted_while_running_is_written_again(
        tmp_path: Path, gone: str, caplog: pytest.LogCaptureFixture) -> None:
    """Storage tester: `rm limits.journal` while serve ran; it went on writing to the
    deleted file, and a restart forgot the spend the journal held. The next sweep finds
    the file gone and writes the state again from memory."""
    ref, store = MemoryLimitStore(), await opened(tmp_path)
    for i in range(3):
        for s in (ref, store):
            await s.admit(NO_RPM, ask(i), T0 + i)
            await s.settle(NO_RPM, ask(i), 30, 300 + i, T0 + i + 0.5)
    for s in (ref, store):
        await s.admit(NO_RPM, ask(9), T0 + 4)  # one still in flight
    if gone in ("journal", "both"):
        (tmp_path / JOURNAL_FILE).unlink()
    if gone in ("snapshot", "both"):
        (tmp_path / "limits.snapshot").unlink()
    assert await store.sweep(T0 + 5) == []
    await snapshots_written(tmp_path)
    assert "while the services ran" in caplog.text
    for s in (ref, store):  # and what comes after lands in the new journal
        await s.admit(NO_RPM, ask(10), T0 + 6)
        await s.settle(NO_RPM, ask(10), 30, 310, T0 + 6.5)
    kill(store)
    again = await opened(tmp_path)
    # r9, in flight at the kill, charged its hold (1000) as lost, as ever
    assert await again.budget("k-1", "acme", "total", T0 + 7) == (
        300 + 301 + 302 + 310 + 1000, 0)
    await again.close()


async def test_an_exhausted_total_budget_stays_exhausted(tmp_path: Path) -> None:
    limits = Limits(budget_nano=3000, budget_period="total")
    store = await opened(tmp_path)
    for i in range(3):
        assert (await store.admit(limits, ask(i), T0 + i)).allowed
        await store.settle(limits, ask(i), 100, 1000, T0 + i)
    assert (await store.admit(limits, ask(3, cost=1), T0 + 4)).reason == "budget"
    kill(store)
    for _ in range(2):
        store = await opened(tmp_path)
        assert (await store.admit(limits, ask(3, cost=1), T0 + 5)).reason == "budget"
        assert await store.budget("k-1", "acme", "total", T0 + 5) == (3000, 0)
        await store.close()


async def test_a_torn_last_line_is_skipped_and_later_lines_are_kept(tmp_path: Path) -> None:
    ref, store = MemoryLimitStore(), await opened(tmp_path)
    for s in (ref, store):
        await s.admit(LIMITS, ask(1), T0)
        await s.settle(LIMITS, ask(1), 10, 100, T0 + 1)
    kill(store)
    journal = tmp_path / JOURNAL_FILE
    whole = journal.read_bytes().splitlines(keepends=True)[0]
    with journal.open("ab") as f:
        f.write(whole.replace(b'"r1"', b'"r9"')[:40])  # killed mid-write
    store = await opened(tmp_path)
    assert state(store) == state(ref)
    for s in (ref, store):  # appended after the torn line: must survive the next restart
        await s.admit(LIMITS, ask(2), T0 + 2)
        await s.settle(LIMITS, ask(2), 10, 200, T0 + 3)
    kill(store)
    store = await opened(tmp_path)
    assert state(store) == state(ref)
    await store.close()


async def test_a_journal_a_newer_release_wrote_keeps_its_holds(tmp_path: Path) -> None:
    """A hold's record with a field this release does not know (a rollback after an
    upgrade added one) is restored, not skipped as damaged with its spend (review)."""
    store = await opened(tmp_path)
    await store.admit(LIMITS, ask(1, cost=4000), T0)  # in flight at the kill
    await store.admit(LIMITS, ask(2, cost=3000), T0)
    await store.settle(LIMITS, ask(2), 10, 2500, T0 + 1)
    kill(store)
    journal = tmp_path / JOURNAL_FILE
    rows = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
    for row in rows:
        if row[1] in ("a", "s"):
            row[3].append(None)  # a limit a newer release added (retest)
        if row[1] == "a":
            row[4]["record"]["cache_read_tokens"] = 0
            row[4]["priority_class"] = "x"
    journal.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    store = await opened(tmp_path)
    assert await store.budget("k-1", "acme", "total", T0 + 2) == (4000 + 2500, 0)
    assert [(r["request_id"], r["status"]) for r in records(tmp_path)] == [("r1", LOST)]
    await store.close()


async def test_in_flight_holds_become_lost_charges_with_one_record_each(
        tmp_path: Path) -> None:
    store = await opened(tmp_path)
    for i in range(3):
        await store.admit(ORG, ask(i, key="org:acme", cost=1000 + i, record=False), T0 + i)
        await store.admit(LIMITS, ask(i, cost=1000 + i), T0 + i)
    await store.settle(LIMITS, ask(0), 10, 123, T0 + 5)
    await store.settle(ORG, ask(0, key="org:acme", record=False), 10, 123, T0 + 5)
    kill(store)
    for _ in range(3):  # a restart, a kill after recovery, a clean restart
        store = await opened(tmp_path)
        assert await store.budget("k-1", "acme", "total", T0 + 9) == (123 + 1001 + 1002, 0)
        assert await store.budget("org:acme", "acme", "total", T0 + 9) == (
            123 + 1001 + 1002, 0)
        recs = records(tmp_path)
        assert sorted((r["request_id"], r["status"], r["estimated"], r["cost_usd"])
                      for r in recs) == [("r1", LOST, True, "0.000001001"),
                                         ("r2", LOST, True, "0.000001002")]
        # Its slots and tokens are free again: three more fit under max_concurrent.
        for j in range(3):
            assert (await store.admit(NO_RPM, ask(10 + j), T0 + 9)).allowed
            await store.settle(NO_RPM, ask(10 + j), 0, 0, T0 + 9)
        kill(store)
    again = await opened(tmp_path)
    await again.close()
    assert len(records(tmp_path)) == 2


async def test_records_written_before_a_crash_in_recovery_are_not_written_twice(
        tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.admit(LIMITS, ask(1), T0)
    kill(store)
    before = tmp_path.parent / "before"
    shutil.copytree(tmp_path, before)
    store = await opened(tmp_path)  # writes r1's lost record, then its snapshot
    kill(store)
    for name in os.listdir(tmp_path):  # as if it died after the record, before the snapshot
        if name.startswith("limits."):
            os.remove(tmp_path / name)
    for name in os.listdir(before):
        if name.startswith("limits."):
            shutil.copy(before / name, tmp_path / name)
    store = await opened(tmp_path)
    assert [r["request_id"] for r in records(tmp_path)] == ["r1"]
    assert len((tmp_path / USAGE_FILE).read_bytes().splitlines()) == 1
    assert await store.budget("k-1", "acme", "total", T0 + 1) == (1000, 0)
    await store.close()


async def test_a_request_recorded_but_not_settled_is_charged_its_record(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.admit(LIMITS, ask(1), T0)
    sink = JsonlUsageLog(tmp_path)  # the record came first; the kill took the settlement
    sink.write(UsageRecord(
        request_id="r1", key_id="k-1", org="acme", model="demo", upstream_model="tiny-llama",
        backend="b", prompt_tokens=4, completion_tokens=6, total_tokens=10,
        cost_usd="0.000000321", status=200, stream=False, estimated=False,
        started_at=iso(T0), duration_ms=5.0,
        endpoint="chat"))
    sink.close()
    kill(store)
    store = await opened(tmp_path)
    assert await store.budget("k-1", "acme", "total", T0 + 1) == (321, 0)
    assert [r["status"] for r in records(tmp_path)] == [200]
    await store.close()


def real_record(rid: str, key: str, at: float, cost_usd: str) -> UsageRecord:
    return UsageRecord(
        request_id=rid, key_id=key, org="acme", model="demo", upstream_model="tiny-llama",
        backend="b", prompt_tokens=4, completion_tokens=6, total_tokens=10,
        cost_usd=cost_usd, status=200, stream=False, estimated=False, started_at=iso(at),
        duration_ms=5.0, endpoint="chat")


@pytest.mark.parametrize("second_key", ["k-1", "k-2"])
async def test_a_reused_request_id_is_not_settled_at_the_earlier_requests_record(
        tmp_path: Path, second_key: str) -> None:
    # Review: an earlier request's record under the same id (a sidecar keeps a
    # workload's reused x-request-id) settled the next one's hold at its cost at restart.
    store = await opened(tmp_path)
    first = ask(1, cost=1000, at=T0)
    await store.admit(NO_RPM, first, T0)
    sink = JsonlUsageLog(tmp_path)
    sink.write(real_record("r1", "k-1", T0, "0.000000002"))
    sink.close()
    await store.settle(NO_RPM, first, 10, 2, T0 + 1)
    big = ask(1, key=second_key, cost=5_000, at=T0 + 2)
    await store.admit(NO_RPM, big, T0 + 2)
    kill(store)
    store = await opened(tmp_path)
    spent = {k: (await store.budget(k, "acme", "total", T0 + 3))[0] for k in ("k-1", "k-2")}
    assert spent[second_key] == 5_000 + (2 if second_key == "k-1" else 0)
    # Readers show one record per id (README, "Request ids in the mesh"); the log has both.
    assert [(r["key_id"], r["status"], r["cost_usd"]) for r in log_lines(
        tmp_path / USAGE_FILE)] == [("k-1", 200, "0.000000002"), (second_key, LOST, "0.000005")]
    await store.close()


async def test_the_org_hold_is_settled_at_its_requests_record(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.admit(ORG, ask(1, key="org:acme", cost=1000, record=False), T0)
    await store.admit(LIMITS, ask(1, cost=1000), T0)
    sink = JsonlUsageLog(tmp_path)
    sink.write(real_record("r1", "k-1", T0, "0.000000321"))
    sink.close()
    kill(store)
    store = await opened(tmp_path)
    assert await store.budget("k-1", "acme", "total", T0 + 1) == (321, 0)
    assert await store.budget("org:acme", "acme", "total", T0 + 1) == (321, 0)
    assert [r["status"] for r in records(tmp_path)] == [200]
    await store.close()


async def test_a_sweep_is_replayed_once_and_its_missing_records_written(
        tmp_path: Path) -> None:
    store = await opened(tmp_path)
    for i in range(2):
        await store.admit(LIMITS, ask(i, lease=1.0), T0)
    lost = await store.sweep(T0 + 2)
    assert [a.request_id for a in lost] == ["r0", "r1"]
    lost_record_writer(tmp_path)(lost[0])  # the caller wrote r0's record, then was killed
    kill(store)
    for _ in range(2):
        store = await opened(tmp_path)
        assert sorted(r["request_id"] for r in records(tmp_path)) == ["r0", "r1"]
        assert len((tmp_path / USAGE_FILE).read_bytes().splitlines()) == 2
        assert await store.budget("k-1", "acme", "total", T0 + 3) == (2000, 0)
        assert await store.sweep(T0 + 3) == []
        kill(store)


async def test_compaction_keeps_the_state_and_the_journal_small(tmp_path: Path) -> None:
    ref = MemoryLimitStore()
    store = await opened(tmp_path, compact_bytes=4096)
    limits = Limits(rpm=10**6, tpm=10**6, max_concurrent=50, budget_nano=10**12,
                    budget_period="total")
    for i in range(600):
        now = T0 + i / 50
        for s in (ref, store):
            await s.admit(limits, ask(i, key=f"k-{i % 7}"), now)
            if i >= 20:  # 20 in flight at any time
                j = i - 20
                await s.settle(limits, ask(j, key=f"k-{j % 7}"), 50, 500, now)
        if i % 10 == 0:
            await asyncio.sleep(0.01)  # a gateway's loop turns: snapshot threads finish
    assert state(store) == state(ref)
    await snapshots_written(tmp_path)  # and every rotated journal removed
    # A snapshot thread starved of CPU (a loaded machine) lets the journal run on until
    # the next append after it ends: one more request, then its snapshot.
    now = T0 + 600 / 50
    for s in (ref, store):
        await s.admit(limits, ask(600, key="k-5"), now)
        await s.settle(limits, ask(600, key="k-5"), 50, 500, now)
    await asyncio.sleep(0.01)
    await snapshots_written(tmp_path)
    assert (tmp_path / JOURNAL_FILE).stat().st_size < 4096 * 8  # not the whole history
    kill(store)
    again = await opened(tmp_path)
    assert len(records(tmp_path)) == 20  # those in flight, each once
    for k in range(7):
        assert (await again.budget(f"k-{k}", "acme", "total", T0 + 20))[1] == 0
    spent = sum([(await again.budget(f"k-{k}", "acme", "total", T0 + 20))[0]
                 for k in range(7)])
    assert spent == 581 * 500 + 20 * 1000  # with the one more request
    await again.close()


async def test_replay_skips_lines_a_snapshot_already_holds(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.admit(LIMITS, ask(1), T0)
    await store.settle(LIMITS, ask(1), 10, 100, T0)
    lines = (tmp_path / JOURNAL_FILE).read_bytes()
    await store.close()  # snapshot, journal emptied
    (tmp_path / f"{JOURNAL_FILE}.2").write_bytes(lines)  # died before removing it
    (tmp_path / JOURNAL_FILE).write_bytes(lines)
    store = await opened(tmp_path)
    assert await store.budget("k-1", "acme", "total", T0) == (100, 0)
    await store.close()


async def test_a_second_process_cannot_share_the_state(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    with pytest.raises(OSError, match="in use by another tokenbooth process"):
        await opened(tmp_path)
    await store.close()
    again = await opened(tmp_path)
    await again.close()


async def test_a_reader_loads_a_running_store_without_changing_it(tmp_path: Path) -> None:
    store = await opened(tmp_path, compact_bytes=2048)
    for i in range(40):
        await store.admit(NO_RPM, ask(i), T0 + i)
        if i < 38:
            await store.settle(NO_RPM, ask(i), 10, 100 + i, T0 + i)
    await snapshots_written(tmp_path)
    files = sorted(os.listdir(tmp_path))
    reader = DurableMemoryLimitStore(tmp_path)
    assert await reader.load() == []
    assert state(reader) == state(store)
    led = reader.ledgers()[("k-1", "total")]
    assert (led.spent, led.reserved) == (sum(range(100, 138)), 2000)
    assert sorted(os.listdir(tmp_path)) == files
    await store.close()


async def test_a_damaged_snapshot_stops_the_start(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    await store.close()
    (tmp_path / "limits.snapshot").write_bytes(b'{"version": 1, "se')
    with pytest.raises(OSError, match="damaged limit state"):
        await opened(tmp_path)
    (tmp_path / "limits.snapshot").unlink()  # the lock was let go: another start may try
    again = await opened(tmp_path)
    await again.close()


async def test_a_snapshot_this_release_cannot_read_stops_the_start_naming_it(
        tmp_path: Path) -> None:
    """Valid JSON of another layout (a hold without a field this release needs) is a
    clear refusal naming the file, not an internal TypeError (review)."""
    store = await opened(tmp_path)
    await store.admit(LIMITS, ask(1), T0)
    await store.close()
    await snapshots_written(tmp_path)
    snap = tmp_path / "limits.snapshot"
    doc = orjson.loads(snap.read_bytes())
    text = orjson.dumps(doc).replace(b'"lease_s"', b'"lease_x"')
    assert text != orjson.dumps(doc)
    snap.write_bytes(text)
    with pytest.raises(OSError, match=r"limits\.snapshot: limit state this release cannot read"):
        await opened(tmp_path)


async def test_a_journaled_admission_is_replayed_as_taken_whatever_the_checks_say_now(
        tmp_path: Path) -> None:
    """A journal line is an admission that was allowed: replay takes what it took. It
    re-ran the checks, and a line they refuse now was dropped, with its hold: a journal
    the last release left at a kill, holding a request it admitted under a concurrency
    limit set mid-flight (its requests in flight before had no lease there; they have
    one now), replayed without that request: never charged, its lost record never
    written, its budget spent twice. Likewise the rpm a release computes differently."""
    store = await opened(tmp_path)
    first = ask(1, lease=150.0)
    before = Limits(tpm=1000, budget_nano=10_000, budget_period="total")
    assert (await store.admit(before, first, T0)).allowed
    kill(store)
    # The last release wrote this line: `keys update --max-concurrent 1` while r1 was in
    # flight, and r2 admitted (r1 took no lease under a tpm and budget alone).
    second = ask(2, lease=150.0)
    line = store.journal_path.read_bytes().splitlines()[-1]
    row = orjson.loads(line)
    row[0], row[2] = row[0] + 1, T0 + 1.0
    row[3] = [None, 1000, 1, 10_000, "total"]
    row[4]["request_id"] = second.request_id
    with store.journal_path.open("ab") as f:
        f.write(orjson.dumps(row) + b"\n")
    store = await opened(tmp_path)  # both were in flight at the kill: charged as lost
    try:
        assert await store.budget("k-1", "acme", "total", T0 + 2.0) == (2_000, 0)
        lost = sorted(r["request_id"] for r in read_records(tmp_path / USAGE_FILE)
                      if r["status"] == LOST)
        assert lost == ["r1", "r2"]
    finally:
        await store.close()
