"""A backend that answers a stream request with something other than a readable SSE
stream, through the real Envoy (`stream_metering: ext_proc`, the default): a non-vLLM
server that ignores `stream: true` and sends its JSON, or one that gzips the stream
although the gateway asked for `accept-encoding: identity`. The client gets the bytes as
sent; the record is the JSON's exact usage, or the whole hold (estimated) where nothing
can be read, never a prompt with zero completion tokens. The key's one slot comes back."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from aiohttp import web

from policy.config import load_config
from policy.endpoints import lookup
from policy.request import parse_request
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.fake_backend import ThreadedBackend
from tests.e2e.test_gateway import records_for
from tests.helpers import METERED_SECRET, SECRET

pytestmark = pytest.mark.e2e
# k-metered (the default key here): one request in flight, so a slot left held refuses
# the next request; its tpm (1,000) allows few whole holds.
CHAT: dict[str, Any] = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 5, "stream": True}
ANSWER = {"id": "c-1", "object": "chat.completion", "created": 1, "model": "tiny-llama",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "hi there"}}],
          "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}


def sse(*objs: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + \
        b"data: [DONE]\n\n"


GZIPPED = gzip.compress(sse(
    {"choices": [{"index": 0, "delta": {"content": "hi"}}]},
    {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}))


# Streams that end inside an event (no blank line after the last bytes), and one whose
# events are a single LF apart (so one event, never ended): the meters read no event in
# the unended bytes, and the client still gets every byte.
_CHUNKS = sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]},
              {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}})
UNENDED = {
    "tail-lf": _CHUNKS.removesuffix(b"\n"),  # `data: [DONE]\n`
    "tail-none": _CHUNKS.removesuffix(b"\n\n"),  # `data: [DONE]`
    "single-lf": _CHUNKS.replace(b"\n\n", b"\n"),
}
# Event streams with nothing generated in them: no bytes, a comment alone (no event is
# read: the whole hold), and `[DONE]` alone with a stray line end after it (read: the
# prompt, and no completion token).
NO_CONTENT = {"sse-empty": b"", "sse-comment": b": ping\n\n",
              "done-extra-lf": b"data: [DONE]\n\n\n"}
USAGE_EVENT = b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}\n\n'


# A server other than vLLM: a space after every colon, and no usage chunk (it ignores
# stream_options): the record is estimated from the content events, 3.
SPACED = sse(*({"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("a", "b", "c")))


# Streams whose generation failed after two content events: older vLLM's error event
# (no `[DONE]` after it), and OpenAI's shape with a named code.
_TWO = SPACED[:SPACED.index(b'data: {"choices": [{"index": 0, "delta": {"content": "c"')]
FAILED = {
    "old-error": _TWO + b'data: {"object": "error", "message": "boom", "type": '
                        b'"InternalServerError", "param": null, "code": 503}\n\n',
    "openai-error": _TWO + b'data: {"error": {"message": "boom", "type": "server_error", '
                           b'"code": "server_error"}}\n\ndata: [DONE]\n\n',
    # An error event of 64 KiB: Envoy's meter reports its code alone: the error's own,
    # not one nested in it (retest), nor a string it cannot copy whole.
    "big-error": _TWO + b'data: {"error": {"message": "' + b"b" * (64 << 10)
                 + b'", "type": "server_error", "code": 503}}\n\ndata: [DONE]\n\n',
    "big-error-nested": _TWO + b'data: {"error": {"message": "' + b"b" * 6000
                        + b'", "param": {"code": 404}, "code": "server_error"}}\n\n'
                        + b"data: [DONE]\n\n",
    "big-error-escaped": _TWO + b'data: {"error": {"message": "' + b"b" * 6000
                         + b'", "code": "a\\"b"}}\n\ndata: [DONE]\n\n',
}

# Streams both meters must read alike (streams2 tester: Envoy's meter differed on each):
# name -> (bytes, the usage-only event a client that did not ask for usage must not get,
# or b"", the record's (prompt, completion)).
_HI = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
_USAGE_ONLY = (b'data: {"choices": [], "usage": {"prompt_tokens": 12, "total_tokens": 15, '
               b'"completion_tokens": 3}}\n\n')
_MANY_USAGE = (b'data: {"choices": [], "usage": {"prompt_tokens": 12, "total_tokens": '
               b'4012, "completion_tokens": 4000}}\n\n')
_BAD_USAGE = (b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": '
              b'3}, "x": "\xff\xfe caf\xc3\xa9 \xed\xa0\x80"}\n\n')
_BIG_USAGE = (b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": '
              b'3, "prompt_tokens_details": {"cached_tokens": 0}}, "x": "' + b"a" * (1 << 20)
              + b'"}\n\n')
_NESTED_FIRST = (b'data: {"choices":[],"usage":{"prompt_tokens_details":{},"prompt_tokens":12,'
                 b'"completion_tokens":3,"total_tokens":15}}\n\n')
_TWO_USAGE = (b'data: {"choices":[],"meta":{"usage":{"prompt_tokens":12,"completion_tokens":'
              b'9}},"usage":{"prompt_tokens":12,"completion_tokens":3},"x":"' + b"p" * 6000
              + b'"}\n\n')
ALIKE: dict[str, tuple[bytes, bytes, tuple[int, int]]] = {
    # vLLM's continuous_usage_stats after the usage chunk: the usage chunk's counts.
    "late-inline": (_HI + _USAGE_ONLY + b'data: {"choices": [{"index": 0, "delta": '
                    b'{"content": "x"}}], "usage": {"prompt_tokens": 12, '
                    b'"completion_tokens": 1, "total_tokens": 13}}\n\ndata: [DONE]\n\n',
                    _USAGE_ONLY, (12, 3)),
    # An SSE stream sent as text/plain (see `_chat`): read by its bytes.
    "text-plain": (_HI + _USAGE_ONLY + b"data: [DONE]\n\n", _USAGE_ONLY, (12, 3)),
    # A `"usage"` key nested in another event with no choices: no usage chunk.
    "nested-usage": (_HI + _USAGE_ONLY + b'data: {"id": "x", "choices": [], "metadata": '
                     b'{"usage": {"note": 1}}}\n\ndata: [DONE]\n\n', _USAGE_ONLY,
                     (12, 3)),
    # The usage on the last content chunk (no usage-only chunk), then `[DONE]` after a
    # long `id:` line: the inline usage counts once `[DONE]` is read.
    "long-done": (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, '
                  b'"finish_reason": "stop"}], "usage": {"prompt_tokens": 12, '
                  b'"completion_tokens": 3, "total_tokens": 15}}\n\n'
                  + b"id: " + b"7" * 300 + b"\ndata: [DONE]\n\n", b"", (12, 3)),
    # Many short events in one write (Envoy reads them in one chunk), then the usage.
    "many": (_HI * 4000 + _MANY_USAGE + b"data: [DONE]\n\n", _MANY_USAGE, (12, 4000)),
    # Bytes that are no UTF-8 in the usage chunk (hostile-backend tester: Envoy's meter
    # put them in its report, which the services' gRPC decoder refused with every other
    # stream's report batched in it).
    "bad-utf8-usage": (_HI + _BAD_USAGE + b"data: [DONE]\n\n", _BAD_USAGE, (12, 3)),
    # A usage chunk of a megabyte (hostile-backend retest: Envoy's reports of such
    # events, batched, overflowed the access log's stream and were dropped).
    "big-usage": (_HI + _BIG_USAGE + b"data: [DONE]\n\n", _BIG_USAGE, (12, 3)),
    # A usage object that opens with a nested object without a count; one past 4 KiB
    # whose first `"usage"` is nested elsewhere (Envoy's meter missed the first, and
    # read the second's nested one: retest).
    "nested-first": (_HI + _NESTED_FIRST + b"data: [DONE]\n\n", _NESTED_FIRST, (12, 3)),
    "big-two-usage": (_HI + _TWO_USAGE + b"data: [DONE]\n\n", _TWO_USAGE, (12, 3)),
}

# Usage-only chunks with no count (null, negative, strings, a count missing, or no
# `choices` key at all; one past Envoy's 4 KiB report size; a good one, then a bad one:
# the last wins), after three content events (hostile-backend tester: neither or one meter
# stripped them). Both meters strip them and estimate the stream.
MALFORMED_USAGE = {
    "usage-null": b'data: {"choices": [], "usage": null}\n\n',
    "usage-negative": (b'data: {"choices": [], "usage": {"prompt_tokens": -12, '
                       b'"completion_tokens": 3}}\n\n'),
    "usage-strings": (b'data: {"choices": [], "usage": {"prompt_tokens": "12", '
                      b'"completion_tokens": "3"}}\n\n'),
    "usage-no-completion": b'data: {"choices": [], "usage": {"prompt_tokens": 12}}\n\n',
    "usage-no-choices-key": (b'data: {"usage": {"prompt_tokens": 12, "completion_tokens": '
                             b'"3"}}\n\n'),
    "usage-big-null": b'data: {"choices": [], "usage": null, "x": "' + b"a" * 6000 + b'"}\n\n',
    "usage-good-then-null": _USAGE_ONLY + b'data: {"choices": [], "usage": null}\n\n',
}

# A Responses stream that fails after two text deltas: OpenAI's `response.failed` (its
# error's code a name), or OpenAI's `error` event. (vLLM 0.32 cuts such a stream.)
def _typed(kind: str, obj: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **obj})}\n\n".encode()


_DELTAS = b"".join(_typed("response.output_text.delta", {"delta": w}) for w in "ab")
RESPONSES_FAILED = {
    "failed": _DELTAS + _typed("response.failed", {"response": {
        "status": "failed", "usage": None,
        "error": {"code": "rate_limit_exceeded", "message": "busy"}}}),
    "error": _DELTAS + _typed("error", {"code": "server_error", "message": "boom"}),
}


class Unstreaming(ThreadedBackend):
    """Answers every chat stream as the request's `x-answer` says: `json` (no stream at
    all), `gzip` (an SSE stream, compressed) or `spaced` (SPACED)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)

    async def _responses(self, request: web.Request) -> web.Response:
        return web.Response(body=RESPONSES_FAILED[request.headers["x-answer"]],
                            headers={"content-type": "text/event-stream"})

    async def _chat(self, request: web.Request) -> web.Response:
        if request.headers.get("x-answer") == "empty500":
            return web.Response(status=500, body=b"")
        if request.headers.get("x-answer") == "empty200":
            return web.Response(status=200, body=b"")  # content-length: 0
        if request.headers.get("x-answer") == "204":
            return web.Response(status=204)
        if request.headers.get("x-answer") in ("302", "304"):
            status = int(request.headers["x-answer"])
            return web.Response(status=status, body=b"moved" if status == 302 else None,
                                headers={"location": "http://elsewhere.example/v1"})
        if request.headers.get("x-answer") == "chunked200":  # no body, chunked
            resp = web.StreamResponse(status=200)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write_eof()
            return resp  # type: ignore[return-value]
        if request.headers.get("x-answer") in ("gz400", "gz500"):
            return web.Response(
                status=int(request.headers["x-answer"][2:]), headers={
                    "content-type": "application/json", "content-encoding": "gzip"},
                body=gzip.compress(b'{"object": "error", "message": "This model\'s '
                                   b'maximum context length is 2048 tokens."}'))
        if request.headers.get("x-answer") in NO_CONTENT:  # chunked, as a stream comes
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            if NO_CONTENT[request.headers["x-answer"]]:
                await resp.write(NO_CONTENT[request.headers["x-answer"]])
            await resp.write_eof()
            return resp  # type: ignore[return-value]
        if request.headers.get("x-answer") in UNENDED:
            return web.Response(body=UNENDED[request.headers["x-answer"]],
                                headers={"content-type": "text/event-stream"})
        if request.headers.get("x-answer") == "no-done":  # ended, no usage, no [DONE]
            return web.Response(body=_HI * 3, headers={"content-type": "text/event-stream"})
        if request.headers.get("x-answer") in ALIKE:
            kind = ("text/plain" if request.headers["x-answer"] == "text-plain"
                    else "text/event-stream")
            return web.Response(body=ALIKE[request.headers["x-answer"]][0],
                                headers={"content-type": kind})
        if request.headers.get("x-answer") in MALFORMED_USAGE:
            body = _HI * 3 + MALFORMED_USAGE[request.headers["x-answer"]] + b"data: [DONE]\n\n"
            return web.Response(body=body, headers={"content-type": "text/event-stream"})
        if request.headers.get("x-answer") == "reset":  # a 200, a chunk, then a reset
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_HI)
            transport = request.transport
            assert transport is not None
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return resp  # type: ignore[return-value]
        if request.headers.get("x-answer") == "spaced":
            return web.Response(body=SPACED, headers={"content-type": "text/event-stream"})
        answer = request.headers.get("x-answer", "")
        if answer in FAILED:
            return web.Response(body=FAILED[answer],
                                headers={"content-type": "text/event-stream"})
        if answer == "error-then-hang":  # the error event, then nothing until the client goes
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(FAILED["openai-error"].removesuffix(b"data: [DONE]\n\n"))
            for _ in range(1200):  # aiohttp does not cancel a handler whose client left
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.05)
            return resp  # type: ignore[return-value]
        if request.headers.get("x-answer") == "gzip":
            return web.Response(body=GZIPPED, headers={
                "content-type": "text/event-stream", "content-encoding": "gzip"})
        return web.json_response(ANSWER)


