"""What a request is charged when its usage cannot be read the ordinary way, driven
through `Lifecycle` directly (no sockets):

- a JSON answer over JSON_KEEP_BYTES: its `usage` is read from its last bytes, else the
  hold is charged;
- an ending Envoy made itself after admission (its route timeout's 504, a backend reset's
  502): estimated like a client that left, not recorded as a backend's refusal;
- a response that goes on out of the services' sight (Envoy's meter report never came,
  or the services stopped with the stream open): the whole hold, never a 504.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from authz.runtime.snapshot import Runtime
from authz.services import lifecycle
from authz.services.lifecycle import GATEWAY_TIMEOUT, JSON_KEEP_BYTES, Lifecycle
from policy.keys import Principal
from policy.limits import Decision, cost_nano
from policy.meter_report import MeterReport
from policy.stream_pace import ABORT_STEPS, HEADROOM
from policy.usage import LOST, Usage, UsageRecord
from tests.helpers import policy_dict, write_policy

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello there " * 20}],
        "max_tokens": 50}
COMPLETION = {"model": "demo", "prompt": "hi", "max_tokens": 200}
BACKEND = "http://127.0.0.1:8000"


@dataclass
class Recorded:
    """The recorder's part: the records written."""

    got: list[UsageRecord] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def record(self, rec: UsageRecord) -> None:
        self.got.append(rec)

    def count(self, rec: UsageRecord, ttft_s: float | None = None) -> None:
        pass

    def oversize_events(self, alias: str, n: int) -> None:
        pass

    def bound_violation(self, alias: str) -> None:
        self.violations.append(alias)


@dataclass
class Holds:
    """Admission's part: everything admitted; what each settlement charged, and the hold."""

    settled: list[tuple[int, int, int]] = field(default_factory=list)

    async def admit_all(self, *_: Any) -> Decision:
        return Decision(True)

    async def settle(self, _limits: Any, ask: Any, tokens: int, cost: int,
                     _now: Any) -> Any:
        self.settled.append((tokens, cost, ask.cost_nano))
        return SimpleNamespace(bound_violated=False, corrected=False)

    def org_carries_record(self, _org: Any) -> bool:
        return False


class Reports:
    """Where Envoy's meter reports would come: every stream is expected."""

    def expect(self, request_id: str) -> bool:
        return True

    def forget(self, request_id: str) -> None:
        pass


@dataclass
class Harness:
    runtime: Runtime
    recorded: Recorded
    holds: Holds

    async def admitted(self, body: dict[str, Any], path: str = "/v1/chat/completions",
                       reports: Reports | None = None) -> Lifecycle:
        life = Lifecycle(self.runtime, self.recorded, self.holds,  # type: ignore[arg-type]
                         reports=reports)
        life.identify("POST", path, "rid-1", None,
                      Principal("k-main", "acme", frozenset(), frozenset()))
        await life.request_body(json.dumps(body).encode())
        life.delivered = True  # the servicer wrote the answer: Envoy routed the request
        return life

    async def record(self, life: Lifecycle) -> UsageRecord:
        await life.settle()
        [rec] = self.recorded.got
        return rec


async def assert_whole_hold(h: Harness, life: Lifecycle, status: int | str) -> None:
    """The record and the settlement charge the hold: what the backend could generate
    (a non-streaming request's prompt, as a cut stream's, once the backend's count is
    asked for: here it never comes, so the prompt's bound)."""
    if life.recount_owed is not None:
        life.write(life.recount_owed[0])
    rec = await h.record(life)
    req = life.req
    assert req is not None
    assert counts(rec) == (status, req.prompt_bound, req.completion_bound, True)
    tokens, cost, hold = h.holds.settled[0]
    assert (tokens, cost) == (req.prompt_bound + req.completion_bound, hold)


def make_harness(tmp_path: Path, **policy: Any) -> Harness:
    path = write_policy(tmp_path, BACKEND, **policy)
    return Harness(Runtime.from_file(path), Recorded(), Holds())


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


def counts(rec: UsageRecord) -> tuple[Any, int, int, bool]:
    return rec.status, rec.prompt_tokens, rec.completion_tokens, rec.estimated


def feed(life: Lifecycle, body: bytes, piece: int) -> None:
    for i in range(0, len(body), piece):
        life.response_chunk(body[i:i + piece], end=False)
    life.response_chunk(b"", end=True)


def completion_answer(text_bytes: int, usage: dict[str, Any] | None,
                      after_usage: str = "") -> bytes:
    """A vLLM completions answer whose text is `text_bytes` long, `usage` after it."""
    head = b'{"id":"cmpl-1","object":"text_completion","model":"tiny-llama","choices":' \
           b'[{"index":0,"text":"'
    tail = b'","finish_reason":"length"}]'
    if usage is not None:
        tail += b',"usage":' + json.dumps(usage).encode()
    return head + b"a" * text_bytes + tail + after_usage.encode() + b"}"


# -- 1. A JSON answer larger than JSON_KEEP_BYTES ------------------------------------


async def test_a_json_answer_past_the_keep_limit_is_charged_its_own_usage(h: Harness) -> None:
    usage = {"prompt_tokens": 2, "completion_tokens": 200, "total_tokens": 202,
             "prompt_tokens_details": None}
    body = completion_answer(JSON_KEEP_BYTES + (8 << 20), usage,
                             ',"prompt_logprobs":null,"kv_transfer_params":null')
    life = await h.admitted(COMPLETION, "/v1/completions")
    life.response_start(200, BACKEND)
    feed(life, body, 1 << 20)
    rec = await h.record(life)
    assert counts(rec) == (200, 2, 200, False)
    price = life.req.model.price_per_1k_tokens  # type: ignore[union-attr]
    assert h.holds.settled[0][:2] == (202, cost_nano(2, 200, price))


