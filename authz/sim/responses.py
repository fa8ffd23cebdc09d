"""Response bodies in vLLM's OpenAI-server shapes: JSON responses and SSE event templates.

Stream events are built from per-request byte templates so that each token costs one
concatenation, not one JSON encoding. The templates are cut out of ``orjson.dumps`` of the
full chunk dict, so the bytes are exactly what encoding the dict would give.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final, Literal

import orjson

from authz.sim.tokens import WORDS

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


def chat_response(model: str, text: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """A non-streaming ``chat.completion`` body."""
    return orjson.dumps(
        {
            "id": request_id("chat"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            ],
            "usage": usage(prompt_tokens, completion_tokens),
            "prompt_logprobs": None,
        }
    )


def completion_response(model: str, text: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """A non-streaming ``text_completion`` body."""
    return orjson.dumps(
        {
            "id": request_id("completion"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }
    )


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _split(payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """Encode ``payload`` as an event and cut it around the sentinel string."""
    head, tail = _event(payload).split(_SENTINEL_JSON)
    return head, tail


class StreamEvents:
    """SSE events of one streamed response (one id, created and model for every chunk)."""

    __slots__ = ("_base", "_head", "_last_tail", "_mid_tail", "kind", "role")

    def __init__(self, kind: Kind, model: str) -> None:
        self.kind = kind
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self._base: dict[str, Any] = {
            "id": request_id(kind),
            "object": obj,
            "created": int(time.time()),
            "model": model,
        }
        # A token chunk is head + token_json(i) + mid_tail (or last_tail for the final one).
        # As in vLLM, chat chunks carry stop_reason only on the final one; completion chunks
        # carry it on every chunk.
        self.role = b""
        if kind == "chat":
            self.role = _event(self._chat({"role": "assistant", "content": ""}, None, False))
            self._head, self._mid_tail = _split(self._chat({"content": _SENTINEL}, None, False))
            _, self._last_tail = _split(self._chat({"content": _SENTINEL}, "length", True))
        else:
            self._head, self._mid_tail = _split(self._completion(None))
            _, self._last_tail = _split(self._completion("length"))

    def _chat(self, delta: dict[str, str], finish: str | None, stop: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish,
        }
        if stop:
            choice["stop_reason"] = None
        return {**self._base, "choices": [choice]}

    def _completion(self, finish: str | None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": _SENTINEL,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
        }
        return {**self._base, "choices": [choice]}

    def token(self, i: int, last: bool) -> bytes:
        """The event carrying generated token ``i``; ``last`` adds finish_reason "length"."""
        return self._head + token_json(i) + (self._last_tail if last else self._mid_tail)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """vLLM's final usage-only chunk (``stream_options.include_usage``)."""
        return _event(
            {**self._base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
        )
