"""The SSE parser's cost is linear in the bytes fed whatever the chunking, and an event over
`max_event_bytes` is passed through as it arrives (byte-exact, never buffered, flagged),
the same for every split of the stream."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from policy.config import EnvoySettings
from policy.sse import MAX_EVENT_BYTES, Event, SSEParser
from policy.stream_usage import ResponsesStreamMeter, StreamMeter

CHUNK = 4 << 10


def feed_all(p: SSEParser, data: bytes, chunk: int) -> int:
    """Feed `data` in `chunk`-byte pieces; the bytes that came back (events and tail)."""
    out = 0
    for i in range(0, len(data), chunk):
        out += sum(len(e.raw) for e in p.feed(data[i : i + chunk]))
    events, tail = p.finish()
    return out + sum(len(e.raw) for e in events) + len(tail)


def cpu_s(data: bytes, max_event_bytes: int) -> float:
    """The least CPU time of 3 runs (the others are noise: another process, a GC pass)."""
    best = float("inf")
    for _ in range(3):
        p = SSEParser(max_event_bytes)
        t0 = time.process_time()
        assert feed_all(p, data, CHUNK) == len(data)
        best = min(best, time.process_time() - t0)
    return best


def test_cost_is_linear_in_bytes_whatever_the_line_length() -> None:
    """One 16 MiB event in 4 KiB chunks costs about what 1024 events of 16 KiB cost (the
    parser used to rescan the line on each chunk: this took minutes)."""
    big = b"data: " + b"x" * (16 << 20) + b"\n\n"
    small = (b"data: " + b"y" * ((16 << 10) - 8) + b"\n\n") * 1024
    assert len(small) == 16 << 20
    for limit in (MAX_EVENT_BYTES, 2 * len(big)):  # passed through unread, or buffered
        ratio = cpu_s(big, limit) / max(cpu_s(small, limit), 1e-3)
        assert ratio < 3, (limit, ratio)


def test_the_default_limit_is_far_above_a_real_event_and_configurable() -> None:
    assert MAX_EVENT_BYTES == EnvoySettings().max_event_bytes == 16 << 20
    assert EnvoySettings(max_event_bytes=4096).max_event_bytes == 4096


def test_an_oversize_event_is_forwarded_as_it_arrives() -> None:
    """With strip_usage (the meter answers every chunk), everything fed once past the limit
    has gone out after each chunk: the parser keeps 2 bytes of it at most."""
    head = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    big = b"data: " + b"z" * 100_000 + b"\r\ndata: more\r\n\r\n"
    tail = b"data: [DONE]\n\n"
    stream = head + big + tail
    m = StreamMeter(strip_usage=True, max_event_bytes=4096)
    out = b""
    for i in range(0, len(stream), 1000):
        got = m.feed(stream[i : i + 1000])
        assert got is not None
        out += got
        fed = i + 1000
        if len(head) + 4096 + 1000 < fed < len(head) + len(big):
            assert out == stream[:fed]
            assert len(m._parser._buf) <= 2  # the bound is the point
    out += m.finish() or b""
    assert out == stream
    assert (m.oversize_events, m.oversize_bytes, m.content_chunks, m.done) == (
        1, len(big), 1, True)
    assert m.usage is None
    assert m.completion_estimate == 1 + (len(big) + 3) // 4


def test_an_oversize_usage_chunk_is_never_stripped() -> None:
    """Only bytes the meter read can be stripped: an oversize usage chunk reaches the
    client, and the usage is missing (the record is then estimated)."""
    usage = (b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3},'
             b'"pad":"' + b"p" * 5000 + b'"}\n\n')
    stream = usage + b"data: [DONE]\n\n"
    for size in (1, 7, 4096, len(stream)):
        m = StreamMeter(strip_usage=True, max_event_bytes=4096)
        out = b"".join(m.feed(stream[i : i + size]) or b""
                       for i in range(0, len(stream), size))
        out += m.finish() or b""
        assert out == stream, size
        assert m.usage is None and m.oversize_events == 1 and m.done
    small = StreamMeter(strip_usage=True, max_event_bytes=len(usage))
    assert (small.feed(stream), small.usage is not None) == (b"data: [DONE]\n\n", True)


def test_an_oversize_responses_final_event_is_counted_and_passed() -> None:
    done = (b'event: response.completed\ndata: {"type":"response.completed","response":'
            b'{"usage":{"input_tokens":1,"output_tokens":2},"output":"' + b"o" * 9000
            + b'"}}\n\n')
    m = ResponsesStreamMeter(max_event_bytes=4096)
    assert all(m.feed(done[i : i + 512]) is None for i in range(0, len(done), 512))
    assert m.finish() is None
    assert (m.usage, m.done, m.oversize_events, m.oversize_bytes) == (
        None, False, 1, len(done))


# -- any split, any mix of line endings, events over and under the limit ----------------

LIMIT = 48  # small, so that the generated streams have events on both sides of it


@st.composite
def event_bytes(draw: st.DrawFn) -> bytes:
    """One event (never an empty one: a lone CR before a blank line's LF would be CRLF)."""
    eol = draw(st.sampled_from([b"\n", b"\r", b"\r\n"]))
    kinds = st.sampled_from([b"data: ", b"data:", b"event: ", b": ", b"id: "])
    values = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    lines = draw(st.lists(st.tuples(kinds, values), min_size=1, max_size=4))
    return b"".join(k + v + eol for k, v in lines) + eol


def parse(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes, int]:
    """Events with each oversize event's fragments merged, the tail, the oversize count."""
    p = SSEParser(LIMIT)
    events: list[Event] = []
    prev = 0
    for c in [*sorted(cuts), len(data)]:
        events += p.feed(data[prev:c])
        prev = c
    last, tail = p.finish()
    merged: list[Event] = []
    for e in [*events, *last]:
        if e.oversize and merged and merged[-1].oversize:
            merged[-1] = Event(merged[-1].raw + e.raw, None, None, True)
        else:
            merged.append(e)
    return merged, tail, p.oversize_events


@settings(max_examples=300, deadline=None)
@given(st.lists(event_bytes(), min_size=1, max_size=8), event_bytes(), st.data())
def test_any_split_gives_the_same_events_and_bytes(
        events: list[bytes], last: bytes, data: st.DataObject) -> None:
    # An unterminated last event: without its blank line, cut anywhere.
    partial = last[: data.draw(st.integers(0, len(last.rstrip(b"\r\n"))))]
    stream = b"".join(events) + partial
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    whole = parse(stream, [])
    got = parse(stream, cuts)
    assert got == whole
    merged, tail, oversize = got
    assert b"".join(e.raw for e in merged) + tail == stream
    big = [e for e in events if len(e) > LIMIT]
    # Adjacent oversize events merge above; their bytes and their count are exact.
    assert oversize == len(big) + (len(tail) == 0 and len(partial) > LIMIT)
    assert [e.raw for e in merged if not e.oversize] == [e for e in events if len(e) <= LIMIT]


def test_every_single_split_of_oversize_events_with_every_line_ending() -> None:
    big = b"x" * LIMIT
    over = (b"data: " + big + b"\r\ndata: b\r\n\r\n" + b"event: " + big + b"\rdata: c\r\r"
            + b": " + big + b"\n\n")  # 3 events (merged by `parse`)
    unterminated = b"data: " + big + b"\r"
    stream = b"data: a\n\n" + over + b"data: d\r\n\r\n" + unterminated
    whole = parse(stream, [])
    assert [(e.raw, e.oversize) for e in whole[0]] == [
        (b"data: a\n\n", False), (over, True), (b"data: d\r\n\r\n", False),
        (unterminated, True)]
    assert whole[1:] == (b"", 4)
    for i in range(len(stream) + 1):
        assert parse(stream, [i]) == whole, i
    for i in range(0, len(stream) + 1, 5):
        for j in range(i, len(stream) + 1, 3):
            assert parse(stream, [i, j]) == whole, (i, j)


TEXT = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
USAGE_ONLY = b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":9}}\n\n'


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["text", "big", "usage", "big-usage"]), max_size=6),
       st.data())
def test_stripping_meter_is_byte_exact_for_any_split(kinds: list[str],
                                                     data: st.DataObject) -> None:
    """Every byte reaches the client in order, but the usage-only chunks the meter read;
    an oversize one is never read, so never stripped."""
    pad = b"data: " + b"p" * 200 + b"\r\n"
    events = {"text": TEXT, "big": pad + TEXT, "usage": USAGE_ONLY, "big-usage": pad + USAGE_ONLY}
    stream = b"".join(events[k] for k in kinds) + b"data: [DONE]\n\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    m = StreamMeter(strip_usage=True, max_event_bytes=128)
    out, prev = b"", 0
    for c in [*cuts, len(stream)]:
        out += m.feed(stream[prev:c]) or b""
        prev = c
    out += m.finish() or b""
    assert out == b"".join(events[k] for k in kinds if k != "usage") + b"data: [DONE]\n\n"
    assert m.oversize_events == sum(k.startswith("big") for k in kinds)
    assert (m.usage is not None) == ("usage" in kinds)
    assert m.content_chunks == kinds.count("text") and m.done
