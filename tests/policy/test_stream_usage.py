"""policy/stream_usage.py: `StreamMeter` reads the usage chunk, counts content chunks and,
when asked, strips exactly the usage-only chunk, passing every other byte through."""

from __future__ import annotations

import gzip
from typing import Any

from policy.endpoints import Kind
from policy.stream_usage import ResponsesStreamMeter, StreamMeter, meter_for, stream_error_status
from policy.usage import Usage


def chunk(body: str) -> bytes:
    return f"data: {body}\n\n".encode()


ROLE = chunk('{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
TEXT = chunk('{"choices":[{"index":0,"delta":{"content":"Hi"}}]}')
THINK = chunk('{"choices":[{"index":0,"delta":{"reasoning_content":"hm"}}]}')
COMPLETION = chunk('{"choices":[{"index":0,"text":"Hi"}]}')
USAGE = chunk('{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}')
DONE = b"data: [DONE]\n\n"


def meter(strip: bool, *chunks: bytes) -> tuple[StreamMeter, bytes | None]:
    """Feed whole chunks, then finish; the bytes the client gets (None: as sent)."""
    m = StreamMeter(strip_usage=strip)
    outs = [m.feed(c) for c in chunks] + [m.finish()]
    if all(o is None for o in outs):
        return m, None
    assert None not in outs  # stripping answers for every chunk
    return m, b"".join(o for o in outs if o is not None)


def test_reads_usage_counts_content_and_sees_done() -> None:
    m, out = meter(False, ROLE, TEXT, THINK, TEXT, USAGE, DONE)
    assert out is None  # without strip_usage, nothing is rewritten
    assert m.usage == Usage(7, 3)
    assert m.content_chunks == 3  # the empty role chunk carries no text
    assert m.done


def test_legacy_completions_text_counts() -> None:
    m, _ = meter(False, COMPLETION, COMPLETION, DONE)
    assert (m.content_chunks, m.usage, m.done) == (2, None, True)


def test_a_token_whose_text_is_empty_counts() -> None:
    """vLLM sends a chunk per generated token; one ending inside a UTF-8 character (or
    EOS) has empty text, and a cut stream charged by its chunks must count it. The role
    chunk that opens each chat choice carries none."""
    empty_chat = chunk('{"choices":[{"index":0,"delta":{"content":""}}]}')
    last = chunk('{"choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}')
    empty_text = chunk('{"choices":[{"index":0,"text":""}]}')
    m, _ = meter(False, ROLE, empty_chat, TEXT, empty_chat, last)
    assert (m.content_chunks, m.usage) == (4, None)
    m, _ = meter(False, empty_text, COMPLETION, empty_text)
    assert m.content_chunks == 3


def test_strips_only_the_usage_only_chunk() -> None:
    m, out = meter(True, ROLE, TEXT, USAGE, DONE)
    assert out == ROLE + TEXT + DONE
    assert m.usage == Usage(7, 3)


def test_usage_inside_a_chunk_with_choices_is_kept() -> None:
    both = chunk('{"choices":[{"index":0,"delta":{"content":"x"}}],'
                 '"usage":{"prompt_tokens":1,"completion_tokens":1}}')
    m, out = meter(True, both, DONE)
    assert out == both + DONE
    assert (m.usage, m.content_chunks) == (Usage(1, 1), 1)



def continuous(index: int, prompt: int, done: int) -> bytes:
    """A vLLM 0.32 chunk with continuous_usage_stats: its usage is that one choice's."""
    return chunk(f'{{"choices":[{{"index":{index},"text":"x"}}],"usage":{{"prompt_tokens":'
                 f'{prompt},"total_tokens":{prompt + done},"completion_tokens":{done}}}}}')


def test_continuous_usage_of_one_choice_is_not_the_requests() -> None:
    """vLLM's continuous_usage_stats counts each choice (each prompt of a batch) apart: a
    stream of 2 prompts x n=2 cut before its usage-only chunk has no usage (it is
    estimated), never the last choice's 3 + 2 tokens; a whole one has the request's."""
    chunks = [continuous(i, 3 if i < 2 else 5, k) for k in (1, 2) for i in range(4)]
    whole = chunk('{"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":8}}')
    for strip in (False, True):
        m, _ = meter(strip, *chunks)
        assert (m.usage, m.content_chunks, m.done) == (None, 8, False)
        m, out = meter(strip, *chunks, whole, DONE)
        assert m.usage == Usage(8, 8) and m.done
        assert out == (b"".join(chunks) + DONE if strip else None)
        # `[DONE]` with no usage-only chunk (not vLLM: it always sends one when asked):
        # the last chunk's count is one choice's, below what the chunks carried: the
        # stream is estimated, not charged 5 of 8 as exact (review).
        m, _ = meter(strip, *chunks, DONE)
        assert (m.usage, m.done, m.completion_estimate) == (None, True, 8)

def test_split_chunks_hold_back_partial_events_when_stripping() -> None:
    m = StreamMeter(strip_usage=True)
    assert m.feed(TEXT[:5]) == b""  # nothing complete yet
    assert m.feed(TEXT[5:] + USAGE[:10]) == TEXT
    assert m.feed(USAGE[10:]) == b""  # the usage chunk, complete and dropped
    assert m.finish() == b""
    assert m.usage == Usage(7, 3)


def test_a_cut_stream_keeps_its_tail_and_has_no_usage() -> None:
    m, out = meter(True, TEXT, b'data: {"choices":[{"index":0,"delta":{"content":"pa')
    assert out == TEXT + b'data: {"choices":[{"index":0,"delta":{"content":"pa'
    assert (m.usage, m.done, m.content_chunks) == (None, False, 1)


def test_junk_is_passed_through_and_not_counted() -> None:
    junk = [b": keep-alive\n\n", chunk("not json"), chunk("[1,2]"), chunk('"s"'),
            chunk('{"choices":"x"}'), chunk('{"choices":[1]}'),
            chunk('{"choices":[]}'), chunk('{"choices":[],"x":{"usage":1}}'),
            b"event: ping\n\n"]
    m, out = meter(True, *junk)
    assert out == b"".join(junk)
    assert (m.usage, m.content_chunks, m.done) == (None, 0, False)


def test_a_malformed_usage_only_chunk_is_stripped_and_no_count() -> None:
    """A usage-only chunk (a `usage` key and no choice) whose usage is no count (null,
    negative, strings, a count missing) or that has no `choices` key at all is still the
    chunk the client did not ask for: stripped, by Envoy's meter too (it reached the
    client before: hostile-backend tester). The last one wins, so the stream is estimated
    (an inline usage is not the request's either)."""
    inline = chunk('{"choices":[{"index":0,"delta":{"content":"x"}}],'
                   '"usage":{"prompt_tokens":1,"completion_tokens":9}}')
    for bad in ('{"choices":[],"usage":null}', '{"choices":[ ],"usage":{"prompt_tokens":-1,'
                '"completion_tokens":3}}', '{"choices":[],"usage":{"prompt_tokens":"7",'
                '"completion_tokens":"3"}}', '{"choices":[],"usage":{"prompt_tokens":7}}',
                '{"usage":{"prompt_tokens":7,"completion_tokens":"x"}}'):
        m, out = meter(True, ROLE, TEXT, USAGE, chunk(bad), DONE)
        assert out == ROLE + TEXT + DONE, bad
        assert m.usage is None and m.content_chunks == 1
        m, out = meter(True, inline, chunk(bad), DONE)
        assert out == inline + DONE and m.usage is None
        m, out = meter(False, TEXT, chunk(bad), DONE)
        assert out is None and m.usage is None
    # No `choices` key but a count: the usage chunk too (stripped, read).
    m, out = meter(True, TEXT, chunk('{"usage":{"prompt_tokens":7,"completion_tokens":3}}'),
                   DONE)
    assert out == TEXT + DONE and m.usage == Usage(7, 3)
    # An error event with a usage key is the error: passed, read as the failure.
    err = chunk('{"error":{"message":"boom","code":500},"usage":null}')
    m, out = meter(True, TEXT, err, DONE)
    assert out == TEXT + err + DONE and m.error_status == 500


def test_the_last_usage_chunk_wins() -> None:
    second = chunk('{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5}}')
    m, out = meter(True, USAGE, second, DONE)
    assert out == DONE and m.usage == Usage(7, 5)


def test_a_usage_counting_fewer_tokens_than_the_chunks_is_no_count() -> None:
    """Each content chunk is a generation step's, a token at least: a usage chunk saying
    fewer (0, or a second, lower one) was charged as exact (hostile-backend tester). It
    is no count; the stream is estimated from its chunks. The chunk is stripped still."""
    low = chunk('{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":1}}')
    m, out = meter(True, ROLE, TEXT, TEXT, TEXT, low, DONE)
    assert out == ROLE + TEXT * 3 + DONE and m.content_chunks == 3 and m.usage is None
    m, _ = meter(True, TEXT, TEXT, USAGE, low, DONE)  # the last one wins: too low
    assert m.usage is None
    m, _ = meter(True, TEXT, TEXT, TEXT, USAGE, DONE)  # as many as the chunks: a count
    assert m.usage == Usage(7, 3)
    r = responses(DELTA, DELTA, end("response.completed",
                                    '{"input_tokens":9,"output_tokens":1}'))
    assert r.usage is None


# -- the Responses API ------------------------------------------------------------------

def typed(kind: str, body: str, name: bool = True) -> bytes:
    head = f"event: {kind}\n" if name else ""
    return f"{head}data: {body}\n\n".encode()


def end(kind: str, usage: str = '{"input_tokens":9,"output_tokens":4,"total_tokens":13}'
        ) -> bytes:
    return typed(kind, f'{{"response":{{"usage":{usage}}},"type":"{kind}"}}')


DELTA = typed("response.output_text.delta", '{"delta":"x","type":"response.output_text.delta"}')


def responses(*chunks: bytes) -> ResponsesStreamMeter:
    m = ResponsesStreamMeter()
    assert all(m.feed(c) is None for c in chunks) and m.finish() is None
    return m


def test_responses_usage_comes_from_the_final_event() -> None:
    for kind in ("response.completed", "response.incomplete", "response.failed"):
        m = responses(DELTA, DELTA, end(kind))
        assert (m.usage, m.content_chunks, m.done) == (Usage(9, 4), 2, True), kind


def test_a_failed_responses_stream_records_its_error_status() -> None:
    """`response.failed` (the response's `error.code`), OpenAI's `error` event (its
    `code`) and a vLLM-style `{"error": {...}}`: the record's status; a normal end none."""
    def failed(code: str) -> bytes:
        return typed("response.failed", '{"type":"response.failed","response":{"status":'
                     f'"failed","error":{{"code":"{code}","message":"m"}},"usage":null}}}}')
    cases = {
        failed("server_error"): 500, failed("rate_limit_exceeded"): 429,
        failed("invalid_prompt"): 400, failed("503"): 503,
        typed("error", '{"type":"error","code":"ERR_X","message":"m","param":null,'
              '"sequence_number":3}'): 500,
        typed("error", '{"type":"error","code":"rate_limit_exceeded","message":"m"}'): 429,
        typed("", '{"type":"error","code":null,"message":"m"}', name=False): 500,
        typed("error", '{"type":"error","error":{"type":"invalid_request_error",'
              '"code":"too_many_requests","message":"m"}}'): 429,
        typed("response.failed", '{"type":"response.failed","response":null}'): 500,
        typed("", '{"error":{"message":"m","type":"InternalServerError","code":503}}',
              name=False): 503,
        end("response.incomplete"): 0, end("response.completed"): 0,
    }
    for event, status in cases.items():
        m = responses(DELTA, event)
        assert m.error_status == status, event
    # The usage a failed response carries is the backend's count; without it, none.
    m = responses(DELTA, failed("server_error"))
    assert (m.usage, m.done, m.error_status) == (None, True, 500)
    assert responses(DELTA, end("response.failed")).usage == Usage(9, 4)


def test_a_responses_delta_with_non_ascii_text_counts_its_silent_tokens() -> None:
    """vLLM sends no Responses delta for a token ending inside a UTF-8 character, so a
    cut stream counted by its deltas was charged short (real vLLM: 56-59 deltas for 60
    tokens). A delta counts one token for each of its non-ASCII bytes past the first."""
    def delta(text: str) -> bytes:
        return typed("response.output_text.delta",
                     '{"delta":"' + text + '","type":"response.output_text.delta"}')
    m = responses(delta("a"), delta("字"), delta("é"), delta("ab"), delta("字字"))
    assert (m.content_chunks, m.tokens_seen) == (5, 5 + 2 + 1 + 5)
    assert m.completion_estimate == m.tokens_seen


def test_responses_events_without_a_name_are_read_by_their_type() -> None:
    bare = typed("", '{"response":{"usage":{"input_tokens":2,"output_tokens":1}},'
                 '"type":"response.completed"}', name=False)
    delta = typed("", '{"delta":"x","type":"response.reasoning_text.delta"}', name=False)
    m = responses(delta, bare)
    assert (m.usage, m.content_chunks, m.done) == (Usage(2, 1), 1, True)


def test_responses_junk_and_events_without_usage() -> None:
    junk = [b": keep-alive\n\n", typed("response.output_text.delta", "not json"),
            typed("", "[1]", name=False), typed("", '{"type":3}', name=False),
            typed("response.created", '{"response":{"usage":null}}')]
    m = responses(*junk)
    assert (m.usage, m.content_chunks, m.done) == (None, 1, False)
    # A final event whose usage is unreadable ends the stream without usage.
    m = responses(end("response.completed", usage="null"))
    assert (m.usage, m.done) == (None, True)
    m = responses(typed("response.completed", "[]"))
    assert (m.usage, m.done) == (None, True)


def test_meter_for_picks_by_kind() -> None:
    assert type(meter_for(Kind.RESPONSES, False)) is ResponsesStreamMeter
    chat = meter_for(Kind.CHAT, False)
    assert type(chat) is StreamMeter and chat.strip_usage
    assert not meter_for(Kind.COMPLETION, True).strip_usage


def test_a_cut_stream_is_estimated_at_tokens_per_chunk() -> None:
    """With vLLM's stream_interval N a content chunk carries up to N tokens: a stream
    that ends without its usage chunk is charged N a chunk (the backend's bound caps it)."""
    m = meter_for(Kind.CHAT, client_wants_usage=False, tokens_per_chunk=8)
    for c in (ROLE, TEXT, TEXT, TEXT):
        m.feed(c)
    m.finish()
    assert m.usage is None and m.content_chunks == 3 and m.completion_estimate == 24
    assert meter_for(Kind.CHAT, False).completion_estimate == 0


def test_a_stream_answered_as_one_json_object_counts_its_usage() -> None:
    """A backend that ignores `stream: true` answers with its JSON: its usage is exact."""
    answer = (b'{"object": "chat.completion", "choices": [{"index": 0, "message": '
              b'{"content": "Hi"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}')
    m, out = meter(True, answer[:20], answer[20:])
    assert out == answer  # passed on whole
    assert (m.usage, m.unreadable) == (Usage(7, 3), False)


def test_a_body_with_no_sse_event_is_unreadable_once_it_ended() -> None:
    """A gzip-compressed stream (a backend that ignored `accept-encoding: identity`) or an
    HTML page: nothing tells what was generated."""
    for body in (gzip.compress(TEXT + USAGE + DONE), b"<html>\n<body>oops</body>\n</html>"):
        m = StreamMeter(strip_usage=True)
        m.feed(body)
        assert not m.unreadable  # not yet: more may come
        m.finish()
        assert (m.usage, m.unreadable) == (None, True)
    m, _ = meter(True, b": ping\n\n", TEXT)  # a readable stream cut before its usage
    assert not m.unreadable
    m, _ = meter(True)  # a body that ended with no bytes at all (a chunked empty 200)
    assert (m.usage, m.unreadable) == (None, True)


# vLLM 0.32's event when generation fails mid-stream (then `[DONE]`), and older vLLM's.
VLLM_ERROR = chunk('{"error": {"message": "Internal server error", "type": '
                   '"InternalServerError", "param": null, "code": 500}}')
OLD_ERROR = chunk('{"object": "error", "message": "boom", "type": "InternalServerError", '
                  '"param": null, "code": 503}')


def test_a_stream_that_ends_in_an_error_event_says_its_status() -> None:
    """The error event after content chunks: a stream that failed, not a success. It
    passes through (the client sees it), and the stream is charged as a cut one."""
    for strip in (False, True):
        m, out = meter(strip, ROLE, TEXT, TEXT, VLLM_ERROR, DONE)
        assert (m.error_status, m.usage, m.content_chunks, m.done) == (500, None, 2, True)
        assert out == (ROLE + TEXT + TEXT + VLLM_ERROR + DONE if strip else None)
    m, _ = meter(False, COMPLETION, OLD_ERROR)  # no [DONE]: ended all the same
    assert (m.error_status, m.content_chunks) == (503, 1)


def test_a_stream_without_an_error_event_has_no_error_status() -> None:
    m, _ = meter(True, ROLE, TEXT, USAGE, DONE)
    assert m.error_status == 0


def test_the_first_error_event_decides_whatever_the_split() -> None:
    body = ROLE + TEXT + OLD_ERROR + VLLM_ERROR + DONE
    for at in range(1, len(body)):
        m, _ = meter(False, body[:at], body[at:])
        assert (m.error_status, m.content_chunks) == (503, 1), at


GRAMMAR_ERROR = chunk('{"error": {"message": "Grammar error: unclosed group", "type": '
                      '"BadRequestError", "param": null, "code": 400}}')


def test_a_4xx_error_as_the_first_event_is_a_refusal() -> None:
    """vLLM refuses some requests only once the stream began (a grammar that does not
    compile): the 400 is the first event, and nothing ran. Any event before it (a chat's
    role chunk: the engine had produced output), or a 5xx, is a failure, not a refusal."""
    for strip in (False, True):
        m, _ = meter(strip, GRAMMAR_ERROR, DONE)
        assert (m.error_status, m.refused, m.content_chunks) == (400, True, 0)
    body = GRAMMAR_ERROR + DONE
    for at in range(1, len(body)):
        assert meter(False, body[:at], body[at:])[0].refused, at
    assert not meter(False, ROLE, GRAMMAR_ERROR, DONE)[0].refused
    assert not meter(False, VLLM_ERROR, DONE)[0].refused
    assert not meter(False, DONE)[0].refused
    # A comment (vLLM's --sse-keep-alive-interval) is no event with data: still first.
    assert meter(False, b": keep-alive\n\n", GRAMMAR_ERROR, DONE)[0].refused
    assert not meter(False, b"data: hello\n\n", GRAMMAR_ERROR, DONE)[0].refused
    # A backend that goes on after its refusal (not vLLM): what it sent is charged.
    assert not meter(False, GRAMMAR_ERROR, TEXT, DONE)[0].refused
    assert not meter(False, GRAMMAR_ERROR, USAGE, DONE)[0].refused


def test_continuous_usage_before_an_error_event_is_not_the_usage() -> None:
    """vLLM's continuous_usage_stats on a chunk counts one choice so far: after an error
    event vLLM still sends `[DONE]`, but the stream failed as a cut one, and it is
    estimated from its chunks."""
    m, _ = meter(False, continuous(0, 3, 1), continuous(1, 3, 1), VLLM_ERROR, DONE)
    assert (m.usage, m.error_status, m.completion_estimate) == (None, 500, 2)


def test_stream_error_status_reads_the_code_when_it_is_an_error_status() -> None:
    cases: list[tuple[dict[str, Any], int]] = [
        ({"error": {"message": "m", "code": 500}}, 500),
        ({"error": {"message": "m", "code": 503}}, 503),
        ({"error": {"message": "m", "code": 400}}, 400),
        ({"error": {"message": "m", "code": "502"}}, 502),
        ({"error": {"message": "m", "code": "server_error"}}, 500),  # OpenAI's: a name
        ({"error": {"message": "m", "code": None}}, 500),
        ({"error": {"message": "m"}}, 500),
        ({"error": {"code": 200}}, 500),  # not an error status
        ({"error": {"code": 700}}, 500),
        ({"error": {"code": True}}, 500),
        ({"error": {"code": "\uff15\uff10\uff10"}}, 500),  # fullwidth: not ASCII digits
        ({"object": "error", "message": "m", "code": 503}, 503),
        ({"object": "error", "message": "m"}, 500),
        ({"error": "a string"}, 0),  # not the error object
        ({"object": "chat.completion.chunk"}, 0),
        ({"choices": [], "error": {"code": 500}}, 0),  # a chunk, whatever else it holds
        ({}, 0),
    ]
    for obj, status in cases:
        assert stream_error_status(obj) == status, obj


def test_a_completions_logprob_keyed_error_is_not_an_error_event() -> None:
    """Completions `top_logprobs` are keyed by token text: a token `error` is a key in a
    chunk with choices, never an error event."""
    logprob = chunk('{"choices":[{"index":0,"text":"error","logprobs":{"top_logprobs":'
                    '[{"error":-0.1}]}}]}')
    m, _ = meter(False, logprob, DONE)
    assert (m.error_status, m.content_chunks) == (0, 1)
