"""Fault test: `tokenbooth serve` with `state: memory` is SIGKILLed with streams in flight,
then with its key's `total` budget spent, and restarted each time (Envoy and the
upstream stay up). The budget stays spent (429 insufficient_quota), each stream in
flight at the kill has exactly one `lost` record at its full hold, and the ledger's
spend equals the sum of the records' costs, within the budget.

Needs the durable store for `state: memory` (authz/state/limits/factory.py returning
`durable.make_durable_memory_store`) and the lost-record material on `Ask.record`
(the lifecycle's asks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.bootstrap import render_yaml
from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.state.limits.durable import DurableMemoryLimitStore
from authz.state.usage.records import USAGE_FILE, read_records
from policy.config import load_config
from policy.keys import fingerprint
from policy.limits import usd_to_nano
from policy.usage import LOST
from tests.e2e.conftest import _backend_healthy
from tests.helpers import PORTS, write_policy

pytestmark = pytest.mark.e2e

KEY = "sk-tb-test-budget-0123456789abcdefghijklmnopqrs"
KEY_ID = "k-budget"
BUDGET = Decimal("5.00")  # each stream holds ~$0.45 (prompt bound + 100 output tokens)
MESSAGES = [{"role": "user", "content": "hello"}]


@dataclass
class Rig:
    """sim + Envoy, and a `tokenbooth serve` this test kills and restarts."""

    config: Path
    data_dir: Path
    side: str
    logs: Path
    client: openai.OpenAI
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    serve: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start_serve(self) -> None:
        self.starts += 1
        with (self.logs / f"serve-{self.starts}.log").open("wb") as log:
            self.serve = spawn([sys.executable, "-m", "authz.cli", "serve", "--config",
                                str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: http_ok(f"{self.side}/readyz"), "serve", alive=[self.serve])

    def kill_serve(self) -> None:
        assert self.serve is not None
        os.kill(self.serve.pid, signal.SIGKILL)
        self.serve.wait(10)

    def chat(self, **kw: Any) -> Any:
        return self.client.chat.completions.create(model="demo", messages=MESSAGES, **kw)


@contextlib.contextmanager
def rig(root: Path, budget: Decimal | None = BUDGET,
        envoy: dict[str, Any] | None = None) -> Iterator[Rig]:
    """The rig for one key, with a `total` budget (None: a key without limits);
    `envoy`: more of the config's `envoy` section."""
    ports = PORTS
    logs = root / "logs"
    logs.mkdir()
    sim_port, listen = ports.free_port(), f"127.0.0.1:{ports.free_port()}"
    path = write_policy(
        root, f"http://127.0.0.1:{sim_port}", listen=listen,
        services={"grpc_listen": f"127.0.0.1:{ports.free_port()}",
                  "http_listen": f"127.0.0.1:{ports.free_port()}"},
        envoy={"admin_listen": f"127.0.0.1:{ports.free_port()}", **(envoy or {})},
        keys=[{"id": KEY_ID, "org": "acme", "sha256": fingerprint(KEY),
               **({} if budget is None else {"budget_usd": str(budget),
                                             "budget_period": "total"})}],
    )
    cfg = load_config(path)
    (root / "envoy.yaml").write_text(render_yaml(cfg))
    client = openai.OpenAI(base_url=f"http://{listen}/v1", api_key=KEY, max_retries=0)
    r = Rig(path, cfg.data_dir, f"http://{cfg.services.http_listen}", logs, client)
    try:
        for name, argv in (
            ("sim", [sys.executable, "-m", "authz.cli", "sim", "--listen",
                     f"127.0.0.1:{sim_port}", "--model", "tiny-llama"]),
            ("envoy", [str(envoy_path()), "-c", str(root / "envoy.yaml"), "--log-level",
                       "warn", "--use-dynamic-base-id"]),
        ):
            with (logs / f"{name}.log").open("wb") as log:
                r.procs.append(spawn(argv, stdout=log, stderr=subprocess.STDOUT))
        r.start_serve()
        admin = f"http://{cfg.envoy.admin_listen}"
        wait_until(lambda: http_ok(f"{admin}/ready"), "envoy", timeout=60, alive=r.procs)
        wait_until(lambda: _backend_healthy(admin), "backend health", timeout=30,
                   alive=r.procs)
        yield r
    finally:
        client.close()
        stop([*([r.serve] if r.serve else []), *r.procs])


