"""Token estimates for when no tokenizer and no upstream count are at hand.

`estimate` is a typical-case guess (~4 bytes a token for BPE tokenizers).
`upper_bound` never undercounts a byte-level BPE: every token covers at least
one byte, plus a per-message allowance for the chat template's special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

# Special tokens a chat template adds per message, and once per conversation.
CHAT_PER_MESSAGE = 8
CHAT_PER_CONVERSATION = 8


def estimate(text: str) -> int:
    n = len(text.encode("utf-8", "surrogatepass"))
    return (n + 3) // 4


def upper_bound(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def chat_estimate(contents: Iterable[str]) -> int:
    n = 0
    count = 0
    for c in contents:
        n += estimate(c)
        count += 1
    return n + 3 * count + 3


def chat_upper_bound(contents: Iterable[str]) -> int:
    """Never fewer than a byte-level BPE tokenizer with a chat template would count."""
    n = 0
    count = 0
    for c in contents:
        n += upper_bound(c)
        count += 1
    return n + CHAT_PER_MESSAGE * count + CHAT_PER_CONVERSATION
