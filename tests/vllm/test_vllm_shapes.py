"""What vLLM 0.32's own request models make of shapes the hold's bound measures, asked of
its code in its venv (no server): the tools a chat template renders are no longer than
the gateway measures them (policy/tokens.py, `rendered_tools`)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from policy.tokens import json_indent2_len, rendered_tools
from tests.vllm.conftest import _require_python

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

CHAT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "f"}},
    {"type": "function", "function": {"name": "f", "strict": None, "defer_loading": None}},
    {"type": "function", "defer_loading": True, "function": {"name": "g", "x": 1}, "y": 2},
    {"type": "function", "function": {"name": "h", "description": "d", "strict": True,
                                      "parameters": {"type": "object"}}},
]
RESPONSES_TOOLS: list[Any] = [
    {"type": "function", "name": "f"},
    {"type": "function", "name": "g", "strict": True, "parameters": {"type": "object"},
     "description": "d"},
]
# Prints, as one JSON line, each chat tool as vLLM dumps it for the template, then the
# Responses tools as its `construct_tool_dicts` converts them.
_DUMP = """
import json, sys
import vllm  # noqa: F401  (vLLM's own import order)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.entrypoints.openai.responses.utils import construct_tool_dicts
chat, responses = json.loads(sys.stdin.read())
msg = [{"role": "user", "content": "hi"}]
out = [[t.model_dump() for t in ChatCompletionRequest.model_validate(
           {"messages": msg, "tools": [tool]}).tools] for tool in chat]
r = ResponsesRequest.model_validate({"input": "hi", "tools": responses})
print(json.dumps([out, construct_tool_dicts(r.tools, r.tool_choice)]))
"""


def test_tools_render_no_longer_than_the_bound_measures() -> None:
    python = _require_python()
    done = subprocess.run([str(python), "-c", _DUMP], input=json.dumps(
        [CHAT_TOOLS, RESPONSES_TOOLS]), capture_output=True, text=True, timeout=300,
        check=True)
    chat, responses = json.loads(done.stdout.strip().splitlines()[-1])
    for tool, [dump] in zip(CHAT_TOOLS, chat, strict=True):
        assert json_indent2_len(rendered_tools([tool])[0]) >= json_indent2_len(dump), dump
    for tool, dump in zip(RESPONSES_TOOLS, responses, strict=True):
        fn = {k: v for k, v in tool.items() if k != "type"}
        mine = rendered_tools([{"type": "function", "function": fn}])[0]
        assert json_indent2_len(mine) >= json_indent2_len(dump), dump
    # What makes the client's own JSON fall short: the defaults vLLM writes in.
    assert chat[0] == [{"type": "function", "function": {
        "name": "f", "description": None, "parameters": None}}]
