"""The simulator's Responses API (`POST /v1/responses`), in vLLM 0.32's shapes.

The request is rendered as vLLM renders it, into chat messages (``instructions`` a system
message, a string ``input`` a user message, each item one message: a function call an
assistant tool call, its output a tool message, a reasoning item an assistant message),
and counted with ``prompt_tokens_chat``. The output is ``max_output_tokens`` tokens (else
``default_max_tokens`` or what the context leaves), clamped to the context as vLLM does;
the response is then ``incomplete`` (``max_output_tokens``), as vLLM reports a generation
stopped by its limit. A stream sends vLLM's typed events: created, in_progress, the
message item and its text part, one ``response.output_text.delta`` per token, their done
events, and ``response.completed`` with the usage.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson

from authz.sim.protocol import (
    GenRequest,
    SimError,
    invalid_field,
    min_one_token,
    model_of,
    opt_bool,
    opt_int,
    param_error,
    prompt_too_long,
    sampling_temperature,
)
from authz.sim.tokens import prompt_tokens_chat, token_text

FUNCTION_TOOL_KEYS: Final = ("name", "description", "parameters")


def _call(item: Mapping[str, Any]) -> dict[str, Any]:
    args = item.get("arguments")
    if item.get("type") == "custom_tool_call":
        args = json.dumps({"input": item.get("input") or ""}, ensure_ascii=False)
    name = item.get("name")
    if item.get("namespace"):
        name = f"{item['namespace']}__{name}"
    return {"role": "assistant", "tool_calls": [
        {"id": item.get("call_id"), "type": "function",
         "function": {"name": name, "arguments": args}}]}


def _reasoning(item: Mapping[str, Any]) -> dict[str, Any]:
    parts = item.get("content") or item.get("summary") or [{}]
    return {"role": "assistant", "reasoning": parts[0].get("text", "")}


def _message(item: Any) -> dict[str, Any]:
    """The chat message vLLM makes of one input item."""
    if not isinstance(item, dict):
        raise invalid_field("input", "Input should be a valid dictionary", "dict_type", item)
    kind = item.get("type", "message")
    if kind == "message" and isinstance(item.get("role"), str):
        return item
    if kind in ("function_call", "custom_tool_call"):
        return _call(item)
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"role": "tool", "content": item.get("output"),
                "tool_call_id": item.get("call_id")}
    if kind == "reasoning":
        return _reasoning(item)
    raise SimError(400, f"Unsupported input item type: {kind}")


def messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of a Responses request, as vLLM builds them."""
    out: list[dict[str, Any]] = []
    if body.get("instructions"):
        out.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        out.append({"role": "user", "content": items})
    elif isinstance(items, list):
        out += [_message(item) for item in items]
    else:
        raise invalid_field("input", "Field required", "missing", items)
    return out


def template_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """What vLLM hands the chat template beside the messages: function tools in chat
    form, tool_choice, chat_template_kwargs and the reasoning effort."""
    tools = [{"type": "function", "function": {k: t.get(k) for k in FUNCTION_TOOL_KEYS}}
             for t in body.get("tools") or [] if isinstance(t, dict)
             and t.get("type") == "function"]
    reasoning = body.get("reasoning")
    return {"tools": tools or None, "tool_choice": body.get("tool_choice"),
            "chat_template_kwargs": body.get("chat_template_kwargs"),
            "reasoning_effort": reasoning.get("effort") if isinstance(reasoning, dict)
            else None}


