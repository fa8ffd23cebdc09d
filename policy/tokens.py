"""Prompt-token bounds and estimates from bytes, for when no tokenizer is at hand.

A byte-level BPE never emits more tokens than the UTF-8 bytes it encodes, so a prompt
has at most as many tokens as the bytes of everything the backend renders into it, plus
the tokens the chat template adds itself. A chat request's `Tally` adds up:

* `text`: bytes rendered as they are (message strings). A string's compact JSON is never
  shorter than its UTF-8, so one `orjson.dumps` of a message measures all its strings.
* `json`: JSON-valued fields (`tools`, `tool_calls` with their arguments parsed as vLLM
  does, `response_format`, ...) in orjson's indent-2 form. Templates re-serialize them
  with `tojson` (json.dumps, ensure_ascii=False): with no indent that is never longer
  than the indent-2 form; with indent k, at most ceil(k/2) times it.
* `exact`: media items, at the model's `tokens_per_image` / `_audio` / `_video`.

    chat bound = min(max_model_len, text + ceil(indent/2)·json + exact
                     + chat_template_tokens_per_message·messages
                     + chat_template_tokens_per_request)

    /v1/completions, per prompt: min(max_model_len, prompt + suffix)
        prompt = UTF-8 bytes + special_tokens_per_prompt, or the count of token ids
        suffix = UTF-8 bytes + special_tokens_per_prompt, when one is sent

The estimates (~4 bytes a token) are the typical counts the TPM reservation uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import orjson

from policy.config import Model
from policy.errors import ApiError, invalid_request

# Content-part types rendered as text (vLLM's TEXT_PART_TYPES, and tool_reference).
TEXT_PARTS: Final = frozenset(
    {"text", "input_text", "output_text", "refusal", "thinking", "tool_reference"}
)
# A part is media when its type or one of its keys names a media kind (vLLM reads both).
MEDIA_KINDS: Final = {
    "image_url": "image", "input_image": "image", "image_pil": "image",
    "audio_url": "audio", "input_audio": "audio", "video_url": "video",
    "image_embeds": "embeddings", "audio_embeds": "embeddings",
    "video_embeds": "embeddings", "prompt_embeds": "embeddings",
    "file": "file", "input_file": "file",
}  # fmt: skip
# Top-level chat fields vLLM hands to the chat template (`functions` too, to be safe).
CHAT_PROMPT_FIELDS: Final = (
    "tools", "functions", "tool_choice", "response_format", "documents",
    "chat_template_kwargs", "reasoning_effort",
)  # fmt: skip
# Typical template tokens per chat request (the estimate, not the bound).
CHAT_ESTIMATE_OVERHEAD: Final = 3


def utf8_len(text: str) -> int:
    """UTF-8 bytes of `text` (no copy for ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def json_len(value: Any) -> int:
    """Bytes of `value`'s compact JSON: at least the UTF-8 bytes of every string in it."""
    return len(orjson.dumps(value))


def json_indent2_len(value: Any) -> int:
    """Bytes of `value` rendered as JSON with indent 2 (orjson; the stdlib for the values
    orjson refuses, e.g. integers past 64 bits from a parsed `arguments` string)."""
    try:
        return len(orjson.dumps(value, option=orjson.OPT_INDENT_2))
    except orjson.JSONEncodeError:
        return len(json.dumps(value, indent=2, ensure_ascii=False).encode())


def json_factor(indent: int) -> int:
    """How many indent-2 renderings cover one at `indent` (ceil(indent/2), at least 1)."""
    return max(1, (indent + 1) // 2)


def estimate_bytes(n: int) -> int:
    """Typical tokens of `n` bytes of text (~4 bytes a token for BPE tokenizers)."""
    return (n + 3) // 4


def capped(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


@dataclass(slots=True)
class Tally:
    """What a chat request renders into its prompt; see the module docstring."""

    text: int = 0
    json: int = 0
    exact: int = 0
    messages: int = 0

    def bound(self, model: Model) -> int:
        n = (self.text + json_factor(model.chat_template_json_indent) * self.json
             + self.exact + model.chat_template_tokens_per_message * self.messages
             + model.chat_template_tokens_per_request)
        return capped(n, model.max_model_len)

    def estimate(self) -> int:
        return estimate_bytes(self.text + self.json) + self.exact + CHAT_ESTIMATE_OVERHEAD


def chat_prompt(body: dict[str, Any], model: Model) -> tuple[int, int]:
    """(estimate, bound) of a chat request's prompt tokens; a 400 names a bad field."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("'messages' must be a non-empty array.", "messages")
    tally = Tally(messages=len(messages))
    for i, message in enumerate(messages):
        _message(message, i, model, tally)
    for name in CHAT_PROMPT_FIELDS:
        _field(body.get(name), tally)
    return tally.estimate(), tally.bound(model)


def _field(value: Any, tally: Tally) -> None:
    if isinstance(value, dict | list):
        tally.json += json_indent2_len(value)
    elif value is not None:
        tally.text += json_len(value)


def _message(m: Any, i: int, model: Model, tally: Tally) -> None:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise invalid_request("Each message must be an object with a string 'role'.",
                              f"messages[{i}]")
    content = m.get("content")
    if content is not None and not isinstance(content, str | list):
        raise invalid_request("'content' must be a string, an array of parts, or null.",
                              f"messages[{i}].content")
    nested = [k for k, v in m.items() if isinstance(v, dict | list)]
    if not nested:  # the common case: strings only, measured by one dump
        tally.text += json_len(m)
        return
    tally.text += json_len({k: v for k, v in m.items() if k not in nested})
    for k in nested:
        if k == "content":
            _parts(m[k], i, model, tally)
        elif k == "tool_calls":
            _tool_calls(m[k], i, tally)
        else:
            tally.json += json_indent2_len(m[k])


def _parts(parts: list[Any], i: int, model: Model, tally: Tally) -> None:
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid_request("Each content part must be an object with a 'type'.",
                                  f"messages[{i}].content[{j}]")
        kinds = {MEDIA_KINDS[k] for k in part.keys() & MEDIA_KINDS.keys()}
        if part["type"] in MEDIA_KINDS:
            kinds.add(MEDIA_KINDS[part["type"]])
        if kinds:
            tally.exact += _media_tokens(kinds, model, f"messages[{i}].content[{j}]")
        elif part["type"] in TEXT_PARTS:
            tally.text += json_len(part)
        else:
            raise invalid_request(f"Unsupported content part type {part['type']!r}.",
                                  f"messages[{i}].content[{j}]")


def _media_tokens(kinds: set[str], model: Model, param: str) -> int:
    """The most tokens one media part may add; a 400 when the model cannot bound it."""
    per_item = {"image": model.tokens_per_image, "audio": model.tokens_per_audio,
                "video": model.tokens_per_video}
    worst = 0
    for kind in sorted(kinds):
        n = per_item.get(kind)
        if n is None:
            raise _unbounded_part(kind, param)
        worst = max(worst, n)
    return worst


def _unbounded_part(kind: str, param: str) -> ApiError:
    if kind in ("embeddings", "file"):
        why = f"{kind} parts are not accepted: their size does not bound their tokens."
    else:
        why = (f"{kind} parts are not accepted for this model: it sets no "
               f"tokens_per_{kind}, and their bytes do not bound their tokens.")
    return invalid_request(why[0].upper() + why[1:], param)


def _tool_calls(calls: Any, i: int, tally: Tally) -> None:
    """As sent, plus each string `arguments` parsed (vLLM renders it as an object)."""
    tally.json += json_indent2_len(calls)
    if not isinstance(calls, list):
        return
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if not isinstance(args, str) or not args:
            continue
        try:
            parsed = json.loads(args)  # the stdlib, as vLLM: it takes NaN and big integers
        except (ValueError, RecursionError):
            continue  # vLLM renders `{}` in its place
        try:
            tally.json += json_indent2_len(parsed)
        except (ValueError, RecursionError):
            raise invalid_request(
                "Tool call arguments are nested too deeply.",
                f"messages[{i}].tool_calls[{j}].function.arguments") from None


def completion_prompt(body: dict[str, Any], model: Model) -> tuple[int, int, int]:
    """(estimate, bound, number of prompts) of a /v1/completions request."""
    prompts = _prompt_list(body.get("prompt"))
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise invalid_request("'suffix' must be a string.", "suffix")
    suffix_bytes = utf8_len(suffix) if suffix else 0
    suffix_bound = suffix_bytes + model.special_tokens_per_prompt if suffix else 0
    estimate = bound = 0
    for p in prompts:
        if isinstance(p, str):
            n = utf8_len(p)
            estimate += estimate_bytes(n + suffix_bytes)
            n += model.special_tokens_per_prompt
        else:
            n = len(p)
            estimate += n + estimate_bytes(suffix_bytes)
        bound += capped(n + suffix_bound, model.max_model_len)
    return estimate, bound, len(prompts)


def _prompt_list(prompt: Any) -> list[str] | list[list[int]]:
    """The prompts of a completions `prompt`: a string, strings, token ids, or lists of ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str) and all(isinstance(p, str) for p in prompt):
            return prompt
        if type(first) is int and all(type(t) is int for t in prompt):
            return [prompt]
        if isinstance(first, list) and all(
            isinstance(p, list) and all(type(t) is int for t in p) for p in prompt
        ):
            return prompt
    raise invalid_request(
        "'prompt' must be a string, an array of strings, an array of token ids, or an "
        "array of arrays of token ids.", "prompt")
