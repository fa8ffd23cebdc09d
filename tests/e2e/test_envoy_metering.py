"""Streams metered inside Envoy (`envoy.stream_metering: envoy`): the Lua meter reads the
chunks, strips the usage chunk the client did not ask for, and one access-log report per
stream reaches the services. The same gateway tests as with ext_proc metering (imported
below, run here against this gateway), then every chunk split of a vLLM-shaped stream
from an upstream that cuts it where it is told."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from authz.runtime.procs import wait_until
from policy.stream_pace import ABORT_STEPS
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_gateway import (  # noqa: F401  (run here against this gateway)
    records_for,
    test_a_stream_that_ends_in_an_error_event_is_recorded_as_failed,
    test_a_stream_the_backend_refuses_in_its_first_event_costs_nothing,
    test_chat_non_streaming_exact_usage_and_one_record,
    test_chat_streaming_hides_the_usage_chunk_it_added,
    test_chat_streaming_with_usage_requested,
    test_completions_json_and_stream,
    test_cut_stream_is_recorded_as_estimated,
    test_secret_never_leaks_anywhere,
    test_upstream_error_is_passed_through_and_recorded,
)
from tests.e2e.test_stream_interval import (  # noqa: F401
    test_a_stream_left_early_is_charged_per_chunk_seen,
    test_grouped_stream_is_metered_exactly_and_hides_the_usage_chunk,
)
from tests.helpers import SECRET

pytestmark = pytest.mark.e2e
ENVOY = {"stream_metering": "envoy"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("gw-envoy-meter"), envoy=ENVOY) as g:
        yield g


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The stream_interval tests' gateway, Envoy metering."""
    with run_gateway(tmp_path_factory.mktemp("gw-envoy-interval"), envoy=ENVOY,
                     demo={"stream_interval": 8}) as g:
        yield g


# -- every chunk split --------------------------------------------------------------------

BIG = 6000  # one content event over the meter's event limit (4096 below)
USAGE = {"prompt_tokens": 9, "completion_tokens": 23, "total_tokens": 32}


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(content: str) -> dict[str, Any]:
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [{"index": 0, "delta": {"content": content},
                                       "logprobs": None, "finish_reason": None}]}


def stream_events() -> list[bytes]:
    """A vLLM-shaped stream whose text tries to look like what the meter looks for."""
    texts = ["Hello", ' "usage":{"prompt_tokens":0}', "data: [DONE]", '"choices":[]',
             "\n\n", "x" * BIG, "\r\n\r\n", "é€😀", "end"]
    first = _chunk("")
    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    usage = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
             "model": "m", "choices": [], "usage": USAGE}
    return [_event(first), *(_event(_chunk(t)) for t in texts), _event(usage),
            b"data: [DONE]\n\n"]


# vLLM 0.32's event when generation fails mid-stream (json.dumps: spaces after colons).
ERROR_EVENT = (b'data: {"error": {"message": "Internal server error", "type": '
               b'"InternalServerError", "param": null, "code": 503}}\n\n')
PROMPT_COUNT = 11  # what the upstream's /tokenize says of every prompt


def error_stream_events() -> list[bytes]:
    """A stream whose generation fails: content chunks whose text looks like the error
    event (escaped, as JSON writes it), the error event, then `[DONE]` (as vLLM)."""
    first = _chunk("")
    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    texts = ['{"error": {"code": 400}}', '"object": "error"', "\r\n\r\n", "ok"]
    return [_event(first), *(_event(_chunk(t)) for t in texts), ERROR_EVENT,
            b"data: [DONE]\n\n"]


GRAMMAR_EVENT = (b'data: {"error": {"message": "Grammar error: unclosed group", "type": '
                 b'"BadRequestError", "param": null, "code": 400}}\n\n')


def refused_stream_events() -> list[bytes]:
    """vLLM refusing a request once its stream began (a grammar that does not compile):
    the 400 its first event with data, after a keep-alive comment here, then [DONE]."""
    return [b": keep-alive\n\n", GRAMMAR_EVENT, b"data: [DONE]\n\n"]


# SSE line ends: LF, CRLF, or CR alone (each legal). Event texts hold no raw line end
# (JSON escapes them), so an event's end is the only blank line to rewrite.
EOLS = {"lf": b"\n\n", "crlf": b"\r\n\r\n", "cr": b"\r\r"}


def with_eol(events: list[bytes], eol: str) -> list[bytes]:
    return [ev.replace(b"\n\n", EOLS[eol]) for ev in events]


