"""When a stream's chunks came, and what its backend could generate while none came.

vLLM does not slow down for a slow reader: a client that stops reading fills Envoy's
buffers, Envoy stops reading the backend, and vLLM generates on, merging the steps it
cannot send, until the stream ends or the connection closes. A stream cut after such a
pause carried fewer tokens than were generated (real vLLM: 2,169 of 7,168 for a client
that paused, then left). `StreamPace` is fed each message's time and the tokens it
carried; `unseen` says, at the cut, how many more the backend could have generated in the
pauses (gaps of `stall_s` or more after a choice's first chunk, the silence before the
cut included): the pauses' length at `HEADROOM` times the pace the stream kept between
them. A backend that paused itself is charged so too: the gateway sees the same silence.
Times are the caller's clock (monotonic seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The pace vLLM may gain while its reader pauses (its batch may shrink meanwhile): the
# estimate stays above what it generated.
HEADROOM = 2.0


@dataclass(slots=True)
class StreamPace:
    stall_s: float
    pauses_s: float = 0.0  # gaps of stall_s or more between chunks
    flow_s: float = 0.0  # the gaps shorter than that: the stream's own pace
    flow_tokens: int = 0  # tokens the chunks after those gaps carried
    first_at: float | None = None  # the first chunk with tokens
    last_at: float | None = None  # the last one

    def chunk(self, now: float, tokens: int, opened_choice: bool) -> None:
        """A message carrying `tokens` generated tokens arrived at `now`; `opened_choice`:
        it opened a choice (a batch's next prompt, after its prefill: no pause)."""
        if tokens <= 0:
            return
        if self.last_at is None:
            self.first_at = now
        else:
            gap = now - self.last_at
            if gap < self.stall_s:
                self.flow_s += gap
                self.flow_tokens += tokens
            elif not opened_choice:
                self.pauses_s += gap
        self.last_at = now

    def unseen(self, now: float, seen: int) -> int | None:
        """Tokens the backend could have generated that no chunk carried, for a stream cut
        at `now` after chunks carrying `seen`: 0 without a pause; None when it paused but
        showed no pace to measure (charge what it could generate)."""
        pauses = self.pauses_s
        if self.last_at is not None and now - self.last_at >= self.stall_s:
            pauses += now - self.last_at
        if pauses <= 0:
            return 0
        rate = self.rate(seen)
        if rate is None:
            return None
        return math.ceil(pauses * rate * HEADROOM)

    def rate(self, seen: int) -> float | None:
        """Tokens a second between pauses; else over the whole stream (its chunks all
        came after long gaps: a large stream_interval), pauses included."""
        if self.flow_s > 0 and self.flow_tokens > 0:
            return self.flow_tokens / self.flow_s
        if self.first_at is not None and self.last_at is not None \
                and self.last_at > self.first_at and seen > 0:
            return seen / (self.last_at - self.first_at)
        return None
