"""`make bench`: tokenbooth through Envoy against bare Envoy, no-op servicers and LiteLLM.

Run: `.venv/bin/python -m bench.run [--reps 3] [--duration 5] [--concurrency 1,16,64]`
(`--smoke` for a tiny run of A, F and B-memory). Configurations (see bench/README.md):
A bare Envoy, F no-op servicers, B-memory / B-redis tokenbooth, C LiteLLM's proxy.

In each repetition round every configuration is started once (the order rotates from
round to round), measured at each concurrency, non-streaming and streaming, after a
warm-up, then stopped. The upstream is one `tokenbooth sim` with zero think time for the
whole run. Every response's status and body are checked; a cell with any failure is marked
in the report and the run exits non-zero. Then the paced-stream section (bench/paced.py):
the sim pacing tokens, gateway CPU per streamed token for A, F and B side by side
(`--paced-only` runs only it, `--no-paced` skips it). Results: bench/results/latest.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authz.envoy_config.binary import envoy_path
from authz.runtime.procs import stop
from bench import gateways, levers, litellm_proxy, paced, procstat, report
from bench.gateways import ALIAS, Gateway
from bench.loadgen import good_body
from tests.redis_server import RedisServer

ALL_CONFIGS = ("A", "F", "B-memory", "B-redis", "C")
# B-memory with the model's `stream_interval` set: vLLM sends 8 tokens a chunk (the sim
# as vLLM does), so the per-chunk cost is paid once per 8 tokens. Paced section only.
STREAM_INTERVAL = 8
B_INTERVAL = f"B-interval{STREAM_INTERVAL}"
# B-memory with streams metered in Envoy (envoy.stream_metering: envoy), alone and with
# the stream_interval above. Paced section only.
B_ENVOY = "B-envoy"
F_ENVOY = "F-envoy"  # its floor: F with the same bootstrap, streams handed over
B_ENVOY_INTERVAL = f"B-envoy-interval{STREAM_INTERVAL}"
RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def request_body(mode: str) -> bytes:
    """64 completion tokens; streams ask for the usage chunk (as tokenbooth always does
    upstream), so every configuration moves the same bytes."""
    body: dict[str, Any] = {"model": ALIAS, "max_tokens": 64,
                            "messages": [{"role": "user", "content": PROMPT}]}
    if mode == "sse":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


def commit() -> str:
    """The tokenbooth commit measured (`+dirty` with uncommitted changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    envoy = subprocess.run([str(envoy_path()), "--version"], capture_output=True, text=True,
                           check=False).stdout.strip().split("version:")[-1].strip()
    short_envoy = envoy.split("/")[1] if "/" in envoy else envoy
    cores = os.cpu_count() or 0
    load = os.getloadavg()
    return {
        "cores": cores, "cpu": model, "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(), "kernel": platform.release(), "envoy": envoy,
        "loadavg_at_start": load,
        "summary": (f"{cores} cores ({model}), {mem_gib:.0f} GiB, Linux {platform.release()}, "
                    f"Python {platform.python_version()}, Envoy {short_envoy}; "
                    f"load average {load[0]:.2f} at the start (a shared machine: other "
                    "work ran beside the bench)"),
    }


class Bench:
    def __init__(self, args: argparse.Namespace, run_dir: Path) -> None:
        self.args = args
        self.run_dir = run_dir
        self.bodies = {m: run_dir / f"body-{m}.json" for m in args.modes}
        for mode, path in self.bodies.items():
            path.write_bytes(request_body(mode))
        self.measurements: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.cells = len(args.configs) * len(args.modes) * len(args.concurrency) * args.reps
        self.paced_plan = paced.cells(args.paced_tpot, args.paced_tokens, args.paced_streams)
        self.cells += len(self.paced_plan) * len(args.paced_configs)
        self.paced: list[dict[str, Any]] = []
        self.sim_url = ""
        self.shared: dict[str, list[int]] = {}
        self.redis: RedisServer | None = None

    def progress(self, text: str) -> None:
        done = len(self.measurements) + len(self.paced)
        elapsed = time.monotonic() - self.t0
        eta = f", ~{elapsed / done * (self.cells - done) / 60:.1f} min left" if done else ""
        print(f"[{done}/{self.cells} {elapsed:5.0f}s{eta}] {text}", flush=True)

    def starter(self, config: str) -> Callable[[], Gateway]:
        run, sim = self.run_dir, self.sim_url
        if config == "A":
            return lambda: gateways.start_bare(run, sim)
        if config == "F":
            return lambda: gateways.start_noop(run, sim)
        if config == F_ENVOY:
            return lambda: gateways.start_noop(run, sim, config,
                                               envoy={"stream_metering": "envoy"})
        if config in levers.VARIANTS or config in levers.SPLIT_VARIANTS:
            return levers.starter(config, run, sim)
        if config == "B-memory":
            return lambda: gateways.start_tokenbooth(run, sim, "memory", config)
        if config == B_INTERVAL:  # the model's stream_interval: vLLM batches tokens
            return lambda: gateways.start_tokenbooth(
                run, sim, "memory", config, {"stream_interval": STREAM_INTERVAL})
        if config in (B_ENVOY, B_ENVOY_INTERVAL):
            model = {"stream_interval": STREAM_INTERVAL} if config == B_ENVOY_INTERVAL else {}
            return lambda: gateways.start_tokenbooth(
                run, sim, "memory", config, model, {"stream_metering": "envoy"})
        assert self.redis is not None
        url = self.redis.url
        if config == "B-redis":
            return lambda: gateways.start_tokenbooth(run, sim, url, config)
        return lambda: litellm_proxy.start_litellm(run, sim, url,
                                                   os.cpu_count() or 1)

    def measure(self, gw: Gateway, config: str, mode: str, conns: int, rep: int) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "bench.loadgen", "--url", gw.url,
               "--body-file", str(self.bodies[mode]), "--connections", str(conns),
               "--warmup", str(a.warmup), "--duration", str(a.duration)]
        for h in gw.headers:
            cmd += ["--header", h]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        groups = {**gw.cpu_groups, "loadgen": [proc.pid], **self.shared}
        if config not in ("B-redis", "C"):
            groups.pop("redis", None)
        marks: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
        lines = []
        for line in proc.stdout:
            if line.strip() in ("START", "END"):
                marks[line.strip()] = (procstat.sample(groups), gw.counters())
            else:
                lines.append(line)
        if proc.wait() != 0 or set(marks) != {"START", "END"} or not lines:
            raise RuntimeError(f"{config} {mode} c={conns}: the load generator failed")
        result: dict[str, Any] = json.loads(lines[-1])
        (cpu0, cnt0), (cpu1, cnt1) = marks["START"], marks["END"]
        result |= {
            "config": config, "mode": mode, "rep": rep,
            "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu1},
            "counters": {k: cnt1[k] - cnt0.get(k, 0.0) for k in cnt1},
        }
        self.measurements.append(result)
        d = report.per_request(result)
        failed = result["completed"] - result["ok"] + result["bad_body"]
        failed += sum(result["errors"].values())
        msgs = d.get("msgs", {}).get("total")
        self.progress(
            f"{config:<8} {mode:<4} c={conns:<3} {result['rps']:8.0f} req/s  "
            f"p50 {result['lat_ms']['p50']:7.2f} ms  p99 {result['lat_ms']['p99']:7.2f} ms  "
            f"gateway {d['gateway_cpu_us']:6.0f} µs/req"
            + (f"  {msgs:.1f} msgs/req" if msgs is not None else "")
            + (f"  !! {failed} FAILED {result['status']} {result['errors']}" if failed else ""))

    def prime(self, gw: Gateway) -> None:
        """A few requests of each kind before any measurement: the first ones pay for lazy
        start-up work, and a gateway that refuses them (a 401 from a wrong key, say) stops
        the run here rather than produce a table of errors."""
        for mode in self.args.modes:
            for _ in range(5):
                req = urllib.request.Request(gw.url, data=self.bodies[mode].read_bytes(),
                                             headers=dict(h.split(": ", 1) for h in gw.headers)
                                             | {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=30) as r:
                        status, body = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, body = e.code, e.read()
                if not 200 <= status < 300 or not good_body(body)[0]:
                    raise RuntimeError(f"{gw.name} {mode}: HTTP {status}: {body[:300]!r}")

    def round(self, rep: int) -> None:
        configs = self.args.configs
        shift = rep % len(configs)
        for config in configs[shift:] + configs[:shift]:
            self.progress(f"round {rep + 1}/{self.args.reps}: starting {config}")
            gw = self.starter(config)()
            try:
                self.prime(gw)
                for mode in self.args.modes:
                    for conns in self.args.concurrency:
                        self.measure(gw, config, mode, conns, rep)
            finally:
                gw.stop()

    def run(self) -> dict[str, Any]:
        info = machine()
        logs = self.run_dir
        sim_url, sim = gateways.start_sim(logs)
        self.sim_url = sim_url
        self.shared = {"sim": [sim.pid]}
        try:
            if any(c in ("B-redis", "C") for c in self.args.configs):
                self.redis = RedisServer(self.run_dir)
                self.redis.start()
                assert self.redis.proc is not None
                self.shared["redis"] = [self.redis.proc.pid]
            for rep in range(self.args.reps if self.args.configs else 0):
                self.round(rep)
            for config in self.args.paced_configs:
                self.progress(f"paced streams: starting {config}")
                self.paced += paced.run_config(self.starter(config), config, self.paced_plan,
                                               self.args.paced_min_s, self.shared,
                                               self.progress, self.args.paced_idle_s)
        finally:
            if self.redis is not None:
                self.redis.stop()
            stop([sim])
        a = self.args
        return {
            "finished_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": info,
            "settings": {"configs": a.configs, "modes": a.modes, "concurrency": a.concurrency,
                         "reps": a.reps, "duration_s": a.duration, "warmup_s": a.warmup,
                         "commit": commit(), "paced_configs": a.paced_configs,
                         "paced_min_s": a.paced_min_s,
                         "litellm": litellm_proxy.version() if "C" in a.configs else None},
            "summary": report.summarize(self.measurements),
            "measurements": self.measurements,
            "paced": self.paced,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run: A, F, B-memory (and C if its venv exists), one "
                         "concurrency, 0.5 s, one repetition")
    ap.add_argument("--configs", default=",".join(ALL_CONFIGS))
    ap.add_argument("--modes", default="json,sse")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    ap.add_argument("--paced-configs",
                    default=f"A,F,B-memory,{B_INTERVAL},{F_ENVOY},{B_ENVOY},{B_ENVOY_INTERVAL}",
                    help="configurations of the paced-stream section")
    ap.add_argument("--paced-tpot", default="2,20", help="ms per token")
    ap.add_argument("--paced-tokens", default="64,512", help="tokens per stream")
    ap.add_argument("--paced-streams", default="1,64", help="streams at once")
    ap.add_argument("--paced-min-s", type=float, default=3.0,
                    help="seconds each paced cell streams for (at least one stream each)")
    ap.add_argument("--paced-idle-s", type=float, default=paced.IDLE_S,
                    help="seconds each paced gateway's idle CPU is measured for")
    ap.add_argument("--paced-only", action="store_true", help="only the paced section")
    ap.add_argument("--no-paced", action="store_true", help="skip the paced section")
    args = ap.parse_args(argv)
    if args.smoke:
        args.configs, args.concurrency, args.reps = "A,F,B-memory,C", "4", 1
        args.duration, args.warmup = 0.5, 0.3
        args.paced_tpot, args.paced_tokens, args.paced_streams = "2", "16", "1,4"
        args.paced_min_s, args.paced_idle_s = 0.2, 0.5
    if args.paced_only:
        args.configs = ""
    if args.no_paced:
        args.paced_configs = ""
    args.paced_configs = [c for c in args.paced_configs.split(",") if c]
    args.paced_tpot = [int(v) for v in args.paced_tpot.split(",")]
    args.paced_tokens = [int(v) for v in args.paced_tokens.split(",")]
    args.paced_streams = [int(v) for v in args.paced_streams.split(",")]
    args.configs = [c for c in args.configs.split(",") if c]
    args.modes = [m for m in args.modes.split(",") if m]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    unknown = (set(args.configs) - set(ALL_CONFIGS) - set(levers.SPLIT_VARIANTS)) | (
        set(args.paced_configs) - set(ALL_CONFIGS) - set(levers.VARIANTS)
        - {B_INTERVAL, F_ENVOY, B_ENVOY, B_ENVOY_INTERVAL})
    if unknown or set(args.modes) - set(report.MODES):
        ap.error(f"unknown configuration or mode: {sorted(unknown) or args.modes}")
    if "C" in args.configs and not litellm_proxy.available():
        print(f"bench: skipping C (LiteLLM): no venv at {litellm_proxy.VENV} "
              "(create it with `make bench-litellm-venv`)", flush=True)
        args.configs.remove("C")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="tb-bench-run-"))
    bench = Bench(args, run_dir)
    try:
        result = bench.run()
    except BaseException:
        print(f"bench: failed; logs are in {run_dir}", file=sys.stderr, flush=True)
        raise
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")
    md = report.markdown(result)
    (args.out / "latest.md").write_text(md)
    print("\n" + md)
    print(f"written: {args.out / 'latest.md'} and {args.out / 'latest.json'}")
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    failed = sum(r["failed"] for r in result["summary"])
    failed += sum(m["failed"] + (m["completed_streams"] == 0) for m in result["paced"])
    if failed:
        print(f"bench: {failed} request(s) failed (non-2xx, bad body or connection error); "
              "the marked cells are not valid measurements", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
