"""policy/prompt_count.py: what is asked of a backend's /tokenize for a cut request."""

from __future__ import annotations

from typing import Any

import pytest

from policy.endpoints import Kind
from policy.prompt_count import MAX_ASKS, Recount, counted, tokenize_request

MSGS: list[Any] = [{"role": "system", "content": "be brief"},
                   {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "c", "type": "function",
                                    "function": {"name": "f", "arguments": "{}"}}]}]


def test_chat_sends_the_messages_and_the_fields_a_template_renders() -> None:
    body = {"model": "demo", "messages": MSGS, "tools": [{"type": "function"}],
            "chat_template_kwargs": {"x": 1}, "add_generation_prompt": False,
            "max_tokens": 5, "temperature": 0, "stream": True}
    assert tokenize_request(Kind.CHAT, body, "up") == Recount((), ({
        "model": "up", "messages": MSGS, "tools": [{"type": "function"}],
        "chat_template_kwargs": {"x": 1}, "add_generation_prompt": False},))


def test_documents_and_reasoning_effort_go_to_the_template_kwargs() -> None:
    """vLLM's chat completions render `documents` and `reasoning_effort` (and
    `enable_thinking` from it) as template arguments; its /tokenize reads them only in
    `chat_template_kwargs` (tests/vllm checks the counts agree)."""
    docs = [{"title": "t", "text": "a long document"}]
    base = {"model": "demo", "messages": MSGS}
    [ask] = tokenize_request(Kind.CHAT, {**base, "documents": docs,
                                         "reasoning_effort": "low"}, "up").asks  # type: ignore[union-attr]
    assert ask == {"model": "up", "messages": MSGS, "chat_template_kwargs": {
        "documents": docs, "reasoning_effort": "low", "enable_thinking": True}}
    # Over the client's own; its enable_thinking kept; null ones left out.
    [ask] = tokenize_request(Kind.CHAT, {**base, "documents": docs, "reasoning_effort": "none",
                                         "chat_template_kwargs": {"documents": [], "x": 1}},
                             "up").asks  # type: ignore[union-attr]
    assert ask["chat_template_kwargs"] == {"documents": docs, "x": 1,
                                           "reasoning_effort": "none", "enable_thinking": False}
    [ask] = tokenize_request(Kind.CHAT, {**base, "reasoning_effort": "high",
                                         "chat_template_kwargs": {"enable_thinking": False}},
                             "up").asks  # type: ignore[union-attr]
    assert ask["chat_template_kwargs"] == {"enable_thinking": False,
                                           "reasoning_effort": "high"}
    [ask] = tokenize_request(Kind.CHAT, {**base, "documents": None}, "up").asks  # type: ignore[union-attr]
    assert "chat_template_kwargs" not in ask


def test_every_text_part_type_is_text() -> None:
    parts = [{"type": t, "text": "x"} for t in ("text", "input_text", "output_text",
                                                 "refusal", "thinking")]
    assert tokenize_request(Kind.CHAT, {"messages": [{"role": "assistant", "content": parts}]},
                            "up") is not None


def test_a_truncated_prompt_is_charged_what_the_backend_kept() -> None:
    """vLLM keeps the last truncate_prompt_tokens of each prompt (of a batch too)."""
    body = {"prompt": ["a", [1, 2, 3, 4, 5]], "truncate_prompt_tokens": 4}
    r = tokenize_request(Kind.COMPLETION, body, "up")
    assert r is not None and r.counted == (5,) and r.total([3]) == 3 + 4
    one = tokenize_request(Kind.COMPLETION, {**body, "prompt": "a"}, "up")
    assert one is not None and one.total([9]) == 4
    for off in (None, -1, True):
        r = tokenize_request(Kind.COMPLETION, {**body, "truncate_prompt_tokens": off}, "up")
        assert r is not None and r.total([500]) == 505


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "x"}},
                                  {"type": "input_audio"}, "text"])
def test_chat_with_media_or_odd_parts_stays_estimated(part: Any) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    assert tokenize_request(Kind.CHAT, {"messages": msgs}, "up") is None
    assert tokenize_request(Kind.CHAT, {"messages": "nope"}, "up") is None


def test_completions_a_string_is_asked_token_ids_are_counted_here() -> None:
    def ask(prompt: str, **extra: Any) -> dict[str, Any]:
        return {"model": "up", "prompt": prompt, **extra}

    assert tokenize_request(Kind.COMPLETION, {"prompt": "once", "echo": True}, "up") == \
        Recount((), (ask("once"),))
    assert tokenize_request(Kind.COMPLETION, {"prompt": "a", "add_special_tokens": False},
                            "up") == Recount((), (ask("a", add_special_tokens=False),))
    assert tokenize_request(Kind.COMPLETION, {"prompt": [5, 6, 7]}, "up") == Recount((3,), ())
    assert tokenize_request(Kind.COMPLETION, {"prompt": ["once"]}, "up") == \
        Recount((), (ask("once"),))
    assert tokenize_request(Kind.COMPLETION, {"prompt": [[5, 6]]}, "up") == Recount((2,), ())
    assert tokenize_request(Kind.COMPLETION, {"prompt": [5]}, "up") == Recount((1,), ())
    # A batch: one /tokenize call per text prompt, token ids counted here; summed.
    r = tokenize_request(Kind.COMPLETION, {"prompt": ["a", [1, 2], "b"]}, "up")
    assert r == Recount((2,), (ask("a"), ask("b")))
    assert r.total([3, 4]) == 9
    assert tokenize_request(Kind.COMPLETION, {"prompt": [[1], [2, 3]]}, "up") == \
        Recount((1, 2), ())
    # A suffix (/tokenize has none), an empty or odd prompt, too large a batch: None.
    for body in ({"prompt": "a", "suffix": "b"}, {"prompt": []}, {"prompt": ["a", 3.5]},
                 {"prompt": [[]]}, {"prompt": None}, {"prompt": ["x"] * (MAX_ASKS + 1)}):
        assert tokenize_request(Kind.COMPLETION, body, "up") is None, body


@pytest.mark.parametrize("kind", [Kind.RESPONSES, Kind.EMBEDDINGS, Kind.SCORE])
def test_other_kinds_stay_estimated(kind: Kind) -> None:
    assert tokenize_request(kind, {"input": "x", "prompt": "x"}, "up") is None


def test_counted_reads_count() -> None:
    assert counted({"count": 12, "tokens": [1] * 12}) == 12
    for bad in ({"count": -1}, {"count": "12"}, {"count": True}, {}, [], None):
        assert counted(bad) is None