async def test_past_the_keep_limit_only_the_tail_is_kept(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "JSON_KEEP_BYTES", 1 << 10)
    monkeypatch.setattr(lifecycle, "JSON_TAIL_BYTES", 256)
    life = await h.admitted(COMPLETION, "/v1/completions")
    life.response_start(200, BACKEND)
    body = completion_answer(100_000, {"prompt_tokens": 2, "completion_tokens": 7})
    for i in range(0, len(body), 100):
        life.response_chunk(body[i:i + 100], end=False)
        assert len(life._json_body) <= 1 << 10  # never more than the limit
    life.response_chunk(b"", end=True)
    assert counts(await h.record(life)) == (200, 2, 7, False)


async def test_past_the_keep_limit_a_usage_followed_by_prompt_logprobs_is_read(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's chat answer puts `prompt_logprobs` (~1.5 KB a prompt token at 20 logprobs)
    and `prompt_token_ids` after `usage`: a long prompt's answer past the keep limit has
    its usage far from its end. It is still charged its own usage, not its hold."""
    monkeypatch.setattr(lifecycle, "JSON_KEEP_BYTES", 1 << 10)
    monkeypatch.setattr(lifecycle, "JSON_TAIL_BYTES", 256)
    # Decoded tokens may spell a usage key too (escaped inside their strings).
    logprobs = ",".join(json.dumps({str(i): {"logprob": -1.5, "rank": 1,
                                             "decoded_token": '"usage":{}'}})
                        for i in range(2000))
    body = completion_answer(5_000, {"prompt_tokens": 2, "completion_tokens": 7},
                             f',"prompt_logprobs":[null,{logprobs}],"prompt_token_ids":null')
    assert len(body) - body.index(b'"usage"') > 50_000
    for piece in (1, 7, 100, 4096):
        h.recorded.got.clear()
        life = await h.admitted(COMPLETION, "/v1/completions")
        life.response_start(200, BACKEND)
        feed(life, body, piece)
        assert counts(await h.record(life)) == (200, 2, 7, False), piece


@pytest.mark.parametrize(("path", "body", "answer"), [
    ("/v1/embeddings", {"model": "demo", "input": ["hello world"] * 200},
     b'{"id":"embd-1","object":"list","created":1,"model":"m","data":['
     + b",".join(b'{"index":%d,"object":"embedding","embedding":[%s]}'
                 % (i, b",".join([b"-0.0123456789"] * 300)) for i in range(200))
     + b'],"usage":{"prompt_tokens":400,"total_tokens":400,"completion_tokens":0,'
       b'"prompt_tokens_details":null}}'),
    ("/v1/score", {"model": "demo", "queries": "q", "documents": ["a b"] * 200},
     b'{"id":"score-1","object":"list","created":1,"model":"m","data":['
     + b",".join(b'{"index":%d,"object":"score","score":0.123456789}' % i
                 for i in range(200) for _ in range(30))
     + b'],"usage":{"prompt_tokens":400,"total_tokens":400,"completion_tokens":0,'
       b'"prompt_tokens_details":null}}'),
])
async def test_past_the_keep_limit_an_embeddings_or_score_answer_is_read(
        h: Harness, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any],
        answer: bytes) -> None:
    """An embeddings batch of many wide vectors passes the keep limit (2048 inputs of
    4096 floats: over 100 MB): numbers before its `usage`, nothing after. Read from the
    tail, as chat's (it was charged its hold: 9.5 times its usage)."""
    monkeypatch.setattr(lifecycle, "JSON_KEEP_BYTES", 1 << 12)
    monkeypatch.setattr(lifecycle, "JSON_TAIL_BYTES", 1 << 10)
    life = await h.admitted(body, path)
    life.response_start(200, BACKEND)
    feed(life, answer, 1000)
    rec = await h.record(life)
    assert (rec.status, rec.prompt_tokens, rec.estimated) == (200, 400, False)


@pytest.mark.parametrize(("tail_bytes", "after"), [
    (256, ',"output_messages":[{"content":"' + "b" * 5000 + '"}]'),  # the fake is trimmed
    (1 << 10, ""),  # the fake is in the kept tail
])
async def test_past_the_keep_limit_a_responses_answer_is_charged_its_hold(
        h: Harness, monkeypatch: pytest.MonkeyPatch, tail_bytes: int, after: str) -> None:
    """vLLM's Responses answer holds objects the client shaped on both sides of its usage:
    the `tools` it echoes before, and with `enable_response_messages` the
    `input_messages` after (a harmony model's developer message, each tool's parameters
    in it). A tool parameter named `usage` is no count, and a search of the bytes cannot
    tell it from the top-level key, in what was trimmed nor in the kept tail: past the
    keep limit a Responses answer is charged its hold (chat and completions answers are
    read, their `prompt_logprobs` follow their usage). It was charged the client's
    object: here 1 token for 150."""
    monkeypatch.setattr(lifecycle, "JSON_KEEP_BYTES", 1 << 10)
    monkeypatch.setattr(lifecycle, "JSON_TAIL_BYTES", tail_bytes)
    fake = '{"usage":{"input_tokens":1,"output_tokens":0}}'
    body = ('{"id":"resp_1","object":"response","output":[{"type":"message","content":'
            '[{"type":"output_text","text":"' + "a" * 5000 + '"}]}],'
            '"usage":{"input_tokens":2,"output_tokens":150,"total_tokens":152},'
            '"input_messages":[{"role":"developer","tools":[{"name":"f","parameters":'
            '{"type":"object","properties":' + fake + '}}]}]' + after + '}').encode()
    life = await h.admitted({"model": "demo", "input": "hi", "max_output_tokens": 200},
                            "/v1/responses")
    life.response_start(200, BACKEND)
    feed(life, body, 100)
    await assert_whole_hold(h, life, 200)


async def test_a_json_answer_too_large_to_read_is_charged_its_hold(
        h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole 2xx answer past the limit whose end holds no usage: the backend generated
    it all (a JSON answer is sent once generated): the hold, never zero completion."""
    monkeypatch.setattr(lifecycle, "JSON_KEEP_BYTES", 1 << 10)
    life = await h.admitted(COMPLETION, "/v1/completions")
    life.response_start(200, BACKEND)
    feed(life, completion_answer(10_000, None), 500)
    await assert_whole_hold(h, life, 200)


@pytest.mark.parametrize("answer", [
    completion_answer(100, None),  # no usage at all
    completion_answer(100, {"prompt_tokens": "2", "completion_tokens": 9}),
    completion_answer(100, {"prompt_tokens": -2, "completion_tokens": 9}),
    completion_answer(100, {"prompt_tokens": 2, "completion_tokens": 9})[:60],  # cut
    b"not json at all",
])
@pytest.mark.parametrize("cut", [False, True])
async def test_a_json_answer_without_readable_usage_is_charged_its_hold(
        h: Harness, answer: bytes, cut: bool) -> None:
    """A 2xx JSON answer whose usage cannot be read (absent, malformed, the body cut by
    the backend or the client): vLLM sent it once generated, so the hold, never zero
    completion tokens."""
    life = await h.admitted(COMPLETION, "/v1/completions")
    life.response_start(200, BACKEND)
    life.response_chunk(answer, end=not cut)
    if cut:
        life.finish(aborted=True)
    rec = await h.record(life)
    req = life.req
    assert req is not None and rec.estimated
    assert (rec.prompt_tokens, rec.completion_tokens) == (req.prompt_bound,
                                                         req.completion_bound)


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 10**12, "completion_tokens": 10**12},
    {"prompt_tokens": 2**60, "completion_tokens": 1},
])
async def test_usage_past_all_bounds_is_charged_the_hold_not_a_crash(
        h: Harness, usage: dict[str, int]) -> None:
    """A backend that reports more than the ledgers count exactly: settling it raised
    (a traceback, a concurrency slot held until its lease ended). Its hold is charged,
    estimated, and counted as a bound violation."""
    life = await h.admitted(COMPLETION, "/v1/completions")
    life.response_start(200, BACKEND)
    life.response_chunk(completion_answer(100, usage), end=True)
    await assert_whole_hold(h, life, 200)
    assert h.recorded.violations == ["demo"]


async def test_completion_past_what_max_tokens_allows_is_charged_what_it_allows(
        h: Harness) -> None:
    """max_tokens is written upstream: a backend reporting more completion tokens than it
    allows (times every sequence) misreports. What it allows is charged, estimated, and
    counted as a bound violation: a key's spend never passes its budget for it."""
    life = await h.admitted({**COMPLETION, "n": 2}, "/v1/completions")
    req = life.req
    assert req is not None and req.completion_bound == 400
    life.response_start(200, BACKEND)
    life.response_chunk(completion_answer(100, {"prompt_tokens": 2,
                                                "completion_tokens": 100_000}), end=True)
    rec = await h.record(life)
    assert counts(rec) == (200, 2, 400, True)
    assert h.recorded.violations == ["demo"]
    price = req.model.price_per_1k_tokens
    assert h.holds.settled[0][:2] == (402, cost_nano(2, 400, price))


async def test_a_prompt_past_the_models_context_is_charged_its_bound(tmp_path: Path) -> None:
    """With `max_model_len`, no backend counts more prompt tokens than the context holds
    for each prompt: a report past it (10**6 for a short prompt took a $0.40 budget to
    $500: hostile-backend tester) is charged the prompt's bound, estimated, a violation.
    One within the context but above the bound is charged as reported (a template
    longer than configured: README)."""
    policy = policy_dict(BACKEND)
    policy["models"]["demo"]["max_model_len"] = 512  # type: ignore[index]
    h = make_harness(tmp_path, models=policy["models"])
    for reported, expected in ((1_000_000, None), (2 * 512 + 1, None), (2 * 512, 1024)):
        h.recorded.got.clear()
        h.holds.settled.clear()
        life = await h.admitted({**COMPLETION, "prompt": ["hi", "yo"]}, "/v1/completions")
        req = life.req
        assert req is not None and req.prompt_ceiling == 2 * 512
        life.response_start(200, BACKEND)
        life.response_chunk(completion_answer(10, {"prompt_tokens": reported,
                                                   "completion_tokens": 7}), end=True)
        rec = await h.record(life)
        if expected is None:
            assert counts(rec) == (200, req.prompt_bound, 7, True)
        else:
            assert counts(rec) == (200, expected, 7, False)
    assert h.recorded.violations == ["demo", "demo"]


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 2, "completion_tokens": 0},  # text in the answer, no token counted
    {"prompt_tokens": 2},  # no completion count at all
    {"prompt_tokens": 0, "completion_tokens": 9},  # no prompt token for a prompt
])
async def test_a_json_usage_the_answer_contradicts_is_no_count(
        h: Harness, usage: dict[str, int]) -> None:
    """Hostile-backend retest: each was charged as exact. A generating endpoint's usage
    without completion tokens, fewer than the choices with text, or no prompt token for
    a prompt, is no count: the hold (the prompt's bound), estimated."""
    life = await h.admitted(COMPLETION, "/v1/completions")
    req = life.req
    assert req is not None
    life.response_start(200, BACKEND)
    life.response_chunk(completion_answer(100, usage), end=True)
    rec = await h.record(life)
    assert rec.estimated and rec.prompt_tokens == req.prompt_bound
    if "completion_tokens" not in usage or usage["completion_tokens"] == 0:
        assert rec.completion_tokens == req.completion_bound


