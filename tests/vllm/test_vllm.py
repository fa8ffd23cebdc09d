"""A real vLLM behind Envoy + tokenbooth: records equal vLLM's own usage and its counters.

vLLM runs on CPU with random weights; `ignore_eos` makes it produce exactly
`max_tokens` tokens, so every expectation below is exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from authz.sim.streaming import stream_spans
from authz.state.usage.records import USAGE_FILE, read_records
from policy.stream_usage import StreamMeter
from tests.e2e.conftest import Gateway
from tests.e2e.test_gateway import records_for
from tests.helpers import SECRET
from tests.vllm.conftest import LONG_TOKENS, MODEL, VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about the gateway in front of you."}]
PROMPT = "Once upon a time, in a data centre far away,"
EXACT: dict[str, Any] = {"ignore_eos": True, "temperature": 0}
FIXTURES = Path(__file__).resolve().parents[1] / "policy" / "fixtures"
# Rewrites the recorded streams that tests/policy/test_vllm_streams.py replays.
RECORD = os.environ.get("TOKENBOOTH_RECORD_VLLM_FIXTURES") == "1"


def vllm_usage(vllm: VllmServer, path: str, body: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens that vLLM itself reports for this request body."""
    usage = json.loads(vllm.post(path, {**body, "stream": False}))["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def raw_stream(url: str, body: dict[str, Any], key: str | None = None) -> tuple[bytes, str]:
    """POST a streaming request and return the whole SSE body as bytes, plus x-request-id."""
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read(), r.headers.get("x-request-id", "")


def sse_data(stream: bytes) -> list[bytes]:
    return [line[6:] for line in stream.split(b"\n") if line.startswith(b"data: ")]


def test_audit_finds_no_drift_against_vllm(vllm_gateway: Gateway,
                                          vllm_server: VllmServer) -> None:
    """First in the session, while every token vLLM counted came through the gateway:
    `tokenbooth audit --vllm` finds the ledger equal to the records and the records
    equal to vLLM's own counters (later tests also call vLLM directly)."""
    from tests.e2e.test_limits import new_key

    key, key_id = new_key(vllm_gateway, "--budget", "5", "--budget-period", "day")
    client = vllm_gateway.client(key)
    for i, n in enumerate((4, 9)):
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=n,
                                       extra_body=EXACT)
        list(client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=n,
                                            stream=True, extra_body=EXACT))
        client.completions.create(model="other", prompt=f"{PROMPT} {i}", max_tokens=n,
                                  extra_body=EXACT)
    # Several sequences: vLLM's prompt counter counts the prompt once per sequence.
    # (Sampled, as vLLM wants for n > 1; ignore_eos keeps every sequence max_tokens long.)
    sampled = {"ignore_eos": True, "seed": 7}
    client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3, n=2,
                                   extra_body=sampled)
    client.completions.create(model="other", prompt=[PROMPT, "two"], max_tokens=3, n=3,
                              extra_body=sampled)
    # best_of, which vLLM 0.32 ignores: n sequences run, and the prompt is counted n
    # times, not best_of times (the audit read a drift where there was none).
    client.completions.create(model="other", prompt=PROMPT, max_tokens=3, n=1,
                              extra_body={**EXACT, "best_of": 3})
    deadline = time.monotonic() + 15
    while True:  # vLLM counts just after each response; the last settle lands too
        r = subprocess.run([sys.executable, "-m", "authz.cli", "audit", "--json",
                            "--config", str(vllm_gateway.config_path),
                            "--vllm", vllm_server.url],
                           capture_output=True, text=True, timeout=60)
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    [backend] = report["backends"]
    assert backend["records"] >= 9 and backend["estimated"]["records"] == 0
    assert (backend["vllm_prompt_tokens"], backend["vllm_generation_tokens"]) == (
        backend["prompt_tokens"], backend["completion_tokens"])
    [ledger] = [a for a in report["ledgers"] if a["owner"] == key_id]
    assert ledger["records"] == 9 and ledger["spent_nano"] == ledger["records_nano"] > 0


