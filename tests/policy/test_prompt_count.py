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
    for off in (None, -1):
        r = tokenize_request(Kind.COMPLETION, {**body, "truncate_prompt_tokens": off}, "up")
        assert r is not None and r.total([500]) == 505
    # Read as vLLM reads the integer (shapes tester: `"5"` was recounted whole, a cut
    # stream charged 301 prompt tokens where vLLM had kept 5).
    for off, cap in (("4", 4), (4.0, 4), (" 4 ", 4), (True, 1)):
        r = tokenize_request(Kind.COMPLETION, {**body, "truncate_prompt_tokens": off}, "up")
        assert r is not None and r.total([500]) == 2 * cap
    chat = tokenize_request(Kind.CHAT, {"messages": [{"role": "user", "content": "x"}],
                                        "truncate_prompt_tokens": "5"}, "up")
    assert chat is not None and chat.total([312]) == 5


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


@pytest.mark.parametrize("kind", [Kind.EMBEDDINGS, Kind.SCORE, Kind.RERANK])
def test_other_kinds_stay_estimated(kind: Kind) -> None:
    assert tokenize_request(kind, {"input": "x", "prompt": "x"}, "up") is None


def responses_ask(body: dict[str, Any], model: str = "up") -> dict[str, Any] | None:
    r = tokenize_request(Kind.RESPONSES, {"model": "demo", "stream": True, **body}, model)
    if r is None:
        return None
    assert r.counted == () and len(r.asks) == 1 and r.cap is None
    return r.asks[0]


ASK: dict[str, Any] = {"model": "up", "add_generation_prompt": True,
                       "continue_final_message": False, "add_special_tokens": True}


def test_responses_instructions_and_string_input_are_chat_messages() -> None:
    """vLLM's Responses endpoint renders `instructions` as a system message and a
    string input as a user message, and tokenizes with special tokens added (its
    `build_tok_params` default; /tokenize's is False)."""
    assert responses_ask({"input": "hi", "instructions": "be brief",
                          "max_output_tokens": 5}) == {
        **ASK, "messages": [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "hi"}]}
    # Empty (or null) instructions add no message.
    for empty in ("", None):
        assert responses_ask({"input": "", "instructions": empty}) == {
            **ASK, "messages": [{"role": "user", "content": ""}]}


def test_responses_items_become_the_messages_vllm_makes() -> None:
    """Message items keep their role and text (input_text parts as the `text` parts
    /tokenize takes); an assistant output message renders its first part alone; a
    function call's output is a tool message."""
    items = [
        {"type": "message", "role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                     {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "m1", "status": "completed",
         "content": [{"type": "output_text", "text": "A1", "annotations": []},
                     {"type": "output_text", "text": "dropped"}]},
        {"type": "function_call_output", "call_id": "c1", "output": "1", "id": "o",
         "status": "completed"},
        {"role": "assistant", "content": "after"},
        {"role": "system", "content": "sys", "type": "message"},
    ]
    assert responses_ask({"input": items}) == {**ASK, "messages": [
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "text", "text": "a"},
                                     {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "A1"},
        {"role": "tool", "content": "1", "tool_call_id": "c1"},
        {"role": "assistant", "content": "after"},
        {"role": "system", "content": "sys"}]}


def test_responses_a_partial_last_message_is_continued() -> None:
    last = {"type": "message", "role": "assistant", "status": "in_progress",
            "content": [{"type": "output_text", "text": "One,"}]}
    ask = responses_ask({"input": [{"role": "user", "content": "count"}, last]})
    assert ask is not None
    assert (ask["add_generation_prompt"], ask["continue_final_message"]) == (False, True)
    ask = responses_ask({"input": [last, {"role": "user", "content": "count"}]})
    assert ask is not None and ask["add_generation_prompt"] is True


def test_responses_tools_and_template_arguments() -> None:
    """Function tools in chat form (null fields left to vLLM's defaults, `strict` only
    when set); `reasoning.effort` and `enable_thinking` over the client's template
    arguments, as `build_chat_params` sets them."""
    tools = [{"type": "function", "name": "f", "description": None, "strict": None},
             {"type": "function", "name": "g", "description": "d", "strict": True,
              "parameters": {"type": "object"}}]
    ask = responses_ask({"input": "hi", "tools": tools, "tool_choice": "required",
                         "reasoning": {"effort": "low", "summary": "auto"},
                         "chat_template_kwargs": {"x": 1}})
    assert ask == {**ASK, "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}},
        {"type": "function", "function": {"name": "g", "description": "d", "strict": True,
                                          "parameters": {"type": "object"}}}],
        "chat_template_kwargs": {"x": 1, "reasoning_effort": "low",
                                 "enable_thinking": True}}
    kw = responses_ask({"input": "hi", "reasoning": {"effort": "none"},
                        "chat_template_kwargs": {"enable_thinking": True}})
    assert kw is not None and kw["chat_template_kwargs"] == {
        "enable_thinking": True, "reasoning_effort": "none"}
    for reasoning in (None, {}, {"effort": None}):
        kw = responses_ask({"input": "hi", "reasoning": reasoning, "tools": []})
        assert kw is not None and "chat_template_kwargs" not in kw and "tools" not in kw


