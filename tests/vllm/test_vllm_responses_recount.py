"""A cut Responses request's prompt recount (policy/prompt_count.py) against vLLM 0.32
itself: the /tokenize body it sends renders what vLLM's Responses endpoint renders (asked
of vLLM's own functions in its venv), counts what vLLM reports as `usage.input_tokens`
(its server), and a Responses stream cut through the gateway is charged that count."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from policy.endpoints import Kind
from policy.prompt_count import Recount, counted, tokenize_request
from tests.e2e.conftest import Gateway
from tests.vllm.conftest import LONG_TOKENS, MODEL, VllmServer, _require_python
from tests.vllm.test_vllm import EXACT, leave_after_five_events

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TOOLS: list[Any] = [
    {"type": "function", "name": "add", "description": "Add two numbers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                     "b": {"type": "integer"}}}},
    {"type": "function", "name": "now", "strict": True, "parameters": {"type": "object"}},
    {"type": "function", "name": "bare", "description": None, "strict": None},
]
CALL: dict[str, Any] = {"type": "function_call", "call_id": "c1", "name": "add",
                        "arguments": '{"a": 2, "b": 2}'}
# A function call's output: a tool message (its call stays at the bound, see below).
OUTPUTS: list[Any] = [
    {"role": "user", "content": "What is 2+2, and what time is it?"},
    {"type": "function_call_output", "call_id": "c1", "output": "4"},
    {"type": "function_call_output", "call_id": "c2", "output": "noon", "id": "fco_2",
     "status": "completed"},
    {"type": "message", "role": "assistant",
     "content": [{"type": "output_text", "text": "4, at noon."}]},
    {"role": "user", "content": "Thanks!"},
]
# Every shape tokenbooth counts: string input; instructions and messages (input_text
# parts, a developer message); turns with assistant text (an output message of two
# parts, of which vLLM renders the first); function tools with reasoning; function
# call outputs; a last assistant message to continue.
SHAPES: dict[str, dict[str, Any]] = {
    "string": {"input": "Hello there."},
    "instructions": {"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me"},
                                     {"type": "input_text", "text": "a story."}]},
        {"type": "message", "role": "developer", "content": "Answer in French."},
        {"role": "system", "content": "Mind the gateway."}]},
    "turns": {"instructions": "", "input": [
        {"role": "user", "content": "Where is Envoy?"},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "In front of vLLM."},
                     {"type": "output_text", "text": "A second part vLLM drops."}]},
        {"role": "assistant", "content": "And it meters tokens."},
        {"role": "user", "content": "Why?"}]},
    "tools": {"input": "What is 2+2?", "tools": TOOLS, "tool_choice": "auto",
              "reasoning": {"effort": "low"}, "chat_template_kwargs": {"x": 1}},
    "outputs": {"instructions": "Use the tools.", "input": OUTPUTS, "tools": TOOLS},
    "continue": {"input": [
        {"role": "user", "content": "Count to three."},
        {"type": "message", "role": "assistant", "status": "incomplete",
         "content": [{"type": "output_text", "text": "One, two,"}]}],
        "reasoning": {"effort": "none"}},
}

# For each (Responses body, tokenbooth's /tokenize body): what vLLM's Responses endpoint
# renders (its messages as its chat parser keeps them, tools, template arguments, special
# tokens), and what its /tokenize renders of the ask (the messages validated as it
# validates them, then kept as the same parser keeps them).
_RENDER = """
import json, sys
from types import SimpleNamespace
import vllm  # noqa: F401  (vLLM's own import order)
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.openai.responses.utils import (
    construct_input_messages, construct_tool_dicts)
from vllm.entrypoints.serve.tokenize.protocol import TokenizeChatRequest
from vllm.renderers.chat_utils import TEXT_PART_TYPES
cfg = SimpleNamespace(max_model_len=512)

def kept(m):
    # What `_parse_chat_message_content` hands the template: the role, the content as
    # text (string content a text part; text parts of every TEXT_PART_TYPES alike),
    # an assistant's tool calls, a tool message's call id, a name.
    m = dict(m)
    content = m.get("content")
    parts = ([] if content is None else [{"type": "text", "text": content}]
             if isinstance(content, str) else list(content))
    assert all(p["type"] in TEXT_PART_TYPES for p in parts), parts
    out = {"role": m["role"], "content": [p["text"] for p in parts]}
    for k in ("tool_calls", "tool_call_id", "name"):
        if m.get(k) is not None:
            out[k] = [dict(c) for c in m[k]] if k == "tool_calls" else m[k]
    return out

out = []
for body, ask in json.loads(sys.stdin.read()):
    r = ResponsesRequest.model_validate(body)
    t = TokenizeChatRequest.model_validate(ask)
    out.append({
        "responses": [
            [kept(m) for m in construct_input_messages(
                request_instructions=r.instructions, request_input=r.input)],
            construct_tool_dicts(r.tools, r.tool_choice),
            r.build_chat_params(None, "auto").chat_template_kwargs,
            r.build_tok_params(cfg).add_special_tokens],
        "tokenize": [
            [kept(m) for m in t.messages],
            None if t.tools is None else [x.model_dump() for x in t.tools],
            t.build_chat_params(None, "auto").chat_template_kwargs,
            t.build_tok_params(cfg).add_special_tokens]})
