"""The services stopping (SIGTERM of `serve`) with a stream open past the grace period,
through the real servicer and server (grace 1 s here): the server cancels the stream and
Envoy serves the rest unmetered (on_metering_loss: serve), so the record charges the
whole hold with the backend's status, as the lost-hold sweep would. A client that leaves
during the grace is still a 499 with what was seen."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.state.usage.records import USAGE_FILE, USAGE_STREAM, read_records
from authz.state.usage.redis_sink import read_stream
from policy.endpoints import lookup
from policy.request import parse_request
from policy.stream_pace import ABORT_STEPS
from tests.grpc_harness import Running, serve_policy
from tests.redis_server import RedisServer
from tests.services.test_ext_proc import (
    CHAT,
    STREAM,
    Stream,
    admit,
    records,
    req_body,
    resp_body,
)

BODY = {**CHAT, "stream": True, "max_tokens": 100}


def bounds(running: Running) -> tuple[int, int]:
    endpoint = lookup("POST", "/v1/chat/completions")
    assert endpoint is not None
    req = parse_request(json.dumps(BODY).encode(), endpoint,
                        running.services.runtime.snapshot.config)
    return req.prompt_bound, req.completion_bound


async def test_a_stream_open_past_the_grace_is_charged_its_whole_hold(
        running: Running) -> None:
    s = Stream(running)
    await admit(s, BODY, rid="open-1")
    await s.send(resp_body(STREAM[:150], end=False))  # one content chunk seen
    t0 = time.monotonic()
    await running.services.stop()
    assert time.monotonic() - t0 >= running.services.grace_s - 0.1
    [rec] = list(read_records(running.data_dir / USAGE_FILE))
    prompt, completion = bounds(running)
    assert (rec["request_id"], rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"]) == ("open-1", 200, prompt, completion, True)


@pytest.fixture
async def cut_on_loss(tmp_path: Path) -> AsyncIterator[Running]:
    async with serve_policy(tmp_path, envoy={"on_metering_loss": "cut"}) as r:
        yield r


async def test_with_on_metering_loss_cut_the_rest_is_not_served(
        cut_on_loss: Running) -> None:
    """Envoy resets the stream when the services go: what was seen, estimated."""
    s = Stream(cut_on_loss)
    await admit(s, BODY, rid="open-2")
    await s.send(resp_body(STREAM[:150], end=False))
    await cut_on_loss.services.stop()
    [rec] = list(read_records(cut_on_loss.data_dir / USAGE_FILE))
    assert (rec["completion_tokens"], rec["estimated"]) == (1 + ABORT_STEPS, True)


async def test_a_client_gone_during_the_grace_is_a_499(running: Running) -> None:
    s = Stream(running)
    await admit(s, BODY, rid="gone-1")
    await s.send(resp_body(STREAM[:150], end=False))
    stopping = asyncio.create_task(running.services.stop())
    await asyncio.sleep(0.1)
    s.call.cancel()  # Envoy drops the stream: its client went away
    [rec] = await records(running, 1)
    await stopping
    assert (rec["request_id"], rec["status"], rec["completion_tokens"], rec["estimated"]) == (
        "gone-1", 499, 1 + ABORT_STEPS, True)


class _Undeliverable:
    """A stream whose answer cannot be written: Envoy reset it while the servicer admitted
    (its message timeout passed, or its client left)."""

    def __init__(self, msg: Any) -> None:
        self._msgs = [msg]

    async def read(self) -> Any:
        return self._msgs.pop() if self._msgs else grpc.aio.EOF

    async def write(self, _: Any) -> None:
        raise asyncio.CancelledError


async def test_an_admission_whose_answer_never_reached_envoy_charges_nothing(
        running: Running) -> None:
    """No backend had the request (only the answer names its cluster): a record with
    nothing charged, and nothing left held (the key has a concurrency slot of 1)."""
    servicer = running.services._ext_proc
    assert servicer is not None
    body = json.dumps({**CHAT, "max_tokens": 10}).encode()
    with pytest.raises(asyncio.CancelledError):
        await servicer.Process(None, _Undeliverable(req_body(body, "k-metered", "lost-1")))
    [rec] = await records(running, 1)
    assert (rec["request_id"], rec["status"], rec["total_tokens"], rec["cost_usd"],
            rec["estimated"]) == ("lost-1", 499, 0, "0", False)
    s = Stream(running)  # the slot is free again
    await admit(s, {**CHAT, "max_tokens": 10}, "k-metered", "next-1")


class _ResetAfterLast:
    """Envoy resets the stream the moment it has the last answer: the servicer's write of
    that answer is cancelled although the answer went out (grpc.aio cancels the handler)."""

    def __init__(self, *msgs: Any) -> None:
        self._msgs = list(reversed(msgs))

    async def read(self) -> Any:
        return self._msgs.pop() if self._msgs else grpc.aio.EOF

    async def write(self, _: Any) -> None:
        if not self._msgs:
            raise asyncio.CancelledError


async def test_a_reset_right_after_the_last_answer_still_records_and_settles(
        running: Running) -> None:
    """A stream that ended without usage needs its prompt counted before its record is
    written: a reset landing as its last answer is written must not lose that record (it
    was left to the lost-hold sweep, with the key's concurrency slot held until then)."""
    servicer = running.services._ext_proc
    assert servicer is not None
    body = json.dumps({**BODY, "max_tokens": 10}).encode()
    no_usage = STREAM[:STREAM.index(b'data: {"choices": []')]
    with pytest.raises(asyncio.CancelledError):
        await servicer.Process(None, _ResetAfterLast(req_body(body, "k-metered", "reset-1"),
                                                     resp_body(no_usage)))
    [rec] = await records(running, 1)
    assert (rec["request_id"], rec["status"], rec["completion_tokens"],
            rec["estimated"]) == ("reset-1", 200, 2, True)
    s = Stream(running)  # the slot is free again
    await admit(s, {**CHAT, "max_tokens": 10}, "k-metered", "next-2")


async def test_the_drain_waits_for_work_started_while_it_drains(running: Running) -> None:
    """A stream Envoy metered whose report comes during the drain starts its prompt
    count then, which writes the record and settles: the drain waits for that too (it
    waited only for the work under way when it began, and the record was written to a
    closed log, or never)."""
    ext = running.services._ext_proc
    assert ext is not None
    done: list[str] = []

    async def recount() -> None:
        await asyncio.sleep(0.3)
        done.append("recorded and settled")

    async def report() -> None:
        await asyncio.sleep(0.1)
        ext._apart(recount())

    ext._apart(report())
    await ext.drain(5.0)
    assert done == ["recorded and settled"]


async def test_a_hurried_stop_leaves_what_is_unrecorded_to_the_sweep(
        tmp_path: Path) -> None:
    """A second stop signal (`Services.hurry`) while the stop waits on its grace: the
    stream still open gets no record from the stopping process (it was charged its whole
    hold as a `200`, after the grace); its hold stays in the journal, and the next start
    charges it in full with one `lost` record. A request that ended before is recorded
    and settled as ever: one record each, the ledger their sum, nothing reserved."""
    async with serve_policy(tmp_path) as running:
        s = Stream(running)
        await admit(s, {**CHAT, "max_tokens": 10}, "k-metered", "done-1")
        await s.send(resp_body(STREAM))  # ended: recorded, settled
        assert await hurried_with_one_open_stream(running, "open-1") == 1
        assert [r["request_id"] for r in read_records(running.data_dir / USAGE_FILE)] \
            == ["done-1"]
    async with serve_policy(tmp_path) as again:  # the journal's hold: swept at the start
        recs = {r["request_id"]: r for r in read_records(again.data_dir / USAGE_FILE)}
        assert sorted(recs) == ["done-1", "open-1"]
        prompt, completion = bounds(again)
        assert (recs["open-1"]["status"], recs["open-1"]["prompt_tokens"],
                recs["open-1"]["completion_tokens"]) == ("lost", prompt, completion)
        store = again.services.limits
        assert store is not None
        assert await store.budget("k-metered", "acme", "total", time.time()) == (
            int(Decimal(recs["done-1"]["cost_usd"]) * 10**9), 0)


async def hurried_with_one_open_stream(running: Running, rid: str) -> int:
    """A stream of k-main admitted as `rid`, one content chunk seen, then the stop and,
    into its grace (1 s), the hurry; the requests it left to the lost-hold sweep."""
    open_ = Stream(running)
    await admit(open_, BODY, "k-main", rid)
    await open_.send(resp_body(STREAM[:150], end=False))
    stop = asyncio.create_task(running.services.stop())
    await asyncio.wait({stop}, timeout=0.2)  # a hurry before it cuts the grace all the same
    running.services.hurry()
    await stop
    assert running.services._ext_proc is not None
    return running.services._ext_proc.left_to_sweep


async def test_a_hurried_stop_records_what_no_store_holds(
        tmp_path: Path, own_redis: RedisServer) -> None:
    """A request admitted while Redis was away holds nothing there (a key without
    limits is admitted unheld; fail_open limits under the local limiter): no sweep will
    ever record it. A hurried stop must not leave it to the sweep: it gets its record
    from the stopping process (its whole hold, as a stream cut by a stop), else it would
    have none at all."""
    async with serve_policy(tmp_path, state=own_redis.url) as running:
        own_redis.stop()
        # k-main has no limits: admitted unheld
        assert await hurried_with_one_open_stream(running, "away-1") == 0
    own_redis.start()
    async with serve_policy(tmp_path, state=own_redis.url):  # delivers the spooled records
        deadline = time.monotonic() + 10
        while not (recs := await read_stream(own_redis.url, USAGE_STREAM)):
            assert time.monotonic() < deadline, "no record delivered"
            await asyncio.sleep(0.1)
    prompt, completion = bounds(running)
    assert [(r["request_id"], r["prompt_tokens"], r["completion_tokens"], r["estimated"])
            for r in recs] == [("away-1", prompt, completion, True)]
