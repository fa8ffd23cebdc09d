"""policy/prompt_count.py: what is asked of a backend's /tokenize for a cut request."""

from __future__ import annotations

from typing import Any

import pytest

from policy.endpoints import Kind
from policy.prompt_count import counted, tokenize_request, truncated

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


def test_every_text_part_type_is_text() -> None:
    parts = [{"type": t, "text": "x"} for t in ("text", "input_text", "output_text",
                                                 "refusal", "thinking")]
    assert tokenize_request(Kind.CHAT, {"messages": [{"role": "assistant", "content": parts}]},
                            "up") is not None


def test_a_truncated_prompt_is_charged_what_the_backend_kept() -> None:
    assert truncated(500, {"truncate_prompt_tokens": 100}) == 100
    assert truncated(50, {"truncate_prompt_tokens": 100}) == 50
    for off in ({}, {"truncate_prompt_tokens": -1}, {"truncate_prompt_tokens": None},
                {"truncate_prompt_tokens": True}):
        assert truncated(500, off) == 500


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
    # A batch of one is that one prompt.
    assert tokenize_request(Kind.COMPLETION, {"prompt": ["once"]}, "up") == {
        "model": "up", "prompt": "once"}
    assert tokenize_request(Kind.COMPLETION, {"prompt": [[5, 6]]}, "up") == 2
    assert tokenize_request(Kind.COMPLETION, {"prompt": [5]}, "up") == 1
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
