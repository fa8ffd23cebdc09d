"""Deterministic toy tokenizer and text generator for the upstream simulator.

Token counts are chosen so tests (and the gateway's metering) can predict usage exactly:

* ``count_tokens(text)``: one token per match of the regex ``\\w+|[^\\w\\s]``, i.e. every
  run of word characters is one token and every other non-space character is one token.
  ``"Hello, world!"`` -> ``Hello`` ``,`` ``world`` ``!`` -> 4. Every token covers at least
  one byte, as with a byte-level BPE.
* ``prompt_tokens_chat(messages, request)`` = ``sum(message_tokens(m)) + 3`` plus, from
  ``request``, the tokens of every top-level field vLLM hands to the chat template
  (``TEMPLATE_FIELDS``; ``tool_choice`` only with ``tools``): a string as text, anything
  else as its JSON (``json.dumps(..., ensure_ascii=False)``, as Transformers' ``tojson``).
* ``message_tokens(m)`` = 3 (role/template framing) + ``count_tokens(text(m))`` +
  ``MEDIA_TOKENS`` per media part + the tokens of every other field but ``role``: a string
  as text, anything else as its JSON, with an assistant's tool-call ``arguments`` string
  parsed first as vLLM does (``{}`` when it is not a JSON object). ``text(m)`` is the
  message's ``content`` when it is a string, the text of its text parts joined by ``" "``
  when it is a list, and ``""`` when absent/null.
* ``prompt_token_counts(prompt, suffix)``: per prompt, as vLLM batches them: a string ->
  ``count_tokens``; a list of strings -> one count each; a list of ints (token ids) -> its
  length; a list of lists of ints -> one length each; plus ``count_tokens(suffix)`` each.
  ``prompt_tokens_completion`` is their sum (vLLM's ``usage.prompt_tokens``).
* Generated output is exactly ``max_tokens`` tokens per sequence. Token ``i`` is
  ``WORDS[i % len(WORDS)]``, with a leading space for every token but the first, so
  ``count_tokens(output_text(n)) == n``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")

# Cycled to produce output; every entry is one \w+ run, so each token counts as exactly 1.
WORDS: Final[tuple[str, ...]] = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
    "dolore", "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis",
)  # fmt: skip

# Per-message and per-conversation overhead of the chat template (see module docstring).
CHAT_TOKENS_PER_MESSAGE: Final = 3
CHAT_TOKENS_REPLY_PRIMER: Final = 3
# Prompt tokens of one image, audio or video part.
MEDIA_TOKENS: Final = 64

# Content parts rendered as text, and the key holding their text.
TEXT_PART_KEYS: Final = {"text": "text", "input_text": "text", "output_text": "text",
                         "refusal": "refusal", "thinking": "thinking"}
MEDIA_PARTS: Final = frozenset({"image_url", "input_image", "image_pil", "audio_url",
                                "input_audio", "video_url"})
# Top-level chat fields vLLM passes to the chat template.
TEMPLATE_FIELDS: Final = ("tools", "tool_choice", "response_format", "documents",
                          "chat_template_kwargs", "reasoning_effort")

# Output text for up to this many tokens is sliced from one precomputed string.
_PRECOMPUTED: Final = 4096


def count_tokens(text: str) -> int:
    """Number of toy tokens in ``text`` (words and single punctuation characters)."""
    return sum(1 for _ in TOKEN_RE.finditer(text))


def tojson(value: Any) -> str:
    """JSON as a chat template's ``tojson`` renders it."""
    return json.dumps(value, ensure_ascii=False)


def _value_tokens(value: Any) -> int:
    if value is None:
        return 0
    return count_tokens(value if isinstance(value, str) else tojson(value))


def message_text(content: Any) -> str:
    """Text of a chat message ``content``: a string, a list of parts, or null."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get(TEXT_PART_KEYS[kind], ""))
            for part in content
            if isinstance(part, Mapping)
            and (kind := part.get("type", "text")) in TEXT_PART_KEYS
        )
    return ""


def media_parts(content: Any) -> int:
    """Number of image, audio and video parts in a message ``content``."""
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if isinstance(p, Mapping) and p.get("type") in MEDIA_PARTS)


def template_tool_calls(calls: Any) -> Any:
    """Tool calls as vLLM hands them to the template: string arguments parsed to objects."""
    if not isinstance(calls, list):
        return calls
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping) and not isinstance(fn.get("arguments"), dict):
            args = fn.get("arguments")
            try:
                parsed = json.loads(args) if isinstance(args, str) and args else {}
            except (ValueError, RecursionError):
                parsed = {}
            fn = {**fn, "arguments": parsed if isinstance(parsed, dict) else {}}
            call = {**call, "function": fn}
        out.append(call)
    return out


def message_tokens(message: Mapping[str, Any]) -> int:
    """Prompt tokens of one chat message (see the module docstring)."""
    total = CHAT_TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            total += count_tokens(message_text(value)) + MEDIA_TOKENS * media_parts(value)
        elif key == "tool_calls" and message.get("role") == "assistant":
            total += _value_tokens(template_tool_calls(value))
        elif key != "role":
            total += _value_tokens(value)
    return total


def prompt_tokens_chat(
    messages: Iterable[Mapping[str, Any]], request: Mapping[str, Any] | None = None
) -> int:
    """Prompt tokens of a chat request: its messages, and the template fields of ``request``."""
    total = CHAT_TOKENS_REPLY_PRIMER + sum(message_tokens(m) for m in messages)
    if request is not None:
        for name in TEMPLATE_FIELDS:
            if name != "tool_choice" or request.get("tools"):
                total += _value_tokens(request.get(name))
    return total


def prompt_token_counts(prompt: str | Sequence[Any], suffix: str | None = None) -> list[int]:
    """Prompt tokens of each prompt of a completions request (see the module docstring)."""
    if isinstance(prompt, str):
        counts = [count_tokens(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        counts = [count_tokens(p) for p in prompt]
    elif prompt and isinstance(prompt[0], list):
        counts = [len(p) for p in prompt]
    else:
        counts = [len(prompt)]  # a flat list of token ids
    extra = count_tokens(suffix) if suffix else 0
    return [c + extra for c in counts]


def prompt_tokens_completion(prompt: str | Sequence[Any], suffix: str | None = None) -> int:
    """Prompt tokens of a completions request: the sum over its prompts."""
    return sum(prompt_token_counts(prompt, suffix))


def token_text(i: int) -> str:
    """Text of generated token ``i`` (0-based)."""
    word = WORDS[i % len(WORDS)]
    return word if i == 0 else " " + word


# TOKEN_TEXTS[i] == token_text(i) for the first _PRECOMPUTED tokens; _ENDS[n] is the length
# of the first n tokens joined, so output_text(n) is a single slice.
TOKEN_TEXTS: Final[tuple[str, ...]] = tuple(token_text(i) for i in range(_PRECOMPUTED))
_JOINED: Final = "".join(TOKEN_TEXTS)


def _prefix_ends() -> tuple[int, ...]:
    ends = [0]
    for text in TOKEN_TEXTS:
        ends.append(ends[-1] + len(text))
    return tuple(ends)


_ENDS: Final[tuple[int, ...]] = _prefix_ends()


def output_text(n: int) -> str:
    """The full generated text of ``n`` tokens."""
    if n <= _PRECOMPUTED:
        return _JOINED[: _ENDS[n]]
    return _JOINED + "".join(token_text(i) for i in range(_PRECOMPUTED, n))
