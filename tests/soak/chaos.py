"""The chaos schedule: every `interval` seconds of the load, the next of: Redis killed
(SIGKILL) and started again on its port and directory, a replica SIGKILLed and started
again (the two in turn), the upstream (the simulator) SIGKILLed and started again.
No event starts in the last `interval / 2` seconds of the load, so that each ends
within it."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tests.soak.cluster import Cluster

EVENTS = ("redis", "replica", "upstream")
OUTAGE_S = {"redis": 3.0, "replica": 2.0, "upstream": 2.0}


@dataclass(frozen=True, slots=True)
class Event:
    what: str  # "redis", "replica 0", ...
    at_s: float  # from the start of the load
    down_s: float  # from the kill to ready again


def _run_event(cluster: Cluster, what: str, nth: int) -> str:
    """Kill, wait the outage, start again and wait until ready; a name for the report."""
    if what == "redis":
        cluster.kill_redis()
        time.sleep(OUTAGE_S[what])
        cluster.start_redis()
        return "redis"
    if what == "replica":
        i = nth % 2
        cluster.kill_replica(i)
        time.sleep(OUTAGE_S[what])
        cluster.start_replica(i)
        return f"replica {i}"
    cluster.kill_sim()
    time.sleep(OUTAGE_S[what])
    cluster.start_sim()
    return "upstream"


def planned(duration_s: float, interval_s: float) -> int:
    """How many events fit in a load of `duration_s`."""
    n = 0
    while (n + 1) * interval_s <= duration_s - interval_s / 2:
        n += 1
    return n


async def run_chaos(cluster: Cluster, start: float, duration_s: float, interval_s: float,
                    log: list[Event], worker: ThreadPoolExecutor) -> None:
    """The schedule from `start` (monotonic); each event runs in `worker`'s thread so that
    the clients go on meanwhile. That thread must outlive the processes it starts again:
    they die with it (`spawn`'s PR_SET_PDEATHSIG follows the thread that forked, and
    `asyncio.to_thread`'s threads end with the event loop: a replica restarted by the
    chaos was stopped when the load ended, its holds never swept)."""
    loop = asyncio.get_running_loop()
    for i in range(planned(duration_s, interval_s)):
        await asyncio.sleep(max(0.0, start + (i + 1) * interval_s - time.monotonic()))
        what = EVENTS[i % len(EVENTS)]
        t0 = time.monotonic()
        name = await loop.run_in_executor(worker, _run_event, cluster, what,
                                          i // len(EVENTS))
        log.append(Event(name, t0 - start, time.monotonic() - t0))
