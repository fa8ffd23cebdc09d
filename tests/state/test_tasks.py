"""Stopping background tasks (authz/state/tasks.py) when a cancel is lost."""

from __future__ import annotations

import asyncio
import logging

import pytest

from authz.state.keys.redis_store import connect
from authz.state.orgs import OrgLimitsCache, RedisOrgStore
from authz.state.tasks import cancel_and_wait
from tests.redis_server import RedisServer


def _deaf(cancels: list[int], ignore: list[int]) -> asyncio.Task[None]:
    """A polling loop that swallows its first `ignore[0]` cancels (read at each one)."""
    async def poll() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) > ignore[0]:
                    raise
    return asyncio.create_task(poll(), name="deaf-poller")


async def test_a_swallowed_cancel_is_sent_again() -> None:
    cancels: list[int] = []
    task = _deaf(cancels, [3])
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task), 2.0)
    assert task.cancelled() and len(cancels) == 4


async def test_a_task_that_never_ends_is_left_after_the_bound(
        caplog: pytest.LogCaptureFixture) -> None:
    cancels: list[int] = []
    ignore = [10**9]
    task = _deaf(cancels, ignore)
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, "tokenbooth.tasks"):
        await asyncio.wait_for(cancel_and_wait(task, limit_s=0.3), 2.0)
    assert not task.done() and len(cancels) >= 3
    assert "did not stop within 0s; left running: deaf-poller" in caplog.text
    ignore[0] = 0  # this test's own clean-up: the next cancel lands
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_failed_task_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise RuntimeError("the poller broke")
    task = asyncio.create_task(fail(), name="broken")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, "tokenbooth.tasks"):
        await cancel_and_wait(task, None)
    assert "background task broken had failed: the poller broke" in caplog.text


async def test_a_loop_of_redis_calls_always_stops(own_redis: RedisServer) -> None:
    """The real case: on Python 3.11 a cancel landing as a redis-py call completes can
    come back as its answer (asyncio.wait_for, gh-86296); a plain cancel-and-await then
    hangs. Over many stops at every point of the call, each one ends."""
    client = connect(own_redis.url, 1.0)
    try:
        for turn in range(100):
            task = asyncio.create_task(_get_forever(client))
            for _ in range(turn % 7):
                await asyncio.sleep(0)
            await asyncio.wait_for(cancel_and_wait(task), 3.0)
            assert task.done()
    finally:
        await client.aclose()


async def _get_forever(client: object) -> None:
    while True:
        await client.get("x")  # type: ignore[attr-defined]


async def test_the_org_limits_poller_closes_while_in_a_redis_call(
        own_redis: RedisServer) -> None:
    """Its close used to cancel once and await: the CI hang of one admin-API test's
    teardown, the poller polling on (a dead Redis, later) in every test after it."""
    for _ in range(30):
        cache = OrgLimitsCache(RedisOrgStore(own_redis.url), poll_s=0)
        await cache.start()
        await asyncio.sleep(0.002)  # the poller mid-call or between calls
        await asyncio.wait_for(cache.close(), 3.0)
