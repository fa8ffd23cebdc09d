"""Prompt-token bounds and estimates from bytes, for when no tokenizer is at hand.

A byte-level BPE never emits more tokens than the UTF-8 bytes it encodes, nor does a
SentencePiece or WordPiece tokenizer (a character, or its bytes with byte fallback, per
token), so a prompt has at most as many tokens as the bytes of everything the backend
renders into it, plus the tokens the chat template adds itself. Bytes *after* the
template's case filters (`upper`, `title`) and the tokenizer's Unicode normalizer: NFC
(Qwen's) or NFKC (XLM-R's, T5's: U+FDFA is 3 bytes and 33 once normalized), or lower
case (`do_lower_case`), may lengthen a text, so every byte measure here is of the
longest of the text as sent, upper- and title-cased, in NFC and NFKC, and each
lowercased (`widest_len`; ASCII is all of them).
A chat request's `Tally` adds up:

* `text`: bytes rendered as they are (message strings). A string's compact JSON is never
  shorter than its UTF-8, so one `orjson.dumps` of a message measures all its strings.
* `json`: JSON-valued fields (`tools`, `tool_calls` with their arguments parsed as vLLM
  does, `response_format`, ...) in orjson's indent-2 form. Templates re-serialize them
  with `tojson` (json.dumps, ensure_ascii=False): with no indent that is never longer
  than the indent-2 form; with indent k, at most ceil(k/2) times it.
* `exact`: media items, at the model's `tokens_per_image` / `_audio` / `_video`.

    chat bound = min(max_model_len, k·(text + ceil(indent/2)·json) + exact
                     + chat_template_tokens_per_message·messages
                     + chat_template_tokens_per_request)
        k = prompt_tokens_per_byte (1; more for tokenizers that decompose, or prefix
        every split: every UTF-8 byte count below is times k)

    /v1/completions, per prompt: min(max_model_len, prompt + suffix)
        prompt = UTF-8 bytes + special_tokens_per_prompt, or the count of token ids
        suffix = UTF-8 bytes + special_tokens_per_prompt, when one is sent
    /v1/embeddings, per input: as a completions prompt without suffix
    rerank / score, per pair: min(2·max_model_len + 1, text(query) + text(document) + 1
                                  + chat_template_tokens_per_request + template kwargs)
        text = min(max_model_len, UTF-8 bytes + special_tokens_per_prompt)
    /v1/responses: as chat, each input item (and `instructions`) one message

The estimates (~4 bytes a token) are the typical counts the TPM reservation uses.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

import orjson

from policy.config import Model
from policy.errors import ApiError, invalid_request

# Content-part types rendered as text (vLLM's TEXT_PART_TYPES, and tool_reference).
TEXT_PARTS: Final = frozenset(
    {"text", "input_text", "output_text", "refusal", "thinking", "tool_reference"}
)
# A part is media when its type or one of its keys names a media kind (vLLM reads both:
# the keys where a part has a `uuid`); a text part is held as its text as well.
MEDIA_KINDS: Final = {
    "image_url": "image", "input_image": "image", "image_pil": "image",
    "audio_url": "audio", "input_audio": "audio", "video_url": "video",
    "image_embeds": "embeddings", "audio_embeds": "embeddings",
    "video_embeds": "embeddings", "prompt_embeds": "embeddings",
    "file": "file", "input_file": "file",
}  # fmt: skip
# A content part's keys vLLM 0.32 knows (`_KNOWN_CONTENT_PART_FIELDS`): the others of a
# media part go to the chat template with it.
PART_FIELDS: Final = frozenset({
    "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil",
    "image_url", "input_audio", "name", "prompt_cache_breakpoint", "refusal", "text",
    "thinking", "type", "uuid", "video_embeds", "video_url"})
# Top-level chat fields vLLM hands to the chat template (`functions` too, to be safe).
CHAT_PROMPT_FIELDS: Final = (
    "tools", "functions", "tool_choice", "response_format", "documents",
    "chat_template_kwargs", "reasoning_effort",
)  # fmt: skip
# `chat_template_kwargs` keys no byte count bounds: vLLM hands the kwargs to the
# tokenizer's `apply_chat_template`, so its own parameters there pad the prompt to a
# length, replace the conversation or the template, or tokenize differently (hold bound
# tester: `padding: max_length` billed 4,000 on a 660 hold). Names of the tokenizer's
# special tokens (keys ending in `_token` / `_tokens`) replace them in the template's
# variables: a template that writes `eos_token` after every message repeated the client's
# string there (3,813 billed on 1,970).
TEMPLATE_CALL_KWARGS: Final = frozenset({
    "chat_template", "conversation", "documents", "max_length", "messages", "padding",
    "return_assistant_tokens_mask", "return_dict", "return_tensors", "special_tokens_map",
    "tokenize", "tokenizer_kwargs", "tools", "truncation"})
# Typical template tokens per chat request (the estimate, not the bound).
CHAT_ESTIMATE_OVERHEAD: Final = 3


# The Unicode normalizations tokenizers apply before they split a text.
_FORMS: Final = ("NFC", "NFKC")


def widest_len(text: str) -> int:
    """UTF-8 bytes of `text` at its longest as a template and a tokenizer may make it:
    as sent, upper-cased or title-cased (Jinja's `upper` and `title`: real templates
    case a role or a tool's types, and `ΐ` is 2 bytes and 6 in upper case: hold bound
    retest, 3,608 billed on a 1,754 hold), each in its NFC or NFKC form, and any of them
    lowercased (vLLM lowercases a pooling model's input with its sentence-transformers
    `do_lower_case`, a tokenizer may: `Ⱥ` is 2 bytes and 3 in lower case; pooling
    tester)."""
    forms = {text, text.upper(), text.title()}
    forms.update([unicodedata.normalize(f, t) for t in forms for f in _FORMS
                  if not unicodedata.is_normalized(f, t)])
    forms.update([t.lower() for t in forms])
    return max(len(t.encode("utf-8", "surrogatepass")) for t in forms)


def _excess(dumped: bytes) -> int:
    """What normalizing the UTF-8 `dumped` may add to its length (0 for ASCII)."""
    return 0 if dumped.isascii() else widest_len(dumped.decode("utf-8", "surrogatepass")) - len(
        dumped)


def utf8_len(text: str) -> int:
    """UTF-8 bytes of `text`, at its widest normalization (no copy for ASCII)."""
    return len(text) if text.isascii() else widest_len(text)


def json_len(value: Any) -> int:
    """Bytes of `value`'s compact JSON: at least the UTF-8 bytes of every string in it
    (at their widest normalization)."""
    dumped = orjson.dumps(value)
    return len(dumped) + _excess(dumped)


# A small value is rendered by orjson (in C, ~20x the walk's speed): its rendering is
# at most size x depth, a few MB at this size.
_RENDER_MAX = 16 << 10
# A float Python spells otherwise than orjson: in exponent form (1e-07 / 1e-7), and where
# Python uses an exponent and orjson does not (below 1e-4, from 1e16). A match inside a
# string only sends the value to the walk.
_EXPONENT = re.compile(rb"[0-9][eE]|\.0000|[0-9]{16,}\.")


def json_indent2_len(value: Any) -> int:
    """Bytes of `value` (parsed by orjson: no NaN or Infinity) rendered as JSON with
    indent 2 by Python's encoder, what chat templates' `tojson` uses. A small value
    without exponent floats is rendered by orjson; any other is measured by
    `indent2_len`, without rendering it."""
    try:
        compact = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return _indent2_walk(value, scalars=True)
    if len(compact) <= _RENDER_MAX and not _EXPONENT.search(compact):
        return len(orjson.dumps(value, option=orjson.OPT_INDENT_2)) + _excess(compact)
    return len(compact) + _excess(compact) + _indent2_walk(value, scalars=False)


def indent2_len(value: Any) -> int:
    """As `json_indent2_len`, for any value (NaN and Infinity too, from the stdlib's
    parser), computed without rendering it: linear in the value's size. (The rendering
    grows with size x depth: a body of deeply nested arrays would take seconds and
    hundreds of MB.) The compact form comes from orjson when it can; values it refuses
    (past 255 levels, integers past 64 bits, lone surrogates) are measured item by item."""
    try:
        compact = json_len(value)
    except orjson.JSONEncodeError:
        return _indent2_walk(value, scalars=True)
    return compact + _indent2_walk(value, scalars=False)


def _indent2_walk(value: Any, scalars: bool) -> int:
    """What indent 2 adds to orjson's compact form: before each item of a non-empty
    container at depth d a newline and 2(d+1) spaces, before its closer a newline and 2d
    spaces, a space after each key's colon, and Python's longer spelling of some floats
    (`1e-07` for orjson's `1e-7`, `NaN` for `null`). With `scalars`, the compact form's own
    bytes too."""
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            items = len(v)
            if items:
                total += items * (2 * depth + 4) + 2 * depth + 1
                stack.extend((x, depth + 1) for x in v.values())
            if scalars:  # braces, commas, colons, keys
                total += 2 + max(0, items - 1) + items + sum(_scalar_len(str(k)) for k in v)
        elif isinstance(v, list | tuple):
            items = len(v)
            if items:
                total += items * (2 * depth + 3) + 2 * depth + 1
                stack.extend((x, depth + 1) for x in v)
            if scalars:  # brackets, commas
                total += 2 + max(0, items - 1)
        elif scalars:
            total += _scalar_len(v)
        elif isinstance(v, float):
            total += len(json.dumps(v)) - len(orjson.dumps(v))
    return total


def _scalar_len(v: Any) -> int:
    """Bytes of a scalar's JSON as Python's encoder writes it (ensure_ascii off)."""
    if isinstance(v, float):
        return len(json.dumps(v))
    try:
        return json_len(v)
    except orjson.JSONEncodeError:  # an integer past 64 bits, a lone surrogate
        return widest_len(json.dumps(v, ensure_ascii=False))


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
        n = (model.prompt_tokens_per_byte
             * (self.text + json_factor(model.chat_template_json_indent) * self.json)
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
        message_tally(message, "messages", i, model, tally)
    for name in CHAT_PROMPT_FIELDS:
        value = body.get(name)
        if name == "chat_template_kwargs":
            template_kwargs_tally(value, tally)
        elif name == "tools" and isinstance(value, list):
            tools_tally(rendered_tools(value), tool_repeats(messages), tally)
        else:
            field_tally(value, tally)
    return tally.estimate(), tally.bound(model)


def template_kwargs_tally(value: Any, tally: Tally) -> None:
    """`chat_template_kwargs`, after the messages are tallied: a 400 for a key no byte
    count bounds (`TEMPLATE_CALL_KWARGS`, special tokens), else the kwargs as JSON, once
    for each message and once more: a template may write a variable of its own in every
    message (one that writes it more often than that is the operator's to know)."""
    if isinstance(value, dict):
        for key, v in value.items():
            if key in TEMPLATE_CALL_KWARGS or key.endswith("_token") or (
                    # (a count such as `max_thinking_tokens` is no token list)
                    key.endswith("_tokens") and not _is_count(v)):
                raise invalid_request(
                    f"'chat_template_kwargs.{key}' is not accepted here: it changes how the "
                    "backend renders or tokenizes the prompt (a tokenizer parameter, a "
                    "template input or a special token), which no count of the request "
                    "bounds.", f"chat_template_kwargs.{key}")
    once = Tally()
    field_tally(value, once)
    times = tally.messages + 1
    tally.text += once.text * times
    tally.json += once.json * times


def tools_tally(rendered: list[Any], times: int, tally: Tally) -> None:
    """Tools in the chat form vLLM renders (`rendered_tools`): their JSON at the
    template's indent and their parameters once more (`properties_len`), `times` over
    (`tool_repeats`)."""
    once = Tally()
    field_tally(rendered, once)
    once.text += sum(properties_len(tool) for tool in rendered)
    tally.text += once.text * times
    tally.json += once.json * times


def tool_repeats(messages: list[Any]) -> int:
    """How many times a template may write the tool list: once, or before every user
    message equal to the last one, as Mistral's HF templates do (`message ==
    user_messages[-1]`: a user who said "yes" ten times had the tools written ten times;
    hold bound retest, 15,719 billed on a 4,674 hold). Messages compare by their text
    (parts joined as vLLM joins them), which finds every pair the template's comparison
    finds, and maybe more."""
    users = [_compared(m) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return max(1, users.count(users[-1])) if users else 1


# A chat part's text as vLLM 0.32 reads it (`MM_PARSER_MAP`, `TEXT_PART_TYPES`), by type.
_TEXT_OF: Final = {"text": "text", "input_text": "text", "output_text": "text",
                   "thinking": "thinking", "refusal": "refusal"}


def _compared(message: dict[str, Any]) -> Any:
    """A user message's content as the template compares it: a list of parts becomes the
    text vLLM makes of it (each text, thinking or refusal part's text, the empty ones
    dropped, joined by line ends; media left out: two messages equal here may differ in
    their media, which only counts the tools more often; hold bound retest 3: refusal
    parts and empty text parts were missed)."""
    content = message.get("content")
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        text: Any = part
        if isinstance(part, dict):
            kind = part.get("type")
            key = _TEXT_OF.get(kind) if isinstance(kind, str) else None
            if key is None or part.get("uuid") is not None:
                continue
            text = part.get(key)
        if isinstance(text, str) and text:
            texts.append(text)
    return "\n".join(texts)


def _is_count(value: Any) -> bool:
    return value is None or isinstance(value, int | float)


def properties_len(tool: Any) -> int:
    """A tool's `function.parameters.properties` (in the chat form vLLM renders) once more,
    as text, beyond the tool's JSON: a template may write each parameter's name, type and
    description in a signature and a docstring beside the schema (vLLM's Hermes tool
    template: each name three times; hold bound retest, 3,960 billed on a 3,386 hold)."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    params = fn.get("parameters") if isinstance(fn, dict) else None
    props = params.get("properties") if isinstance(params, dict) else None
    return 0 if props is None else json_len(props)


def rendered_tools(tools: Any) -> Any:
    """Function tools at least as long as vLLM hands them to the template: validated and
    dumped, so `function.description` and `.parameters` are there as null when the
    client left them out, and a tool's `defer_loading` is copied into its function
    (vLLM drops unknown keys and null `strict` / `defer_loading`: never longer). A
    minimal tool renders about twice its own bytes: a byte bound of the client's JSON
    alone fell short."""
    if not isinstance(tools, list):
        return tools
    out: list[Any] = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            out.append(tool)
            continue
        full = {"description": None, "parameters": None, **fn}
        if tool.get("defer_loading") is not None and fn.get("defer_loading") is None:
            full["defer_loading"] = tool["defer_loading"]
        out.append({**tool, "function": full})
    return out


def field_tally(value: Any, tally: Tally) -> None:
    """A top-level field the template renders: a string as text, else as JSON."""
    if isinstance(value, dict | list):
        tally.json += json_indent2_len(value)
    elif value is not None:
        tally.text += json_len(value)


def message_tally(m: Any, field: str, i: int, model: Model, tally: Tally) -> None:
    """One chat message (`field[i]` names it in a 400); `tally.messages` is the caller's."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise invalid_request("Each message must be an object with a string 'role'.",
                              f"{field}[{i}]")
    content = m.get("content")
    if content is not None and not isinstance(content, str | list):
        raise invalid_request("'content' must be a string, an array of parts, or null.",
                              f"{field}[{i}].content")
    nested = [k for k, v in m.items() if isinstance(v, dict | list)]
    if not nested:  # the common case: strings only, measured by one dump
        tally.text += json_len(m)
        return
    tally.text += json_len({k: v for k, v in m.items() if k not in nested})
    for k in nested:
        if k == "content":
            parts_tally(m[k], f"{field}[{i}].content", model, tally)
        elif k == "tool_calls":
            _tool_calls(m[k], tally)
        else:
            tally.json += json_indent2_len(m[k])


def parts_tally(parts: list[Any], param: str, model: Model, tally: Tally) -> None:
    """Content parts: text as its JSON bytes, media at the model's per-item tokens."""
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid_request("Each content part must be an object with a 'type'.",
                                  f"{param}[{j}]")
        kinds = {MEDIA_KINDS[k] for k in part.keys() & MEDIA_KINDS.keys()}
        if part["type"] in MEDIA_KINDS:
            kinds.add(MEDIA_KINDS[part["type"]])
        if kinds:
            tally.exact += _media_tokens(kinds, model, f"{param}[{j}]")
            # vLLM hands a media part's keys it does not know to the template beside it,
            # which may render them (`tojson`): held as text (retest's review note).
            extra = {k: v for k, v in part.items() if k not in PART_FIELDS}
            if extra:
                tally.text += json_len(extra)
        # A text part is text even with a media key beside it: vLLM reads a part by its
        # type (by its keys only where it has a `uuid`), so such a part is held as both;
        # and so is one with a `uuid` and a `tool_reference` key, text to vLLM whatever its
        # type (its `name`: retest).
        if part["type"] in TEXT_PARTS or (
                part.get("uuid") is not None and "tool_reference" in part):
            tally.text += json_len(part)
        elif not kinds:
            raise invalid_request(f"Unsupported content part type {part['type']!r}.",
                                  f"{param}[{j}]")


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


def _tool_calls(calls: Any, tally: Tally) -> None:
    """As sent, plus each string `arguments` parsed (vLLM renders it as an object)."""
    tally.json += json_indent2_len(calls)
    if not isinstance(calls, list):
        return
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if isinstance(args, str) and args:
            tally.json += arguments_len(args)


def arguments_len(args: str) -> int:
    """Indent-2 bytes of a tool call's `arguments` string parsed as vLLM parses it (0 when
    it is not JSON: vLLM renders `{}` in its place)."""
    try:
        parsed = json.loads(args)  # the stdlib, as vLLM: it takes NaN and big integers
    except (ValueError, RecursionError):
        return 0
    return indent2_len(parsed)


def completion_prompt(body: dict[str, Any], model: Model) -> tuple[int, int, int]:
    """(estimate, bound, number of prompts) of a /v1/completions request."""
    prompts = prompt_list(body.get("prompt"), "prompt")
    if any(not p for p in prompts):
        # vLLM 0.32 refuses an empty prompt, text or token ids, alone or in a batch.
        raise invalid_request("'prompt' must not be empty, nor hold an empty prompt.",
                              "prompt")
    suffix = body.get("suffix")
    if suffix is not None and not isinstance(suffix, str):
        raise invalid_request("'suffix' must be a string.", "suffix")
    refuse_past_context(prompts, body, model, "prompt", generates=True)
    estimate, bound = batch_bound(prompts, model, suffix)
    return estimate, bound, len(prompts)


def refuse_past_context(prompts: list[str] | list[list[int]], body: dict[str, Any],
                        model: Model, param: str, generates: bool = False) -> None:
    """A 400 before the hold for a token-id prompt longer than the model's context: its
    length is exact, and vLLM refuses it (after the gateway had taken the key's request
    and held its tokens). A prompt that fills the context exactly is refused too where
    the request `generates`: vLLM clamps `max_tokens` to the room left and refuses 0
    ("max_tokens must be at least 1, got 0"). Text prompts are counted by the backend's
    tokenizer, and `truncate_prompt_tokens` has vLLM cut the prompt instead, so neither
    is judged here."""
    limit = model.max_model_len
    if limit is None or body.get("truncate_prompt_tokens") is not None:
        return
    for p in prompts:
        if isinstance(p, str):
            continue
        if len(p) > limit:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt contains {len(p)} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.",
                param)
        if generates and len(p) == limit:
            raise invalid_request(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt contains {len(p)} input tokens, which leaves no room for output "
                "tokens. Please reduce the length of the input prompt.", param)


def batch_bound(prompts: list[str] | list[list[int]], model: Model,
                suffix: str | None = None) -> tuple[int, int]:
    """(estimate, bound) of a batch of prompts, each bounded on its own (see the module
    docstring); /v1/embeddings inputs are bounded as completions prompts without suffix."""
    per_byte = model.prompt_tokens_per_byte
    suffix_bytes = utf8_len(suffix) if suffix else 0
    suffix_bound = per_byte * suffix_bytes + model.special_tokens_per_prompt if suffix else 0
    estimate = bound = 0
    for p in prompts:
        if isinstance(p, str):
            n = utf8_len(p)
            estimate += estimate_bytes(n + suffix_bytes)
            n = per_byte * n + model.special_tokens_per_prompt
        else:
            n = len(p)
            estimate += n + estimate_bytes(suffix_bytes)
        bound += capped(n + suffix_bound, model.max_model_len)
    return estimate, bound


# A string vLLM's request models read as an integer (pydantic, lax): " 7", "+5", "1_000",
# "1.00"; not "1e3", "0x10", "1.".
_ID_TEXT: Final = re.compile(r"\s*[+-]?[0-9](?:_?[0-9])*(?:\.0+)?\s*", re.ASCII)


def is_token_id(t: Any) -> bool:
    """A token id as vLLM's request models read one in a list of ids (lax): an integer, a
    boolean, a float with no fraction, or a string of one (`1.0` and `"1"` are 1; its
    range is the backend's to check). A list of strings alone is text prompts."""
    return (type(t) in (int, bool) or (type(t) is float and t.is_integer())
            or (type(t) is str and _ID_TEXT.fullmatch(t) is not None))


_ZERO: Final = re.compile(r"[0_]+(?:\.0+)?")  # "-0", "-0_0", "-0.00": not negative


def _non_negative(prompts: list[list[Any]], param: str) -> list[list[int]]:
    """Lists of token ids, none negative: vLLM's request models refuse one (`ge=0`), after
    admission (tester: `[-1, 5]` held, then vLLM's 400 of six validation errors)."""
    for ids in prompts:
        for t in ids:
            # (As text, its sign and digits: a float of 400 digits is inf, and int(inf) a
            # 500: retest.)
            if (t.lstrip().startswith("-") and not _ZERO.fullmatch(t.strip()[1:])
                    if type(t) is str else t < 0):
                raise invalid_request(
                    f"'{param}' holds a negative token id: {str(t)[:40]!r}.", param)
    return prompts


def token_ids(prompt: Any) -> bool:
    """Whether a completions `prompt` (an embeddings `input`) entry is one list of ids."""
    return (isinstance(prompt, list) and bool(prompt) and all(is_token_id(t) for t in prompt)
            and not all(isinstance(t, str) for t in prompt))


def prompt_list(prompt: Any, param: str) -> list[str] | list[list[int]]:
    """The prompts of a completions `prompt` (or embeddings `input`): a string, strings,
    token ids, or lists of ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str) and all(isinstance(p, str) for p in prompt):
            return prompt
        if token_ids(prompt):
            return _non_negative([prompt], param)
        if isinstance(first, list) and all(
            isinstance(p, list) and all(is_token_id(t) for t in p) for p in prompt
        ):
            return _non_negative(prompt, param)
    raise invalid_request(
        f"'{param}' must be a string, an array of strings, an array of token ids, or an "
        "array of arrays of token ids.", param)


def text_bound(text: str, model: Model) -> int:
    """Tokens one text input may become: its UTF-8 bytes plus the special tokens, capped."""
    return capped(model.prompt_tokens_per_byte * utf8_len(text)
                  + model.special_tokens_per_prompt, model.max_model_len)


def pairs_bound(queries: list[str], docs: list[str], model: Model,
                per_pair: int) -> tuple[int, int]:
    """(estimate, bound) of scoring `queries` against `docs` (one query for all, or one
    each). Per pair, what vLLM counts: a bi-encoder both texts and a padding token; a
    cross-encoder the pair in one prompt. `per_pair`: the template's tokens on top. Capped
    at twice the context (each text of a bi-encoder pair may fill it) plus one."""
    one = len(queries) == 1
    cap = None if model.max_model_len is None else 2 * model.max_model_len + 1
    estimate = bound = 0
    for i, doc in enumerate(docs):
        q = queries[0 if one else i]
        estimate += estimate_bytes(utf8_len(q) + utf8_len(doc)) + 1
        bound += capped(text_bound(q, model) + text_bound(doc, model) + 1 + per_pair, cap)
    return estimate, bound
