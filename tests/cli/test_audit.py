"""`tokenbooth audit` as a process: ledgers written by the real Redis limit store and
records by the real sinks; vLLM counters from the simulator and from a recorded vLLM
/metrics page."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from authz.cli.common import parse_since
from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.state.limits.base import LimitStore
from authz.state.limits.durable import DurableMemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.usage.records import USAGE_FILE, UsageSink, make_sink
from authz.state.usage.redis_sink import RedisUsageSink
from policy.config import Config, load_config
from policy.limits import Ask, Limits, cost_nano, period_id
from policy.quota import limits_from, org_hold
from policy.usage import Usage, make_record
from tests.helpers import PORTS, write_policy
from tests.redis_server import RedisServer

KEY = "k-audit"
KEYS = [{"id": KEY, "org": "acme", "sha256": "0" * 64, "budget_usd": "10",
         "budget_period": "day"},
        {"id": "k-free", "org": "acme", "sha256": "1" * 64}]
ORGS = {"acme": {"budget_usd": "50", "budget_period": "month"}}


def audit(cfg_path: Path, *args: str) -> tuple[int, Any, str]:
    """Exit status, the JSON report (None when there is none) and stderr."""
    r = subprocess.run([sys.executable, "-m", "authz.cli", "audit", "--config", str(cfg_path),
                        "--json", *args], capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None, r.stderr


def record(cfg: Config, rid: str, key: str, usage: Usage, started: datetime,
           backend: str = "", estimated: bool = False,
           periods: tuple[str | None, str | None] = (None, None)) -> Any:
    return make_record(
        request_id=rid, key_id=key, org="acme", model="demo", upstream_model="tiny-llama",
        backend=backend, usage=usage, price=cfg.models["demo"].price_per_1k_tokens,
        status=200, stream=False, estimated=estimated, started_at=started, duration_ms=5.0,
        endpoint="chat", key_budget_period=periods[0], org_budget_period=periods[1])


class Gateway:
    """What ext_proc does per request: admit (the org's hold, then the key's when it
    has limits), write the record, settle every hold at the real cost."""

    def __init__(self, cfg: Config, store: LimitStore, sink: UsageSink) -> None:
        self.cfg, self.store, self.sink = cfg, store, sink
        self.price = cfg.models["demo"].price_per_1k_tokens

    async def admit(self, rid: str, key_id: str, now: datetime) -> list[tuple[Limits, Ask]]:
        [key] = [k for k in self.cfg.keys if k.id == key_id]
        limits = limits_from(key)
        ask = Ask(rid, key_id, "acme", 1200, cost_nano(200, 1000, self.price),
                  period_id(limits.budget_period, now), 60.0)
        holds = [org_hold(self.cfg.orgs["acme"], ask, now)]
        if limits.any:
            holds.append((limits, ask))
        for lim, a in holds:
            assert (await self.store.admit(lim, a, now.timestamp())).allowed
        return holds

    async def request(self, rid: str, key_id: str, usage: Usage, now: datetime,
                      settle: bool = True) -> None:
        holds = await self.admit(rid, key_id, now)
        # The ledgers charged, as the record says: the org's, and the key's if budgeted.
        (org_lim, org_ask), *key = holds
        periods = (key[0][1].period if key and key[0][0].budget_nano is not None else None,
                   org_ask.period if org_lim.budget_nano is not None else None)
        self.sink.write(record(self.cfg, rid, key_id, usage, now, periods=periods))
        charge = cost_nano(usage.prompt_tokens, usage.completion_tokens, self.price)
        for lim, ask in holds if settle else []:
            done = await self.store.settle(lim, ask, usage.total_tokens, charge,
                                           now.timestamp())
            assert done.applied


@pytest.fixture
def redis_state(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    server = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        yield server, write_policy(tmp_path, "http://127.0.0.1:8000", state=server.url,
                                   keys=KEYS, orgs=ORGS)
    finally:
        server.stop()


async def _traffic(gw: Gateway, now: datetime) -> None:
    """Three requests settled, one only of the org's, one in flight (held, no record
    yet), one settling (recorded, not settled yet)."""
    for i, usage in enumerate([Usage(10, 20), Usage(7, 0), Usage(133, 999)]):
        await gw.request(f"done-{i}", KEY, usage, now)
    await gw.request("free", "k-free", Usage(1, 1), now)
    await gw.admit("in-flight", KEY, now)
    await gw.request("settling", KEY, Usage(50, 50), now, settle=False)


async def _redis_traffic(cfg: Config, now: datetime) -> None:
    store, sink = RedisLimitStore(cfg.state, timeout_s=2.0), make_sink(cfg)
    assert isinstance(sink, RedisUsageSink)
    await sink.start()
    await _traffic(Gateway(cfg, store, sink), now)
    await sink.aclose()
    await store.close()


def test_redis_ledgers_match_records_until_one_is_corrupted(
        redis_state: tuple[RedisServer, Path]) -> None:
    server, path = redis_state
    now = datetime.now(UTC)
    asyncio.run(_redis_traffic(load_config(path), now))

    rc, out, err = audit(path)
    assert (rc, err) == (0, ""), out
    rows = {(r["owner"], r["period"]): r for r in out["ledgers"]}
    day, month = period_id("day", now), period_id("month", now)
    assert set(rows) == {(KEY, day), ("org:acme", month)}
    assert [rows[KEY, day][k] for k in ("records", "settling", "live_holds", "drift")] == [
        3, 1, 2, False]
    assert rows["org:acme", month]["records"] == 4
    assert out["drift"] is False and out["ledger_source"].startswith("redis")

    with redis.Redis.from_url(server.url) as client:
        client.hincrby(f"tb:{{k:{KEY}}}:budget:{day}", "spent", 1)
    r = subprocess.run([sys.executable, "-m", "authz.cli", "audit", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    [line] = [x for x in r.stdout.splitlines() if "DRIFT" in x]
    assert line.startswith(KEY) and "spent" in line
    rc, out, _ = audit(path, "--since", "2d")
    assert rc == 1 and [r["owner"] for r in out["ledgers"] if r["drift"]] == [KEY]

    server.stop()
    rc, out, err = audit(path)
    assert rc == 2 and out is None
    assert err.startswith("tokenbooth: error:") and err.count("\n") == 1, err


def test_memory_ledgers_are_read_from_the_journaled_state(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000", keys=KEYS, orgs=ORGS)
    cfg, now = load_config(path), datetime.now(UTC)

    async def traffic() -> None:
        store, sink = DurableMemoryLimitStore(cfg.data_dir), make_sink(cfg)
        await store.start()
        await _traffic(Gateway(cfg, store, sink), now)
        sink.close()
        await store.close()

    asyncio.run(traffic())
    rc, out, err = audit(path)
    assert (rc, err) == (0, ""), out
    assert out["ledger_source"].startswith("memory")
    assert [(r["owner"], r["records"], r["settling"]) for r in out["ledgers"]] == [
        (KEY, 3, 1), ("org:acme", 4, 1)]
    sink = make_sink(cfg)  # a record no ledger charged
    sink.write(record(cfg, "uncharged", KEY, Usage(1, 0), now,
                      periods=(period_id("day", now), period_id("month", now))))
    sink.close()
    rc, out, _ = audit(path)
    assert rc == 1 and [r["owner"] for r in out["ledgers"] if r["drift"]] == [KEY, "org:acme"]
    # A damaged record is drift named beside the ledgers, which are audited all the same
    # (CLI tester: one stopped the audit with a "bad input" error, exit 2).
    damaged = json.loads((cfg.data_dir / USAGE_FILE).read_text().splitlines()[0])
    damaged |= {"request_id": "damaged", "cost_usd": "abc"}
    with (cfg.data_dir / USAGE_FILE).open("a") as f:
        f.write(json.dumps(damaged) + "\n")
    rc, out, err = audit(path)
    assert (rc, err) == (1, "")
    assert out["malformed_records"] == [
        "usage record 'damaged' is malformed (ValueError: cost_usd 'abc' is not a decimal "
        "number)"]
    assert [r["owner"] for r in out["ledgers"]] == [KEY, "org:acme"]
    text = subprocess.run([sys.executable, "-m", "authz.cli", "audit", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 1
    assert "DRIFT: usage record 'damaged' is malformed" in text.stdout
    assert "1 malformed record(s)" in text.stdout


def test_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    for args in (["--since", "last week"], ["--vllm", "ftp://x"],
                 ["--vllm", f"http://127.0.0.1:{PORTS.free_port()}"]):
        rc, out, err = audit(path, *args)
        assert rc == 2 and out is None and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err


def test_since_takes_ages_and_iso_times() -> None:
    now = datetime(2026, 3, 15, 12, tzinfo=UTC)
    assert parse_since("7d", now) == datetime(2026, 3, 8, 12, tzinfo=UTC)
    assert parse_since("90m", now) == datetime(2026, 3, 15, 10, 30, tzinfo=UTC)
    assert parse_since("2026-03-01", now) == datetime(2026, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("-1h", now)


# -- --vllm ------------------------------------------------------------------------------


def _chat(url: str, stream: bool) -> Usage:
    """One real request to the simulator; the usage it reports."""
    body = {"model": "tiny-llama", "max_tokens": 9, "stream": stream,
            "messages": [{"role": "user", "content": "count the tokens, please"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    if stream:
        chunks = [json.loads(x[6:]) for x in text.splitlines()
                  if x.startswith("data: {")]
        usage = next(c["usage"] for c in chunks if c.get("usage"))
    else:
        usage = json.loads(text)["usage"]
    return Usage(usage["prompt_tokens"], usage["completion_tokens"])


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[str]:
    url = f"http://127.0.0.1:{PORTS.free_port()}"
    with (tmp_path / "sim.log").open("wb") as log:
        proc = spawn([sys.executable, "-m", "authz.cli", "sim", "--listen", url[7:]],
                     stdout=log, stderr=log)
    try:
        wait_until(lambda: http_ok(f"{url}/health"), "sim", alive=[proc])
        yield url
    finally:
        stop([proc])


def test_vllm_counters_against_records_of_the_simulator(sim: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, sim, keys=KEYS)
    cfg = load_config(path)
    sink, now = make_sink(cfg), datetime.now(UTC)
    for i, stream in enumerate([False, True, True]):
        sink.write(record(cfg, f"r{i}", "k-free", _chat(sim, stream), now, backend=sim))
    sink.close()
    rc, out, err = audit(path, "--vllm", sim)
    assert (rc, err) == (0, ""), out
    [b] = out["backends"]
    assert b["records"] == 3 and b["prompt_tokens"] == b["vllm_prompt_tokens"] > 0
    assert b["completion_tokens"] == b["vllm_generation_tokens"] == 27

    served = _chat(sim, False)  # tokens served without a record
    rc, out, _ = audit(path, "--vllm", sim + "/")
    assert rc == 1 and out["backends"][0]["drift"] is True
    # Estimated records are listed apart; the counters then only bound them from below.
    sink = make_sink(cfg)
    sink.write(record(cfg, "cut", "k-free", served, now, backend=sim, estimated=True))
    sink.close()
    rc, out, _ = audit(path, "--vllm", sim)
    assert rc == 0 and out["backends"][0]["estimated"]["records"] == 1


# A page as vLLM serves it: several label sets (two served model names), _created
# samples, the process collector's start time.
VLLM_METRICS = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="tiny-llama"} 30.0
vllm:prompt_tokens_total{engine="0",model_name="tiny-llama-2"} 12.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="tiny-llama"} 1.77e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny-llama"} 40.0
vllm:generation_tokens_total{engine="0",model_name="tiny-llama-2"} 2.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1773568800.0
"""  # 2026-03-15T10:00:00Z


