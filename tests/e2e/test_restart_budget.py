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
def rig(root: Path, budget: Decimal | None = BUDGET) -> Iterator[Rig]:
    """The rig for one key, with a `total` budget (None: a key without limits)."""
    ports = PORTS
    logs = root / "logs"
    logs.mkdir()
    sim_port, listen = ports.free_port(), f"127.0.0.1:{ports.free_port()}"
    path = write_policy(
        root, f"http://127.0.0.1:{sim_port}", listen=listen,
        services={"grpc_listen": f"127.0.0.1:{ports.free_port()}",
                  "http_listen": f"127.0.0.1:{ports.free_port()}"},
        envoy={"admin_listen": f"127.0.0.1:{ports.free_port()}"},
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


def streams_in_flight(r: Rig, n: int) -> list[threading.Thread]:
    """`n` slow streams, each admitted (its hold taken) before this returns."""
    admitted = threading.Semaphore(0)

    def one() -> None:
        stream = r.chat(max_tokens=100, stream=True, extra_headers={"x-sim-tpot-ms": "100"})
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
