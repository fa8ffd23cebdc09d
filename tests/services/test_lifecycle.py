"""The lifecycle's settlement contract, through the real servicer: a body that cannot be
forwarded is refused before anything is held, and an admitted request always ends in
exactly one record and one settlement.

The principal k-metered allows one request in flight (tests/services/test_ext_proc.py's
METERED), and so does its org here: a leaked hold shows as a refused next request.
"""

from __future__ import annotations

import ast
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from authz.envoy_config.http_filters import rewritten_body_limit
from authz.services import lifecycle
from authz.state.limits.admission import Admission
from tests.grpc_harness import Running, serve_policy
from tests.services.test_ext_proc import CHAT, Stream, immediate, records, req_body

BODY_LIMIT = 32 << 10


@pytest.fixture
async def one_slot(tmp_path: Path) -> AsyncIterator[Running]:
    async with serve_policy(tmp_path, orgs={"acme": {"max_concurrent": 1}},
                            max_request_body_bytes=BODY_LIMIT) as r:
        yield r


def with_field(name: str, raw_value: bytes) -> bytes:
    """CHAT with one more top-level field, written as raw JSON."""
    return json.dumps(CHAT).encode()[:-1] + f', "{name}": '.encode() + raw_value + b"}"


async def send(running: Running, raw: bytes, rid: str) -> Any:
    return await Stream(running).send(req_body(raw, "k-metered", rid))


async def assert_nothing_held(running: Running) -> None:
    """No budget reserved or spent, and the one slot is free: a normal request gets in."""
    store = running.services.limits
    assert store is not None
    now = running.services.runtime.clock().timestamp()
    for _ in range(100):  # a settlement after a cancelled stream runs as its own task
        if await store.budget("k-metered", "acme", "total", now) == (0, 0):
            break
        await asyncio.sleep(0.02)
    assert await store.budget("k-metered", "acme", "total", now) == (0, 0)
    r = await send(running, json.dumps(CHAT).encode(), "after")
    assert r.HasField("request_body"), immediate(r)


async def test_too_deeply_nested_body_is_refused_before_admission(one_slot: Running) -> None:
    # 500 deep: within what the JSON decoder accepts, past what the encoder writes.
    raw = with_field("metadata", b"[" * 500 + b"]" * 500)
    status, body = immediate(await send(one_slot, raw, "deep"))
    assert (status, body["error"]["code"], body["error"]["type"]) == (
        400, "invalid_request", "invalid_request_error")
    assert "nested" in body["error"]["message"]
    await assert_nothing_held(one_slot)
    assert await records(one_slot, 0) == []


async def test_body_too_large_once_rewritten_is_refused_before_admission(
    one_slot: Running,
) -> None:
    # `1e15` (4 bytes) is re-encoded as `1000000000000000.0` (18): under the request
    # limit as sent, past Envoy's buffer for the rewritten body.
    raw = with_field("metadata", b"[" + b",".join([b"1e15"] * 6000) + b"]")
    assert len(raw) < BODY_LIMIT
    status, body = immediate(await send(one_slot, raw, "big"))
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert "too large once rewritten" in body["error"]["message"]
    await assert_nothing_held(one_slot)
    assert await records(one_slot, 0) == []


async def test_a_failure_after_admission_still_records_and_settles(
    one_slot: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(_: object) -> list[tuple[str, str]]:
        raise RuntimeError("injected")

    monkeypatch.setattr(lifecycle, "rate_headers", broken)
    status, body = immediate(await send(one_slot, json.dumps(CHAT).encode(), "broken"))
    assert (status, body["error"]["code"]) == (500, "internal_error")
    monkeypatch.undo()
    [rec] = await records(one_slot, 1)
    assert (rec["request_id"], rec["status"], rec["total_tokens"], rec["estimated"]) == (
        "broken", 500, 0, False)
    await assert_nothing_held(one_slot)


async def test_a_stream_cancelled_during_admission_settles_at_zero(
    one_slot: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store admitted, but the stream went away before its answer came back."""
    admitted = asyncio.Event()
    real = Admission.admit_all

    async def slow(self: Admission, *args: Any) -> Any:
        decision = await real(self, *args)
        admitted.set()
        await asyncio.Event().wait()  # the answer never comes back
        return decision

    monkeypatch.setattr(Admission, "admit_all", slow)
    s = Stream(one_slot)
    await s.call.write(req_body(json.dumps(CHAT).encode(), "k-metered", "cut"))
    await asyncio.wait_for(admitted.wait(), 5)
    s.call.cancel()
    monkeypatch.undo()
    await assert_nothing_held(one_slot)
    assert await records(one_slot, 0) == []  # not admitted as far as anyone saw


async def test_rewrite_slack_matches_envoys_hold_buffer(one_slot: Running) -> None:
    cfg = one_slot.services.runtime.snapshot.config
    assert cfg.max_request_body_bytes + lifecycle.REWRITE_SLACK == rewritten_body_limit(cfg)


def test_lifecycle_knows_no_protobuf() -> None:
    tree = ast.parse(Path(lifecycle.__file__).read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert modules  # the test read the real module
    assert [m for m in modules if m.split(".")[0] in ("grpc", "google", "envoy")
            or m == "authz.services.protos" or m.startswith("authz.envoy_config")] == []