def test_chat_non_streaming_record_equals_vllm_usage(vllm_gateway: Gateway,
                                                     vllm_server: VllmServer) -> None:
    raw = vllm_gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=16, extra_body=EXACT)
    resp = raw.parse()
    assert resp.usage is not None and resp.usage.completion_tokens == 16
    assert resp.model == MODEL  # the alias was rewritten to the upstream model
    [rec] = records_for(vllm_gateway, raw.headers["x-request-id"])
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (
        resp.usage.prompt_tokens, resp.usage.completion_tokens)
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == vllm_usage(
        vllm_server, "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, **EXACT})
    assert rec["estimated"] is False and rec["backend"] == vllm_server.url
    # price 0.50 / 1.50 per 1k tokens, exact decimal
    cost = (rec["prompt_tokens"] * 50 + rec["completion_tokens"] * 150) / 100_000
    assert float(rec["cost_usd"]) == pytest.approx(cost, abs=1e-12)


def test_chat_stream_hides_the_usage_chunk_and_records_vllm_usage(
        vllm_gateway: Gateway, vllm_server: VllmServer) -> None:
    body = {"model": "demo", "messages": MESSAGES, "max_tokens": 12, "stream": True, **EXACT}
    stream, rid = raw_stream(f"{vllm_gateway.base_url}/v1/chat/completions", body, SECRET)
    events = sse_data(stream)
    assert events[-1] == b"[DONE]" and stream.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    assert all(c["choices"] for c in chunks)  # no usage-only chunk reached the client
    [rec] = records_for(vllm_gateway, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (
        *vllm_usage(vllm_server, "/v1/chat/completions",
                    {**body, "model": MODEL, "stream": False}), False)
    assert rec["completion_tokens"] == 12 and rec["stream"] is True


def test_chat_stream_with_usage_requested_matches_the_record(vllm_gateway: Gateway) -> None:
    raw = vllm_gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=9, stream=True,
        stream_options={"include_usage": True}, extra_body=EXACT)
    chunks = list(raw.parse())
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [] and usage.completion_tokens == 9
    [rec] = records_for(vllm_gateway, raw.headers["x-request-id"])
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens)


def test_completions_json_and_stream(vllm_gateway: Gateway, vllm_server: VllmServer) -> None:
    client = vllm_gateway.client()
    expected = vllm_usage(vllm_server, "/v1/completions",
                          {"model": MODEL, "prompt": PROMPT, "max_tokens": 7, **EXACT})
    raw = client.completions.with_raw_response.create(
        model="demo", prompt=PROMPT, max_tokens=7, extra_body=EXACT)
    resp = raw.parse()
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == expected
    [rec] = records_for(vllm_gateway, raw.headers["x-request-id"])
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == expected
    sraw = client.completions.with_raw_response.create(
        model="demo", prompt=PROMPT, max_tokens=7, stream=True, extra_body=EXACT)
    text = "".join(c.choices[0].text for c in sraw.parse() if c.choices)
    assert text == resp.choices[0].text  # temperature 0: the same tokens either way
    [srec] = records_for(vllm_gateway, sraw.headers["x-request-id"])
    assert (srec["prompt_tokens"], srec["completion_tokens"], srec["estimated"]) == (
        *expected, False)
    assert srec["endpoint"] == "completions"


def test_record_sums_equal_vllm_counter_deltas(vllm_gateway: Gateway,
                                               vllm_server: VllmServer) -> None:
    """Everything vLLM counted, the records hold; nothing more, nothing less."""
    client = vllm_gateway.client()
    before = vllm_server.counters()
    ids: list[str] = []
    for i, n in enumerate((3, 8, 5, 11)):
        msgs = [{"role": "user", "content": f"Request {i}: count {n} things."}]
        ids.append(client.chat.completions.with_raw_response.create(
            model="demo", messages=msgs, max_tokens=n, extra_body=EXACT,
            stream=bool(i % 2)).headers["x-request-id"])
        ids.append(client.completions.with_raw_response.create(
            model="other", prompt=f"{PROMPT} {i}", max_tokens=n, extra_body=EXACT,
            stream=not i % 2).headers["x-request-id"])
    # The streamed ones were read to the end by the SDK only if iterated; be explicit.
    recs = [r for rid in ids for r in records_for(vllm_gateway, rid)]
    assert len(recs) == len(ids)
    assert not any(r["estimated"] for r in recs)
    want = {"vllm:prompt_tokens_total": sum(r["prompt_tokens"] for r in recs),
            "vllm:generation_tokens_total": sum(r["completion_tokens"] for r in recs)}
    deadline = time.monotonic() + 10
    while True:  # vLLM updates its counters just after the response ends
        delta = {k: v - before[k] for k, v in vllm_server.counters().items()}
        if delta == want or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert delta == want


