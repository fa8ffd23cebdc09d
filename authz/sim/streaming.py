"""Server-sent-event streaming of a simulated generation, as vLLM streams it."""

from __future__ import annotations

import asyncio
from typing import Final

from aiohttp import web

from authz.sim.metrics import ModelMetrics
from authz.sim.protocol import GenRequest
from authz.sim.responses import DONE_EVENT, Kind, StreamEvents

# Starlette's StreamingResponse(media_type="text/event-stream"), which vLLM uses, adds charset.
SSE_CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"


async def stream_generation(
    request: web.Request,
    gen: GenRequest,
    kind: Kind,
    metrics: ModelMetrics,
    ttft_s: float,
    tpot_s: float,
    cut_after: int | None,
) -> web.StreamResponse:
    """Stream ``gen.max_tokens`` token steps, then the usage chunk (if asked) and [DONE].

    Each step carries one token event per choice (``gen.choices``: ``n`` per prompt),
    in choice order. Headers go out at once; the first step (and, for chat, one role
    chunk per choice before it) after ``ttft_s``; each later step ``tpot_s`` after the
    previous one. With ``cut_after`` set, the connection is closed right after that many
    token events (at most all of them), with no terminating chunk, usage chunk or [DONE]:
    a backend dying mid-stream.
    """
    resp = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    choices = gen.choices
    events = StreamEvents(kind, gen.model, choices)
    n = gen.max_tokens
    total = n * choices
    limit = total if cut_after is None else min(cut_after, total)
    sent = 0
    try:
        if ttft_s > 0:
            await asyncio.sleep(ttft_s)
        for role in events.roles:
            await resp.write(role)
        last = n - 1
        for i in range(n):
            if sent >= limit:
                break
            if i and tpot_s > 0:
                await asyncio.sleep(tpot_s)
            for c in range(min(choices, limit - sent)):
                await resp.write(events.token(i, i == last, c))
                sent += 1
        if cut_after is not None:
            _drop_connection(request)
            return resp
        if gen.include_usage:
            await resp.write(events.usage(gen.prompt_tokens, gen.completion_tokens))
        await resp.write(DONE_EVENT)
    except ConnectionError:
        # The client went away; nothing more to send. aiohttp's own write_eof after we
        # return fails the same way and is handled quietly as a client disconnect.
        pass
    finally:
        metrics.generation_tokens.inc(sent)
    return resp


def _drop_connection(request: web.Request) -> None:
    """Close the TCP connection after flushing what was written, mid chunked body."""
    transport = request.transport
    if transport is not None:
        transport.close()
