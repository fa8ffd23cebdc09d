"""What a cut stream's backend could generate while no chunk came (policy/stream_pace.py),
on an injected clock."""

from __future__ import annotations

import math

import pytest

from policy.stream_pace import ABORT_STEPS, HEADROOM, StreamPace


def paced(*chunks: tuple[float, int, bool], stall_s: float = 2.0) -> StreamPace:
    pace = StreamPace(stall_s)
    for at, tokens, opened in chunks:
        pace.chunk(at, tokens, opened)
    return pace


def steady(n: int, step: float = 0.05, start: float = 0.0) -> list[tuple[float, int, bool]]:
    return [(start + i * step, 1, i == 0) for i in range(n)]


def test_a_stream_read_at_its_pace_has_nothing_unseen() -> None:
    pace = paced(*steady(40))
    assert pace.rate(40) == pytest.approx(20.0)
    # Cut 50 ms after its last chunk: the step vLLM could take before it saw the cut.
    assert pace.unseen(40 * 0.05, 40) == math.ceil(0.05 * 20 * HEADROOM)
    assert pace.unseen(39 * 0.05, 40) == 0


def test_a_pause_is_charged_at_the_pace_kept_between_pauses() -> None:
    """Chunks every 50 ms (20 a second), then 3 s without one, one more, the cut: the 3 s
    at twice that pace."""
    pace = paced(*steady(20), (0.95 + 3.0, 1, False))
    assert pace.debt_s == 3.0
    assert pace.unseen(0.95 + 3.0 + 0.01, 21) == pytest.approx(3.0 * 20 * HEADROOM, abs=1)


def test_the_silence_before_the_cut_counts_too() -> None:
    """However short: a client that stopped reading and left 1.9 s later paid for none of
    what vLLM generated into the buffers meanwhile (stall_s is for pauses it then read
    past)."""
    pace = paced(*steady(20))
    assert pace.unseen(0.95 + 1.9, 20) == pytest.approx(1.9 * 20 * HEADROOM, abs=1)
    assert pace.unseen(0.95 + 2.5, 20) == pytest.approx(2.5 * 20 * HEADROOM, abs=1)
    # One chunk and a moment: nothing to measure a pace by, and no pause owes the bound.
    assert paced((0.0, 1, True)).unseen(0.5, 1) == 0


def test_a_batch_pause_is_charged_for_every_sequence_it_may_run() -> None:
    """Eight prompts scheduled one after another: one ran while the pace was measured,
    all eight may run in the pause."""
    pace = StreamPace(2.0, sequences=8)
    for at, tokens, opened in steady(20):
        pace.chunk(at, tokens, opened)
    assert pace.unseen(0.95 + 8.0, 20) == pytest.approx(8.0 * 20 * 8 * HEADROOM, abs=1)
    # All eight open when it was measured: their pace is the measured one.
    pace = StreamPace(2.0, sequences=8)
    for i in range(20):
        for c in range(8):
            pace.chunk(i * 0.05 + c * 0.001, 1, i == 0)
    assert pace.unseen(0.957 + 8.0, 160) == pytest.approx(
        8.0 * pace.rate(160) * HEADROOM, abs=2)


def test_a_choice_opened_after_a_long_prefill_is_no_pause() -> None:
    """A batch's next prompt begins after its prefill: its first chunk opens a choice."""
    pace = paced(*steady(16), (0.75 + 3.0, 1, True), (0.75 + 3.05, 1, False))
    assert pace.debt_s == 0
    assert pace.unseen(0.75 + 3.05, 18) == 0


def test_a_choice_whose_first_chunk_carries_merged_steps_keeps_the_pause() -> None:
    """A prompt that began while the reader paused: its first chunk carries what vLLM
    generated meanwhile (a tester paid 2,009 of 4,661 tokens read): not a prefill."""
    pace = StreamPace(2.0)
    for at, tokens, opened in steady(16):
        pace.chunk(at, tokens, opened)
    pace.chunk(0.75 + 3.0, 41, opened=1, steps=1, merged=True)
    assert pace.debt_s == pytest.approx(3.0 - 40 / 20)  # the 40 merged paid 2 s of it


def test_the_wait_for_the_first_chunk_is_no_pause() -> None:
    pace = paced(*steady(5, start=30.0))
    assert pace.unseen(30.0 + 0.2, 5) == 0


def test_a_pause_with_no_pace_to_measure_is_unknown() -> None:
    """One chunk, then silence: nothing says how fast the backend goes (the bound)."""
    assert paced((0.0, 1, True)).unseen(5.0, 1) is None
    assert paced((0.0, 0, True)).unseen(5.0, 0) == 0  # no tokens yet: not begun


def test_chunks_that_all_came_after_long_gaps_use_the_whole_streams_pace() -> None:
    """A large stream_interval: a chunk of 64 tokens every 2.1 s."""
    pace = paced(*[(i * 2.1, 64, i == 0) for i in range(5)])
    rate = 5 * 64 / (4 * 2.1)
    assert pace.rate(5 * 64) == pytest.approx(rate)
    assert pace.unseen(4 * 2.1, 5 * 64) == math.ceil(4 * 2.1 * rate * HEADROOM)


def test_a_pauses_tokens_sent_after_it_are_not_charged_again() -> None:
    """The client read again: vLLM sends the steps it merged in the pause, past the
    stream's pace. Those tokens are seen; the pause owes only what none carried."""
    pace = paced(*steady(20), (0.95 + 3.0, 1, False))  # 3 s pause: 60 tokens at 20/s
    pace.chunk(0.95 + 3.05, 41, False)  # 40 past the pace: 2 s of it
    assert pace.debt_s == pytest.approx(1.0)
    pace.chunk(0.95 + 3.10, 21, False)  # the rest, and more
    assert pace.debt_s == 0
    assert pace.unseen(0.95 + 3.10, 83) == 0
    # The pace stays the one before the pause (catching up is not the backend's pace).
    assert pace.rate(83) == pytest.approx(20.0)