@pytest.fixture
def recorded_vllm() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = VLLM_METRICS.encode() if self.path == "/metrics" else b""
            self.send_response(200 if body else 404)
            self.send_header("content-type", "text/plain; version=0.0.4")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_recorded_vllm_page_counts_records_since_its_process_start(
        recorded_vllm: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, recorded_vllm, keys=KEYS)
    cfg = load_config(path)
    sink = make_sink(cfg)
    at = datetime.fromisoformat
    sink.write(record(cfg, "before", "k-free", Usage(500, 500),  # an earlier process's
                      at("2026-03-15T09:59:59+00:00"), backend=recorded_vllm))
    sink.write(record(cfg, "a", "k-free", Usage(40, 40), at("2026-03-15T10:00:00+00:00"),
                      backend=recorded_vllm))
    sink.write(record(cfg, "b", "k-free", Usage(2, 2), at("2026-03-15T11:00:00+00:00"),
                      backend=recorded_vllm))
    sink.close()
    rc, out, err = audit(path, "--vllm", recorded_vllm)
    assert (rc, err) == (0, ""), out
    [b] = out["backends"]
    assert (b["vllm_prompt_tokens"], b["vllm_generation_tokens"], b["records"]) == (42, 42, 2)
    assert b["process_start"] == "2026-03-15T10:00:00+00:00"


