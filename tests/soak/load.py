"""The soak's clients: asyncio tasks, each sending one request after another with the
openai SDK (no retries), until a deadline. The mix: chat and completions as JSON,
streams with and without `include_usage`, streams the client leaves after two chunks;
a few requests ask the simulator to fail (`x-sim-status: 500`) or to cut the stream
(`x-sim-cut-after`). Each request's outcome is kept: its status as the client saw it,
the `x-request-id` the gateway gave it, the error's `code`, its latency."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from tests.soak.cluster import KEYS, Key

MESSAGES: list[Any] = [{"role": "user", "content": "hello soak"}]
UPSTREAM_FAIL = 0.02  # of the JSON requests: the simulator answers 500
UPSTREAM_CUT = 0.05  # of the streams: the simulator drops the connection after 2 tokens
KINDS = (("chat", 40), ("completion", 10), ("stream", 20), ("stream_usage", 20),
         ("leave", 10))
CLIENT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    key: str
    status: int | str  # the HTTP status, or "connection" / "timeout": none came
    rid: str  # "" when no response came
    code: str  # an error's `code`; "" on success
    latency_s: float
    fault: str = ""  # "500" / "cut": the upstream was asked to fail
    broken: bool = False  # a stream that ended without its last chunk
    started: float = 0.0  # time.monotonic() when it was sent

    @property
    def admitted(self) -> bool:
        """Admitted by the gateway: answered, or failed upstream (a backend's error)."""
        return bool(self.rid) and (self.status == 200 or self.code == "upstream_error")

    @property
    def refused(self) -> bool:
        """Refused by the gateway itself (a 4xx of its own): no record may exist."""
        return (bool(self.rid) and isinstance(self.status, int)
                and 400 <= self.status < 500 and self.code != "upstream_error")


def sdk_clients(base_url: str) -> dict[str, openai.AsyncOpenAI]:
    return {k.id: openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=k.secret,
                                     max_retries=0, timeout=CLIENT_TIMEOUT_S)
            for k in KEYS}


async def _json(c: openai.AsyncOpenAI, kind: str, max_tokens: int,
                headers: dict[str, str]) -> str:
    if kind == "completion":
        raw: Any = await c.completions.with_raw_response.create(
            model="demo", prompt="hello soak", max_tokens=max_tokens, extra_headers=headers)
    else:
        raw = await c.chat.completions.with_raw_response.create(
            model="demo", messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers)
    raw.parse()
    return str(raw.headers.get("x-request-id", ""))


async def _stream(c: openai.AsyncOpenAI, kind: str, max_tokens: int,
                  headers: dict[str, str]) -> tuple[str, bool]:
    """(request id, broken): read to the end, or left after two chunks ("leave")."""
    extra: dict[str, Any] = {}
    if kind == "stream_usage":
        extra["stream_options"] = {"include_usage": True}
    raw: Any = await c.chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=max_tokens, stream=True,
        extra_headers=headers, **extra)
    rid = str(raw.headers.get("x-request-id", ""))
    stream: openai.AsyncStream[Any] = raw.parse()
    chunks, finished = 0, False
    try:
        async for chunk in stream:
            chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finished = True
            if kind == "leave" and chunks >= 2:
                break
    except (openai.APIError, httpx.HTTPError, ValueError, OSError):
        return rid, True  # cut: by the upstream (asked to) or by a fault
    finally:
        await stream.close()
    return rid, not finished and kind != "leave"


async def one_request(c: openai.AsyncOpenAI, key: Key, rng: random.Random) -> Outcome:
    kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
    streaming = kind in ("stream", "stream_usage", "leave")
    max_tokens = rng.randint(3 if streaming else 1, 40)
    headers: dict[str, str] = {}
    fault = ""
    if not streaming and rng.random() < UPSTREAM_FAIL:
        headers["x-sim-status"] = fault = "500"
    elif kind in ("stream", "stream_usage") and rng.random() < UPSTREAM_CUT:
        headers["x-sim-cut-after"] = "2"
        fault = "cut"
    t0 = time.monotonic()
    status: int | str = 200
    rid, code, broken = "", "", False
    try:
        if streaming:
            rid, broken = await _stream(c, kind, max_tokens, headers)
        else:
            rid = await _json(c, kind, max_tokens, headers)
    except openai.APIStatusError as e:
        status, rid = e.status_code, str(e.response.headers.get("x-request-id", ""))
        code = str(e.code or "")
    except openai.APITimeoutError:
        status = "timeout"
    except (openai.APIConnectionError, httpx.HTTPError, OSError):
        status = "connection"
    except openai.APIError as e:  # an error event before any chunk, say
        status, code = "api_error", str(e.code or "")
    return Outcome(kind, key.id, status, rid, code, time.monotonic() - t0, fault, broken,
                   t0)


async def client_loop(n: int, clients: dict[str, openai.AsyncOpenAI], deadline: float,
                      out: list[Outcome], seed: int) -> None:
    """Client `n`: requests one after another until `deadline` (monotonic)."""
    rng = random.Random(seed * 1000 + n)
    keys: Sequence[Key] = KEYS
    weights = [k.weight for k in keys]
    while time.monotonic() < deadline:
        key = rng.choices(keys, weights)[0]
        out.append(await one_request(clients[key.id], key, rng))


async def run_clients(base_url: str, n: int, duration_s: float, seed: int) -> list[Outcome]:
    out: list[Outcome] = []
    clients = sdk_clients(base_url)
    deadline = time.monotonic() + duration_s
    try:
        await asyncio.gather(*(client_loop(i, clients, deadline, out, seed) for i in range(n)))
    finally:
        for c in clients.values():
            await c.close()
    return out
