"""A config reload while requests are in flight: each ends under the config it was
admitted with (its hold was computed from it), the next ones under the new one."""

from __future__ import annotations

import asyncio
import json
import time

import yaml

from tests.grpc_harness import Running
from tests.services.test_ext_proc import CHAT, Stream, admit, records, req_body, resp_body

USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}


async def _answer(s: Stream) -> None:
    body = json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode()
    await s.send(resp_body(body, end=True))
    await s.close()


async def test_a_price_changed_mid_request_charges_the_price_it_was_held_at(
        running: Running) -> None:
    """The hold is a bound at the admission's prices; charging a raised price at the end
    would pass it (and the budget it was checked against)."""
    first = Stream(running)
    await admit(first, {**CHAT, "max_tokens": 5}, key_id="k-metered", rid="before")
    data = yaml.safe_load(running.config_path.read_text())
    data["models"]["demo"]["price_per_1k_tokens"] = {"input": "5", "output": "15"}
    running.config_path.write_text(yaml.safe_dump(data))
    rt = running.services.runtime
    deadline = time.monotonic() + 5
    while rt.snapshot.config.models["demo"].price_per_1k_tokens.input != 5:
        assert time.monotonic() < deadline, "the reload never came"
        await asyncio.sleep(0.1)
    await _answer(first)
    await records(running, 1)
    second = Stream(running)  # this key takes one request at a time
    for _ in range(100):
        r = await second.send(req_body(json.dumps({**CHAT, "max_tokens": 5}).encode(),
                                       "k-metered", "after"))
        if r.HasField("request_body"):
            break
        await asyncio.sleep(0.02)  # the first one's settlement trails its record
        second = Stream(running)
    await _answer(second)
    recs = {r["request_id"]: r for r in await records(running, 2)}
    assert recs["before"]["cost_usd"] == "0.013"  # 11 * 0.50/1k + 5 * 1.50/1k
    assert recs["after"]["cost_usd"] == "0.13"  # 11 * 5/1k + 5 * 15/1k
    limits = running.services.limits
    assert limits is not None
    for _ in range(100):  # the settlements trail the records
        spent, reserved = await limits.budget("k-metered", "acme", "total", time.time())
        if reserved == 0:
            break
        await asyncio.sleep(0.02)
    assert (spent, reserved) == (143_000_000, 0)  # $0.013 + $0.13, in nano-USD
