"""When a stream's chunks came, and what its backend could generate while none came.

vLLM does not slow down for a slow reader: a client that stops reading fills Envoy's
buffers, Envoy stops reading the backend, and vLLM generates on, merging the steps it
cannot send, until the stream ends or the connection closes. A stream cut after such a
pause carried fewer tokens than were generated (real vLLM: 2,169 of 7,168 for a client
that paused, then left). `StreamPace` is fed each message's time and the tokens it
carried; `unseen` says, at the cut, how many more the backend could have generated in the
pauses (gaps of `stall_s` or more after the first chunk, and the silence before the cut
however short) at `HEADROOM` times the pace the stream kept before them (for every
sequence it runs, where fewer had opened when that pace was measured), less what chunks
carried past that pace after a pause (the steps vLLM merged meanwhile, sent once its
reader read again). A backend that paused itself is charged so too: the gateway sees the
same silence.
Times are the caller's clock (monotonic seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The pace vLLM may gain while its reader pauses (its batch may shrink meanwhile): the
# estimate stays above what it generated.
HEADROOM = 2.0


# A choice that opens this soon after a pause (a batch's next prompt, whose prefill held
# the whole batch): the pause was that prefill, not a lagging reader.
OPENED_AFTER_PAUSE_S = 1.0


# From the cut the gateway sees to vLLM's abort (Envoy resets the upstream connection,
# vLLM's server notices at its next send, its engine takes the abort between steps): it
# generates on meanwhile, in steps, not time. An idle real vLLM 0.32 counted up to 3
# tokens a choice past the chunks a cut stream's gateway had seen; one whose API server
# lagged its engine (2 busy cores: the engine ran ahead while the server that streams and
# notices the cut waited for the CPU) up to 15 (real-vLLM tester). The default covers
# that; `limits.abort_lag_steps` sets it. (A time at the stream's pace instead charged a
# fast or bursty stream's measured pace, hundreds of tokens a second, for a lag of steps.)
ABORT_STEPS = 16


# A flow shorter than this many tokens (and than stall_s) measures no pace for the
# silence before a cut: two chunks 2 ms apart made a stop button cost the whole bound.
ESTABLISHED_TOKENS = 5


@dataclass(slots=True)
class StreamPace:
    stall_s: float
    # Sequences the request generates (prompts x n): a batch whose prompts start one
    # after another had fewer running when its pace was measured than in its pauses.
    sequences: int = 1
    # Steps vLLM takes from a cut to its abort (ABORT_STEPS), and the steps a chunk holds
    # (`stream_interval`): the cut is noticed at the next send, that many steps on.
    abort_steps: int = ABORT_STEPS
    interval: int = 1
    debt_s: float = 0.0  # pause seconds whose tokens no chunk has carried yet
    flow_s: float = 0.0  # the gaps shorter than stall_s before any pause: its own pace
    flow_tokens: int = 0  # tokens the chunks after those gaps carried
    # Those gaps times the choices open during each: tokens over it are one sequence's
    # pace, however many were running.
    flow_seq_s: float = 0.0
    first_at: float | None = None  # the first chunk with tokens
    last_at: float | None = None  # the last one
    opened: int = 0  # choices opened so far
    _pause: float = 0.0  # the last pause, and when it ended
    _pause_end: float | None = None

    def chunk(self, now: float, tokens: int, opened: int = 0, steps: int = 1,
              merged: bool = False) -> None:
        """A read carrying `tokens` generated tokens arrived at `now`, in `steps` content
        chunks of which `opened` opened a choice; `merged`: some chunk held steps vLLM
        merged (it generated them while no chunk could go). A read of openings alone (a
        batch's next prompts, after their prefill) is no pause."""
        if tokens <= 0:
            return
        before = max(1, self.opened)  # choices running in the gap before this read
        self.opened += opened
        if self.last_at is None:
            self.first_at = self.last_at = now
            return
        gap = now - self.last_at
        self.last_at = now
        if opened and steps <= opened and not merged:
            if self._pause_end is not None and now - self._pause_end < OPENED_AFTER_PAUSE_S:
                self.debt_s = max(0.0, self.debt_s - self._pause)  # it was the prefill
                self._pause_end = None
            return
        rate = self.rate(0)
        if gap >= self.stall_s:
            self.debt_s += gap
            self._pause, self._pause_end = gap, now
            if rate:  # the steps this read carries past one a chunk were the pause's
                self.debt_s = max(0.0, self.debt_s - max(0, tokens - steps) / rate)
            return
        if self.debt_s > 0 and rate:
            # Once paused, the stream is held to the pace it kept before: a chunk past it
            # carries what was generated in the pause (vLLM sends the steps it merged
            # meanwhile), and that much is accounted for; one behind it (a reader still
            # lagging, or a backend slower now) adds what it lacks.
            self.debt_s = max(0.0, self.debt_s - (tokens - gap * rate) / rate)
        elif self.debt_s == 0:
            self.flow_s += gap
            self.flow_tokens += tokens
            self.flow_seq_s += gap * before

    def flowed(self, now: float, tokens: int) -> None:
        """Chunks carrying `tokens`, the last at `now`, whose own times are unknown (a
        stream Envoy's meter read reports only its first and last text): flow at the pace
        they average since the last chunk, never a pause (none can be told apart)."""
        if tokens <= 0:
            return
        if self.last_at is None:
            self.chunk(now, tokens)
            return
        gap = max(0.0, now - self.last_at)
        self.last_at = max(self.last_at, now)
        self.flow_s += gap
        self.flow_tokens += tokens
        self.flow_seq_s += gap * max(1, self.opened)

    def unseen(self, now: float, seen: int) -> int | None:
        """Tokens the backend could have generated that no chunk carried, for a stream cut
        at `now` after chunks carrying `seen`: 0 without a pause; None when it paused but
        showed no pace to measure (charge what it could generate). A pause is charged for
        every sequence the request runs (a batch's later prompts may start in it); the
        silence before the cut, however short, for the choices opened (the reader had
        stopped, the buffers filled, vLLM generated on). What it generates after the cut
        is `abort_lag`'s."""
        pauses, silence = self.debt_s, 0.0
        if self.last_at is not None:
            silence = now - self.last_at
            if silence >= self.stall_s:
                pauses, silence = pauses + silence, 0.0
        if pauses <= 0 and silence <= 0:
            return 0
        per_seq = self.sequence_rate(seen)
        if per_seq is None:  # no pace to measure: a pause owes the bound, a moment nothing
            return None if pauses > 0 else 0
        owed = pauses * per_seq * max(self.sequences, self.opened)
        if silence > 0:
            if self.flow_tokens < ESTABLISHED_TOKENS and self.flow_s < self.stall_s:
                # Too little flow to tell a pace: the stream's whole, the silence in it.
                assert self.first_at is not None
                per_seq = min(per_seq, seen / (now - self.first_at) / max(1, self.opened))
            owed += silence * per_seq * max(1, self.opened)
        return math.ceil(owed * HEADROOM)

    def abort_lag(self, choices_unseen: bool = False) -> int:
        """Tokens the backend generates after the cut, before its abort lands:
        `abort_steps` for each choice open (one, before any opened), and a chunk's steps
        past one (vLLM notices the cut when it sends the next chunk, `interval` steps
        after the last). `choices_unseen`: the stream was read elsewhere (Envoy's meter
        counts events, not the choices they open, nor role chunks): every sequence the
        request runs may be stepping on."""
        running = self.sequences if choices_unseen else max(1, self.opened)
        return (self.abort_steps + max(0, self.interval - 1)) * running

    def rate(self, seen: int) -> float | None:
        """Tokens a second before its first pause; else over the whole stream (its chunks
        all came after long gaps: a large stream_interval), pauses included."""
        if self.flow_s > 0 and self.flow_tokens > 0:
            return self.flow_tokens / self.flow_s
        if self.first_at is not None and self.last_at is not None \
                and self.last_at > self.first_at and seen > 0:
            return seen / (self.last_at - self.first_at)
        return None

    def sequence_rate(self, seen: int) -> float | None:
        """`rate`, for one sequence: over the choices that were running."""
        if self.flow_seq_s > 0 and self.flow_tokens > 0:
            return self.flow_tokens / self.flow_seq_s
        rate = self.rate(seen)
        return None if rate is None else rate / max(1, self.opened)