async def test_a_responses_answer_with_text_and_no_output_token_is_no_count(
        h: Harness) -> None:
    """Its output text, `output_tokens: 0`: charged as exact (retest); the hold now."""
    body = (b'{"object":"response","status":"completed","output":[{"type":"message",'
            b'"role":"assistant","content":[{"type":"output_text","text":"hello there"}]}],'
            b'"usage":{"input_tokens":12,"output_tokens":0,"total_tokens":12}}')
    life = await h.admitted({"model": "demo", "input": "hi", "max_output_tokens": 50},
                            "/v1/responses")
    life.response_start(200, BACKEND)
    life.response_chunk(body, end=True)
    await assert_whole_hold(h, life, 200)


async def test_the_ordinary_json_answer_is_unchanged(h: Harness) -> None:
    life = await h.admitted(COMPLETION, "/v1/completions")
    life.response_start(200, BACKEND)
    feed(life, completion_answer(1000, {"prompt_tokens": 2, "completion_tokens": 9}), 300)
    assert not life._json_tail
    assert counts(await h.record(life)) == (200, 2, 9, False)


def test_tail_usage_reads_only_a_usage_key() -> None:
    from authz.services.lifecycle import tail_usage

    good = b'"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    assert tail_usage(b'aaa"}]' + good) == Usage(3, 4)
    # A cut-off start, whitespace, the fields after usage: still read.
    assert tail_usage(b'ge":1},"usage" :\n{"prompt_tokens":3,"completion_tokens":4},'
                      b'"kv_transfer_params":null}') == Usage(3, 4)
    # The last usage key wins over one earlier (a nested object's).
    assert tail_usage(b'{"usage":{"prompt_tokens":1,"completion_tokens":1}}],' + good) == \
        Usage(3, 4)
    # Inside a string, the key's quotes are escaped: not a key.
    assert tail_usage(b'"text":"\\"usage\\": {\\"prompt_tokens\\": 9}"}') is None
    # A key ending in an escaped quote and `usage`: not the usage key.
    assert tail_usage(b'{"say \\"usage": {"prompt_tokens": 9, "completion_tokens": 9}}') \
        is None
    assert tail_usage(b'"usage": null}') is None
    assert tail_usage(b'"usage": {"prompt_tokens": -1}}') is None
    assert tail_usage(b'"usage": {"prompt_tok') is None  # cut: unreadable