USER: dict[str, Any] = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("body", [
    # Stored history, prompt templates, vLLM's own truncation.
    {"input": "hi", "previous_response_id": "resp_1"},
    {"input": "hi", "previous_input_messages": []},
    {"input": "hi", "prompt": {"id": "p"}},
    {"input": "hi", "truncation": "auto"},
    # Odd fields.
    {"input": None}, {"input": []}, {"input": 3}, {"input": "hi", "instructions": 3},
    {"input": "hi", "chat_template_kwargs": []}, {"input": "hi", "reasoning": "high"},
    {"input": "hi", "reasoning": {"effort": 3}},
    # Tools that are not function tools, or unknown keys, or dropped by a server flag.
    {"input": "hi", "tools": [{"type": "web_search_preview"}]},
    {"input": "hi", "tools": [{"type": "custom", "name": "c"}]},
    {"input": "hi", "tools": [{"type": "namespace", "name": "n", "tools": []}]},
    {"input": "hi", "tools": [{"type": "function", "name": "f", "defer_loading": True}]},
    {"input": "hi", "tools": [{"type": "function", "name": 3}]},
    {"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": "none"},
    {"input": "hi", "tools": {"type": "function", "name": "f"}},
    # Media, files, reasoning, references, unknown items and parts.
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a", "x": 1}]}]},
    {"input": [{"role": "user", "content": []}]},
    {"input": [{"role": "user", "content": "hi", "status": "incomplete"}]},
    {"input": [{"role": "tool", "content": "hi"}]},
    {"input": [USER, {"type": "reasoning", "summary": [], "content": []}]},
    {"input": [USER, {"type": "item_reference", "id": "x"}]},
    {"input": [USER, {"type": "custom_tool_call", "call_id": "c", "name": "n",
                      "input": "x"}]},
    # A function call: /tokenize reorders its keys (tests/vllm shows a count apart).
    {"input": [USER, {"type": "function_call", "call_id": "c", "name": "n",
                      "arguments": "{}"}]},
    {"input": [USER, {"type": "function_call_output", "call_id": "c",
                      "output": [{"type": "input_text", "text": "x"}]}]},
    {"input": [USER, {"type": "function_call_output", "call_id": 3, "output": "x"}]},
    {"input": [USER, {"type": "message", "role": "assistant", "content": []}]},
    {"input": [USER, {"role": "assistant",
                      "content": [{"type": "output_text", "text": "x"}]}]},
    {"input": [USER, {"type": "message", "role": "assistant",
                      "content": [{"type": "refusal", "refusal": "no"}]}]},
    {"input": [USER, {"type": "message", "role": "assistant", "status": "odd",
                      "content": [{"type": "output_text", "text": "x"}]}]},
    {"input": [USER, {"type": "message", "role": "assistant",
                      "content": [{"type": "output_text", "text": "x",
                                   "annotations": [{"type": "url_citation"}]}]}]},
    {"input": [USER, "text"]},
])
def test_responses_shapes_not_proven_are_charged_their_bound(body: dict[str, Any]) -> None:
    assert responses_ask(body) is None, body


def test_responses_of_a_harmony_model_are_charged_their_bound() -> None:
    """gpt-oss models render Responses in harmony, not through the chat template."""
    assert responses_ask({"input": "hi"}, "openai/gpt-oss-20b") is None
    assert responses_ask({"input": "hi"}, "unsloth/GPT-OSS-120b") is None
    assert responses_ask({"input": "hi"}, "meta-llama/Llama-3.1-8B") is not None


FN_TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}
RESP_TOOL = {"type": "function", "name": "f", "parameters": {}}


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}},
    {"response_format": {"type": "text"}},
    {"tools": [FN_TOOL], "tool_choice": "required"},
    {"tools": [FN_TOOL], "tool_choice": "none"},
    {"tools": [FN_TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
])
def test_a_kimi_k3_chat_with_fields_its_renderer_adds_is_charged_its_bound(
        extra: dict[str, Any]) -> None:
    """vLLM's kimi_k3 renderer renders `response_format`, and a non-auto `tool_choice`
    beside tools, into the prompt; its /tokenize passes neither (a 50 KB schema was
    recounted as the messages alone). Other renderers do not: counted as before."""
    body = {"model": "demo", "messages": MSGS, **extra}
    for k3 in ("moonshotai/Kimi-K3", "kimi_k3-instruct", "KimiK3"):
        assert tokenize_request(Kind.CHAT, body, k3) is None, (k3, extra)
    assert tokenize_request(Kind.CHAT, body, "meta-llama/Llama-3.1-8B") is not None


def test_a_kimi_k3_chat_without_them_is_counted() -> None:
    for extra in ({}, {"tools": [FN_TOOL]}, {"tools": [FN_TOOL], "tool_choice": "auto"},
                  {"tool_choice": "required"}, {"response_format": None}):
        body = {"model": "demo", "messages": MSGS, **extra}
        assert tokenize_request(Kind.CHAT, body, "moonshotai/Kimi-K3") is not None, extra


def test_a_kimi_k3_responses_request_with_a_forced_tool_choice_is_charged_its_bound() -> None:
    body = {"input": "hi", "tools": [RESP_TOOL]}
    assert responses_ask(body, "moonshotai/Kimi-K3") is not None
    assert responses_ask({**body, "tool_choice": "auto"}, "moonshotai/Kimi-K3") is not None
    assert responses_ask({**body, "tool_choice": "required"}, "moonshotai/Kimi-K3") is None
    assert responses_ask({**body, "tool_choice": "required"}, "Qwen/Qwen3-8B") is not None


def test_counted_reads_count() -> None:
    assert counted({"count": 12, "tokens": [1] * 12}) == 12
    for bad in ({"count": -1}, {"count": "12"}, {"count": True}, {}, [], None):
        assert counted(bad) is None
