"""authz/services/stalls.py: gaps between ticks, on a hand-driven clock."""

from __future__ import annotations

import asyncio

from authz.services.stalls import MIN_GAP_S, WAKE_S, Stalls


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def test_a_gap_counts_for_the_streams_it_overlaps() -> None:
    clock = Clock()
    s = Stalls(tick_s=0.1, clock=clock)
    s.start()
    try:
        for _ in range(5):  # ticking on time: no gap
            clock.t += 0.1
            s.tick()
        assert not s.just_woke(0.0, 0.5)
        clock.t += 3.0  # stopped for 3 s
        assert s.just_woke(100.2, 2.0)  # seen before the ticker runs again
        s.tick()
        clock.t += 0.1
        s.tick()
        assert s.just_woke(100.2, 2.0) and not s.just_woke(100.2, 3.5)
        assert not s.just_woke(clock.t - 0.05, 2.0)  # a stream begun after the gap
        assert s.just_woke(clock.t - 2.5, 2.0)  # one begun within it: 2.4 s of it count
        assert not s.just_woke(clock.t - 1.5, 2.0)  # 1.4 s of it: shorter than the timeout
        clock.t += WAKE_S  # a stream that ends this long after the wake: not the gap's
        s.tick()
        assert not s.just_woke(100.2, 2.0)
    finally:
        await s.close()


async def test_short_gaps_and_a_stopped_ticker_count_nothing() -> None:
    clock = Clock()
    s = Stalls(tick_s=0.1, clock=clock)
    assert not s.just_woke(0.0, 0.1)  # never started
    s.start()
    clock.t += 0.1 + MIN_GAP_S / 2
    s.tick()
    assert not s.just_woke(0.0, MIN_GAP_S / 4)  # below MIN_GAP_S: not kept
    await s.close()
    clock.t += 10
    assert not s.just_woke(0.0, 1.0)


async def test_the_ticker_runs_on_the_loop() -> None:
    s = Stalls(tick_s=0.01)
    s.start()
    s.start()  # idempotent
    await asyncio.sleep(0.05)
    assert not s.just_woke(0.0, 0.5)
    await s.close()


async def test_a_gap_past_a_short_decision_timeout_counts() -> None:
    """With a 20 ms decision timeout, a 0.3 s stall lets Envoy give up on a message: it
    is kept (it was not, under half a second, and the cut read as the client's: review)."""
    clock = Clock()
    s = Stalls(tick_s=0.1, clock=clock)
    s.start()
    try:
        clock.t += 0.1 + 0.3
        s.tick()
        assert s.just_woke(clock.t - 1.0, 0.02)
        assert not s.just_woke(clock.t - 1.0, 0.5)
    finally:
        await s.close()