print(json.dumps(out, default=list))  # pydantic validates Iterable fields lazily
"""


def _ask(body: dict[str, Any]) -> dict[str, Any]:
    recount = tokenize_request(Kind.RESPONSES, {"model": "demo", **body}, MODEL)
    assert recount is not None and recount.counted == () and len(recount.asks) == 1
    return recount.asks[0]


def test_the_ask_renders_what_vllms_responses_endpoint_renders() -> None:
    """vLLM's own Responses functions (`construct_input_messages`, `construct_tool_dicts`,
    `build_chat_params`, `build_tok_params`) against its /tokenize request model fed
    tokenbooth's ask: the same messages, tools, template arguments and special tokens."""
    python = _require_python()
    pairs = [[{"model": MODEL, **body}, _ask(body)] for body in SHAPES.values()]
    done = subprocess.run([str(python), "-c", _RENDER], input=json.dumps(pairs),
                          capture_output=True, text=True, timeout=300, check=True)
    for name, got in zip(SHAPES, json.loads(done.stdout.strip().splitlines()[-1]),
                         strict=True):
        # Messages and tools as JSON: key order counts too (a template's `tojson` keeps
        # it); the template arguments are passed by name.
        assert json.dumps(got["tokenize"][:2]) == json.dumps(got["responses"][:2]), name
        assert got["tokenize"][2:] == got["responses"][2:], name


@pytest.mark.parametrize("name", SHAPES)
def test_the_recount_is_vllms_responses_input_tokens(vllm_server: VllmServer,
                                                     name: str) -> None:
    """Each shape sent whole to vLLM's /v1/responses: its `usage.input_tokens` is what
    its /tokenize answers to tokenbooth's ask. (The tier's template renders tools, tool
    calls and their ids, so they count.)"""
    body = SHAPES[name]
    usage = json.loads(vllm_server.post("/v1/responses", {
        "model": MODEL, **body, "max_output_tokens": 1, **EXACT}))["usage"]
    answer = counted(json.loads(vllm_server.post("/tokenize", _ask(body))))
    assert answer is not None
    assert Recount((), (_ask(body),)).total([answer]) == usage["input_tokens"] > 0, name


def test_a_function_call_item_is_left_at_the_bound(vllm_server: VllmServer) -> None:
    """Why a Responses function call is not recounted: vLLM renders its `function` as
    {name, arguments}, and its /tokenize validates a chat tool call into the schema's
    order, {arguments, name}; a template that renders the call with `tojson` (as the
    tier's does) counts them apart. If this ever passes the other way, the shape can be
    counted."""
    now = {"type": "function_call", "call_id": "c2", "name": "now", "arguments": "{}"}
    body = {"instructions": "Use the tools.", "tools": TOOLS,
            "input": [OUTPUTS[0], CALL, now, *OUTPUTS[1:]]}
    assert tokenize_request(Kind.RESPONSES, {"model": "demo", **body}, MODEL) is None
    usage = json.loads(vllm_server.post("/v1/responses", {
        "model": MODEL, **body, "max_output_tokens": 1, **EXACT}))["usage"]
    # What vLLM renders (`construct_input_messages`): both calls on one assistant
    # message, {"id", "function": {"name", "arguments"}, "type"} each.
    calls = [{"id": c["call_id"], "function": {"name": c["name"], "arguments": c["arguments"]},
              "type": "function"} for c in (CALL, now)]
    ask = _ask({**body, "input": OUTPUTS})
    ask["messages"][2:2] = [{"role": "assistant", "tool_calls": calls}]
    assert counted(json.loads(vllm_server.post("/tokenize", ask))) != usage["input_tokens"]


def _cut_responses_stream(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    """Stream a long Responses request through the gateway, read five events, leave: the
    request's record."""
    return leave_after_five_events(gw, "/v1/responses", {
        "model": "long", **body, "max_output_tokens": LONG_TOKENS, "stream": True, **EXACT})


def test_a_cut_responses_stream_is_charged_vllms_own_prompt_count(
        vllm_gateway: Gateway, vllm_server: VllmServer) -> None:
    """A Responses stream with instructions, function tools and call outputs, left after a few
    events, before vLLM's `response.completed`: its prompt is what vLLM reports for the
    same request uncut (it was its hold's prompt bound). As for chat, vLLM on CPU now and
    then finishes before Envoy sees the client leave: that record is exact; a few tries
    give a real cut."""
    body = SHAPES["outputs"]
    prompt = json.loads(vllm_server.post("/v1/responses", {
        "model": MODEL, **body, "max_output_tokens": 1, **EXACT}))["usage"]["input_tokens"]
    for _ in range(5):
        rec = _cut_responses_stream(vllm_gateway, body)
        assert rec["prompt_tokens"] == prompt, rec
        if rec["estimated"]:
            # Its tools may be called: a tool parser's held-back tokens no event shows,
            # so a cut is charged what it could generate.
            assert rec["status"] == 499 and rec["completion_tokens"] == LONG_TOKENS, rec
            return
    raise AssertionError("five streams in a row outran the client's disconnect")
