"""policy/request_pooling.py: embeddings and rerank / score bodies, bounded exactly."""

from __future__ import annotations

from typing import Any

import pytest

from policy.config import Model
from policy.errors import ApiError
from policy.request_pooling import embeddings_input, scoring_pairs
from policy.tokens import chat_prompt


def model(**extra: Any) -> Model:
    return Model.model_validate(
        {"upstream_model": "m", "backends": [{"url": "http://127.0.0.1:8000"}], **extra})


M = model()  # 8 special tokens per input, 512 template tokens per request
CTX = model(max_tokens=10, max_model_len=20)


def err(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as e:
        call(*args)
    return e.value


@pytest.mark.parametrize(("value", "bound", "n"), [
    ("héllo", 6 + 8, 1),  # UTF-8 bytes + special tokens
    (["a", "bc"], (1 + 8) + (2 + 8), 2),
    ([5, 6, 7], 3, 1),  # token ids count as they are
    ([[1, 2], [3]], 3, 2),
])
def test_embedding_inputs(value: Any, bound: int, n: int) -> None:
    estimate, got, inputs = embeddings_input({"input": value}, M)
    assert (got, inputs) == (bound, n)
    assert estimate <= bound


def test_embedding_inputs_are_capped_by_the_context_each() -> None:
    assert embeddings_input({"input": ["x" * 100, "y"]}, CTX)[1] == 20 + 9
    assert embeddings_input({"input": [list(range(50))], "truncate_prompt_tokens": 20},
                            CTX)[1] == 20


def test_token_ids_past_the_context_are_refused_before_the_hold() -> None:
    """vLLM refuses them (the sim's `_fits`): the gateway knew, as their length is exact."""
    e = err(embeddings_input, {"input": [[1], list(range(21))]}, CTX)
    assert e.param == "input" and "contains 21 input tokens" in e.message
    assert embeddings_input({"input": [list(range(20))]}, CTX)[1] == 20


def test_padding_to_max_length_holds_the_context_per_input() -> None:
    """And a key's TPM takes it too: every input is padded, the count is known (the
    bytes' estimate let 40,960 tokens through a 1,000 TPM key)."""
    assert embeddings_input({"input": ["a", "b"], "padding": "max_length"}, CTX)[:2] == (40, 40)
    assert embeddings_input({"input": ["a"], "padding": "do_not_pad"}, CTX)[1] == 9
    assert err(embeddings_input, {"input": "a", "padding": "max_length"}, M).param == "padding"
    assert err(embeddings_input, {"input": "a", "padding": "longest"}, CTX).param == "padding"


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({"input": "a", "encoding_format": "bytes"}, "encoding_format"),
    ({"input": "a", "encoding_format": None}, "encoding_format"),  # vLLM's has no null
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": "eight"}, "dimensions"),
    ({"messages": []}, "messages"),
    ({"messages": "a"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [[{"role": "user", "content": "a"}], [{"content": "a"}]]}, "messages[1][0]"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": "perhaps"},
     "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": True,
      "continue_final_message": True}, "continue_final_message"),
])
def test_bad_embedding_bodies(body: dict[str, Any], param: str) -> None:
    e = err(embeddings_input, body, M)
    assert (e.status, e.param) == (400, param)


CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]


def test_chat_style_embeddings_are_bounded_as_chat_prompts() -> None:
    """Real-vLLM tester: `messages` was refused, which vLLM 0.32 serves, as it serves a
    conversation in `input` and batches of either: each bounded as a chat prompt."""
    one = chat_prompt({"messages": CONV}, M)
    for body in ({"messages": CONV}, {"input": CONV}):
        assert embeddings_input(body, M) == (*one, 1)
    two = chat_prompt({"messages": CONV[1:]}, M)
    for body in ({"messages": [CONV, CONV[1:]]}, {"input": [CONV, CONV[1:]]}):
        assert embeddings_input(body, M) == (one[0] + two[0], one[1] + two[1], 2)
    # The template's own fields count with each conversation.
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    assert embeddings_input({"messages": CONV, **kwargs}, M)[1] == chat_prompt(
        {"messages": CONV, **kwargs}, M)[1] > one[1]
    # Padded: the context per conversation.
    assert embeddings_input({"messages": [CONV, CONV], "padding": "max_length"}, CTX)[:2] \
        == (40, 40)