def test_tail_usage_decodes_only_a_usage_key_with_an_object(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A completions answer's `top_logprobs` is keyed by token text: each position where
    the token `usage` is a candidate is a `"usage": <logprob>` key. The first trim past
    the keep limit searches the whole 64 MiB kept; each such key was decoded from a
    4 KiB copy (6.6 s on the event loop for a 64 MiB answer of them). Only an object can
    be the usage: nothing else is decoded."""
    decoded: list[int] = []

    class Counting(json.JSONDecoder):
        def raw_decode(self, s: str, idx: int = 0) -> tuple[Any, int]:
            decoded.append(idx)
            return super().raw_decode(s, idx)

    monkeypatch.setattr(lifecycle, "_DECODER", Counting())
    usage = b'"usage":{"prompt_tokens":3,"completion_tokens":4}'
    top = b'{"usage": -0.5, "x": -1.0},' * 20_000
    body = b'{' + usage + b',"choices":[{"logprobs":{"top_logprobs":[' + top + b'{}]}}]}'
    assert lifecycle.tail_usage(body) == Usage(3, 4)
    assert len(decoded) == 1


# -- 2. Envoy's own ending after admission --------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [GATEWAY_TIMEOUT, 502])
async def test_an_ending_envoy_made_is_estimated(h: Harness, stream: bool,
                                                 status: int) -> None:
    """Envoy's route timeout (504) or a backend reset (502), with no backend answer:
    the backend had the request and may have generated, as for a client that left. A
    JSON answer is written only once generated: its completion bound. A stream showed
    what it generated. Either's prompt is counted by the backend."""
    life = await h.admitted({**CHAT, "stream": stream})
    life.response_start(status, "")
    life.response_chunk(b'{"error":{"message":"The backend did not answer in time.",'
                        b'"type":"upstream_error"}}', end=True)
    req = life.req
    assert req is not None
    # The prompt is left to the backend's count: ext_proc asks its /tokenize first.
    assert life.recount_owed is not None and not h.recorded.got
    ending, url, recount = life.recount_owed
    assert url == BACKEND and recount.asks[0]["messages"] == CHAT["messages"]
    assert req.prompt_bound > req.prompt_estimate > 0
    life.write(ending, 61)
    assert counts(await h.record(life)) == (
        status, 61, 0 if stream else req.completion_bound, True)
    # No count (the backend did not answer /tokenize): the prompt's bound, never its
    # byte estimate (~4 bytes a token, which text of ~1 token a byte beats).
    h.recorded.got.clear()
    life.write(ending)
    assert counts(await h.record(life)) == (
        status, req.prompt_bound, 0 if stream else req.completion_bound, True)


@pytest.mark.parametrize("extra", [{"include_reasoning": False},
                                   {"tools": [{"type": "function",
                                               "function": {"name": "f"}}]},
                                   {"tools": [{"type": "function", "function": {"name": "f"}}],
                                    "tool_choice": "required"}])
async def test_a_cut_stream_that_may_hide_tokens_is_charged_its_completion_bound(
        h: Harness, extra: dict[str, Any]) -> None:
    """vLLM sends no chunk for reasoning a client asked not to see, nor for a tool call
    its parser holds back: a cut stream's chunks do not count what was generated (real
    vLLM: 1 of 1,024 tokens shown). Charged what it could generate."""
    life = await h.admitted({**CHAT, "stream": True, **extra})
    req = life.req
    assert req is not None and req.hides_tokens
    life.response_start(200, BACKEND)
    life.response_chunk(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
                        end=False)
    life.finish(aborted=True)
    assert life.recount_owed is not None  # the prompt: the backend's count first
    life.write(life.recount_owed[0], 9)
    rec = await h.record(life)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.estimated) == (
        9, req.completion_bound, True)


