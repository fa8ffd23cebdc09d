"""`state: memory`'s usage log, rotated by size: every record stays readable, in order,
across the rotated files, with several processes writing at once."""

from __future__ import annotations

import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from authz.cli.usage import jsonl_records
from authz.state.limits.durable import recorded
from authz.state.usage.records import (
    USAGE_FILE,
    JsonlUsageLog,
    read_records,
    rotated_files,
)
from policy.limits import usd_to_nano
from policy.usage import LOST, UsageRecord
from tests.state.usage.gen import record

SMALL = 64 << 10  # the smallest rotation size the config allows


def usage_record(i: int, status: int | str = 200) -> UsageRecord:
    return UsageRecord(**record(i, status))


def test_rotates_by_size_and_reads_every_file_in_order(tmp_path: Path) -> None:
    log = JsonlUsageLog(tmp_path, max_bytes=SMALL)
    for i in range(2000):  # ~800 KiB
        log.write(usage_record(i))
    log.close()
    rotated = rotated_files(tmp_path)
    assert len(rotated) >= 10
    assert [p.name for p in rotated][:2] == ["usage-00000001.jsonl", "usage-00000002.jsonl"]
    assert all(p.stat().st_size < SMALL + (SMALL // 16) + 1024 for p in rotated)
    want = [record(i)["request_id"] for i in range(2000)]
    assert [r["request_id"] for r in read_records(tmp_path / USAGE_FILE)] == want
    assert [r["request_id"] for r in jsonl_records(tmp_path / USAGE_FILE)] == want


def test_a_real_record_in_a_newer_file_supersedes_a_lost_one(tmp_path: Path) -> None:
    log = JsonlUsageLog(tmp_path, max_bytes=SMALL)
    log.write(usage_record(7, LOST))
    for i in range(1000):
        log.write(usage_record(1000 + i))
    log.write(usage_record(7))
    log.close()
    assert rotated_files(tmp_path)
    [seven] = [r for r in read_records(tmp_path / USAGE_FILE) if r["request_id"] == record(7)[
        "request_id"]]
    assert seven["status"] == 200
    # Journal recovery reads back through the rotated files too.
    rid = record(7)["request_id"]
    found, lost = recorded(tmp_path / USAGE_FILE, {rid}, since=0.0)[rid]  # newest first
    assert (found.lost, lost.lost) == (False, True)
    assert (found.tokens, found.cost_nano) == (record(7)["total_tokens"], usd_to_nano(
        Decimal(record(7)["cost_usd"])))
    old = recorded(tmp_path / USAGE_FILE, {record(1000)["request_id"]}, since=0.0)
    assert old[record(1000)["request_id"]][0].tokens == record(1000)["total_tokens"]


WRITER = """
import sys
from pathlib import Path
from authz.state.usage.records import JsonlUsageLog
from policy.usage import UsageRecord
from tests.state.usage.gen import record
first, n = int(sys.argv[2]), int(sys.argv[3])
log = JsonlUsageLog(Path(sys.argv[1]), max_bytes=int(sys.argv[4]))
for i in range(first, first + n):
    log.write(UsageRecord(**record(i)))
log.close()
"""


def test_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    n, procs = 4000, 3
    t0 = time.monotonic()
    running = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(k * n),
                                 str(n), str(SMALL)], cwd=Path(__file__).parents[3])
               for k in range(procs)]
    assert [p.wait(60) for p in running] == [0] * procs
    got = [r["request_id"] for r in jsonl_records(tmp_path / USAGE_FILE)]
    print(f"\n{procs} writers, {n} records each, in {time.monotonic() - t0:.1f} s: "
          f"{len(rotated_files(tmp_path))} rotated files")
    assert sorted(got) == sorted(record(i)["request_id"] for i in range(procs * n))
    for k in range(procs):  # each writer's records in its order
        mine = [r for r in got if k * n <= int(r.removeprefix("req-")) < (k + 1) * n]
        assert mine == sorted(mine)


def test_a_torn_last_line_from_an_earlier_process_is_not_glued_to_the_next(
        tmp_path: Path) -> None:
    """A record cut short (a full disk, a crash) and then a restart: the new process's
    first record goes on a line of its own, not onto the torn bytes (readers would skip
    both: a record lost)."""
    log = JsonlUsageLog(tmp_path)
    log.write(usage_record(1))
    log.close()
    path = tmp_path / USAGE_FILE
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(whole[:40])  # the process died mid-line
    again = JsonlUsageLog(tmp_path)  # a restart
    again.write(usage_record(2))
    again.write(usage_record(3))
    again.close()
    assert [r["request_id"] for r in read_records(path)] == [
        usage_record(i).request_id for i in (1, 2, 3)]


def test_a_read_that_overlaps_rotations_misses_no_record(tmp_path: Path) -> None:
    """The files are listed when the read starts; the live file then rotated (renamed
    away, a new one opened) is read all the same: every record written before the read
    began is found, whatever rotations happen meanwhile (the report would miss a whole
    rotated file: ~700k requests at the default size)."""
    from authz.state.usage.records import LogReader

    log = JsonlUsageLog(tmp_path, max_bytes=SMALL)
    for i in range(400):
        log.write(usage_record(i))
    before = {record(i)["request_id"] for i in range(400)}
    reader = LogReader(tmp_path / USAGE_FILE, chunk_bytes=4096)
    seen: list[bytes] = reader.next_lines()  # reading the oldest file...
    for i in range(400, 1200):  # ...while writers rotate the live one, more than once
        log.write(usage_record(i))
    while lines := reader.next_lines():
        seen += lines
    log.close()
    ids = [orjson.loads(line)["request_id"] for line in seen]
    assert before <= set(ids)
    assert len(ids) == len(set(ids))  # each line once
    assert len(rotated_files(tmp_path)) >= 3


def test_a_file_moved_or_deleted_by_another_program_loses_no_later_record(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Storage tester: logrotate's `create` renamed usage.jsonl away, and every record
    went on into the renamed file (checked only each 64 KiB), which readers do not read;
    with `compress`, it was deleted, and the records with it. The next write notices the
    move: it opens a new usage.jsonl and writes that record again there."""
    log = JsonlUsageLog(tmp_path, max_bytes=SMALL)
    path = tmp_path / USAGE_FILE
    log.write(usage_record(1))
    path.rename(tmp_path / "usage.jsonl.1")  # logrotate `create`: rename, then create
    path.touch(mode=0o600)
    log.write(usage_record(2))  # written to the moved file, then again to the new one
    log.write(usage_record(3))
    (tmp_path / "usage.jsonl.1").unlink()  # `compress`: the moved file goes
    path.unlink()  # and the live one deleted outright
    log.write(usage_record(4))
    log.close()
    ids = [r["request_id"] for r in read_records(path)]
    assert ids == [record(i)["request_id"] for i in (4,)]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "moved or deleted by another program" in errors[0]


def test_records_after_a_move_are_all_in_files_readers_read(tmp_path: Path) -> None:
    log = JsonlUsageLog(tmp_path, max_bytes=SMALL)
    path = tmp_path / USAGE_FILE
    log.write(usage_record(1))
    path.rename(tmp_path / "usage.jsonl.1")
    for i in range(2, 6):
        log.write(usage_record(i))
    log.close()
    assert [r["request_id"] for r in read_records(path)] == [
        record(i)["request_id"] for i in range(2, 6)]
    moved = [orjson.loads(x)["request_id"]
             for x in (tmp_path / "usage.jsonl.1").read_bytes().splitlines()]
    assert moved == [record(i)["request_id"] for i in (1, 2)]  # 2: written there, then here