@pytest.fixture(scope="module")
def backend() -> Iterator[Unstreaming]:
    server = Unstreaming()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, backend: Unstreaming) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("unstreaming"),
                     upstream=f"http://127.0.0.1:{backend.port}", demo=ROOM) as g:
        yield g


@pytest.fixture(scope="module")
def envoy_gw(tmp_path_factory: pytest.TempPathFactory, backend: Unstreaming,
             ) -> Iterator[Gateway]:
    """Streams metered by Envoy's Lua meter (`stream_metering: envoy`)."""
    with run_gateway(tmp_path_factory.mktemp("unstreaming-envoy"),
                     upstream=f"http://127.0.0.1:{backend.port}", demo=ROOM,
                     envoy={"stream_metering": "envoy"}) as g:
        yield g


# Room for every chunk of `many` (4,000): a usage past what max_tokens allows is a
# misreport, and one below the chunks no count.
ROOM = {"max_tokens": 4096}


def whole_hold(gw: Gateway) -> tuple[int, int]:
    endpoint = lookup("POST", "/v1/chat/completions")
    assert endpoint is not None
    req = parse_request(json.dumps(CHAT).encode(), endpoint, load_config(gw.config_path))
    return req.prompt_bound, req.completion_bound


def send(gw: Gateway, answer: str, key: str = METERED_SECRET, stream: bool = True,
         usage: bool = False, max_tokens: int = 5) -> tuple[httpx.Response, dict[str, Any]]:
    body: dict[str, Any] = {**CHAT, "stream": stream, "max_tokens": max_tokens}
    if usage:
        body["stream_options"] = {"include_usage": True}
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", json=body,
                   timeout=30,
                   headers={"authorization": f"Bearer {key}", "x-answer": answer,
                            "accept-encoding": "identity"})
    [rec] = records_for(gw, r.headers["x-request-id"])
    return r, rec


