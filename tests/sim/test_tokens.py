"""The toy tokenizer's documented formulas and the generated text."""

from __future__ import annotations

import orjson
import pytest

from authz.sim.responses import token_json
from authz.sim.tokens import (
    WORDS,
    count_tokens,
    output_text,
    prompt_tokens_chat,
    prompt_tokens_completion,
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
    # Text parts joined by " "; other parts ignored: "one two" + "three" -> 3 tokens.
    parts = [
        {"type": "text", "text": "one two"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
        {"type": "text", "text": "three"},
    ]
    assert prompt_tokens_chat([{"role": "user", "content": parts}]) == 3 + 3 + 3


def test_prompt_tokens_completion() -> None:
    assert prompt_tokens_completion("Hello, world!") == 4
    assert prompt_tokens_completion(["a b c", "ignored words here"]) == 3
    assert prompt_tokens_completion([1, 2, 3, 4, 5]) == 5
    assert prompt_tokens_completion([[7, 8], [9]]) == 2


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
