"""One soak run: the cluster started, the clients and the chaos schedule run together,
the holds left to settle, then the report (tests/soak/checks.py judges it)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import percentile
from tests.soak.chaos import Event, run_chaos
from tests.soak.checks import Verdict, judge_money, judge_records, tracebacks, wait_settled
from tests.soak.cluster import LEASE_S, Cluster, rss_kib, start_cluster
from tests.soak.load import Outcome, run_clients

SETTLE_SLACK_S = 30.0  # beyond a lease: the sweep's period, the audit's own time
AFTER_S = 10.0  # a chaos event's window in the report: its outage, and this long after
QUOTA = ("insufficient_quota", "rate_limit_exceeded")  # refusals, whatever the chaos


@dataclass(frozen=True)
class Options:
    duration_s: float = 600.0
    clients: int = 100
    chaos_interval_s: float = 60.0
    tpot_ms: float = 5.0
    seed: int = 1


@dataclass
class Result:
    verdict: Verdict
    outcomes: list[Outcome]
    events: list[Event]
    rss: dict[str, tuple[int | None, int | None, bool]]  # start KiB, end KiB, restarted
    start: float  # time.monotonic() when the load started
    lines: list[str] = field(default_factory=list)


async def _drive(c: Cluster, o: Options, start: float, worker: ThreadPoolExecutor) -> tuple[
        list[Outcome], list[Event], dict[str, tuple[int | None, int | None, bool]]]:
    events: list[Event] = []
    load = asyncio.create_task(run_clients(c.base_url, o.clients, o.duration_s, o.seed))
    chaos = asyncio.create_task(run_chaos(c, start, o.duration_s, o.chaos_interval_s, events,
                                          worker))
    # After a warm-up (imports, pools, caches), before the first chaos event.
    await asyncio.sleep(min(10.0, o.chaos_interval_s / 2, o.duration_s / 4))
    pids0 = c.pids()
    rss0 = {name: rss_kib(pid) for name, pid in pids0.items()}
    outcomes = await load
    await chaos
    pids1 = c.pids()
    rss = {name: (rss0[name], rss_kib(pid), pid != pids0[name]) for name, pid in pids1.items()}
    return outcomes, events, rss


def run_soak(root: Path, o: Options) -> Result:
    cluster = start_cluster(root, o.tpot_ms)
    # The chaos's thread, kept until the cluster stops: what it starts again dies with it.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chaos")
    try:
        start = time.monotonic()
        outcomes, events, rss = asyncio.run(_drive(cluster, o, start, worker))
        admitted = {x.rid for x in outcomes if x.admitted}
        settled = wait_settled(cluster.configs[0], cluster.redis.url, admitted,
                               LEASE_S + SETTLE_SLACK_S)
        # Every role still running once settled (a restarted replica that died with the
        # chaos's thread left its holds unswept: the harness's own fault, named so).
        gone = sorted(name for name, pid in cluster.pids().items() if pid is None)
    finally:
        cluster.stop()
        worker.shutdown()
    v = Verdict()
    judge_records(outcomes, settled, v)
    judge_money(settled, v)
    v.fail_if(gone, "processes not running after the load")
    res = Result(v, outcomes, events, rss, start)
    res.lines = report(res, o, tracebacks(cluster.logs))
    return res


def _latency(outcomes: Sequence[Outcome], streaming: bool) -> str:
    ok = sorted(x.latency_s for x in outcomes if x.status == 200 and not x.broken
                and (x.kind not in ("chat", "completion")) == streaming)
    return (f"{len(ok)} ok, p50 {percentile(ok, 0.5) * 1000:.0f} ms, "
            f"p99 {percentile(ok, 0.99) * 1000:.0f} ms")


def _windows(r: Result) -> list[str]:
    """Errors while each chaos event lasted (and `AFTER_S` after), and outside them."""
    starts = [r.start + e.at_s for e in r.events] + [float("inf")]
    spans = [(a, min(a + e.down_s + AFTER_S, starts[i + 1]))
             for i, (a, e) in enumerate(zip(starts, r.events, strict=False))]
    out = []
    for e, (a, b) in zip(r.events, spans, strict=True):
        during = [x for x in r.outcomes if a <= x.started < b]
        failed = [x for x in during
                  if x.status != 200 and x.code not in QUOTA and not x.fault]
        bad = Counter(f"{x.status} {x.code}".strip() for x in during if x.status != 200)
        last = (f"the last other than a 429 or a fault asked of the upstream was sent "
                f"{max(x.started for x in failed) - a - e.down_s:+.1f} s from its return"
                if failed else "no error other than 429s and faults asked of the upstream")
        out.append(f"  {e.what} at {e.at_s:.0f} s, back in {e.down_s:.1f} s: "
                   f"{sum(bad.values())} errors of {len(during)} requests "
                   f"{dict(bad.most_common(4))}; {last}")
    calm = [x for x in r.outcomes if not any(a <= x.started < b for a, b in spans)]
    bad = Counter(f"{x.status} {x.code}".strip() for x in calm if x.status != 200)
    out.append(f"  outside those windows: {sum(bad.values())} errors of {len(calm)} requests "
               f"{dict(bad.most_common(4))}")
    return out


def report(r: Result, o: Options, tracebacks: dict[str, int]) -> list[str]:
    out = r.outcomes
    statuses = Counter(f"{x.status} {x.code}".strip() for x in out if x.status != 200)
    lines = [
        f"soak: {o.duration_s:.0f} s, {o.clients} clients, chaos every "
        f"{o.chaos_interval_s:.0f} s, {o.tpot_ms:g} ms per token",
        f"requests: {len(out)} ({len(out) / o.duration_s:.0f}/s), by kind "
        + ", ".join(f"{k} {n}" for k, n in sorted(Counter(x.kind for x in out).items())),
        f"ok: {sum(1 for x in out if x.status == 200)}, streams cut: "
        f"{sum(1 for x in out if x.broken)} (asked of the upstream: "
        f"{sum(1 for x in out if x.fault == 'cut')}), upstream asked to fail: "
        f"{sum(1 for x in out if x.fault == '500')}",
        "errors by status: " + (", ".join(f"{s} x{n}" for s, n in statuses.most_common())
                                or "none"),
        f"latency JSON: {_latency(out, False)}",
        f"latency streams (to the last byte): {_latency(out, True)}",
        f"chaos (errors from each kill until {AFTER_S:.0f} s after it was back):",
        *_windows(r),
    ]
    lines += [f"{k}: {v}" for k, v in r.verdict.figures.items()]
    lines.append("RSS KiB, after warm-up -> end: " + ", ".join(
        f"{name} {a} -> {b}{' (restarted)' if restarted else ''}"
        for name, (a, b, restarted) in r.rss.items()))
    lines.append(f"tracebacks in logs: {tracebacks or 'none'}")
    lines += [f"FAIL {f}" for f in r.verdict.failures] or ["PASS"]
    return lines
