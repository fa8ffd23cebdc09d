"""The paced-stream section of `make bench`: gateway CPU per streamed token at a real pace.

The request section's upstream has zero think time, so a stream reaches Envoy in one or
two socket reads. Here the sim paces tokens (`x-sim-tpot-ms`), so each token is its own
read, its own ext_proc message for the configurations that meter (F, B): what a gateway in
front of a real GPU pays per token. Each cell (time per token, tokens, streams) runs
`streams` connections, each streaming one request after another until `min_s` have passed
(at least one each); the tokens are the streams' own `usage.completion_tokens`.

CPU per token = (Envoy + Python CPU over the cell minus the gateway's idle CPU over as long) /
tokens. The idle rate (stats flushes, health checks) is measured once per gateway, before
its cells, and would otherwise count as per-token cost in the slow cells.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench import procstat
from bench.gateways import ALIAS, Gateway
from bench.loadgen import Connection, build_request

GATEWAY_GROUPS = ("envoy", "python")
IDLE_S = 5.0  # how long each gateway's idle CPU is measured (Envoy flushes stats every 5 s)
PROMPT = "Tell me a long story about a lighthouse keeper."


@dataclass(frozen=True)
class Cell:
    tpot_ms: int
    tokens: int
    streams: int

    @property
    def label(self) -> str:
        return f"{self.tpot_ms} ms x {self.tokens} tok x {self.streams}"


def cells(tpots: Sequence[int], tokens: Sequence[int], streams: Sequence[int]) -> list[Cell]:
    return [Cell(t, n, s) for t in tpots for n in tokens for s in streams]


def stream_body(tokens: int) -> bytes:
    """A chat stream of `tokens` tokens whose client asks for the usage chunk (as the request
    section's streams do: every configuration moves the same bytes)."""
    return json.dumps({"model": ALIAS, "max_tokens": tokens, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()


def completion_tokens(body: bytes) -> int | None:
    """The stream's `usage.completion_tokens` (the last usage chunk), None without one or
    without the final `data: [DONE]`."""
    if not body.rstrip().endswith(b"data: [DONE]"):
        return None
    for line in reversed(body.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            usage = json.loads(line[6:]).get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                return int(usage["completion_tokens"])
    return None


@dataclass
class Tally:
    streams: int = 0
    tokens: int = 0
    failed: int = 0


async def _conn_loop(host: str, port: int, request: bytes, deadline: float, t: Tally) -> None:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(request), host, port)
    try:
        while True:
            try:
                reply = await conn.request()
            except ConnectionError:
                t.failed += 1
                return
            n = completion_tokens(reply.body) if 200 <= reply.status < 300 else None
            if n is None:
                t.failed += 1
            else:
                t.streams += 1
                t.tokens += n
            if time.perf_counter() >= deadline or not reply.keep_alive:
                return
    finally:
        conn.close()


async def drive(gw: Gateway, cell: Cell, min_s: float) -> Tally:
    """`cell.streams` connections streaming back to back until `min_s` have passed."""
    headers = [*gw.headers, f"x-sim-tpot-ms: {cell.tpot_ms}"]
    host, port, request = build_request(gw.url, stream_body(cell.tokens), headers)
    tally = Tally()
    deadline = time.perf_counter() + min_s
    results = await asyncio.gather(
        *(_conn_loop(host, port, request, deadline, tally) for _ in range(cell.streams)),
        return_exceptions=True)
    tally.failed += sum(isinstance(r, BaseException) for r in results)
    return tally


def idle_rate(gw: Gateway, seconds: float = IDLE_S) -> dict[str, float]:
    """CPU seconds per second each gateway process group spends doing nothing."""
    groups = {g: gw.cpu_groups[g] for g in GATEWAY_GROUPS if g in gw.cpu_groups}
    before = procstat.sample_ns(groups)
    time.sleep(seconds)
    after = procstat.sample_ns(groups)
    return {g: max(0.0, (after[g] - before[g]) / seconds) for g in groups}


def measure(gw: Gateway, config: str, cell: Cell, min_s: float, idle: dict[str, float],
            shared: dict[str, list[int]]) -> dict[str, Any]:
    """One cell: its CPU by group, net of the idle rate, and per token."""
    groups = {**{g: gw.cpu_groups[g] for g in GATEWAY_GROUPS if g in gw.cpu_groups}, **shared}
    # The counters are read outside the CPU window (a /metrics scrape is not per-token work).
    cnt0 = gw.counters()
    cpu0 = procstat.sample_ns(groups)
    t0 = time.perf_counter()
    tally = asyncio.run(drive(gw, cell, min_s))
    wall = time.perf_counter() - t0
    cpu1 = procstat.sample_ns(groups)
    cnt1 = gw.counters()
    cpu = {g: cpu1[g] - cpu0[g] - idle.get(g, 0.0) * wall for g in cpu1}
    msgs = cnt1.get("envoy.ext_proc.stream_msgs_sent", 0.0) - cnt0.get(
        "envoy.ext_proc.stream_msgs_sent", 0.0)
    tokens = max(tally.tokens, 1)
    return {
        "config": config, "tpot_ms": cell.tpot_ms, "tokens": cell.tokens,
        "streams": cell.streams, "wall_s": wall, "completed_streams": tally.streams,
        "streamed_tokens": tally.tokens, "failed": tally.failed, "cpu_s": cpu,
        "us_per_token": {g: v / tokens * 1e6 for g, v in cpu.items()},
        "gateway_us_per_token": sum(cpu.get(g, 0.0) for g in GATEWAY_GROUPS) / tokens * 1e6,
        "ext_proc_msgs_per_token": msgs / tokens if msgs else None,
        "tokens_per_s": tally.tokens / wall if wall > 0 else 0.0,
    }


def run_config(start: Callable[[], Gateway], config: str, plan: Sequence[Cell], min_s: float,
               shared: dict[str, list[int]], progress: Callable[[str], None],
               idle_s: float = IDLE_S) -> list[dict[str, Any]]:
    """Start one gateway, prime it, measure its idle rate (for `idle_s`), then every
    cell."""
    gw = start()
    out = []
    try:
        asyncio.run(drive(gw, Cell(0, 8, 2), 0.0))  # lazy start-up work, not measured
        idle = idle_rate(gw, idle_s)
        for cell in plan:
            m = measure(gw, config, cell, min_s, idle, shared) | {"idle_cores": idle}
            out.append(m)
            progress(f"paced {config:<12} {cell.label:<22} {m['streamed_tokens']:7d} tok "
                     f"{m['tokens_per_s']:8.0f} tok/s  gateway "
                     f"{m['gateway_us_per_token']:6.1f} µs/token"
                     + (f"  {m['ext_proc_msgs_per_token']:.2f} msgs/token"
                        if m["ext_proc_msgs_per_token"] else "")
                     + (f"  !! {m['failed']} FAILED" if m["failed"] else ""))
    finally:
        gw.stop()
    return out


def _cell_key(m: dict[str, Any]) -> tuple[int, int, int]:
    return m["tpot_ms"], m["tokens"], m["streams"]


def markdown(measurements: Sequence[dict[str, Any]], configs: Sequence[str]) -> list[str]:
    """The paced section: every cell by configuration, then the gateways side by side."""
    if not measurements:
        return []
    out = ["#### Paced streams: gateway CPU per streamed token", "",
           "CPU net of each gateway's idle rate; tokens are the streams' own "
           "`usage.completion_tokens`; msgs/token: Envoy's `ext_proc.stream_msgs_sent` "
           "per token.", "",
           "| config | ms/token | tokens | streams | streamed tokens | tok/s | Envoy µs/tok "
           "| Python µs/tok | gateway µs/tok | ext_proc msgs/tok | failed |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    rank = {c: i for i, c in enumerate(configs)}
    rows = sorted(measurements, key=lambda m: (rank.get(m["config"], 99), _cell_key(m)))
    for m in rows:
        per = m["us_per_token"]
        msgs = m["ext_proc_msgs_per_token"]
        out.append(
            f"| {m['config']} | {m['tpot_ms']} | {m['tokens']} | {m['streams']} "
            f"| {m['streamed_tokens']:,} | {m['tokens_per_s']:,.0f} "
            f"| {per.get('envoy', 0.0):,.1f} | "
            + (f"{per['python']:,.1f}" if "python" in per else "-")
            + f" | {m['gateway_us_per_token']:,.1f} | "
            + (f"{msgs:.2f}" if msgs else "-") + f" | {m['failed']} |")
    present = [c for c in configs if any(m["config"] == c for m in measurements)]
    by = {(m["config"], *_cell_key(m)): m for m in measurements}
    out += ["", "Gateway (Envoy + Python) µs of CPU per streamed token, side by side:", "",
            "| ms/token | tokens | streams | " + " | ".join(present) + " |",
            "|---|---|---|" + "---|" * len(present)]
    for key in sorted({_cell_key(m) for m in measurements}):
        vals = [by.get((c, *key)) for c in present]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(
            "-" if v is None else f"{v['gateway_us_per_token']:,.1f}" for v in vals) + " |")
    return [*out, ""]
