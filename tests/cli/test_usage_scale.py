"""`tokenbooth usage --group-by` over a million records: one streamed pass, with a
measured time and peak RSS (the README quotes both)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import orjson

from tests.helpers import write_policy

N = 1_000_000
DUPLICATES = 10_000  # redelivered records: counted once
LOST_EVERY = 1000  # every 1000th request also has a `lost` record, superseded
ORGS, KEYS, MODELS, DAYS = 20, 1000, 5, 7
# Peak RSS of the command over the million records must stay under RSS_BOUND_MB, and
# exceed the same command over no records (~37 MiB: the interpreter and imports) by at
# most GROWTH_MB: the ids' table (16 MiB for a million, 24 while it doubles) and slack.
# Measured on the 2-core dev VM: 61 MiB, 8.8 s.
RSS_BOUND_MB = 100
GROWTH_MB = 40

LINE = ('{{"request_id":"{rid:032x}","key_id":"key_{key:012x}","org":"org-{org}",'
        '"model":"model-{model}","upstream_model":"upstream-{model}",'
        '"backend":"http://10.0.0.{model}:8000","prompt_tokens":{p},'
        '"completion_tokens":{c},"total_tokens":{t},"cost_usd":"{cost}",'
        '"status":{status},"stream":true,"estimated":false,'
        '"started_at":"2026-03-0{day}T{hour:02d}:{minute:02d}:00.123456Z",'
        '"duration_ms":812.5,"endpoint":"chat"}}\n')


def _line(i: int, status: str = "200") -> str:
    p, c = 100 + i % 900, i % 257
    return LINE.format(rid=i, key=i % KEYS, org=i % ORGS, model=i % MODELS, p=p, c=c,
                       t=p + c, cost=f"0.{i % 1000:03d}5", status=status,
                       day=1 + i % DAYS, hour=i % 24, minute=i % 60)


def write_records(path: Path) -> None:
    """N distinct requests, DUPLICATES of them delivered twice, and a `lost` record
    before every LOST_EVERY-th one (superseded by its real record)."""
    with path.open("w") as f:
        batch: list[str] = []
        for i in range(N):
            if i % LOST_EVERY == 0:
                batch.append(_line(i, '"lost"'))
            batch.append(_line(i))
            if i % (N // DUPLICATES) == 1:
                batch.append(_line(i - 1))
            if len(batch) >= 50_000:
                f.write("".join(batch))
                batch.clear()
        f.write("".join(batch))


# Runs the command and prints its exit status and peak RSS. A child's ru_maxrss counts
# the resident memory of the process it was forked from, so the command is forked from
# this small process rather than from pytest.
MEASURE = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=open(os.environ["OUT"], "wb"))
_, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def measure(config: Path, *args: str) -> tuple[bytes, float, float]:
    """stdout, wall seconds and peak RSS in MiB of one `tokenbooth usage` process."""
    out = config.parent / "out.json"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "authz.cli",
                        "usage", "--config", str(config), *args], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OUT": str(out)})
    elapsed = time.perf_counter() - t0
    status, maxrss_kib = map(int, r.stdout.split())
    assert status == 0, r.stderr
    return out.read_bytes(), elapsed, maxrss_kib / 1024  # Linux: KiB


def test_a_million_records_in_flat_memory(tmp_path: Path) -> None:
    config = write_policy(tmp_path, "http://127.0.0.1:8000")
    data = tmp_path / "data"
    data.mkdir()
    (data / "usage.jsonl").write_text("")
    _, _, rss_empty = measure(config, "--group-by", "org,day", "--json")
    t0 = time.perf_counter()
    write_records(data / "usage.jsonl")
    written = time.perf_counter() - t0
    size_mib = (data / "usage.jsonl").stat().st_size >> 20
    try:
        raw, elapsed, rss = measure(config, "--group-by", "org,day", "--json")
    finally:
        (data / "usage.jsonl").unlink()  # ~370 MiB: not kept among pytest's last runs
    report = orjson.loads(raw)
    print(f"\n{N:,} records ({size_mib} MiB, written in "
          f"{written:.1f} s): usage --group-by org,day in {elapsed:.1f} s, peak RSS "
          f"{rss:.0f} MiB (no records: {rss_empty:.0f} MiB)")
    totals = report["totals"]
    assert totals["requests"] == N
    assert Decimal(totals["cost_usd"]) == sum(Decimal(f"0.{i % 1000:03d}5")
                                              for i in range(1000)) * (N // 1000)
    assert len(report["groups"]) == ORGS * DAYS
    assert sum(g["requests"] for g in report["groups"]) == N
    assert rss < RSS_BOUND_MB, f"peak RSS {rss:.0f} MiB"
    assert rss - rss_empty < GROWTH_MB, f"grew {rss - rss_empty:.0f} MiB"
    assert elapsed < 120