def test_a_batchs_next_prompt_opening_just_after_a_pause_cancels_it() -> None:
    """vLLM writes each choice's chunk apart: the continuing choice's may come first,
    after the pause the other's prefill caused, and the new choice's a moment later."""
    pace = paced(*steady(16), (0.75 + 3.0, 1, False), (0.75 + 3.002, 1, True))
    assert pace.debt_s == 0
    pace = paced(*steady(16), (0.75 + 3.0, 1, False), (0.75 + 5.0, 1, True))
    assert pace.debt_s == 3.0  # too late to be that prefill


def test_messages_without_tokens_change_nothing() -> None:
    pace = paced(*steady(10), (5.0, 0, False))
    assert pace.last_at == 0.45 and pace.debt_s == 0


def test_choices_read_together_count_each() -> None:
    """n=8: Envoy reads one step of every choice at once. They opened 8 choices (taken as
    one, every pause and the moment before a cut were charged 8 times over)."""
    pace = StreamPace(2.0, sequences=8)
    pace.chunk(0.0, 8, opened=8, steps=8)
    for i in range(1, 20):
        pace.chunk(i * 0.05, 8, steps=8)
    assert pace.opened == 8 and pace.sequence_rate(160) == pytest.approx(20.0)
    assert pace.unseen(0.95 + 0.3, 160) == pytest.approx(0.3 * 160 * HEADROOM, abs=1)


def test_a_backlog_read_holding_an_opening_keeps_the_pause() -> None:
    """The reader read again after 5 s: the kernel's backlog (ten steps of choice 0,
    written at pace) and choice 1's first chunk, in one read: not a prefill."""
    pace = StreamPace(2.0, sequences=2)
    for at, tokens, opened in steady(20):
        pace.chunk(at, tokens, opened)
    pace.chunk(0.95 + 5.0, 11, opened=1, steps=11)
    assert pace.debt_s == 5.0
    assert pace.unseen(0.95 + 5.05, 31) >= 5.0 * 20 * 2 * HEADROOM


def test_a_stop_right_after_two_quick_chunks_measures_no_pace_from_them() -> None:
    """Two chunks 2 ms apart, a stop 1 s later: the 2 ms were no pace (the whole bound
    was charged): the stream's own, silence included."""
    pace = StreamPace(2.0)
    pace.chunk(0.0, 1, opened=1)
    pace.chunk(0.002, 1)
    assert pace.unseen(1.002, 2) == math.ceil(1.0 * 2 / 1.002 * HEADROOM)


def test_what_vllm_generates_before_its_abort_lands_is_charged() -> None:
    """Real vLLM counted up to 3 tokens past a cut stream's last chunk (a step or two
    before the abort reached its engine), and 1 past a stream cut after its first chunk:
    both were charged fewer than generated. A cut owes ABORT_STEPS for each open choice,
    whatever the stream's pace (a fast or bursty one's measured pace is no lag)."""
    assert paced((0.0, 1, True)).abort_lag() == ABORT_STEPS  # no pace yet
    assert StreamPace(2.0).abort_lag() == ABORT_STEPS  # cut before its first chunk
    assert paced(*steady(40)).abort_lag() == ABORT_STEPS
    assert paced(*steady(400, step=0.0001)).abort_lag() == ABORT_STEPS
    four = StreamPace(2.0, sequences=4)  # n = 4: each choice steps on
    for i in range(40):
        four.chunk(i * 0.05, 4, opened=4 if i == 0 else 0, steps=4)
    assert four.abort_lag() == 4 * ABORT_STEPS


def test_the_abort_lag_counts_a_chunks_steps_and_the_setting() -> None:
    """Real-vLLM tester: with `stream_interval: 4` vLLM notices a cut at its next send,
    up to 4 steps after the last chunk, and then takes the abort's steps (a stream cut
    before any chunk was charged 7 where vLLM generated 14); one whose API server lagged
    its engine generated up to 15 tokens a choice past what the gateway saw, so the
    steps are a setting (`limits.abort_lag_steps`), by default ABORT_STEPS."""
    assert ABORT_STEPS >= 15
    assert StreamPace(2.0, interval=4).abort_lag() == ABORT_STEPS + 3
    assert StreamPace(2.0, abort_steps=5).abort_lag() == 5
    assert StreamPace(2.0, sequences=3, abort_steps=5, interval=2).abort_lag(
        choices_unseen=True) == 3 * 6
    assert StreamPace(2.0, abort_steps=0).abort_lag() == 0


@pytest.mark.parametrize("span_s", [0.5, 2.0, 6.0, 60.0])
def test_chunks_with_only_their_first_and_last_times_are_flow(span_s: float) -> None:
    """A stream Envoy's meter read (its first and last text's times alone), however long:
    the same as read chunk by chunk at an even pace, never one pause (review: a 6 s
    steady stream was charged its span again as a pause, ~3x what it carried)."""
    pace = StreamPace(2.0)
    pace.chunk(0.0, 1)
    pace.flowed(span_s, 60)
    even = paced(*steady(61, step=span_s / 60))
    assert pace.debt_s == even.debt_s == 0.0
    assert pace.rate(61) == pytest.approx(even.rate(61) or 0.0)
    for silence in (0.0, 0.5, 1.9):  # cut at once, or after a short silence
        assert pace.unseen(span_s + silence, 61) == even.unseen(span_s + silence, 61)
    assert pace.unseen(span_s + 5.0, 61) == even.unseen(span_s + 5.0, 61) > 0
