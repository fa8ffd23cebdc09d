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


def test_each_kind_has_its_own_types() -> None:
    check_field_types({"prompt": "x", "logprobs": 3}, Kind.COMPLETION)  # an integer there
    with pytest.raises(ApiError):
        check_field_types({"prompt": "x", "logprobs": "many"}, Kind.COMPLETION)
    with pytest.raises(ApiError):
        check_field_types({"input": "x", "instructions": 5}, Kind.RESPONSES)
    check_field_types({"input": [1, 2], "temperature": "hot"}, Kind.EMBEDDINGS)  # none


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}),
    ("/v1/completions", {"model": "demo", "prompt": "x", "temperature": "hot"}),
    ("/v1/responses", {"model": "demo", "input": "x", "temperature": "hot"}),
])
def test_parse_request_refuses_before_any_hold(tmp_path: Any, path: str,
                                               body: dict[str, Any]) -> None:
    """parse_request is what runs before admission: the refusal comes from it."""
    cfg = load_config(write_policy(tmp_path, "http://127.0.0.1:8000"))
    endpoint = lookup("POST", path)
    assert endpoint is not None
    with pytest.raises(ApiError) as e:
        parse_request(json.dumps(body).encode(), endpoint, cfg)
    assert e.value.param == "temperature"


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