def assert_slot_free(gw: Gateway) -> None:
    r, rec = send(gw, "json")
    assert r.status_code == 200 and rec["status"] == 200, r.text


def test_a_stream_answered_with_json_is_charged_its_usage(gw: Gateway) -> None:
    r, rec = send(gw, "json")
    assert (r.status_code, r.json()) == (200, ANSWER)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (12, 3, False)
    assert_slot_free(gw)


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_gzipped_stream_is_charged_its_whole_hold(
        meter: str, usage: bool, request: pytest.FixtureRequest) -> None:
    """Envoy's Lua meter held a gzipped stream's bytes for a blank line that never came:
    the client that did not ask for usage got an empty 200, and either client's record
    said 0 completion tokens for a stream the client read whole. Both meters pass it as
    sent and charge the whole hold."""
    gw: Gateway = request.getfixturevalue(meter)
    r, rec = send(gw, "gzip", SECRET, usage=usage)
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"  # as the backend sent it
    assert r.content == gzip.decompress(GZIPPED)  # (httpx decoded it)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
            rec["status"]) == (*whole_hold(gw), True, 200)


@pytest.mark.parametrize("answer", sorted(UNENDED))
@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_stream_that_ends_inside_an_event_reaches_the_client_whole(
        meter: str, usage: bool, answer: str, request: pytest.FixtureRequest) -> None:
    """Envoy's Lua meter dropped the bytes after a stream's last blank line (a final
    `data: [DONE]` with one LF or none), and a stream of events a single LF apart reached
    the client as nothing, charged 0 completion tokens. The client gets every byte (the
    usage chunk left out when it did not ask), the usage chunk before the unended tail
    counts, and a body with no ended event is charged its whole hold, as ext_proc
    metering does."""
    gw: Gateway = request.getfixturevalue(meter)
    r, rec = send(gw, answer, SECRET, usage=usage)
    sent = UNENDED[answer]
    assert r.status_code == 200
    if answer == "single-lf":  # one event, never ended: nothing read, nothing stripped
        assert r.content == sent
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
                rec["status"]) == (*whole_hold(gw), True, 200)
        return
    assert r.content == (sent if usage else sent.replace(USAGE_EVENT, b""))
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
            rec["status"]) == (12, 3, False, 200)


