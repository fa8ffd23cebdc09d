"""The exact prompt of a stream cut before its usage chunk, from the backend's tokenizer.

A stream the client left (or the backend cut) never reaches vLLM's usage chunk, but
the backend has already read the whole prompt. Rather than the byte estimate (~4 bytes
a token, which text of ~1 token a byte beats four times over), the services ask the
backend that served it: vLLM's `POST /tokenize` renders chat messages with the same
template and options as /v1/chat/completions and counts them (`count`).

`tokenize_request` says what to do for one request (a `Recount`): the counts already
known (token ids) and the /tokenize bodies to send (one per prompt of a batch), or None
where /tokenize cannot count what the backend counted (media parts, a suffix, a batch of
over MAX_ASKS prompts, Responses shapes not proven, other kinds): those are charged their
prompt bound. Pure; the requests go out in authz/services/prompt_counter.py.

A Responses API request is rendered by vLLM 0.32 (`OnlineRenderer.render_responses`,
vllm/renderers/online_renderer.py) as chat messages (`construct_input_messages`,
vllm/entrypoints/openai/responses/utils.py) through the same chat template, so its
/tokenize body is those messages, its function tools in chat form
(`construct_tool_dicts`), the template arguments `ResponsesRequest.build_chat_params`
sets and the special tokens its `build_tok_params` adds (`_responses` below).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from policy.endpoints import Kind
from policy.request_fields import lax_int
from policy.tokens import token_ids

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
# gpt-oss models (vLLM's `model_type == "gpt_oss"`) render Responses requests in harmony
# (`_render_responses_with_harmony`: a dated system preamble, tools in a developer
# message), not through the chat template /tokenize renders. The gateway sees only the
# served name: one naming gpt-oss is charged its bound.
HARMONY_NAME: Final = "gpt-oss"
# Kimi K3 models (vLLM's `kimi_k3` renderer, chosen by the architecture) render the
# request's `response_format`, and a `tool_choice` other than `auto` when it has tools,
# into the prompt (`KimiK3Renderer._apply_chat_template`); /tokenize passes the template
# neither. A request carrying them to a model whose served name names K3 is charged its
# bound (a client's 50 KB schema would otherwise be a recount of its messages alone).
# Every other renderer of vLLM 0.32 leaves them out of the prompt.
K3_NAMES: Final = ("kimi-k3", "kimi_k3", "kimik3")
# The keys of a Responses function tool vLLM renders (`FunctionTool` fields; others,
# such as `defer_loading`, would reach the template as extras of their own).
_FUNCTION_TOOL_KEYS: Final = frozenset({"type", "name", "description", "parameters", "strict"})
# Item statuses vLLM reads as "continue this message" when the last item has one
# (`should_continue_final_message`).
_PARTIAL: Final = ("in_progress", "incomplete")
_STATUSES: Final = frozenset({"completed", *_PARTIAL})


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
    # Read as vLLM reads it (`"5"` is 5: shapes tester, a cut stream's prompt was
    # recounted whole); -1 cuts to the context, which the prompt is within anyway.
    cap = lax_int(body.get("truncate_prompt_tokens"))
    cap = cap if cap is not None and cap > 0 else None
    if kind is Kind.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(_text_only(m) for m in messages):
            return None
        if _k3(upstream_model) and (body.get("response_format") is not None
                                    or _forced_tool_choice(body)):
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
    if kind is Kind.RESPONSES:
        responses = _responses(body, upstream_model)
        return None if responses is None else Recount((), (responses,))
    return None


def _responses(body: dict[str, Any], upstream_model: str) -> dict[str, Any] | None:
    """The /tokenize body counting what vLLM's Responses endpoint fed the model, or None
    where it cannot be proven the same: stored history (`previous_response_id`,
    `previous_input_messages`), `truncation: auto` (vLLM may cut the prompt), a harmony
    model, tools other than function tools (or any with `tool_choice: none`, which a
    server flag may drop), and input items other than text messages and string function
    call outputs (function calls, media, files, reasoning, item references)."""
    if HARMONY_NAME in upstream_model.lower():
        return None
    for name in ("previous_response_id", "previous_input_messages", "prompt"):
        if body.get(name) is not None:
            return None
    if body.get("truncation") not in (None, "disabled"):
        return None
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        return None
    # `construct_input_messages`: the instructions as a system message (when not empty),
    # then a string input as one user message, or each item as chat message(s).
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    continue_final = False
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        items = _response_items(given)
        if items is None:
            return None
        messages += items
        last = given[-1]
        continue_final = (last.get("type", "message") == "message"
                          and last.get("status") in _PARTIAL)
    else:
        return None
    tools = _response_tools(body.get("tools"), body.get("tool_choice"))
    if tools is None or (tools and _k3(upstream_model) and _forced_tool_choice(body)):
        return None
    kwargs = _response_template_kwargs(body)
    if kwargs is None:
        return None
    # `build_chat_params` sets these two over the client's template arguments (as
    # /tokenize does with its own fields); `build_tok_params` leaves add_special_tokens
    # at its default, True, where /tokenize's default is False.
    out: dict[str, Any] = {"model": upstream_model, "messages": messages,
                           "add_generation_prompt": not continue_final,
                           "continue_final_message": continue_final,
                           "add_special_tokens": True}
    if tools:
        out["tools"] = tools
    if kwargs:
        out["chat_template_kwargs"] = kwargs
    return out


def _response_items(items: list[Any]) -> list[dict[str, Any]] | None:
    """The chat messages vLLM makes of Responses input items
    (`construct_chat_messages_with_tool_call`): an assistant's text (of a list, its first
    part alone) is an assistant message (it would fill the empty content of a tool-call
    message before it: none here); a call's output is a tool message; a user, system or
    developer message goes on as the client sent it. Not a function call: vLLM renders
    its `function` as {name, arguments}, but /tokenize validates a tool call into its
    schema's order, {arguments, name}, and a template that renders the call with `tojson`
    counts the two differently (tests/vllm/test_vllm_responses_recount.py)."""
    out: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            return None
        kind, role = item.get("type", "message"), item.get("role")
        if kind == "function_call_output":
            if not item.keys() <= {"type", "call_id", "output", "id", "status"} \
                    or not isinstance(item.get("call_id"), str) \
                    or not isinstance(item.get("output"), str) or not _id_status(item):
                return None
            out.append({"role": "tool", "content": item["output"],
                        "tool_call_id": item["call_id"]})
        elif kind != "message":
            return None
        elif role == "assistant":
            text = _assistant_text(item)
            if text is None:
                return None
            out.append({"role": "assistant", "content": text})
        elif role in ("user", "system", "developer"):
            content = item.get("content")
            if not item.keys() <= {"type", "role", "content"}:
                return None
            # vLLM renders the item as it came (its chat parser keeps role and content);
            # /tokenize refuses `input_text` parts, which that parser reads as `text`.
            if isinstance(content, str):
                out.append({"role": role, "content": content})
            elif _input_texts(content):
                out.append({"role": role, "content": [{"type": "text", "text": p["text"]}
                                                      for p in content]})
            else:
                return None
        else:
            return None
    return out


def _input_texts(content: Any) -> TypeGuard[list[dict[str, str]]]:
    """Whether a message's content is a list of `input_text` parts (and nothing else)."""
    return isinstance(content, list) and bool(content) and all(
        isinstance(p, dict) and p.keys() == {"type", "text"} and p["type"] == "input_text"
        and isinstance(p["text"], str) for p in content)