def test_messages_beside_an_input_hold_the_larger_of_the_two() -> None:
    """vLLM's embeddings request types are a union: `messages` its own checks refuse (a
    `name` of 5) leave it the `input`, embedded instead (pooling tester: 512 held, 32,768
    billed). With both, the larger is held; an `input` vLLM cannot embed adds nothing."""
    ids = [[7] * 30] * 64
    odd = [{"role": "user", "content": "hi", "name": 5}]
    assert embeddings_input({"messages": odd, "input": ids}, M) == (30 * 64, 30 * 64, 64)
    assert embeddings_input({"messages": odd, "input": [[7] * 15] * 64}, CTX)[1] == 15 * 64
    # Ids past the context are refused by vLLM too: the messages' bound alone.
    assert embeddings_input({"messages": odd, "input": ids}, CTX)[1] == 20
    one = chat_prompt({"messages": CONV}, M)
    assert embeddings_input({"messages": CONV, "input": "x"}, M) == (*one, 1)
    assert embeddings_input({"messages": CONV, "input": {"not": "embeddable"}}, M) == (
        *one, 1)


def test_embedding_options_pass() -> None:
    for fmt in ("float", "base64"):
        embeddings_input({"input": "a", "encoding_format": fmt, "dimensions": 4}, M)
    embeddings_input({"input": "a"}, M)
    for dims in ("256", 256.0):  # vLLM reads them as 256 (review: they were refused)
        embeddings_input({"input": "a", "dimensions": dims}, M)


TEXT = 5 + 8  # "hello" / "world": 5 bytes + 8 special tokens
PAIR = 2 * TEXT + 1 + 512  # two texts, a padding token, the template's allowance


def test_rerank_pairs_the_query_with_each_document() -> None:
    estimate, bound, pairs = scoring_pairs(
        {"query": "hello", "documents": ["world", "world", "world"]}, M, rerank=True)
    assert (bound, pairs) == (3 * PAIR, 3)
    assert estimate == 3 * (3 + 1)  # ~4 bytes a token, and the padding token


@pytest.mark.parametrize(("sides", "pairs"), [
    ({"queries": "hello", "documents": ["world", "world"]}, 2),
    ({"queries": ["hello", "hello"], "documents": ["world", "world"]}, 2),
    ({"queries": "hello", "items": "world"}, 1),
    ({"data_1": "hello", "data_2": ["world"]}, 1),
    ({"text_1": ["hello"], "text_2": ["world", "world", "world"]}, 3),
])
def test_score_takes_every_side_name(sides: dict[str, Any], pairs: int) -> None:
    assert scoring_pairs(sides, M, rerank=False)[1:] == (pairs * PAIR, pairs)


def test_template_fields_count_per_pair() -> None:
    body = {"query": "hello", "documents": ["world", "world"], "instruction": "judge",
            "chat_template_kwargs": {"k": [1]}}
    # "judge" as text (7 JSON bytes); the kwargs at the template's JSON indent (2x),
    # once for each of a pair's two texts and once more (a template may write them in
    # each message it renders).
    kwargs = len('{\n  "k": [\n    1\n  ]\n}')
    assert scoring_pairs(body, M, rerank=True)[1] == 2 * (PAIR + 7 + 3 * 2 * kwargs)


def test_pairs_are_capped_at_twice_the_context() -> None:
    big = "x" * 100
    assert scoring_pairs({"query": big, "documents": [big]}, CTX, rerank=True)[1] == 41
    padded = {"query": "a", "documents": ["b", "c"], "padding": "max_length"}
    assert scoring_pairs(padded, CTX, rerank=True)[:2] == (2 * 41, 2 * 41)


@pytest.mark.parametrize(("body", "rerank", "param"), [
    ({"query": ["q"], "documents": ["d"]}, True, "query"),
    ({"query": "q"}, True, "documents"),
    ({"query": "q", "documents": []}, True, "documents"),
    ({"query": "q", "documents": [{"content": [{"type": "text", "text": "d"}]}]}, True,
     "documents"),
    ({"documents": ["d"]}, False, "queries"),
    ({"queries": ["a", "b"], "documents": ["c", "d", "e"]}, False, "queries"),
    ({"text_1": "a", "text_2": 5}, False, "text_2"),
    ({}, False, "queries"),
])
def test_bad_scoring_bodies(body: dict[str, Any], rerank: bool, param: str) -> None:
    e = err(scoring_pairs, body, M, rerank)
    assert (e.status, e.param) == (400, param)
