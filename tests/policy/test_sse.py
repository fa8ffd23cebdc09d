"""The SSE parser and the stream meter give the same answer for every split of a stream."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from policy.sse import SSEParser
from policy.stream_usage import ResponsesStreamMeter, StreamMeter
from policy.usage import Usage

USAGE_EVENT = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
               b'"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3}}\n\n')
STREAM = (
    b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\\u00e9b"}}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"c"},"finish_reason":"length"}]}'
    b"\n\n" + USAGE_EVENT + b"data: [DONE]\n\n"
)


def parse_split(data: bytes, cuts: list[int]) -> tuple[list[bytes | None], bytes, bytes]:
    p = SSEParser()
    events = []
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        events += p.feed(data[prev:c])
        prev = c
    last, tail = p.finish()
    events += last
    return [e.data for e in events], b"".join(e.raw for e in events), tail


def test_every_single_split_gives_the_same_events() -> None:
    whole, raw, tail = parse_split(STREAM, [])
    assert len(whole) == 6 and whole[-1] == b"[DONE]"
    assert raw == STREAM and tail == b""
    for i in range(len(STREAM) + 1):
        assert parse_split(STREAM, [i]) == (whole, raw, tail), i


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_multi_split_gives_the_same_events(cuts: list[int]) -> None:
    assert parse_split(STREAM, cuts) == parse_split(STREAM, [])


def test_crlf_cr_multiline_comments_and_fields() -> None:
    data = b"data: a\r\ndata:b\r\n\r\n: keepalive\n\nevent: x\nid: 1\ndata: c\rdata: d\r\r"
    for i in range(len(data) + 1):
        events, raw, tail = parse_split(data, [i])
        assert events == [b"a\nb", None, b"c\nd"], i
        assert raw == data and tail == b""


def test_unterminated_event_is_returned_as_tail_not_event() -> None:
    events, _raw, tail = parse_split(b"data: a\n\ndata: partial", [3])
    assert events == [b"a"] and tail == b"data: partial"


def meter_split(data: bytes, cuts: list[int], strip: bool) -> tuple[StreamMeter, bytes]:
    m = StreamMeter(strip_usage=strip)
    out = b""
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        chunk = data[prev:c]
        got = m.feed(chunk)
        out += chunk if got is None else got
        prev = c
    got = m.finish()
    out += b"" if got is None else got
    return m, out


def test_meter_reads_usage_and_counts_content_for_any_split() -> None:
    for i in range(len(STREAM) + 1):
        m, out = meter_split(STREAM, [i], strip=False)
        assert out == STREAM
        assert m.usage is not None and (m.usage.prompt_tokens, m.usage.completion_tokens) == (
            12, 3)
        assert m.content_chunks == 3 and m.done


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=8))
def test_meter_strips_exactly_the_usage_chunk(cuts: list[int]) -> None:
    m, out = meter_split(STREAM, cuts, strip=True)
    assert out == STREAM.replace(USAGE_EVENT, b"")
    assert m.usage is not None and m.usage.total_tokens == 15


def test_usage_in_a_chunk_with_choices_is_not_stripped() -> None:
    ev = {"choices": [{"index": 0, "delta": {"content": "x"}}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    data = b"data: " + json.dumps(ev).encode() + b"\n\ndata: [DONE]\n\n"
    m, out = meter_split(data, [5], strip=True)
    assert out == data and m.usage is not None


def test_cut_stream_has_no_usage_and_keeps_its_tail() -> None:
    cut = STREAM[:150]
    m, out = meter_split(cut, [40], strip=True)
    assert m.usage is None and not m.done
    assert out == cut  # nothing dropped, the partial event forwarded at the end
    assert m.content_chunks == 1


# -- the Responses API's typed events ---------------------------------------------------

def typed(kind: str, body: str) -> bytes:
    return f"event: {kind}\ndata: {body}\n\n".encode()


COMPLETED = typed("response.completed", '{"response":{"id":"r","status":"incomplete",'
                  '"usage":{"input_tokens":28,"output_tokens":3,"total_tokens":31}},'
                  '"sequence_number":6,"type":"response.completed"}')
RESPONSES_STREAM = (
    typed("response.created", '{"response":{"id":"r","usage":null},"sequence_number":0,'
          '"type":"response.created"}')
    + typed("response.output_item.added", '{"item":{"id":"m"},"output_index":0,'
            '"sequence_number":1,"type":"response.output_item.added"}')
    + typed("response.output_text.delta", '{"delta":"a","sequence_number":2,'
            '"type":"response.output_text.delta"}')
    + typed("response.output_text.delta", '{"delta":"\\u00e9b","sequence_number":3,'
            '"type":"response.output_text.delta"}')
    + typed("response.output_text.done", '{"text":"a\\u00e9b","sequence_number":4,'
            '"type":"response.output_text.done"}')
    + b": a comment between events\n\n"
    + typed("response.output_item.done", '{"item":{"id":"m"},"sequence_number":5,'
            '"type":"response.output_item.done"}')
    + COMPLETED
)


def names_split(data: bytes, cuts: list[int]) -> list[bytes | None]:
    p = SSEParser()
    out = []
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        out += [e.event for e in p.feed(data[prev:c])]
        prev = c
    last, _tail = p.finish()
    return out + [e.event for e in last]


def test_event_names_survive_every_split() -> None:
    whole = names_split(RESPONSES_STREAM, [])
    assert whole[0] == b"response.created" and whole[-1] == b"response.completed"
    assert whole[5] is None  # the comment
    for i in range(len(RESPONSES_STREAM) + 1):
        assert names_split(RESPONSES_STREAM, [i]) == whole, i
    # The last `event:` line wins, `event:x` needs no space, and a name never leaks on.
    assert names_split(b"event: a\nevent:b\ndata: 1\n\ndata: 2\n\n", []) == [b"b", None]


def responses_split(data: bytes, cuts: list[int]) -> tuple[ResponsesStreamMeter, bytes]:
    m = ResponsesStreamMeter()
    out = b""
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        got = m.feed(data[prev:c])
        assert got is None  # nothing is ever rewritten
        out += data[prev:c]
        prev = c
    assert m.finish() is None
    return m, out


def test_responses_meter_reads_completed_at_every_split() -> None:
    for i in range(len(RESPONSES_STREAM) + 1):
        m, out = responses_split(RESPONSES_STREAM, [i])
        assert out == RESPONSES_STREAM
        assert m.usage == Usage(28, 3), i
        assert m.content_chunks == 2 and m.done


@given(st.lists(st.integers(min_value=0, max_value=len(RESPONSES_STREAM)), max_size=12))
def test_responses_meter_any_multi_split(cuts: list[int]) -> None:
    m, _ = responses_split(RESPONSES_STREAM, cuts)
    assert (m.usage, m.content_chunks, m.done) == (Usage(28, 3), 2, True)


def test_responses_cut_before_completed_has_no_usage() -> None:
    cut = RESPONSES_STREAM[: RESPONSES_STREAM.index(COMPLETED) + 40]
    for i in range(0, len(cut) + 1, 7):
        m, _ = responses_split(cut, [i])
        assert m.usage is None and not m.done and m.content_chunks == 2