def _assistant_text(item: dict[str, Any]) -> str | None:
    """An assistant message item's text as vLLM takes it: string content, or the first
    part of an output message (`type: message`, `output_text` parts)."""
    content = item.get("content")
    if isinstance(content, str):
        return content if item.keys() <= {"type", "role", "content"} else None
    if item.get("type") != "message" or not isinstance(content, list) or not content \
            or not item.keys() <= {"type", "role", "content", "id", "status"} \
            or not _id_status(item):
        return None
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "output_text" \
                or not isinstance(part.get("text"), str) \
                or not part.keys() <= {"type", "text", "annotations"} \
                or part.get("annotations", []) != []:
            return None
    text: str = content[0]["text"]
    return text


def _id_status(item: dict[str, Any]) -> bool:
    return (item.get("id") is None or isinstance(item["id"], str)) and (
        item.get("status") is None or item["status"] in _STATUSES)


def _k3(upstream_model: str) -> bool:
    name = upstream_model.lower()
    return any(k in name for k in K3_NAMES)


def _forced_tool_choice(body: dict[str, Any]) -> bool:
    """A `tool_choice` other than `auto` beside tools: what vLLM hands a renderer (with
    no tools, none)."""
    return bool(body.get("tools")) and body.get("tool_choice") not in (None, "auto")


def _response_tools(tools: Any, tool_choice: Any) -> list[dict[str, Any]] | None:
    """Function tools in the chat form vLLM renders them (`construct_tool_dicts`), or
    None when they cannot be counted."""
    if tools is None or tools == []:
        return []
    if not isinstance(tools, list) or tool_choice == "none":
        return None
    out: list[dict[str, Any]] = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function" \
                or not tool.keys() <= _FUNCTION_TOOL_KEYS \
                or not isinstance(tool.get("name"), str) \
                or not isinstance(tool.get("description"), str | None) \
                or not isinstance(tool.get("parameters"), dict | None) \
                or not isinstance(tool.get("strict"), bool | None):
            return None
        # vLLM drops the unset (null) fields, and renders `strict` only when set.
        fn = {k: v for k, v in tool.items() if k != "type" and v is not None}
        out.append({"type": "function", "function": fn})
    return out


def _response_template_kwargs(body: dict[str, Any]) -> dict[str, Any] | None:
    """The template arguments `ResponsesRequest.build_chat_params` adds to the client's
    `chat_template_kwargs`: `reasoning.effort` as `reasoning_effort` (unless null), and
    `enable_thinking` from it unless the client set it. None where not an object."""
    user = body.get("chat_template_kwargs")
    reasoning = body.get("reasoning")
    if user is None:
        user = {}
    if not isinstance(user, dict) or not isinstance(reasoning, dict | None):
        return None
    effort = None if reasoning is None else reasoning.get("effort")
    if not isinstance(effort, str | None):
        return None
    kwargs = dict(user)
    if effort is not None:
        kwargs["reasoning_effort"] = effort
        if "enable_thinking" not in user:
            kwargs["enable_thinking"] = effort != "none"
    return kwargs


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
    return token_ids(prompt)


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
