"""Server-sent-event streaming of a simulated generation, as vLLM streams it: chat and
completions chunks, or the Responses API's typed events."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from aiohttp import web

from authz.sim import responses_api as rapi
from authz.sim.metrics import ModelMetrics
from authz.sim.protocol import GenRequest
from authz.sim.responses import DONE_EVENT, Kind, StreamEvents
from authz.sim.tokens import output_text

# Starlette's StreamingResponse(media_type="text/event-stream"), which vLLM uses, adds charset.
SSE_CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"
# What vLLM 0.32's chat and completions streams send when generation fails mid-way (a
# GenerationError: `create_streaming_error_response`, json.dumps of its ErrorResponse),
# then `[DONE]`.
GENERATION_ERROR_EVENT: Final = (
    b'data: {"error": {"message": "Internal server error", "type": "InternalServerError", '
    b'"param": null, "code": 500}}\n\n')


class Pacing:
    """When events go out: the first token after `ttft_s`, each later one `tpot_s` after
    the previous; with `cut_after` set, the connection is closed right after that many
    token events, with nothing after them: a backend dying mid-stream; with `error_after`
    set, a chat or completions stream sends vLLM's error event and `[DONE]` after that
    many: generation failing mid-stream."""

    __slots__ = ("cut_after", "error_after", "tpot_s", "ttft_s")

    def __init__(self, ttft_s: float, tpot_s: float, cut_after: int | None,
                 error_after: int | None = None) -> None:
        self.ttft_s, self.tpot_s, self.cut_after = ttft_s, tpot_s, cut_after
        self.error_after = error_after


async def _drive(request: web.Request, metrics: ModelMetrics, pace: Pacing,
                 head: Sequence[bytes], steps: int, per_step: int,
                 token: Callable[[int, int], tuple[bytes, int] | None],
                 tail: Callable[[], Sequence[bytes]],
                 weight: Callable[[int], int] = lambda _i: 1,
                 failure: Sequence[bytes] = ()) -> web.StreamResponse:
    """Stream `head`, then `steps` steps of `per_step` token events (`token(step,
    choice)`: the event and its tokens, or None once that choice has finished), then
    `tail()`. Headers go out at once, `head` with the first step; each later step waits
    `weight(step)` token times. `failure`: what ends the stream instead of `tail()` after
    `pace.error_after` token events (none: the hook does not apply)."""
    resp = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
    resp.enable_chunked_encoding()
    total = steps * per_step
    limit = total if pace.cut_after is None else min(pace.cut_after, total)
    failing = bool(failure) and pace.error_after is not None
    if failure and pace.error_after is not None:
        limit = min(limit, pace.error_after)
    sent = tokens = 0
    try:
        await resp.prepare(request)  # a client gone before the headers: quiet too
        if pace.ttft_s > 0:
            await asyncio.sleep(pace.ttft_s)
        for event in head:
            await resp.write(event)
        for i in range(steps):
            if sent >= limit:
                break
            if i and pace.tpot_s > 0:
                await asyncio.sleep(pace.tpot_s * weight(i))
            for c in range(per_step):
                if sent >= limit:
                    break
                out = token(i, c)
                if out is None:
                    continue
                await resp.write(out[0])
                sent += 1
                tokens += out[1]
        if pace.cut_after is not None:
            drop_connection(request)
            return resp
        for event in failure if failing else tail():
            await resp.write(event)
    except ConnectionError:
        # The client went away; nothing more to send. aiohttp's own write_eof after we
        # return fails the same way and is handled quietly as a client disconnect.
        pass
    finally:
        metrics.generation_tokens.inc(tokens)
    return resp


async def stream_generation(request: web.Request, gen: GenRequest, kind: Kind,
                            metrics: ModelMetrics, pace: Pacing) -> web.StreamResponse:
    """Stream token steps, then the usage chunk (if asked) and [DONE].

    Each step carries one token event per choice still generating (``gen.choices``:
    ``n`` per prompt; a clipped prompt's choices finish early), in choice order; a chat
    stream opens with one role chunk per choice.
    """
    per_choice = [c for c in gen.prompt_counts for _ in range(gen.n)]
    lengths = gen.choice_lengths
    events = StreamEvents(kind, gen.model, gen.choices,
                          per_choice if gen.continuous_usage else None)
    failure = (GENERATION_ERROR_EVENT, DONE_EVENT)

    def tail() -> list[bytes]:
        usage = ([events.usage(gen.prompt_tokens, gen.completion_tokens)]
                 if gen.include_usage else [])
        return [*usage, DONE_EVENT]

    if gen.stream_interval > 1:  # vLLM's stream_interval: token 0, then N at a time
        spans = stream_spans(gen.max_tokens, gen.stream_interval)

        def span(i: int, c: int) -> tuple[bytes, int] | None:
            start, end = spans[i][0], min(spans[i][1], lengths[c])
            if start >= end:
                return None
            return events.tokens(start, end, end == lengths[c], c), end - start

        return await _drive(request, metrics, pace, events.roles, len(spans), gen.choices,
                            span, tail, lambda i: spans[i][1] - spans[i][0], failure)

    def one(i: int, c: int) -> tuple[bytes, int] | None:
        return None if i >= lengths[c] else (events.token(i, i == lengths[c] - 1, c), 1)

    return await _drive(request, metrics, pace, events.roles, gen.max_tokens, gen.choices,
                        one, tail, failure=failure)


def stream_spans(n: int, interval: int) -> list[tuple[int, int]]:
    """The [start, end) tokens of each chunk of an `n`-token stream: the first token on
    its own, then `interval` at a time (vLLM's output processor)."""
    return [(0, 1), *((s, min(s + interval, n)) for s in range(1, n, interval))]


async def stream_response(request: web.Request, body: Mapping[str, Any], gen: GenRequest,
                          metrics: ModelMetrics, pace: Pacing) -> web.StreamResponse:
    """A Responses API stream: vLLM's typed events, one text delta per token."""
    r = rapi.ResponseBody(body, gen)
    head = [rapi.event(e, seq) for seq, e in enumerate(rapi.stream_head(r))]
    n = gen.max_tokens
    after = len(head) + n

    def tail() -> list[bytes]:
        return [rapi.event(e, after + k)
                for k, e in enumerate(rapi.stream_tail(r, output_text(n)))]

    return await _drive(request, metrics, pace, head, n, 1,
                        lambda i, _c: (rapi.event(rapi.delta(r, i), len(head) + i), 1), tail)


def drop_connection(request: web.Request) -> None:
    """Close the TCP connection after flushing what was written, mid chunked body."""
    transport = request.transport
    if transport is not None:
        transport.close()
