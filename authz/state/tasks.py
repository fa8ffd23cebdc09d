"""Stopping background tasks for sure.

A cancel can be lost. On Python 3.11, `asyncio.wait_for` returns the inner result when
the cancel arrives as the inner call completes (CPython gh-86296, fixed in 3.12), and
redis-py wraps every write of a client with a socket timeout in it: measured here, about
one cancel in four landing in a Redis GET came back as the GET's answer. A polling loop
then goes round again, and `task.cancel(); await task` waits forever: a stop (SIGTERM, a
store's close) that never ends while the loop polls on. `cancel_and_wait` cancels again
until the task has ended, within a bound."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("tokenbooth.tasks")

RECANCEL_S = 0.05  # how long one cancel is given before the next
LIMIT_S = 10.0  # then the task is left running (logged): a stop must end


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None,
                          limit_s: float = LIMIT_S) -> None:
    """Cancel each task, again every RECANCEL_S until it has ended (at most `limit_s`).
    A task that had failed before has its error logged here (nobody else awaits it)."""
    given = [t for t in tasks if t is not None]
    pending = {t for t in given if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        if pending and loop.time() >= deadline:
            log.warning("background tasks did not stop within %.0fs; left running: %s",
                        limit_s, ", ".join(sorted(_name(t) for t in pending)))
            break
    for task in given:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            log.warning("background task %s had failed: %s", _name(task), error,
                        exc_info=error)


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
