"""Tool calls are generated tokens: a chat stream whose output is tool calls (vLLM streams
`delta.tool_calls[].function` name and argument fragments) and that ends without its
usage chunk is estimated from those events, as a text stream is from its content; so is
reasoning, under either name vLLM has given it (`reasoning`, `reasoning_content`).
The same events drive Envoy's Lua meter in tests/e2e/test_tool_call_metering.py."""

from __future__ import annotations

import json
from typing import Any

from policy.stream_usage import ResponsesStreamMeter, StreamMeter
from policy.usage import Usage

USAGE = {"prompt_tokens": 20, "completion_tokens": 14, "total_tokens": 34}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                       "finish_reason": finish, "stop_reason": None}]}


def call(index: int, **function: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": function}]}


def tool_call_stream() -> tuple[list[bytes], list[bytes], int]:
    """A vLLM-shaped chat stream: reasoning, some text, then two tool calls (the first
    opened with its id, name and empty arguments, as for a named tool_choice; the second
    with its name alone, as the auto parsers send it), then the finish chunk. Returns the
    events up to the finish chunk, the usage chunk and [DONE], and how many of the first
    carry generated tokens: all but the role chunk, for vLLM sends a chunk per generation
    step, also when the parser let no text through (an empty fragment, the EOS)."""
    first = {"id": "chatcmpl-tool-1", "type": "function", "index": 0,
             "function": {"name": "get_weather", "arguments": ""}}
    counted = [
        chunk({"reasoning": "The user wants the weather."}),  # vLLM 0.32's reasoning field
        chunk({"reasoning_content": "So: get_weather."}),      # older releases
        chunk({"content": "Let me look."}),
        chunk({"tool_calls": [first]}),                # the name: counted
        *(chunk(call(0, arguments=a)) for a in ('{"', "city", '":"', "Paris", '"}')),
        chunk({"tool_calls": [{"id": "chatcmpl-tool-2", "type": "function", "index": 1,
                               "function": {"name": "get_time"}}]}),
        chunk(call(1, arguments='"')),                 # an escaped quote is text too
    ]
    empty = [
        chunk({"role": "assistant", "content": "", "reasoning": None,
               "reasoning_content": None}),                # the role chunk: no token
        chunk(call(0, arguments="")),                  # an empty fragment
        chunk({"tool_calls": [{"index": 1, "function": {"name": None, "arguments": ""}}]}),
        chunk({"content": ""}, finish="tool_calls"),
    ]
    events = [sse(empty[0]), *map(sse, counted[:4]), sse(empty[1]),
              *map(sse, counted[4:]), sse(empty[2]), sse(empty[3])]
    usage = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
             "model": "m", "choices": [], "usage": USAGE}
    return events, [sse(usage), b"data: [DONE]\n\n"], len(counted) + len(empty) - 1


def test_a_cut_tool_call_stream_counts_every_name_and_argument_event() -> None:
    events, _, expected = tool_call_stream()
    assert expected == 14
    for strip in (False, True):
        m = StreamMeter(strip_usage=strip)
        out = [m.feed(e) for e in events]
        tail = m.finish()
        assert (m.content_chunks, m.usage, m.done) == (expected, None, False)
        # The first chunk's text spells more than one chunk's tokens may (27 characters,
        # ~7 tokens): a first chunk counts as merged steps too (no `echo` here).
        assert m.completion_estimate == expected + 6
        if strip:
            assert b"".join(o or b"" for o in [*out, tail]) == b"".join(events)


def test_a_whole_tool_call_stream_is_exact_and_its_usage_chunk_stripped() -> None:
    events, tail, expected = tool_call_stream()
    m = StreamMeter(strip_usage=True)
    out = b"".join(m.feed(e) or b"" for e in [*events, *tail]) + (m.finish() or b"")
    assert out == b"".join([*events, tail[1]])
    assert (m.content_chunks, m.usage, m.done) == (expected, Usage(20, 14), True)


def test_tool_calls_of_any_choice_count_once_per_event() -> None:
    two = chunk(call(0, arguments="a"))
    two["choices"].append({**two["choices"][0], "index": 1})
    odd = chunk({"tool_calls": [None, {"function": "f"}, {"index": 0}]})
    odd_types = chunk({"tool_calls": {"function": {"arguments": "x"}}})
    numeric = chunk(call(0, arguments=7))  # type: ignore[arg-type]
    m = StreamMeter(strip_usage=False)
    for e in (two, odd, odd_types, numeric):
        m.feed(sse(e))
    # Each a generation step: once per event, whatever its choices and calls hold.
    assert m.content_chunks == 4


# -- the Responses API ------------------------------------------------------------------

def typed(kind: str, body: dict[str, Any], name: bool = True) -> bytes:
    head = f"event: {kind}\n" if name else ""
    data = json.dumps({"type": kind, **body}, separators=(",", ":"))
    return f"{head}data: {data}\n\n".encode()


def responses_tool_call(name: bool) -> list[bytes]:
    """A function call in a Responses stream, cut before `response.completed`: its item
    opens with the name, then argument deltas."""
    item = {"type": "function_call", "id": "fc_1", "call_id": "call_1",
            "name": "get_weather", "arguments": "", "status": "in_progress"}
    message = {"type": "message", "id": "msg_1", "role": "assistant", "content": [],
               "status": "in_progress"}
    args = ('{"', "city", '":"Paris"}')
    return [
        typed("response.created", {"response": {"usage": None}}, name),
        typed("response.output_item.added", {"output_index": 0, "item": message}, name),
        typed("response.output_text.delta", {"delta": "Let me look."}, name),
        typed("response.output_item.added", {"output_index": 1, "item": item}, name),
        *(typed("response.function_call_arguments.delta",
                {"item_id": "fc_1", "output_index": 1, "delta": a}, name) for a in args),
        typed("response.function_call_arguments.done",
              {"item_id": "fc_1", "output_index": 1, "arguments": "".join(args)}, name),
    ]


def test_responses_function_call_name_and_argument_deltas_count() -> None:
    for name in (True, False):
        m = ResponsesStreamMeter()
        for e in responses_tool_call(name):
            assert m.feed(e) is None
        assert m.finish() is None
        # The text delta, the call's opening event (its name), three argument deltas.
        assert (m.content_chunks, m.usage, m.done) == (5, None, False), name
