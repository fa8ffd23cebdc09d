"""policy/prompt_count.py: what is asked of a backend's /tokenize for a cut request."""

from __future__ import annotations

from typing import Any

import pytest

from policy.endpoints import Kind
from policy.prompt_count import counted, tokenize_request

MSGS: list[Any] = [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "c", "type": "function",
                                    "function": {"name": "f", "arguments": "{}"}}]}]


def test_chat_sends_the_messages_and_the_fields_a_template_renders() -> None:
    body = {"model": "demo", "messages": MSGS, "tools": [{"type": "function"}],
            "chat_template_kwargs": {"x": 1}, "add_generation_prompt": False,
            "max_tokens": 5, "temperature": 0, "stream": True}
    assert tokenize_request(Kind.CHAT, body, "up") == {
        "model": "up", "messages": MSGS, "tools": [{"type": "function"}],
        "chat_template_kwargs": {"x": 1}, "add_generation_prompt": False}


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "x"}},
                                  {"type": "input_audio"}, "text"])
def test_chat_with_media_or_odd_parts_stays_estimated(part: Any) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    assert tokenize_request(Kind.CHAT, {"messages": msgs}, "up") is None
    assert tokenize_request(Kind.CHAT, {"messages": "nope"}, "up") is None


def test_completions_a_string_is_asked_token_ids_are_counted_here() -> None:
    assert tokenize_request(Kind.COMPLETION, {"prompt": "once", "echo": True}, "up") == {
        "model": "up", "prompt": "once"}
    assert tokenize_request(Kind.COMPLETION, {"prompt": "a", "add_special_tokens": False},
                            "up") == {"model": "up", "prompt": "a", "add_special_tokens": False}
    assert tokenize_request(Kind.COMPLETION, {"prompt": [5, 6, 7]}, "up") == 3
    # Batches and suffixes: /tokenize counts one prompt, with no suffix.
    for body in ({"prompt": ["a", "b"]}, {"prompt": [[1], [2]]}, {"prompt": "a", "suffix": "b"},
                 {"prompt": []}):
        assert tokenize_request(Kind.COMPLETION, body, "up") is None


@pytest.mark.parametrize("kind", [Kind.RESPONSES, Kind.EMBEDDINGS, Kind.SCORE])
def test_other_kinds_stay_estimated(kind: Kind) -> None:
    assert tokenize_request(kind, {"input": "x", "prompt": "x"}, "up") is None


def test_counted_reads_count() -> None:
    assert counted({"count": 12, "tokens": [1] * 12}) == 12
    for bad in ({"count": -1}, {"count": "12"}, {"count": True}, {}, [], None):
        assert counted(bad) is None