def test_envoys_meter_passes_a_json_answer_and_charges_its_hold(envoy_gw: Gateway) -> None:
    """Envoy's Lua meter reads event streams only: a JSON answer held until a blank line
    that never came reached the client as an empty 200. It passes untouched, and the
    record is the whole hold (the meter read nothing)."""
    r, rec = send(envoy_gw, "json")
    assert (r.status_code, r.json()) == (200, ANSWER)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"],
            rec["status"]) == (*whole_hold(envoy_gw), True, 200)
    r, rec = send(envoy_gw, "json")  # the key's one slot came back
    assert r.status_code == 200 and rec["status"] == 200


@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_stream_written_with_spaces_is_estimated_from_its_events(
        meter: str, request: pytest.FixtureRequest) -> None:
    """Envoy's Lua meter matched `"content":"` only: a server writing `"content": "a"`
    was counted as generating nothing. Both meters count its three events."""
    gw: Gateway = request.getfixturevalue(meter)
    r, rec = send(gw, "spaced", SECRET)
    assert r.status_code == 200 and r.content == SPACED
    assert (rec["completion_tokens"], rec["estimated"]) == (3, True)


def test_a_backend_error_with_no_body_is_openai_shaped_and_charges_nothing(
        gw: Gateway) -> None:
    """A 500 with an empty body: no body message reached ext_proc, so the client got a
    502 with an empty body and the record said 499 with the prompt charged. It is a 502
    upstream_error, and the record keeps the backend's 500, with nothing charged."""
    r, rec = send(gw, "empty500", SECRET)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
    assert (rec["status"], rec["total_tokens"], rec["estimated"]) == (500, 0, False)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_an_empty_success_is_a_502_charged_its_whole_hold(
        meter: str, stream: bool, request: pytest.FixtureRequest) -> None:
    """A 200 with no body (content-length 0): no body message
    reached ext_proc, so the client got an empty 200 (no SDK parses it) and the record
    said 499 with the prompt estimated. The client gets a 502 upstream_error saying the
    backend sent no answer; the one record says 502 and charges the whole hold,
    estimated (as a 2xx answer whose usage cannot be read: vLLM answers once it has
    generated). The key's one slot comes back."""
    gw: Gateway = request.getfixturevalue(meter)
    r, rec = send(gw, "empty200", SECRET, stream)  # k-main: k-metered's tpm is too small
    assert r.status_code == 502, (r.headers, r.content)
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "upstream_error" and "no answer" in err["message"], err
    # Charged its whole hold: an SDK's retries would each be charged as much again.
    assert r.headers["x-should-retry"] == "false"
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"], rec["stream"]) == (502, *whole_hold(gw), True, stream)