ROLE_CHUNKS = 5  # a completions stream's chunks, each with a logprobs key "role"


def role_logprob_events() -> list[bytes]:
    """A completions stream with logprobs whose top token is literally `role` (vLLM's
    completions `top_logprobs` maps token text to logprob: a key `"role":`), cut by the
    backend before its usage chunk."""
    chunk = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "text": "role", "logprobs": {
                 "text_offset": [0], "token_logprobs": [-0.1], "tokens": ["role"],
                 "top_logprobs": [{"role": -0.1}]}, "finish_reason": None}]}
    return [_event(chunk)] * ROLE_CHUNKS


class SplitUpstream(ThreadedBackend):
    """An upstream that sends the stream above (`error_stream_events` with `x-stream:
    error`) cut at the byte offsets a request's `x-split` header names, each piece its
    own write a few ms apart, its events ended by the line ends `x-eol` names, its body's
    end `x-linger-ms` after its last event; its /tokenize counts PROMPT_COUNT tokens.
    Completions: `role_logprob_events`, then the connection closes."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._stream)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/tokenize", self._tokenize)

    async def _tokenize(self, _: web.Request) -> web.Response:
        return web.json_response({"count": PROMPT_COUNT, "max_model_len": 4096,
                                  "tokens": list(range(PROMPT_COUNT))})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        kind = request.headers.get("x-stream")
        events = (error_stream_events() if kind == "error" else refused_stream_events()
                  if kind == "refused" else stream_events())
        if kind == "cut":  # the connection closes before the usage chunk
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"".join(events[:-2]))
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return resp
        body = b"".join(with_eol(events, request.headers.get("x-eol", "lf")))
        cuts = [int(c) for c in request.headers.get("x-split", "").split(",") if c]
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        start = 0
        for cut in [*sorted(set(cuts)), len(body)]:
            if start < cut <= len(body):
                await resp.write(body[start:cut])
                await asyncio.sleep(0.004)
                start = cut
        await asyncio.sleep(int(request.headers.get("x-linger-ms", "0")) / 1000)
        with contextlib.suppress(ConnectionResetError):  # the client left at [DONE]
            await resp.write_eof()
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for ev in role_logprob_events():
            await resp.write(ev)
            await asyncio.sleep(0.004)
        assert request.transport is not None
        request.transport.close()  # cut before the usage chunk
        return resp


@pytest.fixture(scope="module")
def split_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    upstream = SplitUpstream()
    try:
        with run_gateway(tmp_path_factory.mktemp("gw-envoy-split"),
                         upstream=f"http://127.0.0.1:{upstream.port}",
                         envoy={**ENVOY, "max_event_bytes": 4096}) as g:
            yield g
    finally:
        upstream.stop()


def _splits() -> list[list[int]]:
    """Every byte around each event end (alone), then random multi-cut splits."""
    body = b"".join(stream_events())
    ends, at = [], 0
    for ev in stream_events():
        at += len(ev)
        ends.append(at)
    out = [[e + d] for e in ends[:-1] for d in (-3, -2, -1, 1)]
    rng = random.Random(19)
    out += [sorted(rng.sample(range(1, len(body)), rng.randint(2, 40))) for _ in range(12)]
    out.append(list(range(1, len(body), 97)))  # every 97 bytes
    return out


def _error_splits() -> list[list[int]]:
    """Every byte of the error event and around it, then a cut at every event end."""
    events = error_stream_events()
    start = sum(len(ev) for ev in events[:-2])
    end = start + len(events[-2])
    ends = [sum(len(ev) for ev in events[:i + 1]) for i in range(len(events) - 1)]
    return [[at] for at in range(start - 2, end + 3)] + [ends]


def _request(gw: Gateway, split: list[int], wants_usage: bool, stream: str = "",
             **headers: str) -> urllib.request.Request:
    body: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 64, "stream": True}
    if wants_usage:
        body["stream_options"] = {"include_usage": True}
    return urllib.request.Request(
        f"{gw.base_url}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {SECRET}", "content-type": "application/json",
                 "x-split": ",".join(map(str, split)), "x-stream": stream, **headers})


def _post(gw: Gateway, split: list[int], wants_usage: bool,
          stream: str = "", **headers: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(_request(gw, split, wants_usage, stream, **headers),
                                timeout=30) as r:
        return r.read(), r.headers["x-request-id"]


@pytest.mark.parametrize("wants_usage", [False, True])
def test_every_split_is_metered_exactly_and_passed_byte_for_byte(
        split_gw: Gateway, wants_usage: bool) -> None:
    events = stream_events()
    expected = b"".join(events if wants_usage else [*events[:-2], events[-1]])
    for split in _splits():
        got, rid = _post(split_gw, split, wants_usage)
        assert got == expected, split
        [rec] = records_for(split_gw, rid)
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
                rec["status"]) == (9, 23, False, 200), (split, rec)


@pytest.mark.parametrize("wants_usage", [False, True])
def test_every_split_of_a_failed_stream_says_its_status(
        split_gw: Gateway, wants_usage: bool) -> None:
    """A stream that ends in vLLM's error event, split at every byte of that event and
    around it: the client gets it byte for byte, and each record says the event's status
    (503) with the content events counted (4, and their text's merged steps), estimated,
    the prompt the backend's /tokenize count, whatever the split (text that looks like an
    error event is not one)."""
    expected = b"".join(error_stream_events())
    for split in _error_splits():
        got, rid = _post(split_gw, split, wants_usage, "error")
        assert got == expected, split
        [rec] = records_for(split_gw, rid)
        assert (rec["status"], rec["estimated"], rec["prompt_tokens"]) == (
            503, True, PROMPT_COUNT), (split, rec)
        # The 4 content events, and what their text may hold past one token each (its
        # length: merged steps): the services' own meter reckons 13; Envoy's counts a
        # JSON escape's characters too (a little more, never less).
        assert 4 <= rec["completion_tokens"] <= 17, (split, rec)


def _eol_splits(eol: str) -> list[list[int]]:
    """Every byte around each event end of the stream with `eol` line ends (alone), and
    every 41 bytes."""
    events = with_eol(stream_events(), eol)
    ends = [sum(len(ev) for ev in events[:i + 1]) for i in range(len(events) - 1)]
    total = sum(len(ev) for ev in events)
    return [[e + d] for e in ends for d in (-6, -5, -4, -3, -2, -1, 1)] + [
        list(range(1, total, 41))]


@pytest.mark.parametrize("eol", ["cr", "crlf"])
@pytest.mark.parametrize("wants_usage", [False, True])
def test_every_line_end_sse_allows_is_metered_and_passed(
        split_gw: Gateway, wants_usage: bool, eol: str) -> None:
    """SSE ends a line with CRLF, LF or CR alone. With CR alone the meter found no event
    end: a client that had not asked for usage got an empty 200 (every byte held), and
    every record said 0 completion tokens. Now each split around each event end passes
    byte for byte (the usage chunk the client did not ask for left out) and is exact."""
    events = with_eol(stream_events(), eol)
    expected = b"".join(events if wants_usage else [*events[:-2], events[-1]])
    for split in _eol_splits(eol):
        got, rid = _post(split_gw, split, wants_usage, **{"x-eol": eol})
        assert got == expected, split
        [rec] = records_for(split_gw, rid)
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
                rec["status"]) == (9, 23, False, 200), (split, rec)


@pytest.mark.parametrize("wants_usage", [False, True])
def test_a_client_that_leaves_at_done_leaves_an_exact_record(
        split_gw: Gateway, wants_usage: bool) -> None:
    """The client stops reading at `data: [DONE]` and closes, before the body's end (the
    backend's last bytes come later): the stream is cut, but its usage and its `[DONE]`
    had passed. The record is exact and 200 (it was 499, estimated, counted by chunks:
    the meter kept them for the body's end)."""
    for _ in range(3):
        with urllib.request.urlopen(_request(split_gw, [], wants_usage,
                                             **{"x-linger-ms": "400"}), timeout=30) as r:
            rid = r.headers["x-request-id"]
            while b"[DONE]" not in r.readline():
                pass
        [rec] = records_for(split_gw, rid)
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
                rec["status"]) == (9, 23, False, 200), rec


