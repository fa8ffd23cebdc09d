"""policy/request_responses.py: the Responses API's refusals and prompt bound, exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from policy.config import Model
from policy.errors import ApiError
from policy.request_responses import REFUSED, responses_prompt
from policy.tokens import json_indent2_len, json_len


def model(**extra: Any) -> Model:
    return Model.model_validate(
        {"upstream_model": "m", "backends": [{"url": "http://127.0.0.1:8000"}], **extra})


M = model()  # 16 template tokens per message, 512 per request, JSON at indent 4 (2x)
FRAME = 512


def bound(body: dict[str, Any], m: Model = M) -> int:
    return responses_prompt(body, m)[1]


def test_string_input_and_instructions_are_messages() -> None:
    # As the messages vLLM makes of them: {"role": "user", "content": "hello"}, ...
    user = len(b'{"role":"user","content":"hello"}')
    assert bound({"input": "hello"}) == user + 16 + FRAME
    assert bound({"input": "hello", "instructions": "be brief"}) == (
        user + len(b'{"role":"system","content":"be brief"}') + 2 * 16 + FRAME)
    estimate, _ = responses_prompt({"input": "x" * 400}, M)
    assert estimate == 107 + 3  # ~4 bytes a token, plus the typical template tokens
    assert bound({"input": "x" * 400}, model(max_tokens=10, max_model_len=50)) == 50


def test_message_items_count_as_chat_messages() -> None:
    easy = {"role": "user", "content": "hi"}
    typed = {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "hi"}]}
    assert bound({"input": [easy]}) == json_len(easy) + 16 + FRAME
    scalars = json_len({"type": "message", "role": "user"})
    assert bound({"input": [typed]}) == (scalars + json_len(typed["content"][0])  # type: ignore[index]
                                         + 16 + FRAME)
    assert bound({"input": []}) == FRAME


def test_function_calls_count_as_vllm_tool_calls_with_parsed_arguments() -> None:
    item = {"type": "function_call", "call_id": "c1", "name": "f",
            "arguments": '{"x": [1, 2]}', "id": "fc_1"}
    call = {"id": "c1", "type": "function", "function": {"name": "f",
                                                         "arguments": '{"x": [1, 2]}'}}
    expected = (json_len({"role": "assistant"})
                + 2 * (json_indent2_len([call]) + json_indent2_len({"x": [1, 2]})))
    assert bound({"input": [item]}) == expected + 16 + FRAME
    # A namespaced tool's flat name; a custom call's input as {"input": ...} arguments.
    ns = {**item, "namespace": "ns"}
    assert bound({"input": [ns]}) == bound({"input": [item]}) + 2 * len("ns__")
    custom = {"type": "custom_tool_call", "call_id": "c1", "name": "f", "input": "ls"}
    args = json.dumps({"input": "ls"})
    ccall = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}
    assert bound({"input": [custom]}) == (
        json_len({"role": "assistant"})
        + 2 * (json_indent2_len([ccall]) + json_indent2_len({"input": "ls"})) + 16 + FRAME)


def test_outputs_and_reasoning() -> None:
    out = {"type": "function_call_output", "call_id": "c1", "output": "42"}
    tool = {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert bound({"input": [out]}) == json_len(tool) + 16 + FRAME
    parts = {"type": "function_call_output", "call_id": "c1",
             "output": [{"type": "input_text", "text": "42"}]}
    assert bound({"input": [parts]}) == (json_len({"role": "tool", "tool_call_id": "c1"})
                                         + json_len(parts["output"][0]) + 16 + FRAME)  # type: ignore[index]
    reasoning = {"type": "reasoning", "id": "rs", "summary": [],
                 "content": [{"type": "reasoning_text", "text": "hmm"}]}
    assert bound({"input": [reasoning]}) == json_len(reasoning) + 16 + FRAME


def test_tools_count_in_vllm_chat_form_and_template_fields_too() -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    chat = {"type": "function", "function": {"description": None, "parameters":
                                             {"type": "object"}, "name": "f"}}
    base = bound({"input": "hi"})
    assert bound({"input": "hi", "tools": [tool]}) == base + 2 * json_indent2_len(chat)
    extra = {"tool_choice": "auto", "reasoning": {"effort": "low"}, "text": {"format": {
        "type": "json_object"}}, "chat_template_kwargs": {"a": 1}}
    # (the kwargs once for the one message and once more: template_kwargs_tally)
    expected = base + len(b'"auto"') + 2 * sum(
        json_indent2_len(v) for v in list(extra.values())[1:]) + 2 * json_indent2_len({"a": 1})
    assert bound({"input": "hi", **extra}) == expected
    # Fields the template never sees cost nothing.
    assert bound({"input": "hi", "temperature": 0, "store": True, "metadata": {"a": "b"},
                  "include": ["x"], "user": "u", "truncation": "auto"}) == base


def test_images_need_a_model_setting() -> None:
    image = {"type": "input_image", "image_url": "https://x/cat.png", "detail": "auto"}
    body = {"input": [{"role": "user", "content": [image]}]}
    with pytest.raises(ApiError) as e:
        responses_prompt(body, M)
    assert e.value.param == "input[0].content[0]"
    # `detail` is no key vLLM's parts know: it reaches the template beside the image.
    assert bound(body, model(tokens_per_image=300)) == (
        json_len({"role": "user"}) + 300 + json_len({"detail": "auto"}) + 16 + FRAME)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_state_and_background_are_refused_by_name(name: str) -> None:
    value = {"prompt": {"id": "pmpt_1"}, "previous_input_messages": [{"role": "user"}],
             "background": True}.get(name, "resp_1")
    with pytest.raises(ApiError) as e:
        responses_prompt({"input": "hi", name: value}, M)
    assert (e.value.status, e.value.param) == (400, name)
    assert "not accepted here" in e.value.message
    bound({"input": "hi", name: None})  # null is as good as absent
    if name in ("background", "previous_input_messages"):  # so are false and empty
        bound({"input": "hi", name: [] if name == "previous_input_messages" else False})
    else:  # vLLM reads these whenever they are not null (`""`: its 404, after the hold)
        for empty in ("", {}, False):
            with pytest.raises(ApiError):
                responses_prompt({"input": "hi", name: empty}, M)


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": {"role": "user"}}, "input"),
    ({"input": "hi", "instructions": 3}, "instructions"),
    ({"input": ["hi"]}, "input[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type"),
    ({"input": [{"type": "message", "content": "no role"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": 3}]}, "input[0].content"),
    ({"input": "hi", "tools": {"type": "function"}}, "tools"),
    ({"input": "hi", "tools": [{"type": "web_search_preview"}]}, "tools[0]"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}, {"type": "mcp"}]},
     "tools[1]"),
])
def test_bad_bodies_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as e:
        responses_prompt(body, M)
    assert (e.value.status, e.value.param) == (400, param)


def test_tools_are_held_before_every_user_item_equal_to_the_last() -> None:
    """As chat's (tokens.tool_repeats): Mistral's template writes the tools before every
    user message equal to the last one."""
    tools = [{"type": "function", "name": "f", "description": "d" * 300}]
    items = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 3
    items = items[:-1]  # ... ending with the user's "x": three of them
    once = bound({"input": "x", "tools": tools}) - bound({"input": "x"})
    assert bound({"input": items, "tools": tools}) - bound({"input": items}) == 3 * once
