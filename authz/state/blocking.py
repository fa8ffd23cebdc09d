"""Blocking work off the event loop, in a daemon thread of its own.

A read that never returns (a stalled network mount, a named pipe nobody writes) must not
hold up the event loop, which answers every Envoy decision, nor the process's exit, which
waits for the default executor's threads: such reads run here, one thread each."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[[], T], name: str = "tokenbooth-read") -> T:
    """`fn()` in a new daemon thread; its result (or exception) handed back on the loop.
    Cancelling the await leaves the thread to finish on its own; its result is dropped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as e:  # handed to the awaiting task
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