@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_streams_the_backend_resets_at_once_are_recorded_as_the_client_got_them(
        meter: str, request: pytest.FixtureRequest) -> None:
    """Final retest: streams reset by their backend right after its 200, many at once,
    with Envoy metering: some were cut as Envoy passed the 200 on, before ext_proc had
    the response headers, and their clients got Envoy's 502 while the record said 499.
    Each request's one record says the status its client got."""
    gw: Gateway = request.getfixturevalue(meter)

    def one(_: int) -> tuple[int, dict[str, Any]]:
        with httpx.Client(timeout=30) as c:
            try:
                with c.stream("POST", f"{gw.base_url}/v1/chat/completions", json=CHAT,
                              headers={"authorization": f"Bearer {SECRET}",
                                       "x-answer": "reset"}) as r:
                    for _ in r.iter_bytes():
                        pass
            except httpx.HTTPError:
                pass  # the stream cut after its 200: what the client got is that 200
            [rec] = records_for(gw, r.headers["x-request-id"])
            return r.status_code, rec

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(24)))
    assert [(status, rec["status"] == status if status >= 500 else rec["status"] == 499)
            for status, rec in got] == [(status, True) for status, _ in got]


@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_204_is_an_empty_success(meter: str, request: pytest.FixtureRequest) -> None:
    """A 204 has no content-length, and no body by definition: it reached the client
    as a bare 204, recorded as a client that left (499). It is the empty success above."""
    gw: Gateway = request.getfixturevalue(meter)
    r, rec = send(gw, "204", SECRET, False)
    assert r.status_code == 502 and "no answer" in r.json()["error"]["message"]
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"]) == (502, *whole_hold(gw), True)


