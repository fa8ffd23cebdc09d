"""Recorded real vLLM 0.32 streams (tests/vllm rewrites them with
TOKENBOOTH_RECORD_VLLM_FIXTURES=1), metered at every split and at random multi-splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.stream_usage import ResponsesStreamMeter, StreamMeter
from policy.usage import Usage
from tests.policy.test_sse import parse_split

FIXTURES = Path(__file__).with_name("fixtures")
STREAMS = {p.stem: p.read_bytes() for p in sorted(FIXTURES.glob("vllm_*_stream.sse"))}


def usage_event(stream: bytes) -> tuple[bytes, dict[str, int]]:
    """The usage-only event (raw bytes) and its usage, found without the code under test."""
    for block in stream.split(b"\n\n"):
        if block.startswith(b"data: {") and b'"choices":[]' in block:
            return block + b"\n\n", json.loads(block[6:])["usage"]
    raise AssertionError("no usage chunk in the recording")


def meter(stream: bytes, cuts: list[int], strip: bool) -> tuple[StreamMeter, bytes]:
    m = StreamMeter(strip_usage=strip)
    out = b""
    prev = 0
    for c in [*sorted(cuts), len(stream)]:
        got = m.feed(stream[prev:c])
        out += stream[prev:c] if got is None else got
        prev = c
    got = m.finish()
    return m, out + (b"" if got is None else got)


def test_recordings_are_present() -> None:
    assert set(STREAMS) == {"vllm_chat_stream", "vllm_completion_stream",
                            "vllm_completion_utf8_stream"}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_split_meters_vllm_usage_and_strips_only_its_chunk(name: str) -> None:
    stream = STREAMS[name]
    event, usage = usage_event(stream)
    want = (usage["prompt_tokens"], usage["completion_tokens"])
    for i in range(len(stream) + 1):
        for strip in (False, True):
            m, out = meter(stream, [i], strip)
            assert m.usage is not None and m.done, (i, strip)
            assert (m.usage.prompt_tokens, m.usage.completion_tokens) == want, (i, strip)
            assert out == (stream.replace(event, b"") if strip else stream), (i, strip)


@pytest.mark.parametrize("name", sorted(STREAMS))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_multi_split_gives_the_same_events(name: str, data: st.DataObject) -> None:
    stream = STREAMS[name]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    events, raw, tail = parse_split(stream, cuts)
    assert (events, raw, tail) == parse_split(stream, [])
    assert raw == stream and tail == b"" and events[-1] == b"[DONE]"


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_without_the_usage_chunk_content_chunks_estimate_the_tokens(name: str) -> None:
    """What an estimate sees when an upstream sends no usage: one content chunk per token,
    also for a token whose text is empty (vLLM holds back a UTF-8 character's first bytes:
    half the tokens of the `utf8` recording have `"text":""`)."""
    stream = STREAMS[name]
    event, usage = usage_event(stream)
    m, _ = meter(stream.replace(event, b""), [len(stream) // 3], strip=False)
    assert m.usage is None and m.done
    assert m.content_chunks == usage["completion_tokens"]


# The Responses API stream (`event:` + `data:`, usage in `response.completed`), recorded
# from the same vLLM by tests/vllm.
RESPONSES = (FIXTURES / "vllm_responses.sse").read_bytes()


def completed_usage(stream: bytes) -> dict[str, int]:
    """The usage of the `response.completed` event, found without the code under test."""
    for block in stream.split(b"\n\n"):
        if block.startswith(b"event: response.completed\n"):
            usage: dict[str, int] = json.loads(block.split(b"\ndata: ", 1)[1])["response"][
                "usage"]
            return usage
    raise AssertionError("no response.completed event in the recording")


def responses_meter(stream: bytes, cuts: list[int]) -> ResponsesStreamMeter:
    m = ResponsesStreamMeter()
    prev = 0
    for c in [*sorted(cuts), len(stream)]:
        assert m.feed(stream[prev:c]) is None
        prev = c
    assert m.finish() is None
    return m


def test_every_split_of_a_responses_stream_meters_vllm_usage() -> None:
    usage = completed_usage(RESPONSES)
    want = Usage(usage["input_tokens"], usage["output_tokens"])
    deltas = RESPONSES.count(b"event: response.output_text.delta\n")
    assert deltas > 1 and RESPONSES.count(b"event: ") > deltas + 5
    for i in range(len(RESPONSES) + 1):
        m = responses_meter(RESPONSES, [i])
        assert (m.usage, m.done, m.content_chunks) == (want, True, deltas), i


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, len(RESPONSES)), max_size=40))
def test_any_multi_split_of_a_responses_stream(cuts: list[int]) -> None:
    usage = completed_usage(RESPONSES)
    m = responses_meter(RESPONSES, cuts)
    assert m.usage == Usage(usage["input_tokens"], usage["output_tokens"]) and m.done