@pytest.mark.parametrize(("extra", "hides"), [
    ({"stop": ["Q" * 300]}, True), ({"stop": "end"}, True),
    ({"logit_bias": {"0": 100}}, True), ({"allowed_token_ids": [0, 1]}, True),
    ({"ignore_eos": True}, True), ({"ignore_eos": "true"}, True),
    ({"stop": []}, False), ({"logit_bias": {}}, False), ({"ignore_eos": False}, False),
    ({}, False)])
async def test_a_cut_responses_stream_whose_tokens_may_go_unseen_owes_its_bound(
        h: Harness, extra: dict[str, Any], hides: bool) -> None:
    """vLLM's Responses stream sends an event only for text: with a long stop string it
    held back all but 5 deltas of 64 tokens, with a bias to a special token it sent none
    of 169 (real-vLLM tester: a key with a $2 budget spent $7.67 in 11 cut streams,
    each charged 16 tokens). Such a stream cut short owes its completion bound."""
    life = await h.admitted({"model": "demo", "input": "hi", "max_output_tokens": 200,
                             "stream": True, **extra}, "/v1/responses")
    req = life.req
    assert req is not None and req.hides_tokens is hides
    life.response_start(200, BACKEND)
    life.response_chunk(b'event: response.created\ndata: {"type":"response.created",'
                        b'"response":{"id":"resp_1"}}\n\n', end=False)
    life.finish(aborted=True)
    if life.recount_owed is not None:
        life.write(life.recount_owed[0], 9)
    rec = await h.record(life)
    assert rec.estimated and (rec.completion_tokens == 200) is hides