@pytest.mark.parametrize("answer", ["302", "304"])
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_redirect_is_a_502_that_charges_nothing(answer: str, meter: str,
                                                  request: pytest.FixtureRequest) -> None:
    """A backend's redirect reached the client as sent (an SDK following it sends its
    key elsewhere; a 304 was recorded as a client that left). It is a 502 naming the
    redirect, without its location; the record says 502 and charges nothing: no
    answer was generated here."""
    gw: Gateway = request.getfixturevalue(meter)
    for stream in (False, True):
        r, rec = send(gw, answer, SECRET, stream)
        assert r.status_code == 502, (r.headers, r.content)
        assert "location" not in r.headers
        err = r.json()["error"]
        assert err["code"] == "upstream_error" and f"HTTP {answer}" in err["message"], err
        assert (rec["status"], rec["total_tokens"], rec["cost_usd"]) == (502, 0, "0")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_chunked_empty_success_is_charged_its_whole_hold(
        meter: str, stream: bool, request: pytest.FixtureRequest) -> None:
    """A 200 with a chunked body that has no chunk: its headers reach the client before
    its end is seen (holding every answer's headers for that would cost each request an
    ext_proc message), so the client gets the empty 200 as sent. Its record is a 2xx
    whose usage cannot be read: the whole hold, estimated. A stream was charged its
    prompt and 0 completion tokens (no event was read: the meter took "no bytes" for
    "nothing generated")."""
    gw: Gateway = request.getfixturevalue(meter)
    r, rec = send(gw, "chunked200", SECRET, stream)
    assert (r.status_code, r.content) == (200, b"")
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"]) == (200, *whole_hold(gw), True)


