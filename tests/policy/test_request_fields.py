"""The sampling fields' types, checked before anything is held (policy/request_fields.py).
Parity with vLLM's own request models: tests/vllm/test_vllm_field_types.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from policy.config import load_config
from policy.endpoints import Kind, lookup
from policy.errors import ApiError
from policy.request import parse_request
from policy.request_fields import check_field_types, check_vllm_rules
from tests.helpers import write_policy

CHAT: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 5}


@pytest.mark.parametrize(("field", "value", "param", "says"), [
    ("temperature", "hot", "temperature", "a number"),
    ("top_p", [1], "top_p", "a number"),
    ("frequency_penalty", {"a": 1}, "frequency_penalty", "a number"),
    ("top_k", 1.5, "top_k", "an integer"),
    ("seed", 2**63, "seed", "a 64-bit integer"),
    ("stop", 5, "stop", "a string or an array of strings"),
    ("stop", ["a", 1], "stop", "a string or an array of strings"),
    ("logit_bias", [1], "logit_bias", "an object"),
    ("logit_bias", {"42": "x"}, "logit_bias.42", "a number"),
    ("logit_bias", {"int": "x"}, "logit_bias.int", "a number"),
    ("logit_bias", {"list[str]": None}, "logit_bias.list[str]", "a number"),
    ("stop_token_ids", [1, "x"], "stop_token_ids.1", "an integer"),
    ("user", 5, "user", "a string"),
    ("logprobs", 3, "logprobs", "a boolean"),  # chat's is a boolean
    ("ignore_eos", None, "ignore_eos", "a boolean"),  # vLLM's has no null
    # Fields the gateway reads for the hold, or vLLM fails on after it (shapes tester:
    # each reached vLLM and spent one of the key's requests per minute on its 400, and
    # `structured_outputs: 5` on its 500, which the SDK retried twice more).
    ("response_format", "json", "response_format", "an object"),
    ("structured_outputs", 5, "structured_outputs", "an object"),
    ("documents", "d", "documents", "an array"),
    ("documents", [{"title": 1}], "documents.0.title", "a string"),
    ("chat_template_kwargs", [1], "chat_template_kwargs", "an object"),
    ("vllm_xargs", 5, "vllm_xargs", "an object"),
    ("request_id", 5, "request_id", "a string"),
    ("return_token_ids", "x", "return_token_ids", "a boolean"),
    ("thinking_token_budget", "x", "thinking_token_budget", "an integer"),
    ("truncate_prompt_tokens", "x", "truncate_prompt_tokens", "an integer"),
    ("tool_choice", 5, "tool_choice", '"none", "auto", "required" or an object'),
])
def test_a_wrong_type_is_a_400_naming_the_field(field: str, value: Any, param: str,
                                                says: str) -> None:
    with pytest.raises(ApiError) as e:
        check_field_types({**CHAT, field: value}, Kind.CHAT)
    assert (e.value.status, e.value.code, e.value.param) == (400, "invalid_request", param)
    assert e.value.message == f"'{param}' must be {says}."


@pytest.mark.parametrize(("field", "value"), [
    # what vLLM's lax reading accepts is accepted: never stricter than the backend
    ("temperature", "0.5"), ("temperature", 1), ("temperature", None), ("temperature", True),
    ("seed", "12"), ("seed", -(2**63)), ("top_k", 2.0), ("stop", "x"), ("stop", None),
    ("stop", []), ("logprobs", None), ("top_logprobs", None), ("echo", "yes"),
    ("logit_bias", {"42": "-1.5"}), ("user", ""),
    # fields the gateway does not know pass as they are (vLLM allows extra fields)
    ("some_new_field", {"x": [1]}),
])
def test_what_vllm_accepts_passes(field: str, value: Any) -> None:
    check_field_types({**CHAT, field: value}, Kind.CHAT)


@pytest.mark.parametrize(("kind", "body", "param"), [
    (Kind.CHAT, {"reasoning_effort": 5}, "reasoning_effort"),
    (Kind.CHAT, {"truncation_side": 5}, "truncation_side"),
    (Kind.RESPONSES, {"text": "x"}, "text"),
    (Kind.RESPONSES, {"reasoning": "high"}, "reasoning"),
    (Kind.RESPONSES, {"metadata": 5}, "metadata"),
    (Kind.RESPONSES, {"truncation": 5}, "truncation"),
    (Kind.RESPONSES, {"include": "x"}, "include"),
    (Kind.RESPONSES, {"store": "x"}, "store"),
    (Kind.RESPONSES, {"service_tier": 5}, "service_tier"),
    (Kind.EMBEDDINGS, {"truncate_prompt_tokens": "x"}, "truncate_prompt_tokens"),
    (Kind.EMBEDDINGS, {"user": 5}, "user"),
    (Kind.EMBEDDINGS, {"add_special_tokens": "x"}, "add_special_tokens"),
    (Kind.EMBEDDINGS, {"dimensions": "x"}, "dimensions"),
])
def test_every_kind_refuses_what_vllm_refuses_by_type(kind: Kind, body: dict[str, Any],
                                                      param: str) -> None:
    with pytest.raises(ApiError) as e:
        check_field_types(body, kind)
    assert (e.value.status, e.value.param) == (400, param)
    assert e.value.message.startswith(f"'{param}' ")


def test_each_kind_has_its_own_types() -> None:
    check_field_types({"prompt": "x", "logprobs": 3}, Kind.COMPLETION)  # an integer there
    with pytest.raises(ApiError):
        check_field_types({"prompt": "x", "logprobs": "many"}, Kind.COMPLETION)
    with pytest.raises(ApiError):
        check_field_types({"input": "x", "instructions": 5}, Kind.RESPONSES)
    check_field_types({"input": [1, 2], "temperature": "hot"}, Kind.EMBEDDINGS)  # not its
    check_field_types({"input": "x", "truncate_prompt_tokens": "7"}, Kind.EMBEDDINGS)


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/responses", {"model": "demo", "input": "x", "temperature": "hot"}, "temperature"),
    ("/v1/embeddings", {"model": "demo", "input": "x", "user": 5}, "user"),
    ("/v1/responses", {"model": "demo", "input": "x", "cache_salt": ""}, "cache_salt"),
])
def test_parse_request_refuses_before_any_hold(tmp_path: Any, path: str,
                                               body: dict[str, Any], param: str) -> None:
    """parse_request is what runs before admission: the refusal comes from it."""
    cfg = load_config(write_policy(tmp_path, "http://127.0.0.1:8000"))
    endpoint = lookup("POST", path)
    assert endpoint is not None
    with pytest.raises(ApiError) as e:
        parse_request(json.dumps(body).encode(), endpoint, cfg)
    assert e.value.param == param


@pytest.mark.parametrize(("extra", "param"), [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"logprob_token_ids": [5]}, "logprob_token_ids"),
    ({"logprob_token_ids": [5], "logprobs": False}, "logprob_token_ids"),
    ({"tools": []}, "tools"),
])
def test_a_chat_body_vllm_always_refuses_is_a_400_before_the_hold(
        extra: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as e:
        check_vllm_rules({**CHAT, **extra}, Kind.CHAT)
    assert (e.value.status, e.value.param) == (400, param)
    for fine in ({"continue_final_message": True, "add_generation_prompt": False},
                 {"continue_final_message": True}, {"logprob_token_ids": [5], "logprobs": True},
                 {"tools": None}):
        check_vllm_rules({**CHAT, **fine}, Kind.CHAT)
    check_vllm_rules({"prompt": "x", "tools": []}, Kind.COMPLETION)  # chat's rules only


@pytest.mark.parametrize("kind", [Kind.CHAT, Kind.COMPLETION, Kind.RESPONSES,
                                  Kind.EMBEDDINGS])
def test_a_cache_salt_vllm_refuses_is_a_400_before_the_hold(kind: Kind) -> None:
    for salt in ("", 5, "a/b", "x" * 129, "a\x00"):
        with pytest.raises(ApiError) as e:
            check_vllm_rules({"cache_salt": salt}, kind)
        assert e.value.param == "cache_salt"
    check_vllm_rules({"cache_salt": "tenant-7"}, kind)
    check_vllm_rules({"cache_salt": None}, kind)


@pytest.mark.parametrize(("kind", "body", "param"), [
    # vLLM's check_tool_usage, chat's and Responses' (review)
    (Kind.CHAT, {"tool_choice": "auto"}, "tool_choice"),
    (Kind.CHAT, {"tool_choice": "required"}, "tool_choice"),
    (Kind.CHAT, {"tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool_choice"),
    (Kind.RESPONSES, {"tool_choice": "required"}, "tool_choice"),
    (Kind.RESPONSES, {"tool_choice": "required", "tools": []}, "tool_choice"),
    (Kind.RESPONSES, {"tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
    # vLLM's reject_removed_pooling_parameters
    (Kind.EMBEDDINGS, {"input": "x", "normalize": True}, "normalize"),
    (Kind.EMBEDDINGS, {"input": "x", "normalize": None}, "normalize"),
    (Kind.EMBEDDINGS, {"input": "x", "task": "encode"}, "task"),
])
def test_tool_and_pooling_rules_vllm_always_applies(kind: Kind, body: dict[str, Any],
                                                    param: str) -> None:
    with pytest.raises(ApiError) as e:
        check_vllm_rules(body, kind)
    assert e.value.param == param


@pytest.mark.parametrize(("kind", "body"), [
    (Kind.CHAT, {"tool_choice": "none"}),
    (Kind.CHAT, {"tool_choice": None}),
    (Kind.CHAT, {"tool_choice": "auto", "tools": [{"type": "function"}]}),
    (Kind.RESPONSES, {"tool_choice": "auto"}),
    (Kind.RESPONSES, {"tool_choice": "none", "tools": []}),
    (Kind.RESPONSES, {"tool_choice": "required", "tools": [{"type": "function"}]}),
    (Kind.EMBEDDINGS, {"input": "x", "task": "embed"}),
])
def test_what_those_rules_let_through(kind: Kind, body: dict[str, Any]) -> None:
    check_vllm_rules(body, kind)


def test_an_integer_past_64_bits_is_said_so() -> None:
    """The JSON reader gives it as a float: it read "must be an integer" (retest tester)."""
    with pytest.raises(ApiError) as e:
        check_field_types({**CHAT, "top_k": float(10**20)}, Kind.CHAT)
    assert e.value.message == "'top_k' must be a 64-bit integer."


@pytest.mark.parametrize(("value", "says"), [
    ("1", "an integer"), (2.0, "an integer"), (True, "an integer"), (-2, "at least -1")])
def test_thinking_token_budget_is_an_integer_proper(value: Any, says: str) -> None:
    """vLLM's own validator refuses what pydantic's lax integer would take (review)."""
    with pytest.raises(ApiError) as e:
        check_field_types({**CHAT, "thinking_token_budget": value}, Kind.CHAT)
    assert e.value.message == f"'thinking_token_budget' must be {says}."
    check_field_types({**CHAT, "thinking_token_budget": -1}, Kind.CHAT)


def test_completions_logprob_token_ids_want_logprobs() -> None:
    with pytest.raises(ApiError) as e:
        check_vllm_rules({"prompt": "x", "logprob_token_ids": [3]}, Kind.COMPLETION)
    assert e.value.param == "logprob_token_ids"
    check_vllm_rules({"prompt": "x", "logprob_token_ids": [3], "logprobs": 0},
                     Kind.COMPLETION)
