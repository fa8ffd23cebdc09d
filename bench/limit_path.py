"""µs per admission and per settlement on the limit path, memory and Redis.

Run: `.venv/bin/python -m bench.limit_path [--n N]`. Starts its own
redis-server. Each admit checks and reserves RPM, TPM, concurrency and budget
at once (one Redis round trip); each settle is one more.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from policy.limits import Ask, Limits
from tests.redis_server import RedisServer

LIMITS = Limits(rpm=10**9, tpm=10**12, max_concurrent=10**6, budget_nano=10**15,
                budget_period="day")


def ask(i: int) -> Ask:
    return Ask(request_id=f"r{i}", key_id="bench", org="o", tokens=300, cost_nano=50_000,
               period="day:2026-11-23", lease_s=150)


async def run(store: Any, n: int) -> tuple[float, float, float, float]:
    now = time.time()
    for i in range(200):  # warm up
        await store.admit(LIMITS, ask(-i - 1), now)
        await store.settle(LIMITS, ask(-i - 1), 100, 20_000, now)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        d = await store.admit(LIMITS, ask(i), now)
        assert d.allowed
    c1, w1 = time.process_time(), time.perf_counter()
    for i in range(n):
        await store.settle(LIMITS, ask(i), 100, 20_000, now)
    c2, w2 = time.process_time(), time.perf_counter()
    return ((c1 - c0) / n * 1e6, (w1 - w0) / n * 1e6, (c2 - c1) / n * 1e6,
            (w2 - w1) / n * 1e6)


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    redis = RedisServer(tmp)
    redis.start()
    rows = []
    try:
        mem = MemoryLimitStore()
        await mem.start()
        rows.append(("memory", *await run(mem, n)))
        rstore = RedisLimitStore(redis.url)
        await rstore.start()
        rows.append(("redis (one Lua round trip each)", *await run(rstore, n)))
        await rstore.close()
    finally:
        redis.stop()
    print(f"\nlimit path, {n} requests each (µs per call; Redis CPU not counted)\n")
    print(f"| {'store':<32} | admit CPU | admit wall | settle CPU | settle wall |")
    print(f"|{'-' * 34}|-----------|------------|------------|-------------|")
    for name, ac, aw, sc, sw in rows:
        print(f"| {name:<32} | {ac:>9.1f} | {aw:>10.1f} | {sc:>10.1f} | {sw:>11.1f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    asyncio.run(main(ap.parse_args().n))
