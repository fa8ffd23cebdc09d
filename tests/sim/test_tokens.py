"""The toy tokenizer's documented formulas and the generated text."""

from __future__ import annotations

import orjson
import pytest

from authz.sim.responses import token_json
from authz.sim.tokens import (
    MEDIA_TOKENS,
    WORDS,
    count_tokens,
    message_tokens,
    output_text,
    prompt_token_counts,
    prompt_tokens_chat,
    prompt_tokens_completion,
    template_tool_calls,
    tojson,
    token_text,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("   ", 0),
        ("hello", 1),
        ("Hello, world!", 4),
        ("don't stop", 4),  # don ' t stop
        ("a_b c1 2.5", 5),  # a_b c1 2 . 5
        ("¿Qué tal?", 4),  # ¿ Qué tal ?
        ("x\n\ny\t z", 3),
    ],
)
def test_count_tokens(text: str, expected: int) -> None:
    assert count_tokens(text) == expected


def test_prompt_tokens_chat() -> None:
    # "Be brief, please." is 5 tokens: (5 + 3) + (1 + 3) + 3
    assert (
        prompt_tokens_chat(
            [{"role": "system", "content": "Be brief, please."}, {"role": "user", "content": "Hi"}]
        )
        == 15
    )
    assert prompt_tokens_chat([]) == 3
    # Null content (assistant tool call) counts as empty text.
    assert prompt_tokens_chat([{"role": "assistant", "content": None}]) == 6
    # Text parts joined by " " ("one two" + "three" -> 3 tokens); each media part is
    # MEDIA_TOKENS.
    parts = [
        {"type": "text", "text": "one two"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "text", "text": "three"},
    ]
    assert prompt_tokens_chat([{"role": "user", "content": parts}]) == 3 + MEDIA_TOKENS + 3 + 3


def test_prompt_tokens_chat_counts_every_template_field() -> None:
    # Every message field but role: name (1) and tool_call_id (c1 -> 1).
    tool = {"role": "tool", "name": "get", "tool_call_id": "c1", "content": "42"}
    assert message_tokens(tool) == 3 + 1 + 1 + 1
    # An assistant's arguments string is parsed, then rendered as JSON with the call.
    call = {"id": "c1", "type": "function",
            "function": {"name": "get", "arguments": '{"city":"Paris"}'}}
    rendered = tojson([{**call, "function": {"name": "get", "arguments": {"city": "Paris"}}}])
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    assert message_tokens(assistant) == 3 + count_tokens(rendered)
    bad_args = {**call, "function": {"name": "get", "arguments": "not json"}}
    assert template_tool_calls([bad_args])[0]["function"]["arguments"] == {}
    # Top-level template fields; tool_choice only with tools.
    tools = [{"type": "function", "function": {"name": "get", "parameters": {}}}]
    msgs = [{"role": "user", "content": "hi"}]
    base = prompt_tokens_chat(msgs)
    assert prompt_tokens_chat(msgs, {"tools": tools}) == base + count_tokens(tojson(tools))
    assert prompt_tokens_chat(msgs, {"tool_choice": "auto"}) == base
    assert prompt_tokens_chat(msgs, {"tools": tools, "tool_choice": "auto"}) == (
        base + count_tokens(tojson(tools)) + 1)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    assert prompt_tokens_chat(msgs, {"response_format": schema, "functions": tools}) == (
        base + count_tokens(tojson(schema)))  # vLLM ignores `functions`


def test_prompt_tokens_completion() -> None:
    assert prompt_tokens_completion("Hello, world!") == 4
    # vLLM's usage sums every prompt of a batch.
    assert prompt_token_counts(["a b c", "more words here"]) == [3, 3]
    assert prompt_tokens_completion(["a b c", "more words here"]) == 6
    assert prompt_tokens_completion([1, 2, 3, 4, 5]) == 5
    assert prompt_token_counts([[7, 8], [9]]) == [2, 1]
    assert prompt_token_counts("a", suffix="b c") == [3]
    assert prompt_token_counts([[7, 8], [9]], suffix="x") == [3, 2]


@pytest.mark.parametrize("n", [0, 1, 2, len(WORDS), len(WORDS) + 1, 100, 4096, 4097, 5000])
def test_output_text_has_exactly_n_tokens(n: int) -> None:
    text = output_text(n)
    assert count_tokens(text) == n
    assert text == "".join(token_text(i) for i in range(n))


def test_token_text_and_json_agree() -> None:
    assert token_text(0) == WORDS[0]
    assert token_text(1) == " " + WORDS[1]
    assert token_text(len(WORDS)) == " " + WORDS[0]
    for i in range(3 * len(WORDS)):
        assert orjson.loads(token_json(i)) == token_text(i)
        assert count_tokens(token_text(i)) == 1
