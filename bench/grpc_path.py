"""B's and F's servicer processes driven over real gRPC as Envoy drives them, no Envoy.

Run: `.venv/bin/python -m bench.grpc_path [--concurrency 1,16] [--duration 4] [--reps 2]`.
`tokenbooth serve` (B-memory's config) and `bench.noop` (F) each start on free ports;
a client in this process sends each the inference path's messages for one JSON request
(the Check, then an ext_proc stream: the request body with ext_authz's metadata, the
whole answer), N requests in flight, and reads each server's CPU per request, split by
thread: the event loop's (Python) and gRPC's own (poller threads). B's servicer
answers every request for real (admission, the record, the settlement; every record is
counted at the end), F's answers at once. So B - F is what tokenbooth's decisions cost
inside a busy gRPC server, to set beside `bench.decision_path` (the same decisions
alone, without gRPC).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import grpc
import uvloop
import yaml
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.services.principal_md import principal_metadata
from authz.state.usage.records import USAGE_FILE, read_records
from bench.decision_path import check_bytes, exchange_bytes
from bench.gateways import ALIAS, KEY_LIMITS, write_policy
from bench.procstat import _TICK
from policy.keys import Principal
from policy.limits import Limits, usd_to_nano
from policy.routing import model_cluster_name


@dataclass
class Server:
    name: str
    pid: int
    grpc: str


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of `pid`'s main thread and of its other threads (gRPC's)."""
    main = rest = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        raw = _task_fields(task)
        if raw is None:
            continue
        s = (int(raw[11]) + int(raw[12])) / _TICK
        if int(task.name) == pid:
            main += s
        else:
            rest += s
    return main, rest


def _task_fields(task: Path) -> list[str] | None:
    try:
        raw = (task / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


@contextmanager
def servers(tmp: Path, python: str) -> Iterator[tuple[Server, Server]]:
    """B (`tokenbooth serve`, B-memory's config) and F (`bench.noop`), each ready."""
    procs = []
    try:
        out = []
        for name in ("B", "F"):
            cfg = write_policy(tmp / name, "http://127.0.0.1:1")
            services = yaml.safe_load(cfg.read_text())["services"]
            cmd = ([python, "-m", "authz.cli", "serve", "--config", str(cfg),
                    "--log-level", "warning"] if name == "B" else
                   [python, "-m", "bench.noop", "--grpc", services["grpc_listen"],
                    "--side", services["http_listen"], "--cluster", model_cluster_name(ALIAS)])
            with (tmp / f"{name}.log").open("wb") as log:
                proc = spawn(cmd, stdout=log, stderr=log)
            procs.append(proc)
            side = f"http://{services['http_listen']}"
            wait_until(lambda side=side: http_ok(f"{side}/readyz"), name, alive=[proc])
            out.append(Server(name, proc.pid, services["grpc_listen"]))
        yield out[0], out[1]
    finally:
        stop(procs)


async def drive(server: Server, conc: int, duration: float) -> dict[str, float]:
    """`conc` requests in flight for 1 s of warm-up, then `duration` measured."""
    lim = Limits(KEY_LIMITS["rpm"], KEY_LIMITS["tpm"], KEY_LIMITS["max_concurrent"],
                 usd_to_nano(Decimal(KEY_LIMITS["budget_usd"])), KEY_LIMITS["budget_period"])
    md = principal_metadata(Principal("bench", "bench-org", frozenset(), frozenset(), lim))
    done = 0
    running = True
    async with grpc.aio.insecure_channel(server.grpc) as ch:
        authz = external_auth_pb2_grpc.AuthorizationStub(ch)
        proc = external_processor_pb2_grpc.ExternalProcessorStub(ch)

        async def worker(w: int) -> None:
            nonlocal done
            i = 0
            while running:
                i += 1
                rid = f"{server.name}{conc:03d}{w:04d}-{i:08d}-{time.time_ns()}"
                ok = await authz.Check(external_auth_pb2.CheckRequest.FromString(
                    check_bytes(rid)))
                if ok.status.code != 0:
                    raise SystemExit(f"{server.name}: the Check refused: {ok}")
                call = proc.Process()
                for raw in exchange_bytes(rid, md):
                    await call.write(ep.ProcessingRequest.FromString(raw))
                    answer = await call.read()
                    if answer.HasField("immediate_response"):
                        raise SystemExit(f"{server.name}: refused: {answer}")
                await call.done_writing()
                await call.code()
                done += 1

        tasks = [asyncio.create_task(worker(w)) for w in range(conc)]
        await asyncio.sleep(1.0)
        d0, (m0, r0) = done, thread_cpu(server.pid)
        await asyncio.sleep(duration)
        d1, (m1, r1) = done, thread_cpu(server.pid)
        running = False
        await asyncio.gather(*tasks)
    n = max(d1 - d0, 1)
    return {"req/s": n / duration, "main": (m1 - m0) / n * 1e6,
            "grpc": (r1 - r0) / n * 1e6, "requests": float(done)}


async def main(concs: list[int], duration: float, reps: int, python: str) -> None:
    with tempfile.TemporaryDirectory(prefix="tb-grpc-path-") as d:
        tmp = Path(d)
        rows: list[tuple[int, str, dict[str, float]]] = []
        sent = 0
        with servers(tmp, python) as (b, f):
            for _ in range(reps):
                for conc in concs:
                    for server in (b, f):
                        got = await drive(server, conc, duration)
                        sent += int(got["requests"]) if server is b else 0
                        rows.append((conc, server.name, got))
                        print(f"  {server.name} at {conc}: {got['req/s']:,.0f} req/s, "
                              f"{got['main'] + got['grpc']:,.0f} µs CPU per request",
                              flush=True)
        recorded = sum(1 for _ in read_records(tmp / "B" / "data" / USAGE_FILE))
    print(f"\nServicer CPU per JSON request over gRPC, no Envoy (median of {reps}; µs):\n")
    print("| conns | B req/s | B loop | B gRPC threads | F req/s | F loop | F gRPC threads "
          "| B - F | B/F |")
    print("|---|---|---|---|---|---|---|---|---|")
    for conc in concs:
        def med(name: str, k: str, conc: int = conc) -> float:
            vals = sorted(r[k] for c, n, r in rows if c == conc and n == name)
            return vals[len(vals) // 2]
        bt = med("B", "main") + med("B", "grpc")
        ft = med("F", "main") + med("F", "grpc")
        print(f"| {conc} | {med('B', 'req/s'):,.0f} | {med('B', 'main'):,.0f} | "
              f"{med('B', 'grpc'):,.0f} | {med('F', 'req/s'):,.0f} | {med('F', 'main'):,.0f} | "
              f"{med('F', 'grpc'):,.0f} | {bt - ft:,.0f} | {bt / ft:.2f}x |")
    print(f"\nB recorded {recorded} of the {sent} requests it answered.")
    if recorded != sent:
        raise SystemExit("B lost records")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    uvloop.install()
    asyncio.run(main([int(c) for c in args.concurrency.split(",")], args.duration,
                     args.reps, sys.executable))