def chunk_of(index: int, tokens: int = 1, text: str = "a", logprobs: bool = False) -> bytes:
    """One chat chunk of choice `index`; with `logprobs`, naming `tokens` tokens."""
    entry = {"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}
    choice: dict[str, Any] = {"index": index, "delta": {"content": text}}
    if logprobs:
        choice["logprobs"] = {"content": [entry] * tokens}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


class Clock:
    """lifecycle's `time.monotonic`, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(lifecycle, "time", c)
    return c


async def cut_charge(h: Harness, clock: Clock, body: dict[str, Any],
                     chunks: list[tuple[float, bytes]], idle_s: float = 0) -> int:
    """The completion a stream is charged when cut after these (seconds since the last,
    chunk) and `idle_s` more seconds."""
    life = await h.admitted({**CHAT, "stream": True, **body})
    life.response_start(200, BACKEND)
    for gap, chunk in chunks:
        clock.now += gap
        life.response_chunk(chunk, end=False)
    clock.now += idle_s
    life.finish(aborted=True)
    assert life.recount_owed is not None
    life.write(life.recount_owed[0], 9)
    rec = await h.record(life)
    h.recorded.got.clear()
    assert (rec.prompt_tokens, rec.estimated) == (9, True)
    return rec.completion_tokens


def steady(n: int, index: int = 0, step: float = 0.05) -> list[tuple[float, bytes]]:
    return [(step, chunk_of(index))] * n


async def test_a_stream_cut_while_its_chunks_flowed_is_charged_what_they_carried(
        h: Harness, clock: Clock) -> None:
    """A chat UI's stop button: what the chunks counted, and what the backend could
    generate at its pace in the moment between the last chunk and the cut, and the
    steps it takes before its abort lands (real vLLM: up to 3 past the last chunk)."""
    assert await cut_charge(h, clock, {}, steady(20), idle_s=0) == 20 + ABORT_STEPS
    got = await cut_charge(h, clock, {}, steady(20), idle_s=0.3)
    assert got == pytest.approx(20 + 0.3 * 20 * 2 + ABORT_STEPS, abs=1)


async def test_a_pause_before_the_cut_is_charged_at_the_streams_pace(
        h: Harness, clock: Clock) -> None:
    """vLLM generates on while its reader lags (Envoy stops reading the backend once the
    client stops reading): real vLLM generated 7,168 tokens for a stream whose client
    paused, then left, after 2,169 had reached the gateway. 10 chunks at 20 a second,
    then 1 s more silence than limits.stalled_stream_s (2 s): 3 s at twice that pace."""
    # Shorter than a pause still counts: the reader stopped, vLLM generated on (a client
    # leaving 1.9 s after it stopped reading paid for none of it).
    got = await cut_charge(h, clock, {"max_tokens": 256}, steady(10), idle_s=1.9)
    assert got == pytest.approx(10 + 1.9 * 20 * 2 + ABORT_STEPS, abs=1)
    got = await cut_charge(h, clock, {"max_tokens": 256}, steady(10), idle_s=3.0)
    assert got == pytest.approx(10 + 3 * 20 * 2 + ABORT_STEPS, abs=1)  # rounded up
    # Never past what it could generate.
    assert await cut_charge(h, clock, {}, steady(10), idle_s=30) == 50


async def test_a_pause_before_a_brief_resume_counts_too(h: Harness, clock: Clock) -> None:
    """A client that paused (vLLM merging meanwhile), read one chunk, and left at once."""
    chunks = [*steady(10), (3.0, chunk_of(0)), (0.01, chunk_of(0))]
    got = await cut_charge(h, clock, {"max_tokens": 256}, chunks)
    rate = 9 / (9 * 0.05)  # the pace before the pause
    owed = 3.0 - (1 - 0.01 * rate) / rate  # the last chunk carried a little past it
    assert got == 12 + math.ceil(owed * rate * 2) + ABORT_STEPS


async def test_a_pause_after_one_chunk_has_no_pace_so_the_bound(
        h: Harness, clock: Clock) -> None:
    assert await cut_charge(h, clock, {}, [(0.5, chunk_of(0))], idle_s=5) == 50


async def test_the_stall_that_counts_is_set_by_limits_stalled_stream_s(
        tmp_path: Path, clock: Clock) -> None:
    """A 10 s gap between chunks is a pause at 2 s; at 30 s it is the stream's pace."""
    chunks = [*steady(10), (10.0, chunk_of(0)), *steady(5)]
    body = {"max_tokens": 256}
    h30 = make_harness(tmp_path / "30", limits={"stalled_stream_s": 30})
    assert await cut_charge(h30, clock, body, chunks) == 16 + ABORT_STEPS
    h2 = make_harness(tmp_path / "2", limits={"stalled_stream_s": 2})
    assert await cut_charge(h2, clock, body, chunks) > 16 + 10 * 20


async def test_a_batchs_next_prompt_after_its_prefill_is_no_pause(
        h: Harness, clock: Clock) -> None:
    """Prompt 0 streams, prompt 1 prefills for 3 s, then streams: its first chunk opens a
    choice, not a pause."""
    body = {"model": "demo", "prompt": ["hi", "long " * 50], "max_tokens": 64}
    chunks = [*steady(16, 0), (3.0, chunk_of(1)), *steady(4, 1)]
    h2 = h
    life = await h2.admitted({**body, "stream": True}, path="/v1/completions")
    life.response_start(200, BACKEND)
    for gap, chunk in chunks:
        clock.now += gap
        life.response_chunk(chunk.replace(b'"delta": {"content": "a"}', b'"text": "a"'),
                            end=False)
    life.finish(aborted=True)
    assert life.recount_owed is not None
    life.write(life.recount_owed[0], 9)
    rec = await h2.record(life)
    assert rec.completion_tokens == 21 + 2 * ABORT_STEPS  # both prompts step on
    # The record keeps the hold's bounds (`audit --vllm` caps estimated requests by them).
    assert life.req is not None and life.req.prompt_bound > 9
    assert (rec.prompt_bound, rec.completion_bound) == (life.req.prompt_bound, 2 * 64)


async def test_merged_steps_count_each_token(h: Harness, clock: Clock) -> None:
    """vLLM merges into one chunk the steps it could not send (its reader lagged, or its
    own event loop): logprobs name each token (speculative decoding's several a step
    too); without them, a text spelling more than 4 tokens counts them (~4 ASCII
    characters a token, one a CJK character). A choice's first chunk too (a prompt that
    began while its reader paused carries what was generated meanwhile), but with `echo`,
    which puts the prompt there: one chunk's worth."""
    lp = {"logprobs": True, "n": 2, "max_tokens": 100}
    chunks = [(0.05, chunk_of(0, 7, logprobs=True)), (0.05, chunk_of(1, 1, logprobs=True)),
              (0.05, chunk_of(0, 3, logprobs=True)), (0.05, chunk_of(1, 1, logprobs=True))]
    lag = 2 * ABORT_STEPS  # two choices step on until the abort lands
    assert await cut_charge(h, clock, lp, chunks) == 7 + 1 + 3 + 1 + lag
    # Chat echoes only onto an assistant's last message; "false" is false, as vLLM reads it.
    echoed = {**lp, "echo": True, "messages": [*CHAT["messages"],
                                               {"role": "assistant", "content": "Sure,"}]}
    assert await cut_charge(h, clock, echoed, chunks) == 1 + 1 + 3 + 1 + lag
    assert await cut_charge(h, clock, {**lp, "echo": True}, chunks) == 7 + 1 + 3 + 1 + lag
    assert await cut_charge(h, clock, {**echoed, "echo": "false"}, chunks) == \
        7 + 1 + 3 + 1 + lag
    plain = [(0.05, chunk_of(0, text="a" * 300)), (0.05, chunk_of(0, text="a" * 300)),
             (0.05, chunk_of(0, text="ab")), (0.05, chunk_of(0, text="字" * 60)),
             (0.05, chunk_of(0, text="a long word")), (0.05, chunk_of(0, text="字字"))]
    # ~4 ASCII characters a token, one a CJK character; one chunk's worth below 4.
    assert await cut_charge(h, clock, {"max_tokens": 256}, plain) == \
        75 + 75 + 1 + 60 + 1 + 1 + ABORT_STEPS


async def test_a_stream_that_said_done_is_not_paused(h: Harness, clock: Clock) -> None:
    """Its answer was whole (`[DONE]`), the backend kept the body open: what it counted."""
    chunks = [*steady(3), (0.05, b"data: [DONE]\n\n")]
    assert await cut_charge(h, clock, {}, chunks, idle_s=5) == 3


async def test_a_stream_that_may_hide_tokens_cut_before_its_answer_is_recounted(
        h: Harness) -> None:
    """Cut before its first byte: what it could generate, and its prompt by the
    backend's count (its bound, with tools rendered at the template's indent, can be
    many times the real prompt)."""
    life = await h.admitted({**CHAT, "stream": True, "include_reasoning": False})
    req = life.req
    assert req is not None
    life.finish(aborted=True)
    assert life.recount_owed is not None
    life.write(life.recount_owed[0], 9)
    rec = await h.record(life)
    assert (rec.prompt_tokens, rec.completion_tokens, rec.estimated) == (
        9, req.completion_bound, True)


async def test_tools_not_called_hide_nothing(h: Harness) -> None:
    life = await h.admitted({**CHAT, "stream": True, "tool_choice": "none",
                             "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert life.req is not None and not life.req.hides_tokens


async def test_a_client_leaving_before_its_json_answer_is_charged_its_hold(
        h: Harness) -> None:
    """A client that times out before its JSON answer: vLLM was generating it (real
    vLLM: 513 of 1,024 tokens at half the time), and an answer is written only once
    whole. Charged its hold: with its prompt alone, a client timing out on purpose
    made a budget bound nothing."""
    life = await h.admitted(CHAT)
    req = life.req
    assert req is not None
    life.finish(aborted=True)
    # Its prompt as the backend counts it (clients tester: a 7-token prompt was charged
    # its 558-token bound); its bound if the backend does not answer.
    assert life.recount_owed is not None and not h.recorded.got
    life.write(life.recount_owed[0], 9)
    rec = await h.record(life)
    assert (rec.status, rec.prompt_tokens, rec.completion_tokens, rec.estimated) == (
        499, 9, req.completion_bound, True)


async def test_a_model_without_prompt_recount_charges_a_cut_prompt_its_bound(
        tmp_path: Path) -> None:
    """`prompt_recount: false` (a backend whose /tokenize counts less than its generation
    reads): a cut request's prompt is its bound, and no /tokenize is asked."""
    import yaml

    h = make_harness(tmp_path)
    cfg = yaml.safe_load(h.runtime.config_path.read_text())
    cfg["models"]["demo"]["prompt_recount"] = False
    h.runtime.config_path.write_text(yaml.safe_dump(cfg))
    h = Harness(Runtime.from_file(h.runtime.config_path), Recorded(), Holds())
    life = await h.admitted({**CHAT, "stream": True})
    life.response_start(GATEWAY_TIMEOUT, "")
    life.response_chunk(b'{"error":{"message":"The backend did not answer in time.",'
                        b'"type":"upstream_error"}}', end=True)
    assert life.recount_owed is None
    req = life.req
    assert req is not None
    assert counts(await h.record(life)) == (GATEWAY_TIMEOUT, req.prompt_bound, 0, True)


@pytest.mark.parametrize("details", [
    "upstream_reset_before_response_started{connection_failure}",
    "upstream_reset_before_response_started{overflow}",
])
async def test_a_502_that_never_reached_a_backend_generated_nothing(
    h: Harness, details: str,
) -> None:
    """Envoy could not connect (after its retries) or its circuit breaker refused: the
    backend never had the request."""
    life = await h.admitted(CHAT)
    life.response_start(502, "", details=details)
    life.response_chunk(b'{"error":{"message":"The backend failed before answering.",'
                        b'"type":"upstream_error"}}', end=True)
    assert counts(await h.record(life)) == (502, 0, 0, False)


async def test_a_backends_own_error_answer_generated_nothing(h: Harness) -> None:
    life = await h.admitted(CHAT)
    life.response_start(502, BACKEND, upstream_error=GATEWAY_TIMEOUT)  # marked by Envoy
    life.response_chunk(b'{"object":"error","message":"timed out"}', end=True)
    assert counts(await h.record(life)) == (GATEWAY_TIMEOUT, 0, 0, False)


async def test_envoys_503_reached_no_backend(h: Harness) -> None:
    """No healthy backend (Envoy's 503 after admission): nothing was generated."""
    life = await h.admitted(CHAT)
    life.response_start(503, "")
    life.response_chunk(b'{"error":{"message":"No healthy backend"}}', end=True)
    assert counts(await h.record(life)) == (503, 0, 0, False)


# -- 3, 4. The rest of the response out of the services' sight ----------------------


async def assert_completion_bound(h: Harness, life: Lifecycle, status: int | str,
                                  counted: int | None) -> None:
    """Out of sight: the record charges what the backend could generate (its completion
    bound) and the prompt the backend counts (`counted`; None: it did not answer, the
    prompt's bound), once ext_proc has asked for that count."""
    req = life.req
    assert req is not None and req.prompt_bound > req.prompt_estimate > 0
    assert life.recount_owed is not None and not h.recorded.got
    ending, url, recount = life.recount_owed
    assert url == BACKEND and recount.asks
    life.write(ending, counted)
    rec = await h.record(life)
    prompt = req.prompt_bound if counted is None else counted
    assert counts(rec) == (status, prompt, req.completion_bound, True)
    tokens, cost, hold = h.holds.settled[0]
    assert tokens == prompt + req.completion_bound and cost <= hold


async def test_a_lost_meter_report_charges_the_completion_bound(tmp_path: Path) -> None:
    """A tester stopped `up` (Envoy first) with streams Envoy metered: no report came, and
    each was charged its prompt's bound (558 for a 7-token prompt) besides its completion
    bound. The prompt is the backend's count now; the backend's status (nothing timed
    out)."""
    h = make_harness(tmp_path, envoy={"stream_metering": "envoy"})
    life = await h.admitted({**CHAT, "stream": True}, reports=Reports())
    life.response_start(200, BACKEND)
    assert life.hand_over()
    life.take_report(None)
    await assert_completion_bound(h, life, 200, 7)


async def test_a_stream_left_to_envoy_mid_way_charges_the_completion_bound(
    h: Harness,
) -> None:
    life = await h.admitted({**CHAT, "stream": True})
    life.response_start(200, BACKEND)
    life.response_chunk(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
                        end=False)
    life.finish(aborted=True, out_of_sight=True)
    await assert_completion_bound(h, life, 200, None)  # no count: the prompt's bound


async def test_left_to_envoy_before_the_backend_answered_is_lost(h: Harness) -> None:
    life = await h.admitted(CHAT)
    life.finish(aborted=True, out_of_sight=True)
    await assert_completion_bound(h, life, LOST, 9)


async def test_left_to_envoy_once_usage_was_seen_charges_the_usage(h: Harness) -> None:
    """The backend's count came (only the end of the body was still to pass): exact."""
    life = await h.admitted(CHAT)
    life.response_start(200, BACKEND)
    life.response_chunk(b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":6}}',
                        end=False)
    life.finish(aborted=True, out_of_sight=True)
    assert counts(await h.record(life)) == (200, 5, 6, False)


async def test_a_backend_error_left_to_envoy_generated_nothing(h: Harness) -> None:
    life = await h.admitted(CHAT)
    life.response_start(400, BACKEND, upstream_error=400)
    life.finish(aborted=True, out_of_sight=True)
    assert counts(await h.record(life)) == (400, 0, 0, False)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_admission_whose_answer_never_reached_envoy_charges_nothing(
    h: Harness, stream: bool,
) -> None:
    """Admitted, but the stream was cut before the answer was written (Envoy gave up
    after its message timeout and answered 503, or the client left): no backend had it."""
    life = Lifecycle(h.runtime, h.recorded, h.holds)  # type: ignore[arg-type]
    life.identify("POST", "/v1/chat/completions", "rid-2", None,
                  Principal("k-main", "acme", frozenset(), frozenset()))
    await life.request_body(json.dumps({**CHAT, "stream": stream}).encode())
    life.finish(aborted=True)
    rec = await h.record(life)
    assert counts(rec) == (499, 0, 0, False)


@pytest.mark.parametrize("n", [1, 3])
async def test_a_stream_whose_client_left_before_its_first_chunk_owes_the_abort(
        h: Harness, n: int) -> None:
    """Streams tester: a client that closed once the 200's headers came, before any
    chunk reached ext_proc, was charged its prompt alone (0 completion tokens) where the
    backend had generated (1 token at no delay; real vLLM counted 27). Every sequence may
    step on until the abort lands: `abort_lag_steps` each, as Envoy's meter charges."""
    life = await h.admitted({**CHAT, "stream": True, "n": n, "max_tokens": 200})
    life.finish(aborted=True)
    if life.recount_owed is not None:
        life.write(life.recount_owed[0], 9)
    rec = await h.record(life)
    assert (rec.status, rec.completion_tokens, rec.estimated) == (499, ABORT_STEPS * n, True)
    # Never past what it could generate.
    h.recorded.got.clear()
    life = await h.admitted({**CHAT, "stream": True, "max_tokens": 5})
    life.finish(aborted=True)
    if life.recount_owed is not None:
        life.write(life.recount_owed[0], 9)
    assert (await h.record(life)).completion_tokens == 5


async def test_a_cut_stream_envoy_metered_owes_its_silence_at_its_pace(
        tmp_path: Path) -> None:
    """Streams tester: a client that stopped reading (Envoy's buffers full, the backend
    generating on) until Envoy's idle timeout cut the stream paid a quarter of what was
    generated: Envoy's report had no times but the first text's, so the silence before
    the cut went uncharged. Its last text's time and the stream's end now come too, and
    the silence is charged at the pace the stream kept, as ext_proc's meter charges it."""
    h = make_harness(tmp_path, envoy={"stream_metering": "envoy"})
    body = {**CHAT, "stream": True, "max_tokens": 256}

    async def charged(report: MeterReport) -> int:
        h.recorded.got.clear()
        life = await h.admitted(body, reports=Reports())
        life.response_start(200, BACKEND)
        assert life.hand_over()
        life.take_report(report)
        if life.recount_owed is not None:
            life.write(life.recount_owed[0], 9)
        return (await h.record(life)).completion_tokens

    # 11 chunks in 1 s (10 tokens a second), then 5 s of silence before the cut.
    silent = MeterReport(events=11, ttft_s=0.1, last_s=1.1, end_s=6.1,
                         cut_by_gateway=True)
    assert await charged(silent) == 11 + math.ceil(5 * 10 * HEADROOM) + ABORT_STEPS
    # Longer: what it could generate at most.
    assert await charged(MeterReport(events=11, ttft_s=0.1, last_s=1.1, end_s=60.0)) == 256
    # Cut at once after its last text: the chunks and the abort's steps, as before.
    prompt = MeterReport(events=11, ttft_s=0.1, last_s=1.1, end_s=1.1)
    assert await charged(prompt) == 11 + ABORT_STEPS
    # A steady stream longer than stalled_stream_s, cut at once after its last text (the
    # user pressed stop): its chunks and the abort's steps. Review: the span between its
    # first and last text was replayed as one pause and charged ~3x what it carried.
    for span_s in (3.0, 6.0, 30.0):
        steady = MeterReport(events=61, ttft_s=0.1, last_s=0.1 + span_s, end_s=0.1 + span_s)
        assert await charged(steady) == 61 + ABORT_STEPS
    # ...and 1 s of silence after it, at the pace of its 6 s of flow (10 tokens a second).
    quiet = MeterReport(events=61, ttft_s=0.1, last_s=6.1, end_s=7.1)
    assert await charged(quiet) == 61 + math.ceil(1 * 10 * HEADROOM) + ABORT_STEPS
    # n=4: 200 events in 5 s (40 a second, all four choices), 2 s of silence, cut by
    # Envoy: the silence at the stream's pace, once (review: four times over), and the
    # abort's steps for every choice.
    body = {**CHAT, "stream": True, "max_tokens": 256, "n": 4}
    idle = MeterReport(events=200, ttft_s=0.1, last_s=5.1, end_s=7.1, cut_by_gateway=True)
    assert await charged(idle) == 200 + math.ceil(2 * 40 * HEADROOM) + 4 * ABORT_STEPS
    # A stream that ended is charged its usage, whatever its times.
    usage = (b'data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":11,'
             b'"total_tokens":20}}\n\n')
    assert await charged(MeterReport(events=11, usage_event=usage, done=True, ended=True,
                                     ttft_s=0.1, last_s=1.1, end_s=30.0)) == 11
