"""The exact prompt of a stream cut before its usage chunk, from the backend's tokenizer.

A stream the client left (or the backend cut) never reaches vLLM's usage chunk, but
the backend has already read the whole prompt. Rather than the byte estimate (~4 bytes
a token, which text of ~1 token a byte beats four times over), the services ask the
backend that served it: vLLM's `POST /tokenize` renders chat messages with the same
template and options as /v1/chat/completions and counts them (`count`).

`tokenize_request` says what to do for one request (a `Recount`): the counts already
known (token ids) and the /tokenize bodies to send (one per prompt of a batch), or None
where /tokenize cannot count what the backend counted (media parts, a suffix, a batch of
over MAX_ASKS prompts, other kinds): those are charged their prompt bound. Pure; the
requests go out in authz/services/prompt_counter.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from policy.endpoints import Kind

TOKENIZE_PATH: Final = "/tokenize"
# A batched completions prompt is counted one /tokenize call per prompt, up to this many
# (past it, the prompt's bound is charged).
MAX_ASKS: Final = 32
# Chat request fields vLLM's /tokenize takes as its chat completions do, sent on as the
# client sent them.
CHAT_FIELDS: Final = ("tools", "add_generation_prompt", "continue_final_message",
                      "add_special_tokens")
# Chat request fields vLLM's chat completions hand to the template as keyword arguments
# (over the client's `chat_template_kwargs`), but its /tokenize reads only from
# `chat_template_kwargs`: they go there. (A null one is left out, as vLLM does.)
TEMPLATE_KWARGS: Final = ("documents", "reasoning_effort")
# Content part types that are text (and nothing else) once rendered.
_TEXT_PARTS: Final = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})


@dataclass(frozen=True, slots=True)
class Recount:
    """How to count a prompt the backend read: the prompts counted already (token ids)
    and the /tokenize bodies, one per text prompt. `total` sums them, each prompt cut to
    `truncate_prompt_tokens` as vLLM cuts it."""

    counted: tuple[int, ...]
    asks: tuple[dict[str, Any], ...]
    cap: int | None = None

    def total(self, answers: Sequence[int]) -> int:
        """The prompt tokens the backend charged, given the answers to `asks`."""
        each = (*self.counted, *answers)
        return sum(n if self.cap is None else min(n, self.cap) for n in each)


def tokenize_request(kind: Kind, body: dict[str, Any], upstream_model: str) -> Recount | None:
    """How to count this request's prompt exactly, or None where /tokenize cannot."""
    cap = body.get("truncate_prompt_tokens")
    cap = cap if type(cap) is int and cap > 0 else None
    if kind is Kind.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(_text_only(m) for m in messages):
            return None
        out: dict[str, Any] = {"model": upstream_model, "messages": messages}
        out.update((k, body[k]) for k in CHAT_FIELDS if k in body)
        kwargs = _template_kwargs(body)
        if kwargs is not None:
            out["chat_template_kwargs"] = kwargs
        return Recount((), (out,), cap)
    if kind is Kind.COMPLETION:
        if body.get("suffix") is not None:
            return None
        prompt = body.get("prompt")
        if _token_ids(prompt):
            return Recount((len(prompt),), (), cap)  # the backend counts them as they are
        prompts = prompt if isinstance(prompt, list) else [prompt]
        if not prompts or len(prompts) > MAX_ASKS:
            return None
        counted: list[int] = []
        asks: list[dict[str, Any]] = []
        for p in prompts:
            if _token_ids(p):
                counted.append(len(p))
            elif isinstance(p, str):
                ask: dict[str, Any] = {"model": upstream_model, "prompt": p}
                if "add_special_tokens" in body:
                    ask["add_special_tokens"] = body["add_special_tokens"]
                asks.append(ask)
            else:
                return None
        return Recount(tuple(counted), tuple(asks), cap)
    return None


def _template_kwargs(body: dict[str, Any]) -> Any:
    """The template's keyword arguments as vLLM's chat completions build them: the
    client's, then `documents` and `reasoning_effort`, and `enable_thinking` from the
    effort unless the client set it. Without them /tokenize rendered no documents: a
    RAG request's cut stream was charged its prompt without them."""
    user = body.get("chat_template_kwargs")
    if user is None:
        user = {}
    elif not isinstance(user, dict):
        return user  # as the client sent it (vLLM refuses what is not an object)
    kwargs = dict(user)
    for name in TEMPLATE_KWARGS:
        if body.get(name) not in (None, "auto"):
            kwargs[name] = body[name]
    effort = body.get("reasoning_effort")
    if effort is not None and "enable_thinking" not in user:
        kwargs["enable_thinking"] = effort != "none"
    return kwargs if kwargs or "chat_template_kwargs" in body else None


def _token_ids(prompt: Any) -> TypeGuard[list[int]]:
    return isinstance(prompt, list) and bool(prompt) and all(type(t) is int for t in prompt)


def _text_only(message: Any) -> bool:
    """Whether a chat message renders as text alone (no image, audio or video parts)."""
    if not isinstance(message, dict):
        return False
    content = message.get("content")
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content)


def counted(answer: Any) -> int | None:
    """The prompt tokens in a /tokenize answer (`count`), or None if it has none."""
    if not isinstance(answer, dict):
        return None
    n = answer.get("count")
    return n if type(n) is int and n >= 0 else None
