"""Response bodies in vLLM's OpenAI-server shapes: JSON responses and SSE event templates.

Stream events are built from per-request byte templates so that each token costs one
concatenation, not one JSON encoding. The templates are cut out of ``orjson.dumps`` of the
full chunk dict, so the bytes are exactly what encoding the dict would give.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Final, Literal

import orjson

from authz.sim.tokens import WORDS, output_text, token_text

Kind = Literal["chat", "completion"]

DONE_EVENT: Final = b"data: [DONE]\n\n"

# JSON-encoded text of generated tokens: token 0 is WORDS[0], token i>0 is " " + WORDS[i % W].
_FIRST_TOKEN_JSON: Final = orjson.dumps(WORDS[0])
_CYCLE_TOKEN_JSON: Final = tuple(orjson.dumps(" " + word) for word in WORDS)

_SENTINEL: Final = "\x01tokenbooth-sim\x01"
_SENTINEL_JSON: Final = orjson.dumps(_SENTINEL)


def token_json(i: int) -> bytes:
    """JSON string literal (bytes) of generated token ``i``."""
    return _FIRST_TOKEN_JSON if i == 0 else _CYCLE_TOKEN_JSON[i % len(_CYCLE_TOKEN_JSON)]


def request_id(kind: Kind) -> str:
    """A fresh vLLM-style id: ``chatcmpl-<32 hex>`` or ``cmpl-<32 hex>``."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + os.urandom(16).hex()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """vLLM's UsageInfo field order."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


_OBJECT: Final = {"chat": "chat.completion", "completion": "text_completion"}


def _choice(kind: Kind, index: int, text: str) -> dict[str, Any]:
    if kind == "chat":
        message = {"role": "assistant", "content": text, "tool_calls": []}
        return {"index": index, "message": message, "logprobs": None,
                "finish_reason": "length", "stop_reason": None}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": "length",
            "stop_reason": None, "prompt_logprobs": None}


def response(
    kind: Kind, model: str, lengths: Sequence[int], prompt_tokens: int, completion_tokens: int,
) -> bytes:
    """A non-streaming ``chat.completion`` / ``text_completion`` body: one choice of
    ``lengths[i]`` tokens per index (vLLM's order: prompt by prompt, ``n`` each)."""
    body: dict[str, Any] = {
        "id": request_id(kind),
        "object": _OBJECT[kind],
        "created": int(time.time()),
        "model": model,
        "choices": [_choice(kind, i, output_text(n)) for i, n in enumerate(lengths)],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if kind == "chat":
        body["prompt_logprobs"] = None
    return orjson.dumps(body)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _split(payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """Encode ``payload`` as an event and cut it around the sentinel string."""
    head, tail = _event(payload).split(_SENTINEL_JSON)
    return head, tail


class StreamEvents:
    """SSE events of one streamed response (one id, created and model for every chunk).

    Each chunk carries one choice; ``choices`` templates are cut, one per choice index.
    """

    __slots__ = ("_base", "_heads", "_last_tails", "_mid_tails", "_prompts", "kind", "roles")

    def __init__(self, kind: Kind, model: str, choices: int = 1,
                 continuous: Sequence[int] | None = None) -> None:
        """``continuous``: vLLM's continuous_usage_stats, each choice's prompt tokens
        (every chunk then carries that choice's usage so far); None without it."""
        self.kind = kind
        self._prompts = continuous
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._base: dict[str, Any] = {
            "id": request_id(kind),
            "object": obj,
            "created": int(time.time()),
            "model": model,
        }
        # A token chunk is head + token_json(i) + mid_tail (or last_tail for the final one).
        # As in vLLM, chat chunks carry stop_reason only on the final one; completion chunks
        # carry it on every chunk. Chat streams open with one role chunk per choice.
        self.roles: list[bytes] = []
        self._heads: list[bytes] = []
        self._mid_tails: list[bytes] = []
        self._last_tails: list[bytes] = []
        for c in range(choices):
            if kind == "chat":
                role = _event(self._chat(c, {"role": "assistant", "content": ""}, None, False))
                self.roles.append(self._with_usage(role, c, 0))
                head, mid = _split(self._chat(c, {"content": _SENTINEL}, None, False))
                _, last = _split(self._chat(c, {"content": _SENTINEL}, "length", True))
            else:
                head, mid = _split(self._completion(c, None))
                _, last = _split(self._completion(c, "length"))
            self._heads.append(head)
            self._mid_tails.append(mid)
            self._last_tails.append(last)

    def _chat(
        self, index: int, delta: dict[str, str], finish: str | None, stop: bool
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
        }
        if stop:
            choice["stop_reason"] = None
        return {**self._base, "choices": [choice]}

    def _completion(self, index: int, finish: str | None) -> dict[str, Any]:
        choice = {
            "index": index,
            "text": _SENTINEL,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }
        return {**self._base, "choices": [choice]}

    def token(self, i: int, last: bool, choice: int = 0) -> bytes:
        """The event carrying generated token ``i`` of ``choice``; ``last`` adds
        finish_reason "length"."""
        tail = self._last_tails[choice] if last else self._mid_tails[choice]
        return self._with_usage(self._heads[choice] + token_json(i) + tail, choice, i + 1)

    def tokens(self, start: int, end: int, last: bool, choice: int = 0) -> bytes:
        """One event carrying generated tokens [start, end) of ``choice``."""
        tail = self._last_tails[choice] if last else self._mid_tails[choice]
        text = "".join(token_text(i) for i in range(start, end))
        return self._with_usage(self._heads[choice] + orjson.dumps(text) + tail, choice, end)

    def _with_usage(self, event: bytes, choice: int, done: int) -> bytes:
        """With continuous usage, ``event`` with ``choice``'s usage after ``done`` of its
        tokens, as vLLM 0.32 adds it: one choice's count (its own prompt's tokens, its
        own tokens), not the request's; chat chunks add ``completion_tokens_details``."""
        if self._prompts is None:
            return event
        u: dict[str, Any] = usage(self._prompts[choice], done)
        if self.kind == "chat":
            u["completion_tokens_details"] = None
        return event[:-3] + b',"usage":' + orjson.dumps(u) + b"}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """vLLM's final usage-only chunk (``stream_options.include_usage``)."""
        return _event(
            {**self._base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
        )
