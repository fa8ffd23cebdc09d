"""Client-sized work (decoding, bounding and re-encoding a request body) off the event
loop when the body is large.

A 1 MiB body of 250,000 one-letter prompts, messages or tool calls costs 40-80 ms of
CPU to bound (a usual body ~10 us), and on the event loop every other decision of the
process waits that long: two dozen such requests at once, from any one key (admission
comes after the bounds, so a key over its rate limit too), stalled every request past
Envoy's 2 s decision timeout. Past `OFF_LOOP_BYTES` the work runs in one worker thread
instead; the loop takes the GIL back at each switch interval (5 ms), so other requests
keep being decided. One thread, not a pool: heavy bodies wait for each other, and the
loop competes with one thread for the GIL, not with many.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# Under this a body costs at most a few ms to bound, whatever it holds: cheaper on the
# loop than a thread hand-off.
OFF_LOOP_BYTES = 64 << 10
# Threads start on first use (none in a process that never sees a large body).
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenbooth-body")


async def sized_work(size: int, work: Callable[[], T]) -> T:
    """`work()`, on the loop when `size` (the body's bytes) is small, else in the body
    thread; its exceptions (a refusal) are raised here either way."""
    if size <= OFF_LOOP_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(_WORKER, work)