@pytest.mark.parametrize(("answer", "status"), [("old-error", 503), ("openai-error", 500),
                                               ("big-error", 503), ("big-error-nested", 500),
                                               ("big-error-escaped", 500)])
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_stream_that_ends_in_an_error_event_records_its_status(
        meter: str, answer: str, status: int, request: pytest.FixtureRequest) -> None:
    """A stream that fails after two content events (older vLLM's `"object": "error"`
    with no `[DONE]`; OpenAI's shape, whose code is a name): recorded as 200, a success.
    Both meters record the event's status (500 for a code that is not one), charged as
    a cut stream: the two events seen, estimated. The client gets it as sent."""
    gw: Gateway = request.getfixturevalue(meter)
    r, rec = send(gw, answer, SECRET)
    assert (r.status_code, r.content) == (200, FAILED[answer])
    assert (rec["status"], rec["completion_tokens"], rec["estimated"]) == (status, 2, True)


@pytest.mark.parametrize(("answer", "status"), [("failed", 429), ("error", 500)])
def test_a_failed_responses_stream_records_its_status(gw: Gateway, answer: str,
                                                       status: int) -> None:
    """A Responses stream that ends in `response.failed` (or an `error` event) was
    recorded 200, a success: the record says the failure's status (by its code: a
    `rate_limit_exceeded` 429, `server_error` 500), charged as a cut stream."""
    r = httpx.post(f"{gw.base_url}/v1/responses", timeout=30,
                   json={"model": "demo", "input": "hi", "max_output_tokens": 5,
                         "stream": True},
                   headers={"authorization": f"Bearer {SECRET}", "x-answer": answer})
    assert (r.status_code, r.content) == (200, RESPONSES_FAILED[answer])
    [rec] = records_for(gw, r.headers["x-request-id"])
    assert (rec["status"], rec["completion_tokens"], rec["estimated"]) == (status, 2, True)


@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_client_that_leaves_after_the_error_event_keeps_its_status(
        meter: str, request: pytest.FixtureRequest) -> None:
    """The client reads the error event and leaves while the backend holds the stream
    open: the record says the backend's failure (500), not 499 (the client left): the
    stream had failed before. Envoy's meter reports the event as it passes."""
    gw: Gateway = request.getfixturevalue(meter)
    with httpx.stream("POST", f"{gw.base_url}/v1/chat/completions", json=CHAT, timeout=30,
                      headers={"authorization": f"Bearer {SECRET}",
                               "x-answer": "error-then-hang"}) as r:
        seen = b""
        for part in r.iter_raw():
            seen += part
            if b'"error"' in seen and seen.endswith(b"\n\n"):
                break
        rid = r.headers["x-request-id"]
    [rec] = records_for(gw, rid)
    assert (rec["status"], rec["completion_tokens"], rec["estimated"]) == (500, 2, True)


@pytest.mark.parametrize(("answer", "status"), [("gz400", 400), ("gz500", 502)])
def test_a_gzipped_error_keeps_its_message(answer: str, status: int, gw: Gateway) -> None:
    """A backend error gzipped although the gateway asked for identity reached the
    client as "with no message" (the bytes were read compressed). Its message is kept;
    nothing is charged."""
    for stream in (False, True):
        r, rec = send(gw, answer, SECRET, stream)
        assert r.status_code == status
        assert "content-encoding" not in r.headers
        assert "maximum context length is 2048" in r.json()["error"]["message"], r.text
        assert (rec["total_tokens"], rec["cost_usd"]) == (0, "0")