def parse_responses(body: Mapping[str, Any], models: Mapping[str, Any],
                    default_max_tokens: int | None, max_model_len: int) -> GenRequest:
    """Validate a /v1/responses body: the prompt and output tokens of its generation."""
    model = model_of(body, models)
    if body.get("previous_response_id"):
        raise SimError(404, f"Response with id '{body['previous_response_id']}' not found.",
                       "invalid_request_error", "response_id")
    rendered = messages(body)
    if not rendered:
        raise SimError(400, "Cannot apply chat template to an empty conversation. Provide at "
                       "least one message.")
    sampling_temperature(body)
    prompt = prompt_tokens_chat(rendered, template_fields(body))
    requested = min_one_token(opt_int(body, "max_output_tokens"))
    if requested is not None and requested > max_model_len:
        raise param_error(f"max_output_tokens={requested} cannot be greater than "
                          f"max_model_len={max_model_len}. Please request fewer output tokens.",
                          "max_output_tokens", requested)
    if prompt > max_model_len:
        raise prompt_too_long(prompt, max_model_len)
    limit = requested if requested is not None else default_max_tokens
    if prompt == max_model_len:  # vLLM's Responses check (>=), after the renderer's (>)
        raise SimError(400, f"The engine prompt length {prompt} exceeds the max_model_len "
                       f"{max_model_len}. Please reduce prompt.", "invalid_request_error",
                       "input")
    n = max_model_len - prompt if limit is None else min(limit, max_model_len - prompt)
    return GenRequest(model, prompt, n, opt_bool(body, "stream"), False)


class ResponseBody:
    """One response's objects: the message item and the response around it."""

    def __init__(self, body: Mapping[str, Any], gen: GenRequest) -> None:
        self.gen = gen
        self.id = "resp_" + os.urandom(8).hex()
        self.item_id = "msg_" + os.urandom(8).hex()
        self._base = {
            "id": self.id, "created_at": int(time.time()), "incomplete_details": None,
            "instructions": body.get("instructions"), "metadata": body.get("metadata"),
            "model": gen.model, "object": "response", "output": [],
            "parallel_tool_calls": True, "temperature": body.get("temperature", 1.0),
            "tool_choice": body.get("tool_choice", "none"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "background": False,
            "max_output_tokens": gen.max_tokens, "status": "in_progress", "usage": None,
        }

    def item(self, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [_part(text, None)]
        status = "in_progress" if text is None else "completed"
        return {"id": self.item_id, "content": content, "role": "assistant",
                "status": status, "type": "message", "phase": None}

    def response(self, text: str | None) -> dict[str, Any]:
        """In progress (`text` None), or done with its usage."""
        if text is None:
            return self._base
        g = self.gen
        return {**self._base, "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "output": [self.item(text)], "usage": usage(g.prompt_tokens, g.max_tokens)}


def _part(text: str, logprobs: list[Any] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """vLLM's ResponseUsage."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0,
                                 "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                                  "output_tokens_per_turn": [],
                                  "tool_output_tokens_per_turn": []},
        "total_tokens": input_tokens + output_tokens,
    }


def event(payload: dict[str, Any], seq: int) -> bytes:
    """One typed SSE event: `event: <type>` and its data (with its sequence number)."""
    kind: str = payload["type"]
    data = orjson.dumps({**payload, "sequence_number": seq})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def stream_head(r: ResponseBody) -> Iterator[dict[str, Any]]:
    """The events before the first token."""
    yield {"response": r.response(None), "type": "response.created"}
    yield {"response": r.response(None), "type": "response.in_progress"}
    yield {"item": r.item(None), "output_index": 0, "type": "response.output_item.added"}
    yield {"content_index": 0, "item_id": r.item_id, "output_index": 0,
           "part": _part("", []), "type": "response.content_part.added"}


def delta(r: ResponseBody, i: int) -> dict[str, Any]:
    return {"content_index": 0, "delta": token_text(i), "item_id": r.item_id,
            "logprobs": [], "output_index": 0, "type": "response.output_text.delta"}


def stream_tail(r: ResponseBody, text: str) -> Iterator[dict[str, Any]]:
    """The events after the last token, `response.completed` last."""
    ids = {"content_index": 0, "item_id": r.item_id, "output_index": 0}
    yield {**ids, "logprobs": [], "text": text, "type": "response.output_text.done"}
    yield {**ids, "part": _part(text, None), "type": "response.content_part.done"}
    yield {"item": r.item(text), "output_index": 0, "type": "response.output_item.done"}
    yield {"response": r.response(text), "type": "response.completed"}