@pytest.mark.parametrize("strict", [False, True])
def test_a_backend_that_counted_past_the_charges_is_said(
        strict: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """Real-vLLM tester: cut streams' estimates fell short of what vLLM generated, and
    `audit --vllm` said "ok" (within the bounds). The shortfall is now said, and with
    --strict it is drift."""
    from authz.cli.audit import Report, _print_report
    from policy.audit import BackendAudit, VllmCounters

    b = BackendAudit(VllmCounters("http://vllm:8000", 30, 45, None), records=2,
                     prompt_tokens=15, completion_tokens=26, estimated_records=1,
                     estimated_prompt=7, estimated_completion=3,
                     estimated_prompt_bound=583, estimated_completion_bound=150)
    report = Report([], [b], "memory", strict, None)
    assert not b.drift and b.charged_short == (8, 16)
    assert report.drift is strict
    _print_report(report)
    out = capsys.readouterr().out
    assert ("vLLM counted 8 prompt / 16 generation tokens more than the records charged"
            in out)
    assert ("drift: 0 ledger(s), 1 backend(s)" in out) is strict


@pytest.mark.parametrize("url", ["http://user:S3CRETPW@127.0.0.1:1",
                                 "http://user:S3CRETPW@127.0.0.1:1/\x1b[2J",
                                 "http://user:S3CRETPW@127.0.0.1:abc",
                                 "http://127.0.0.1:1/?token=S3CRETPW", "http://[::1"])
def test_a_vllm_url_that_cannot_be_read_is_said_without_its_password(url: str) -> None:
    """`--vllm` printed a password in the URL, and a control character in it was an
    internal error (admin retest)."""
    from authz.cli.audit import AuditInputError, scrape_vllm

    with pytest.raises((AuditInputError, ValueError)) as e:
        scrape_vllm(url)
    assert "S3CRETPW" not in str(e.value) and "\x1b" not in str(e.value)
    assert "cannot read /metrics" in str(e.value) or "--vllm: expected" in str(e.value)