def streams_in_flight(r: Rig, n: int, tpot_ms: int = 100,
                      ids: list[str] | None = None) -> list[threading.Thread]:
    """`n` slow streams (100 tokens, `tpot_ms` each), each admitted (its hold taken) and
    answering before this returns; their request ids go into `ids`."""
    admitted = threading.Semaphore(0)

    def one() -> None:
        stream = r.chat(max_tokens=100, stream=True,
                        extra_headers={"x-sim-tpot-ms": str(tpot_ms)})
        if ids is not None:
            ids.append(stream.response.headers["x-request-id"])
        with contextlib.suppress(openai.APIError, ValueError):
            for i, _ in enumerate(stream):
                if i == 0:
                    admitted.release()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for _ in range(n):
        assert admitted.acquire(timeout=20), "a stream never started"
    return threads


def ledger(data_dir: Path) -> tuple[int, int]:
    """The key's (spent, reserved) in the state the stopped process left."""
    async def read() -> tuple[int, int]:
        store = DurableMemoryLimitStore(data_dir)
        await store.load()
        return await store.budget(KEY_ID, "acme", "total", time.time())
    return asyncio.run(read())


def test_sigkill_loses_no_spend_and_no_record(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        threads = streams_in_flight(r, 3)
        r.kill_serve()  # three streams in flight: Envoy may serve them unmetered
        r.start_serve()
        for t in threads:
            t.join(30)
        refused = None
        for _ in range(300):  # spend the rest of the budget
            try:
                r.chat(max_tokens=50)
            except openai.RateLimitError as e:
                refused = e
                break
        assert refused is not None and refused.code == "insufficient_quota"
        r.kill_serve()
        r.start_serve()
        with pytest.raises(openai.RateLimitError) as after:
            r.chat(max_tokens=50)  # what was refused before the kill
        assert after.value.code == "insufficient_quota"
        assert r.serve is not None
        stop([r.serve])  # SIGTERM: the final snapshot
        r.serve = None
    recs = [x for x in read_records(r.data_dir / USAGE_FILE) if x["key_id"] == KEY_ID]
    lost = [x for x in recs if x["status"] == LOST]
    assert len(lost) == 3 and all(x["estimated"] for x in lost)
    spent, reserved = ledger(r.data_dir)
    assert reserved == 0
    assert spent == sum(usd_to_nano(Decimal(x["cost_usd"])) for x in recs)
    assert spent <= usd_to_nano(BUDGET)


def test_sigkill_leaves_a_record_for_a_key_without_limits(tmp_path: Path) -> None:
    """Such a key's requests held nothing, so the streams in flight at the kill (Envoy
    served them on, unmetered) left no record at all: served and never billed. Each is
    held for its record now: one `lost` record each at the next start."""
    with rig(tmp_path, budget=None) as r:
        threads = streams_in_flight(r, 3)
        r.kill_serve()
        r.start_serve()
        for t in threads:
            t.join(30)
        r.chat(max_tokens=5)  # served after the restart: its real record
        assert r.serve is not None
        stop([r.serve])
        r.serve = None
    recs = [x for x in read_records(r.data_dir / USAGE_FILE) if x["key_id"] == KEY_ID]
    assert sorted(str(x["status"]) for x in recs) == ["200", LOST, LOST, LOST]
    assert all(x["estimated"] for x in recs if x["status"] == LOST)


def slow_streams_with_ids(r: Rig, n: int) -> tuple[list[str], list[threading.Thread]]:
    """`n` streams of ~30 s (past serve's 10 s grace), each admitted and answering before
    this returns; their request ids."""
    ids: list[str] = []
    return ids, streams_in_flight(r, n, 300, ids)


def test_a_second_sigterm_hurries_the_stop_and_loses_no_money(tmp_path: Path) -> None:
    """The first SIGTERM drains (streams get the 10 s grace); a second one stopped
    nothing sooner. Now it stops waiting: the three streams in flight get no record from
    the stopping process (Envoy serves them on, unmetered), their holds stay in the
    journal, and the next start charges each in full with one `lost` record; one line
    says so. After the restart: one record and one settlement per admitted request."""
    with rig(tmp_path) as r:
        ids, threads = slow_streams_with_ids(r, 3)
        serve, log = r.serve, r.logs / f"serve-{r.starts}.log"
        assert serve is not None
        serve.send_signal(signal.SIGTERM)
        wait_until(lambda: b"shutting down" in log.read_bytes(), "the first stop signal",
                   alive=[serve])
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        hurried = [line for line in log.read_bytes().splitlines() if b"hurried" in line]
        assert len(hurried) == 1 and b"3 request(s) in flight left to the lost-hold sweep" \
            in hurried[0], log.read_bytes()[-3000:]
        r.start_serve()  # the journal's holds: each charged in full, a `lost` record each
        for t in threads:
            t.join(60)
        assert r.serve is not None
        stop([r.serve])
        r.serve = None
    recs = [x for x in read_records(r.data_dir / USAGE_FILE) if x["key_id"] == KEY_ID]
    assert sorted(x["request_id"] for x in recs) == sorted(ids)  # one each
    assert all(x["status"] == LOST and x["estimated"] for x in recs), recs
    spent, reserved = ledger(r.data_dir)
    assert reserved == 0
    assert spent == sum(usd_to_nano(Decimal(x["cost_usd"])) for x in recs)  # one each


def test_streams_envoy_meters_are_recorded_when_up_stops_envoy_first(tmp_path: Path) -> None:
    """`stream_metering: envoy`, stopped as `up` stops (Envoy first, then the services):
    Envoy drops the reports of the streams it cuts, and the services exited with no
    record, leaving each hold to the next start, which charged it in full as `lost`
    (a tester: 558 prompt tokens for a 7-token prompt). Now the stopping services record
    each at once: its completion bound, its prompt as the backend (still up) counts it;
    settled, nothing left for the next start."""
    with rig(tmp_path, envoy={"stream_metering": "envoy"}) as r:
        ids, threads = slow_streams_with_ids(r, 3)
        envoy_proc, serve = r.procs[1], r.serve
        assert serve is not None
        stop([envoy_proc])
        stop([serve])
        r.serve = None
        for t in threads:
            t.join(60)
        recs = [x for x in read_records(r.data_dir / USAGE_FILE) if x["key_id"] == KEY_ID]
        assert sorted(x["request_id"] for x in recs) == sorted(ids)  # one each, at the stop
        assert all((x["status"], x["completion_tokens"], x["estimated"]) == (200, 100, True)
                   for x in recs), recs
        # The prompt as the simulator counts it (its /tokenize), far below its bound.
        assert all(x["prompt_tokens"] == recs[0]["prompt_tokens"] < x["prompt_bound"]
                   for x in recs), recs
        spent, reserved = ledger(r.data_dir)
        assert reserved == 0
        assert spent == sum(usd_to_nano(Decimal(x["cost_usd"])) for x in recs)
        r.start_serve()  # nothing left in the journal: no `lost` record
        time.sleep(1.0)
    recs = [x for x in read_records(r.data_dir / USAGE_FILE) if x["key_id"] == KEY_ID]
    assert len(recs) == 3 and not any(x["status"] == LOST for x in recs)
