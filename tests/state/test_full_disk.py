"""A full disk under the embedded state and the usage log, made real with RLIMIT_FSIZE in
a child process (a write past the limit lands short, or fails with EFBIG, as on a full
disk): no admission is held that a restart would forget, a torn line never swallows
the line after it, and a usage record the disk refused is written once it has room."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = textwrap.dedent("""\
    import asyncio, os, resource, signal, sys
    from dataclasses import replace
    from pathlib import Path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not death, past the limit
    _, HARD = resource.getrlimit(resource.RLIMIT_FSIZE)

    def disk(room):  # files may grow to `room` bytes (None: unlimited)
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (HARD if room is None else room, HARD))
    """)


def run_child(tmp_path: Path, body: str) -> str:
    script = PRELUDE + textwrap.dedent(body)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_a_journal_the_disk_refuses_holds_nothing_a_restart_would_forget(
        tmp_path: Path) -> None:
    out = run_child(tmp_path, """
        from authz.state.limits.base import LimitStoreUnwritable
        from authz.state.limits.durable import JOURNAL_FILE, DurableMemoryLimitStore
        from policy.limits import Ask, Limits

        d = Path(sys.argv[1])
        LIMITS = Limits(max_concurrent=10, budget_nano=10**9, budget_period="total")

        def ask(i):
            return Ask(request_id=f"r{i}", key_id="k", org="o", tokens=10,
                       cost_nano=1000, period="total", lease_s=3600.0)

        async def main():
            s = DurableMemoryLimitStore(d)
            await s.start()
            for i in range(3):
                assert (await s.admit(LIMITS, ask(i), 1.0)).allowed
            await s.settle(LIMITS, ask(0), 10, 700, 2.0)
            # The disk fills: the next admission's line lands short.
            disk(os.path.getsize(d / JOURNAL_FILE) + 7)
            try:
                await s.admit(LIMITS, ask(3), 3.0)
                raise SystemExit("admitted while the journal could not keep it")
            except LimitStoreUnwritable:
                pass
            assert s._mem.state()[0]["k"].holds.keys() == {"r1", "r2"}  # r3 undone
            # Room again: the snapshot makes the state durable, admissions go on.
            disk(None)
            # The snapshot's retry runs in a thread: give a loaded machine time (30 s).
            for _ in range(1500):
                if not s._broken:
                    break
                s._compact_soon()
                await asyncio.sleep(0.02)
            assert (await s.admit(LIMITS, ask(4), 4.0)).allowed
            await s.settle(LIMITS, ask(1), 10, 900, 5.0)
            # What a SIGKILL leaves: no snapshot at close.
            for name in ("_fd", "_lock_fd"):
                os.close(getattr(s, name))
                setattr(s, name, None)
            again = DurableMemoryLimitStore(d)
            await again.load()
            spent, reserved = await again.budget("k", "o", "total", 6.0)
            leases = sorted(again._mem.state()[0]["k"].holds)
            print(spent, reserved, leases)

        asyncio.run(main())
        """)
    # r0 and r1 settled (700 + 900), r2 and r4 held (1000 each), r3 never was.
    assert out.split() == ["1600", "2000", "['r2',", "'r4']"]


def test_usage_records_the_disk_refused_are_written_once_it_has_room(
        tmp_path: Path) -> None:
    out = run_child(tmp_path, """
        from datetime import UTC, datetime
        from authz.state.usage.records import USAGE_FILE, JsonlUsageLog, read_records
        from policy.config import Price
        from policy.usage import Usage, make_record

        d = Path(sys.argv[1])

        def rec(i):
            return make_record(
                request_id=f"r{i}", key_id="k", org="o", model="m", upstream_model="u",
                backend="b", usage=Usage(3, 4), price=Price(), status=200, stream=False,
                estimated=False, started_at=datetime(2026, 1, 1, tzinfo=UTC),
                duration_ms=1.0, endpoint="chat")

        log = JsonlUsageLog(d)
        log.write(rec(0))
        disk(os.path.getsize(d / USAGE_FILE) + 30)  # r1 lands short, r2 not at all
        log.write(rec(1))
        log.write(rec(2))
        disk(None)
        log.write(rec(3))  # the kept ones first, in order, then this one
        log.close()
        print(" ".join(r["request_id"] for r in read_records(d / USAGE_FILE)))
        """)
    assert out.split() == ["r0", "r1", "r2", "r3"]


def test_a_restart_on_a_full_disk_says_where_and_loses_nothing(tmp_path: Path) -> None:
    """The embedded state restarted while its disk is full cannot write its snapshot: the
    start fails naming the directory (it said only "No space left on device", or "File
    too large"), the journal still holds the requests that were in flight, and the next
    start with room charges them and writes each one's `lost` record once."""
    out = run_child(tmp_path, """
        from authz.state.limits.durable import (DurableMemoryLimitStore,
                                                lost_record_writer)
        from authz.state.usage.records import USAGE_FILE, log_lines
        from policy.limits import Ask, HoldRecord, Limits

        d = Path(sys.argv[1])
        LIMITS = Limits(budget_nano=10**9, budget_period="total")
        REC = HoldRecord(model="demo", upstream_model="t", endpoint="chat", stream=True,
                         prompt_tokens=10, completion_tokens=10,
                         started_at="2026-12-05T00:00:00Z", key_budget_period="total")

        def store():
            return DurableMemoryLimitStore(d, on_lost=lost_record_writer(d))

        async def main():
            s = store()
            await s.start()
            for i in range(2):
                a = Ask(f"r{i}", "k", "o", 20, 1000, "total", 30.0, REC)
                assert (await s.admit(LIMITS, a, 1.0)).allowed
            for name in ("_fd", "_lock_fd"):  # what a SIGKILL leaves
                os.close(getattr(s, name))
                setattr(s, name, None)
            disk(8)  # the disk is full: no file grows past 8 bytes
            try:
                await store().start()
                raise SystemExit("started without writing its state")
            except OSError as e:
                print("refused:", e)
            disk(None)
            again = store()
            await again.start()
            print(await again.budget("k", "o", "total", 2.0))
            await again.close()
            print(sorted(r["request_id"] for r in log_lines(d / USAGE_FILE)))

        asyncio.run(main())
        """)
    refused, budget, records = out.strip().splitlines()
    assert f"{tmp_path}: cannot write the limit state" in refused
    assert "nothing is lost" in refused
    assert budget == "(2000, 0)"  # both charged in full, once
    assert records == "['r0', 'r1']"


def test_a_settlement_waits_for_its_record_to_reach_the_disk(tmp_path: Path) -> None:
    """Faults tester: requests ended while the disk was full; their records waited in
    memory, but their settlements reached the journal (its short lines still fit), and a
    kill then lost the records: the key was charged with no record, none `lost` either.
    Now a settlement stays out of the journal while records wait: a kill leaves the hold
    in flight, charged in full with its `lost` record at the restart; once the records
    are written, the settlements follow them into the journal, and a kill then charges
    the records' cost."""
    out = run_child(tmp_path, """
        from datetime import UTC, datetime
        from authz.state.limits.base import LimitStoreUnwritable
        from authz.state.limits.durable import (JOURNAL_FILE, DurableMemoryLimitStore,
                                                lost_record_writer)
        from authz.state.usage.records import USAGE_FILE, JsonlUsageLog, log_lines
        from policy.config import Price
        from policy.limits import Ask, HoldRecord, Limits
        from policy.usage import Usage, make_record

        d = Path(sys.argv[1])
        LIMITS = Limits(budget_nano=10**9, budget_period="total")
        START = datetime(2026, 12, 5, tzinfo=UTC)
        REC = HoldRecord(model="m", upstream_model="u", endpoint="chat", stream=False,
                         prompt_tokens=10, completion_tokens=10,
                         started_at="2026-12-05T00:00:00Z", key_budget_period="total")

        def real(i):  # 7 tokens, $0.007 at $1 a thousand
            return make_record(
                request_id=f"r{i}", key_id="k", org="o", model="m", upstream_model="u",
                backend="b", usage=Usage(3, 4), price=Price(input=1, output=1),
                status=200, stream=False, estimated=False,
                started_at=START, duration_ms=1.0, endpoint="chat")

        def ask(i):
            return Ask(f"r{i}", "k", "o", 20, 50_000, "total", 3600.0, REC)

        def kill(s, log):  # what a SIGKILL leaves: nothing flushed, nothing snapshot
            for name in ("_fd", "_lock_fd"):
                os.close(getattr(s, name))
                setattr(s, name, None)
            log._backlog.drop()
            log._file.close()

        async def run(i, room_before_kill):
            log = JsonlUsageLog(d)
            s = DurableMemoryLimitStore(d, on_lost=lost_record_writer(d),
                                        records_waiting=log.waiting)
            await s.start()
            for j in range(20):  # the usage log outgrows the journal
                log.write(real(1000 * i + j))
            assert (await s.admit(LIMITS, ask(i), START.timestamp())).allowed
            disk(os.path.getsize(d / USAGE_FILE) + 5)  # the journal still has room
            log.write(real(i))  # kept in memory
            assert log.waiting()
            await s.settle(LIMITS, ask(i), 7, 7_000_000, START.timestamp() + 1)
            settled = f'"s",{START.timestamp() + 1}'
            assert settled not in (d / JOURNAL_FILE).read_text()
            # Nothing new is admitted meanwhile (review: a reused request id admitted
            # before the late settlement was replayed out of order), and no snapshot
            # is taken (it would make the charge durable without its record).
            try:
                await s.admit(LIMITS, ask(i + 100), START.timestamp() + 1)
                raise SystemExit("admitted while records wait for the disk")
            except LimitStoreUnwritable:
                pass
            snapshot = (d / "limits.snapshot").read_bytes()
            s._compact_now()
            assert (d / "limits.snapshot").read_bytes() == snapshot
            if room_before_kill:
                disk(None)
                await s.sweep(START.timestamp() + 2)  # any change journals it now
                assert not log.waiting()  # written
                assert settled in (d / JOURNAL_FILE).read_text()
            kill(s, log)
            disk(None)
            again = DurableMemoryLimitStore(d, on_lost=lost_record_writer(d))
            await again.start()
            spent = await again.budget("k", "o", "total", START.timestamp() + 3)
            await again.close()
            mine = [(r["status"], r["cost_usd"]) for r in log_lines(d / USAGE_FILE)
                    if r["request_id"] == f"r{i}"]
            print(i, spent, mine)

        async def main():
            await run(1, room_before_kill=False)
            await run(2, room_before_kill=True)

        asyncio.run(main())
        """)
    first, second = out.strip().splitlines()
    assert first == "1 (50000, 0) [('lost', '0.00005')]"  # its hold, its lost record
    assert second == "2 (7050000, 0) [(200, '0.007')]"  # and now r2's record's cost


def test_a_restart_whose_lost_records_wait_for_the_disk_takes_no_snapshot(
        tmp_path: Path) -> None:
    """Review: a restart on a full usage log settled the requests in flight at the kill,
    sent their `lost` records to memory, and snapshotted: a second kill left the
    charges with no record. Now the snapshot waits for the records: the second restart
    charges them again, once, and writes each `lost` record once."""
    out = run_child(tmp_path, """
        from authz.state.limits.durable import DurableMemoryLimitStore
        from authz.state.usage.records import USAGE_FILE, JsonlUsageLog, log_lines
        from policy.limits import Ask, HoldRecord, Limits

        d = Path(sys.argv[1])
        LIMITS = Limits(budget_nano=10**9, budget_period="total")
        REC = HoldRecord(model="m", upstream_model="u", endpoint="chat", stream=False,
                         prompt_tokens=10, completion_tokens=10,
                         started_at="2026-12-05T00:00:00Z", key_budget_period="total")

        def kill(s, log):
            for name in ("_fd", "_lock_fd"):
                if getattr(s, name) is not None:
                    os.close(getattr(s, name))
                    setattr(s, name, None)
            log._backlog.drop()
            log._file.close()

        def opened(log):
            def lost(a):
                from policy.admission import lost_record
                log.write(lost_record(a))
            return DurableMemoryLimitStore(d, on_lost=lost, records_waiting=log.waiting)

        async def main():
            log = JsonlUsageLog(d)
            s = opened(log)
            await s.start()
            assert (await s.admit(LIMITS, Ask("y", "k", "o", 20, 1000, "total", 3600.0,
                                              REC), 1.0)).allowed
            kill(s, log)
            log = JsonlUsageLog(d)
            log._file.write(b"x" * 64 + b"\\n")  # the usage log outgrows the journal
            disk(os.path.getsize(d / USAGE_FILE) + 5)
            s = opened(log)
            await s.start()  # y's lost record waits in memory
            assert log.waiting()
            kill(s, log)
            disk(None)
            log = JsonlUsageLog(d)
            s = opened(log)
            await s.start()
            print(await s.budget("k", "o", "total", 2.0))
            await s.close()
            log.close()
            print([(r["request_id"], r["status"]) for r in log_lines(d / USAGE_FILE)])

        asyncio.run(main())
        """)
    budget, recs = out.strip().splitlines()
    assert budget == "(1000, 0)"
    assert recs == "[('y', 'lost')]"


def test_a_full_disk_admits_no_request_of_any_key(tmp_path: Path) -> None:
    """Faults tester: with the embedded state on a full disk, a key without limits (and
    one whose outage policy fails open) was still admitted, unheld, as in a Redis outage:
    its records waited in memory and a kill lost them, with no hold for the restart to
    charge (22 of its 200s had no record). While records wait for the disk, or the
    journal cannot be written, every request is refused (503), with limits or without."""
    out = run_child(tmp_path, """
        from datetime import UTC, datetime
        from authz.state.limits.admission import Admission
        from authz.state.limits.durable import JOURNAL_FILE, DurableMemoryLimitStore
        from authz.state.usage.records import USAGE_FILE, JsonlUsageLog
        from policy.config import OnStoreError, Price
        from policy.errors import ApiError
        from policy.limits import Ask, HoldRecord, Limits
        from policy.usage import Usage, make_record

        d = Path(sys.argv[1])
        NOW = datetime(2026, 12, 7, tzinfo=UTC)
        REC = HoldRecord(model="m", upstream_model="u", endpoint="chat", stream=False,
                         prompt_tokens=10, completion_tokens=10,
                         started_at="2026-12-07T00:00:00Z", key_budget_period="total")
        OPEN = OnStoreError(requests="fail_open", tokens="fail_open",
                            concurrency="fail_open")

        def ask(i):
            return Ask(f"r{i}", "k", "o", 20, 50_000, "total", 3600.0, REC)

        def real(i):
            return make_record(
                request_id=f"x{i}", key_id="k", org="o", model="m", upstream_model="u",
                backend="b", usage=Usage(3, 4), price=Price(input=1, output=1),
                status=200, stream=False, estimated=False,
                started_at=NOW, duration_ms=1.0, endpoint="chat")

        async def outcome(adm, limits, i):
            try:
                await adm.admit_all(None, limits, ask(i), NOW)
                return "admitted"
            except ApiError as e:
                return str(e.status)

        async def main():
            log = JsonlUsageLog(d)
            s = DurableMemoryLimitStore(d, records_waiting=log.waiting)
            await s.start()
            adm = Admission(s, OPEN)
            for j in range(20):
                log.write(real(j))
            print(await outcome(adm, Limits(), 0), await outcome(adm, Limits(rpm=100), 1))
            # Records wait for a full disk.
            disk(os.path.getsize(d / USAGE_FILE) + 5)
            log.write(real(99))
            assert log.waiting()
            print(await outcome(adm, Limits(), 2), await outcome(adm, Limits(rpm=100), 3))
            # Room for the records again, but not for the journal's next line.
            disk(None)
            await s.sweep(NOW.timestamp())
            assert not log.waiting()
            disk(os.path.getsize(d / JOURNAL_FILE) + 5)
            print(await outcome(adm, Limits(), 4), await outcome(adm, Limits(rpm=100), 5))
            disk(None)
            await s.close()

        asyncio.run(main())
        """)
    assert out.split() == ["admitted", "admitted", "503", "503", "503", "503"]
