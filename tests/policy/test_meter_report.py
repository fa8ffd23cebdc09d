"""Envoy's stream-meter report read as the services' own meter would have read the
stream: the usage event through the same SSE and JSON code, the counts for estimates."""

from __future__ import annotations

from policy.endpoints import Kind
from policy.meter_report import MeterReport, meter_from_report

USAGE_EVENT = (b'data: {"id":"c","object":"chat.completion.chunk","choices":[],'
               b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n')


def test_the_usage_event_gives_the_exact_usage() -> None:
    meter = meter_from_report(Kind.CHAT, MeterReport(
        events=4, usage_event=USAGE_EVENT, done=True, ended=True), 1 << 20, 1)
    assert meter.usage is not None
    assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (3, 4)
    assert meter.content_chunks == 4 and meter.done


def test_a_crlf_usage_event_reads_the_same() -> None:
    raw = USAGE_EVENT.replace(b"\n", b"\r\n")
    meter = meter_from_report(Kind.COMPLETION, MeterReport(usage_event=raw), 1 << 20, 1)
    assert meter.usage is not None and meter.usage.total_tokens == 7


def test_a_cut_stream_is_estimated_from_the_counts() -> None:
    cut = meter_from_report(Kind.CHAT, MeterReport(events=6, oversize_events=1,
                                                   oversize_bytes=400), 1 << 20, 8)
    assert cut.usage is None and not cut.done
    assert cut.completion_estimate == 6 * 8 + 100  # 8 tokens a chunk, ~4 bytes a token
    assert cut.oversize_events == 1


def test_an_event_that_is_not_a_usage_object_gives_none() -> None:
    for raw in (b'data: {"usage":"lots"}\n\n', b"data: not json\n\n", b"",
                b'data: {"choices":[],"usage":{"prompt_tokens":-1}}\n\n'):
        meter = meter_from_report(Kind.CHAT, MeterReport(usage_event=raw), 1 << 20, 1)
        assert meter.usage is None, raw


def test_a_cut_streams_continuous_usage_is_not_its_usage() -> None:
    """Envoy's meter keeps the last event with a usage object: in a stream cut before
    vLLM's usage-only chunk, with continuous_usage_stats, that is one choice's count."""
    one_choice = (b'data: {"choices":[{"index":1,"delta":{"content":"x"}}],'
                  b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n')
    meter = meter_from_report(Kind.CHAT, MeterReport(events=4, usage_event=one_choice),
                              1 << 20, 1)
    assert meter.usage is None and meter.completion_estimate == 4


def test_an_answer_that_is_not_an_event_stream_is_unreadable() -> None:
    """Envoy's meter passes a whole answer that is not an event stream unread: the meter
    says so (its hold is charged); one cut before its end says only that it was cut."""
    whole = meter_from_report(Kind.CHAT, MeterReport(ended=True, unreadable=True), 1 << 20, 1)
    assert whole.unreadable and whole.usage is None
    cut = meter_from_report(Kind.CHAT, MeterReport(unreadable=True), 1 << 20, 1)
    assert not cut.unreadable
    read = meter_from_report(Kind.CHAT, MeterReport(ended=True, events=3), 1 << 20, 1)
    assert not read.unreadable and read.content_chunks == 3


ERROR_EVENT = (b'data: {"error": {"message": "Internal server error", "type": '
               b'"InternalServerError", "param": null, "code": 500}}\n\n')


def test_an_error_event_gives_its_status_and_no_usage() -> None:
    """Envoy's meter hands over the first event that may say generation failed: read as
    the services' meter reads it, it gives the record's status; the stream is estimated
    from its counts, also with a continuous usage event and `[DONE]`."""
    one_choice = (b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],'
                  b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n')
    meter = meter_from_report(Kind.CHAT, MeterReport(
        events=2, usage_event=one_choice, error_event=ERROR_EVENT, done=True, ended=True),
        1 << 20, 1)
    assert (meter.error_status, meter.usage, meter.completion_estimate) == (500, None, 2)
    plain = meter_from_report(Kind.CHAT, MeterReport(events=2, done=True, ended=True),
                              1 << 20, 1)
    assert plain.error_status == 0


def test_an_event_the_lua_meter_took_for_an_error_may_not_be_one() -> None:
    """The Lua meter matches text; what the event is, is decided here, by its JSON."""
    for raw in (b'data: {"note": {"error": {"code": 500}}}\n\n', b"data: not json\n\n"):
        meter = meter_from_report(Kind.CHAT, MeterReport(error_event=raw), 1 << 20, 1)
        assert meter.error_status == 0, raw


def test_a_4xx_error_event_envoy_saw_first_is_a_refusal() -> None:
    """The Lua meter says whether the error event was the stream's first (`error_first`):
    with a 4xx that is the backend refusing the request in its stream (nothing ran)."""
    grammar = (b'data: {"error": {"message": "Grammar error", "type": "BadRequestError", '
               b'"param": null, "code": 400}}\n\n')
    for first, event, refused in ((True, grammar, True), (False, grammar, False),
                                  (True, ERROR_EVENT, False), (True, b"", False)):
        meter = meter_from_report(Kind.CHAT, MeterReport(
            error_event=event, error_first=first, done=True, ended=True), 1 << 20, 1)
        assert meter.refused is refused, (first, event)
