"""Deterministic toy tokenizer and text generator for the upstream simulator.

Token counts are chosen so tests (and the gateway's metering) can predict usage exactly:

* ``count_tokens(text)``: one token per match of the regex ``\\w+|[^\\w\\s]``, i.e. every
  run of word characters is one token and every other non-space character is one token.
  ``"Hello, world!"`` -> ``Hello`` ``,`` ``world`` ``!`` -> 4.
* ``prompt_tokens_chat(messages)`` = ``sum(count_tokens(text(m)) + 3 for m in messages) + 3``
  where ``text(m)`` is the message's ``content`` when it is a string, the ``text`` of its
  ``{"type": "text"}`` parts joined by ``" "`` when it is a list, and ``""`` when absent/null.
  (3 per message for the role/template framing plus 3 for the assistant prompt.)
* ``prompt_tokens_completion(prompt)``: a string -> ``count_tokens(prompt)``; a list of
  strings -> ``count_tokens`` of the first one; a list of ints (token ids) -> its length;
  a list of lists of ints -> the length of the first one.
* Generated output is exactly ``max_tokens`` tokens. Token ``i`` is ``WORDS[i % len(WORDS)]``,
  with a leading space for every token but the first, so
  ``count_tokens(output_text(n)) == n``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")

# Cycled to produce output; every entry is one \w+ run, so each token counts as exactly 1.
WORDS: Final[tuple[str, ...]] = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
    "dolore", "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis",
)  # fmt: skip

# Per-message and per-conversation overhead of the chat template (see module docstring).
CHAT_TOKENS_PER_MESSAGE: Final = 3
CHAT_TOKENS_REPLY_PRIMER: Final = 3

# Output text for up to this many tokens is sliced from one precomputed string.
_PRECOMPUTED: Final = 4096


def count_tokens(text: str) -> int:
    """Number of toy tokens in ``text`` (words and single punctuation characters)."""
    return sum(1 for _ in _TOKEN_RE.finditer(text))


def message_text(content: Any) -> str:
    """Text of a chat message ``content``: a string, a list of parts, or null."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type", "text") == "text"
        )
    return ""


def prompt_tokens_chat(messages: Iterable[Mapping[str, Any]]) -> int:
    """Prompt tokens of a chat request: ``sum(count_tokens(text) + 3) + 3``."""
    total = CHAT_TOKENS_REPLY_PRIMER
    for message in messages:
        total += count_tokens(message_text(message.get("content"))) + CHAT_TOKENS_PER_MESSAGE
    return total


def prompt_tokens_completion(prompt: str | Sequence[Any]) -> int:
    """Prompt tokens of a completions request (see the module docstring for the rules)."""
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if not prompt:
        return 0
    first = prompt[0]
    if isinstance(first, str):
        return count_tokens(first)
    if isinstance(first, list):
        return len(first)
    return len(prompt)  # a flat list of token ids


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