def test_a_chunk_whose_text_says_done_is_a_chunk(split_gw: Gateway) -> None:
    """A content chunk whose text is `data: [DONE]` (the stream's own texts include it),
    in a stream the backend cuts before its usage chunk: the stream is cut, not ended
    (taken for the end, it was a 200, and a chunk short)."""
    req = _request(split_gw, [], False, "cut")
    with urllib.request.urlopen(req, timeout=30) as r:
        rid = r.headers["x-request-id"]
        with contextlib.suppress(http.client.IncompleteRead):
            r.read()
    [rec] = records_for(split_gw, rid)
    # (its over-limit event's bytes estimate it: the hold's 64 completion tokens)
    assert (rec["completion_tokens"], rec["estimated"]) == (64, True), rec
    assert rec["status"] != 200, rec


def test_a_completions_token_named_role_is_counted(split_gw: Gateway) -> None:
    """vLLM's completions logprobs map token text to logprob: a top token `role` writes
    `"role":` into a chunk, which the meter took for a chat stream's opening role chunk
    and did not count (a cut stream of such chunks was charged 0 completion tokens)."""
    body = {"model": "demo", "prompt": "hi", "max_tokens": 64, "stream": True, "logprobs": 1}
    req = urllib.request.Request(
        f"{split_gw.base_url}/v1/completions", data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {SECRET}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        rid = r.headers["x-request-id"]
        with contextlib.suppress(http.client.IncompleteRead):
            r.read()
    [rec] = records_for(split_gw, rid)
    # The chunks, and the steps vLLM takes before its abort lands (and the moment
    # between the last chunk and the cut, at the stream's pace).
    assert rec["estimated"] and ROLE_CHUNKS + ABORT_STEPS <= rec["completion_tokens"] <= 64


def test_no_chunk_message_reaches_the_services(gateway: Gateway) -> None:
    """A handed-over stream costs ext_proc two messages (request body, response
    headers), whatever its length; the time to its first token is still measured."""
    admin = f"http://{_admin(gateway)}"

    def sent() -> int:
        with urllib.request.urlopen(f"{admin}/stats?filter=ext_proc.stream_msgs_sent") as r:
            return sum(int(line.rsplit(":", 1)[1]) for line in r.read().decode().splitlines()
                       if line.strip())

    def ttft_count() -> float:
        with urllib.request.urlopen(f"{gateway.side_url}/metrics") as r:
            return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                       if line.startswith("gen_ai_server_time_to_first_token_seconds_count"))

    def quiet() -> bool:  # an earlier test's stream may still be settling: wait it out
        with urllib.request.urlopen(f"{gateway.side_url}/metrics") as r:
            held = sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                       if line.startswith("tokenbooth_holds_in_flight{"))
        first = (sent(), ttft_count())
        time.sleep(0.3)
        return held == 0 and (sent(), ttft_count()) == first

    wait_until(quiet, "no stream in flight")
    before, ttft_before = sent(), ttft_count()
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=100,
        stream=True, extra_headers={"x-sim-tpot-ms": "1"})
    chunks = list(raw.parse())
    assert len(chunks) > 100
    [rec] = records_for(gateway, raw.headers["x-request-id"])
    assert (rec["completion_tokens"], rec["estimated"]) == (100, False)
    time.sleep(0.2)
    assert sent() - before == 2
    assert ttft_count() == ttft_before + 1  # the meter timed the first token


