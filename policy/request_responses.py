"""The Responses API (`POST /v1/responses`) as vLLM serves it: what is refused, and the
prompt bound of what is accepted.

vLLM renders a Responses request as a chat: `instructions` becomes a system message, a
string `input` a user message, each input item one message (a function call an
assistant message with one tool call, a call's output a tool message), and function
`tools` the chat tools, wrapped as `{"type": "function", "function": {...}}`. So the
bound is the chat bound (policy/tokens.py) of those messages and tools.

Refused, naming the field: what makes the prompt come from elsewhere than this body
(`previous_response_id`, `previous_input_messages`, `item_reference` items, `prompt`
templates), a generation that outlives the request (`background`), and built-in tools
(the backend runs them in a loop of generations, each with a longer prompt).
"""

from __future__ import annotations

import json
from typing import Any, Final

from policy.config import Model
from policy.errors import invalid_request
from policy.tokens import (
    Tally,
    field_tally,
    json_indent2_len,
    json_len,
    message_tally,
    properties_len,
    rendered_tools,
    template_kwargs_tally,
    tool_repeats,
)

REFUSED: Final = {
    "previous_response_id": "it continues a conversation stored on the backend, whose "
                            "prompt cannot be bounded from this body; send the whole "
                            "conversation in 'input' instead.",
    "previous_input_messages": "its messages are rendered outside the chat template, "
                               "so its prompt cannot be bounded; send them in 'input'.",
    "background": "a background response ends after this request, so its usage cannot "
                  "be metered.",
    "prompt": "a stored prompt template cannot be bounded from this body.",
}  # fmt: skip
# Of those, the ones vLLM reads whenever they are not null (`""` and `{}` too: tester,
# its 404 and 400 came after admission); `background: false` is as good as absent.
_PRESENT: Final = frozenset({"previous_response_id", "prompt"})
# Fields the backend may hand to the chat template (or its structured-output grammar).
TEMPLATE_FIELDS: Final = ("tool_choice", "reasoning", "text", "chat_template_kwargs")
_CALLS: Final = frozenset({"function_call", "custom_tool_call"})
_OUTPUTS: Final = frozenset({"function_call_output", "custom_tool_call_output"})


def responses_prompt(body: dict[str, Any], model: Model) -> tuple[int, int]:
    """(estimate, bound) of a Responses request's prompt tokens; a 400 names a field the
    gateway refuses or cannot read."""
    for name, why in REFUSED.items():
        if body.get(name) or (name in _PRESENT and body.get(name) is not None):
            raise invalid_request(f"'{name}' is not accepted here: {why}", name)
    tally = Tally()
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid_request("'instructions' must be a string.", "instructions")
        tally.text += json_len({"role": "system", "content": instructions})
        tally.messages += 1
    items = body.get("input")
    if isinstance(items, str):
        tally.text += json_len({"role": "user", "content": items})
        tally.messages += 1
    elif isinstance(items, list):
        tally.messages += len(items)
        for i, item in enumerate(items):
            _item(item, i, model, tally)
    else:
        raise invalid_request("'input' must be a string or an array of input items.",
                              "input")
    _tools(body.get("tools"), tool_repeats(items if isinstance(items, list) else []), tally)
    for name in TEMPLATE_FIELDS:
        if name == "chat_template_kwargs":
            template_kwargs_tally(body.get(name), tally)
        else:
            field_tally(body.get(name), tally)
    return tally.estimate(), tally.bound(model)


def _item(item: Any, i: int, model: Model, tally: Tally) -> None:
    """One input item, as the chat message vLLM turns it into (each its own message: vLLM
    merges some, which only lowers the count)."""
    if not isinstance(item, dict):
        raise invalid_request("Each input item must be an object.", f"input[{i}]")
    kind = item.get("type", "message")
    if kind == "message":
        message_tally(item, "input", i, model, tally)
    elif kind in _CALLS:
        message_tally(_call_message(item, kind), "input", i, model, tally)
    elif kind in _OUTPUTS:
        tool = {"role": "tool", "content": item.get("output"),
                "tool_call_id": item.get("call_id")}
        message_tally(tool, "input", i, model, tally)
    elif kind == "reasoning":  # its text, from `content` or `summary`
        tally.text += json_len(item)
    else:
        raise invalid_request(f"Input items of type {kind!r} are not accepted here.",
                              f"input[{i}].type")


def _call_message(item: dict[str, Any], kind: str) -> dict[str, Any]:
    """A (custom) function call as vLLM's assistant message with one tool call."""
    name, namespace = item.get("name"), item.get("namespace")
    if isinstance(name, str) and isinstance(namespace, str) and namespace:
        name = f"{namespace}__{name}"  # vLLM's flat name of a namespaced tool
    if kind == "custom_tool_call":  # its text as vLLM's {"input": ...} arguments
        args: Any = json.dumps({"input": item.get("input") or ""}, ensure_ascii=False)
    else:
        args = item.get("arguments")
    call = {"id": item.get("call_id"), "type": "function",
            "function": {"name": name, "arguments": args}}
    return {"role": "assistant", "tool_calls": [call]}


def _tools(tools: Any, times: int, tally: Tally) -> None:
    """Function tools, measured in the chat form vLLM renders them in, `times` over
    (`tokens.tool_repeats`)."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise invalid_request("'tools' must be an array.", "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid_request(
                "Only function tools (type 'function') are accepted here: built-in tools "
                "run on the backend in a loop of generations whose tokens cannot be "
                "bounded, and other kinds ('namespace', 'custom') are not accepted by "
                "this gateway; send them as function tools.", f"tools[{i}]")
        fn = {k: v for k, v in tool.items() if k != "type"}
        chat_tool = rendered_tools([{"type": "function", "function": fn}])[0]
        tally.json += json_indent2_len(chat_tool) * times
        tally.text += properties_len(chat_tool) * times
