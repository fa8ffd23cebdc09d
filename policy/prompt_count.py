"""The exact prompt of a stream cut before its usage chunk, from the backend's tokenizer.

A stream the client left (or the backend cut) never reaches vLLM's usage chunk, but
the backend has already read the whole prompt. Rather than the byte estimate (~4 bytes
a token, which text of ~1 token a byte beats four times over), the services ask the
backend that served it: vLLM's `POST /tokenize` renders chat messages with the same
template and options as /v1/chat/completions and counts them (`count`).

`tokenize_request` says what to do for one request: an exact count already known
(token ids), the /tokenize body to send, or None where /tokenize cannot count what the
backend counted (media parts, batched or suffixed completions prompts, other kinds):
those stay estimated. Pure; the request goes out in authz/services/prompt_counter.py.
"""

from __future__ import annotations

from typing import Any, Final

from policy.endpoints import Kind

TOKENIZE_PATH: Final = "/tokenize"
# Chat request fields a template may render or that change the rendering, sent on as
# the client sent them (vLLM's /tokenize takes these as its chat completions do, and
# ignores those it has no use for).
CHAT_FIELDS: Final = ("tools", "tool_choice", "response_format", "documents",
                      "chat_template_kwargs", "reasoning_effort", "add_generation_prompt",
                      "continue_final_message", "add_special_tokens")
# Content part types that are text (and nothing else) once rendered.
_TEXT_PARTS: Final = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})


def tokenize_request(kind: Kind, body: dict[str, Any], upstream_model: str
                     ) -> int | dict[str, Any] | None:
    """An exact prompt count (int), the /tokenize body that gets one (dict), or None."""
    if kind is Kind.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(_text_only(m) for m in messages):
            return None
        out: dict[str, Any] = {"model": upstream_model, "messages": messages}
        out.update((k, body[k]) for k in CHAT_FIELDS if k in body)
        return out
    if kind is Kind.COMPLETION:
        prompt = body.get("prompt")
        if body.get("suffix") is not None:
            return None
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one is that prompt
        if isinstance(prompt, str):
            out = {"model": upstream_model, "prompt": prompt}
            if "add_special_tokens" in body:
                out["add_special_tokens"] = body["add_special_tokens"]
            return out
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return len(prompt)  # token ids: the backend counts them as they are
    return None


def _text_only(message: Any) -> bool:
    """Whether a chat message renders as text alone (no image, audio or video parts)."""
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content)


def truncated(count: int, body: dict[str, Any]) -> int:
    """What the backend charged of a prompt of `count` tokens: vLLM keeps only the last
    `truncate_prompt_tokens` of it when the request sets that (a positive number)."""
    cap = body.get("truncate_prompt_tokens")
    return min(count, cap) if type(cap) is int and cap > 0 else count


def counted(answer: Any) -> int | None:
    """The prompt tokens in a /tokenize answer (`count`), or None if it has none."""
    if not isinstance(answer, dict):
        return None
    n = answer.get("count")
    return n if type(n) is int and n >= 0 else None