@pytest.mark.parametrize("answer", sorted(NO_CONTENT))
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_a_stream_with_nothing_generated_is_charged_alike_by_both_meters(
        meter: str, answer: str, request: pytest.FixtureRequest) -> None:
    """Envoy's meter charged an event stream with no event (empty, or a comment alone)
    its prompt and 0 completion tokens where ext_proc charged the whole hold, and a
    `[DONE]` with a stray line end after it the whole hold where ext_proc charged the
    prompt (a review). Both meters: no event read, the whole hold; `[DONE]` read, no
    completion token."""
    gw: Gateway = request.getfixturevalue(meter)
    for usage in (False, True):
        r, rec = send(gw, answer, SECRET, usage=usage)
        assert (r.status_code, r.content) == (200, NO_CONTENT[answer])
        prompt, completion = whole_hold(gw)
        want = (prompt, 0) if answer == "done-extra-lf" else (prompt, completion)
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (
            *want, True), (answer, usage)



@pytest.mark.parametrize("answer", sorted(ALIKE))
@pytest.mark.parametrize("meter", ["gw", "envoy_gw"])
def test_both_meters_read_these_streams_alike(meter: str, answer: str,
                                              request: pytest.FixtureRequest) -> None:
    """Streams2 tester, Envoy's meter only: a chunk with choices and usage after the
    usage chunk replaced its counts; a stream sent as text/plain kept its usage chunk and
    was charged its hold; a nested `"usage"` key was stripped and read as the usage; a
    `[DONE]` after a long `id:` line was not read; and many events in one read cost the
    square of its size. Both meters now agree, exactly."""
    gw: Gateway = request.getfixturevalue(meter)
    body, usage_event, (prompt, completion) = ALIKE[answer]
    for usage in (False, True):
        # (room for every chunk of `many`: a usage past max_tokens is a misreport)
        r, rec = send(gw, answer, SECRET, usage=usage, max_tokens=4096)
        want = body if usage or not usage_event else body.replace(usage_event, b"", 1)
        assert (r.status_code, r.content) == (200, want), (answer, usage)
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (
            prompt, completion, False), (answer, usage)


@pytest.mark.parametrize("answer", sorted(MALFORMED_USAGE))
def test_a_usage_chunk_with_no_count_is_stripped_and_estimated_by_both_meters(
        answer: str, gw: Gateway, envoy_gw: Gateway) -> None:
    """Hostile-backend tester: a usage-only chunk whose usage is no count reached a
    client that had not asked for usage (through neither meter, or one). Both strip it
    and estimate the stream alike: its prompt's bound and the three content events."""
    body = _HI * 3 + MALFORMED_USAGE[answer] + b"data: [DONE]\n\n"
    for g in (gw, envoy_gw):
        for usage in (False, True):
            r, rec = send(g, answer, SECRET, usage=usage)
            want = body if usage else _HI * 3 + b"data: [DONE]\n\n"
            assert (r.status_code, r.content) == (200, want), (answer, usage)
            assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (
                whole_hold(g)[0], 3, True), (answer, usage, g is envoy_gw)


def test_a_finished_stream_without_usage_is_estimated_alike_by_both_meters(
        gw: Gateway, envoy_gw: Gateway) -> None:
    """Streams2 tester: a body that ended after 3 content events, with no usage and no
    `[DONE]`, was charged 3 completion tokens by ext_proc's meter and 6 by Envoy's (the
    report's `ended` never reached the meter, so an abort's steps were added)."""
    got = []
    for g in (gw, envoy_gw):
        r, rec = send(g, "no-done", SECRET)
        assert (r.status_code, r.content) == (200, _HI * 3)
        got.append((rec["completion_tokens"], rec["estimated"]))
    assert got == [(3, True), (3, True)]


def test_envoys_reports_of_big_usage_events_all_arrive(envoy_gw: Gateway) -> None:
    """Twenty streams at once, each ending in a usage chunk of a megabyte: Envoy dropped
    most of their reports (its access log's stream overflowed), and each waited for its
    hold's lease, its key's slot held (hostile-backend retest). Each is recorded, exact."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(20) as pool:
        done = list(pool.map(lambda _: send(envoy_gw, "big-usage", SECRET, max_tokens=64),
                             range(20)))
    for r, rec in done:
        assert r.status_code == 200 and b'"x": "aaa' not in r.content
        assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (
            12, 3, False)