def _read_a_few_chunks_and_leave(gw: Gateway, path: str = "/v1/chat/completions",
                                 ask: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start a long stream, read five chunks, close the connection; the request's record."""
    body = {"model": "long", "max_tokens": LONG_TOKENS, "stream": True, **EXACT,
            **(ask or {"messages": MESSAGES})}
    return leave_after_five_events(gw, path, body)


def leave_after_five_events(gw: Gateway, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a stream request, read five data events, close the connection; its record."""
    req = urllib.request.Request(
        f"{gw.base_url}{path}", data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {SECRET}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        rid = r.headers["x-request-id"]
        seen = 0
        while seen < 5:
            if r.readline().startswith(b"data: {"):
                seen += 1
    deadline = time.monotonic() + 30
    recs: list[dict[str, Any]] = []
    while not recs and time.monotonic() < deadline:
        recs = [x for x in read_records(gw.data_dir / USAGE_FILE) if x["request_id"] == rid]
        time.sleep(0.1)
    [rec] = recs
    return rec


def test_continuous_usage_only_for_a_client_that_asked_for_usage(
        vllm_gateway: Gateway, vllm_server: VllmServer) -> None:
    """vLLM's continuous_usage_stats puts usage in every chunk, but only beside
    include_usage, which the gateway forces upstream: a client that did not ask for usage
    gets none (the option is dropped); one that asked for both gets it in every chunk."""
    url = f"{vllm_gateway.base_url}/v1/chat/completions"
    base = {"model": "demo", "messages": MESSAGES, "max_tokens": 6, "stream": True, **EXACT}
    want = vllm_usage(vllm_server, "/v1/chat/completions", {**base, "model": MODEL})
    stream, rid = raw_stream(url, {**base, "stream_options": {"continuous_usage_stats": True}},
                             SECRET)
    chunks = [json.loads(e) for e in sse_data(stream)[:-1]]
    assert chunks and all(c.get("usage") is None for c in chunks)
    [rec] = records_for(vllm_gateway, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (*want, False)
    both = {"include_usage": True, "continuous_usage_stats": True}
    stream, rid = raw_stream(url, {**base, "stream_options": both}, SECRET)
    chunks = [json.loads(e) for e in sse_data(stream)[:-1]]
    assert all(c.get("usage") for c in chunks)
    assert (chunks[-1]["usage"]["prompt_tokens"], chunks[-1]["usage"]["completion_tokens"]) \
        == want
    [rec] = records_for(vllm_gateway, rid)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (*want, False)


def test_client_gone_mid_stream_gives_an_estimated_record(vllm_gateway: Gateway,
                                                          vllm_server: VllmServer) -> None:
    """vLLM on CPU is quick: now and then it finishes all 480 tokens before Envoy sees the
    client leave, and that record is (rightly) exact. Every record must be one of the two;
    a few tries give a real cut. Either way the prompt is vLLM's own count: a cut one
    from its /tokenize."""
    prompt, _ = vllm_usage(vllm_server, "/v1/chat/completions",
                           {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, **EXACT})
    for _ in range(5):
        rec = _read_a_few_chunks_and_leave(vllm_gateway)
        assert rec["prompt_tokens"] == prompt, rec
        if not rec["estimated"]:
            assert (rec["status"], rec["completion_tokens"]) == (200, LONG_TOKENS), rec
            continue
        assert rec["status"] == 499, rec
        # Counted from the content chunks the gateway saw (the first carries only the role).
        assert 4 <= rec["completion_tokens"] < LONG_TOKENS, rec
        return
    raise AssertionError("five streams in a row outran the client's disconnect")


def test_a_cut_batch_of_prompts_is_charged_vllms_own_count(vllm_gateway: Gateway,
                                                            vllm_server: VllmServer) -> None:
    """A batched completions stream cut short: each prompt counted by vLLM's /tokenize,
    the sum what vLLM's usage says for the batch (each prompt once)."""
    batch = {"prompt": [PROMPT, "\U0001F600 " * 20]}
    prompt, _ = vllm_usage(vllm_server, "/v1/completions",
                           {"model": MODEL, **batch, "max_tokens": 1, **EXACT})
    for _ in range(5):
        rec = _read_a_few_chunks_and_leave(vllm_gateway, "/v1/completions", batch)
        assert rec["prompt_tokens"] == prompt, rec
        if rec["estimated"]:
            assert rec["status"] == 499, rec
            return
    raise AssertionError("five streams in a row outran the client's disconnect")


@pytest.mark.parametrize(("name", "path", "body"), [
    ("chat", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 24}),
    ("completion", "/v1/completions", {"prompt": PROMPT, "max_tokens": 24}),
    # At temperature 0 half its tokens end inside a UTF-8 character: `"text":""` chunks.
    ("completion_utf8", "/v1/completions", {"prompt": "hi", "max_tokens": 24}),
])
def test_real_streams_meter_exactly_at_every_split(vllm_server: VllmServer, name: str,
                                                   path: str, body: dict[str, Any]) -> None:
    """A stream straight from vLLM, split at every byte offset, gives vLLM's usage."""
    body = {**body, "model": MODEL, "stream": True,
            "stream_options": {"include_usage": True}, **EXACT}
    stream, _ = raw_stream(f"{vllm_server.url}{path}", body)
    *chunks, done = sse_data(stream)
    assert done == b"[DONE]"
    usage = json.loads(chunks[-1])["usage"]
    usage_event = b"data: " + chunks[-1] + b"\n\n"
    assert usage_event in stream
    for i in range(len(stream) + 1):
        meter = StreamMeter(strip_usage=True)
        out = [meter.feed(stream[:i]), meter.feed(stream[i:]), meter.finish()]
        assert b"".join(o or b"" for o in out) == stream.replace(usage_event, b""), i
        assert meter.usage is not None and meter.done, i
        assert (meter.usage.prompt_tokens, meter.usage.completion_tokens) == (
            usage["prompt_tokens"], usage["completion_tokens"]), i
    # Without its usage chunk (a stream cut just before it), one content chunk per token,
    # whatever its text.
    cut = StreamMeter(strip_usage=False)
    cut.feed(stream.replace(usage_event, b""))
    cut.finish()
    assert cut.usage is None and cut.content_chunks == usage["completion_tokens"]
    fixture = FIXTURES / f"vllm_{name}_stream.sse"
    if RECORD:
        fixture.parent.mkdir(exist_ok=True)
        fixture.write_bytes(stream)
    # The recorded stream still has the shape vLLM sends today (same chunk fields).
    recorded = [json.loads(d) for d in sse_data(fixture.read_bytes())[:-1]]
    live = [json.loads(d) for d in chunks]
    assert {tuple(sorted(c)) for c in recorded} == {tuple(sorted(c)) for c in live}


def test_stream_interval_groups_tokens_as_the_simulator_assumes(
        vllm_server: VllmServer) -> None:
    """vLLM's per-request `stream_interval` (a model's `stream_interval` setting writes
    it): the first token alone, then up to N tokens a chunk, with the usage unchanged."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 13, "stream": True,
            "stream_interval": 4, "stream_options": {"include_usage": True}, **EXACT}
    stream, _ = raw_stream(f"{vllm_server.url}/v1/chat/completions", body)
    chunks = [json.loads(d) for d in sse_data(stream)[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 13
    meter = StreamMeter(strip_usage=True, tokens_per_chunk=4)
    meter.feed(stream)
    meter.finish()
    assert meter.usage is not None and meter.usage.completion_tokens == 13
    # Really grouped, and never more chunks than the simulator sends (1 + 4 + 4 + 4): a
    # stream cut after the last one would be charged at least what was generated.
    assert 1 < meter.content_chunks <= len(stream_spans(13, 4)), chunks
    assert meter.completion_estimate >= 13


def test_continuous_usage_counts_each_choice_apart_as_the_simulator_assumes(
        vllm_server: VllmServer) -> None:
    """With continuous_usage_stats, vLLM's usage in a chunk with choices is that choice's
    (its prompt's tokens, its own tokens so far), not the request's: the meter takes only
    the usage-only chunk, so the stream cut just before it is estimated, not charged one
    choice."""
    body = {"model": MODEL, "prompt": [PROMPT, "Hello"], "n": 2, "max_tokens": 3,
            "stream": True, "ignore_eos": True,  # n > 1: not greedy
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    stream, _ = raw_stream(f"{vllm_server.url}/v1/completions", body)
    chunks = [json.loads(d) for d in sse_data(stream)[:-1]]
    *choice_chunks, last = chunks
    assert last["choices"] == []
    prompts = [vllm_usage(vllm_server, "/v1/completions", {**body, "prompt": p, "n": 1,
                                                           "stream_options": None})[0]
               for p in (PROMPT, "Hello")]
    assert last["usage"]["prompt_tokens"] == sum(prompts)
    assert last["usage"]["completion_tokens"] == 12
    seen: dict[int, int] = {}
    for c in choice_chunks:
        i = c["choices"][0]["index"]
        seen[i] = seen.get(i, 0) + 1
        assert (c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) == (
            prompts[i // 2], seen[i]), c
    cut = stream[:stream.rindex(b"data: {", 0, stream.rindex(b'"choices":[]'))]
    meter = StreamMeter(strip_usage=False)
    meter.feed(cut)
    meter.finish()
    assert meter.usage is None and meter.content_chunks == len(choice_chunks) == 12
