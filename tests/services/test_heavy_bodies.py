"""A large body is bounded off the event loop: 250,000 one-letter messages cost ~40 ms of
CPU to bound, and on the loop every other decision of the process waited that long."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from authz.services import heavy, lifecycle
from tests.grpc_harness import serve_policy
from tests.services.test_ext_proc import CHAT, Stream, immediate, req_body

LIMIT = 1 << 20


def many_messages(size: int) -> bytes:
    """A chat body of about `size` bytes made of empty user messages (the costliest
    shape to bound per byte)."""
    one = {"role": "user", "content": ""}
    n = (size - 100) // (len(json.dumps(one)) + 2)
    return json.dumps({"model": "demo", "messages": [one] * n}).encode()


@pytest.fixture
def parse_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads the real parser ran in, in order."""
    seen: list[str] = []
    real: Callable[..., Any] = lifecycle.parse_request

    def spy(*args: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(lifecycle, "parse_request", spy)
    return seen


async def test_large_body_is_bounded_off_the_event_loop(
    tmp_path: Path, parse_threads: list[str]
) -> None:
    async with serve_policy(tmp_path, max_request_body_bytes=LIMIT) as running:
        loop_thread = threading.current_thread().name
        big = many_messages(LIMIT)
        assert heavy.OFF_LOOP_BYTES < len(big) <= LIMIT
        s = Stream(running)
        r = await s.send(req_body(big, rid="big"))
        assert r.HasField("request_body"), immediate(r)  # admitted, forwarded
        await s.close()
        small = Stream(running)
        r = await small.send(req_body(json.dumps(CHAT).encode(), rid="small"))
        assert r.HasField("request_body"), immediate(r)
        await small.close()
        assert len(parse_threads) == 2
        assert parse_threads[0] != loop_thread  # the large one in the body thread
        assert parse_threads[1] == loop_thread  # a usual one costs no hand-off


async def test_refusal_of_a_large_body_comes_back_from_the_thread(tmp_path: Path) -> None:
    async with serve_policy(tmp_path, max_request_body_bytes=LIMIT) as running:
        raw = json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}],
                          "pad": "p" * (heavy.OFF_LOOP_BYTES * 2)}).encode()
        status, body = immediate(await Stream(running).send(req_body(raw, rid="bad")))
        assert (status, body["error"]["code"]) == (404, "model_not_found")


async def test_the_loop_runs_while_a_large_body_is_bounded() -> None:
    """Other tasks get turns while the body thread works (on the loop: none at all)."""
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    def work() -> int:
        return sum(range(2_000_000))

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    assert await heavy.sized_work(heavy.OFF_LOOP_BYTES + 1, work) == sum(range(2_000_000))
    during_thread = ticks - before
    before = ticks
    assert await heavy.sized_work(10, work) == sum(range(2_000_000))
    during_inline = ticks - before
    stop.set()
    await task
    assert during_thread >= 1
    assert during_inline == 0
