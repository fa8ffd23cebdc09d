"""When this process stopped running: SIGSTOP, a frozen VM or container, an event loop
blocked. Envoy's ext_proc gives up on a message after its message timeout and, failing
open (`on_metering_loss: serve`), serves the rest of that response unmetered; a stream
the services find cut on waking from such a stall was served out of their sight, not left
by its client (one that ends later, after more of its messages were handled, was not: a
stall with no message of its waiting never reaches Envoy's timeout). A ticker notes
every gap between its ticks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from policy.config import MIN_DECISION_TIMEOUT_MS

TICK_S = 0.1
# Gaps shorter than the shortest decision timeout are not kept (a longer one lets Envoy
# give up on a message: one of 0.3 s at a 20 ms timeout was read as the client leaving,
# review); `just_woke` asks for gaps of at least the timeout in force.
MIN_GAP_S = MIN_DECISION_TIMEOUT_MS / 1000
# How soon after waking a stream must end for the gap to be why: Envoy's reset and the
# stream's queued messages are all handled right away.
WAKE_S = 1.0


class Stalls:
    def __init__(self, tick_s: float = TICK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tick_s = tick_s
        self._clock = clock
        self._last: float | None = None  # the last tick (None: not running)
        self._gaps: deque[tuple[float, float]] = deque(maxlen=64)  # (start, end)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Tick on the running loop (idempotent)."""
        if self._task is None:
            self._last = self._clock()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="stalls")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task, self._last = None, None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            self.tick()

    def tick(self) -> None:
        now = self._clock()
        if self._last is not None and now - self._last - self._tick_s >= MIN_GAP_S:
            self._gaps.append((self._last, now))
        self._last = now

    def just_woke(self, t0: float, min_s: float, within_s: float = WAKE_S) -> bool:
        """Whether the process has just woken (at most `within_s` ago) from standing
        still for `min_s` or more after `t0` (a gap still open counts: the ticker may not
        have run since). A stream that Envoy gave up on in such a gap is found cancelled
        on waking, with whatever it had queued; one whose client leaves later is not."""
        if self._last is None:
            return False
        now = self._clock()
        if now - self._last - self._tick_s >= min_s:
            return True
        return any(end > t0 and end - max(start, t0) >= min_s and now - end <= within_s
                   for start, end in self._gaps)