def _admin(gw: Gateway) -> str:
    import yaml
    data = yaml.safe_load(gw.config_path.read_text())
    return str(data["envoy"]["admin_listen"])


def test_a_concurrency_slot_comes_back_just_after_the_stream(gateway: Gateway) -> None:
    """The settlement follows the report, which Envoy sends after the stream ended
    (README, "Streams metered in Envoy"): the key's one slot comes back within the
    access log's flush, and the stream's record is exact."""
    from tests.e2e.test_limits import admitted_within, new_key

    key, _ = new_key(gateway, "--max-concurrent", "1")
    for _ in range(3):
        raw = gateway.client(key).chat.completions.with_raw_response.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            stream=True)
        assert len(list(raw.parse())) >= 8
        admitted_within(gateway, key, 2.0, "the slot did not come back after the stream")
        [rec] = records_for(gateway, raw.headers["x-request-id"])
        assert (rec["completion_tokens"], rec["estimated"]) == (8, False)


def test_every_split_of_a_refused_stream_costs_nothing(split_gw: Gateway) -> None:
    """A 4xx error as the stream's first event with data (a comment before it is none),
    split at every byte: the Lua meter says it came first, and the record says the
    event's status with nothing charged, as a JSON 400 would be."""
    body = b"".join(refused_stream_events())
    for split in [[at] for at in range(1, len(body))]:
        got, rid = _post(split_gw, split, False, "refused")
        assert got == body, split
        [rec] = records_for(split_gw, rid)
        assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
                rec["estimated"], rec["cost_usd"]) == (400, 0, 0, False, "0"), (split, rec)
