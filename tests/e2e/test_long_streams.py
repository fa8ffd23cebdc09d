"""Long streams: a stream is bounded by an idle timeout and a maximum duration, not by the
route timeout, which bounds non-streaming responses. A stream the gateway cuts is
recorded as 504, not as the client's 499.

One gateway with short limits: route 1 s, stream idle 1 s, stream at most 4 s. The
simulator paces each request's tokens (`x-sim-tpot-ms`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest

from authz.state.usage.records import USAGE_FILE, read_records
from policy.stream_pace import ABORT_STEPS
from tests.e2e.conftest import Gateway, run_gateway

pytestmark = pytest.mark.e2e
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a long story."}]
ROUTE_S, IDLE_S, MAX_S = 1.0, 1.0, 4.0
GATEWAY_TIMEOUT = 504


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("gw-long"), envoy={
            "route_timeout_s": ROUTE_S, "stream_idle_timeout_s": IDLE_S,
            "max_stream_duration_s": MAX_S}) as g:
        yield g


def record(gw: Gateway, request_id: str) -> dict[str, Any]:
    """The one record of a request (written when its ext_proc stream ends)."""
    deadline = time.monotonic() + 5
    while True:
        got = [r for r in read_records(gw.data_dir / USAGE_FILE)
               if r["request_id"] == request_id]
        if got or time.monotonic() > deadline:
            assert len(got) == 1, got
            return got[0]
        time.sleep(0.05)


def stream(gw: Gateway, tpot_ms: int, max_tokens: int) -> tuple[str, int, Exception | None,
                                                                 float]:
    """Read a paced stream to its end: request id, content chunks, the error that ended
    it early (None if whole), seconds taken."""
    t0 = time.monotonic()
    raw = gw.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=max_tokens, stream=True,
        extra_headers={"x-sim-tpot-ms": str(tpot_ms)})
    chunks, error = 0, None
    try:
        for chunk in raw.parse():
            chunks += sum(1 for c in chunk.choices if c.delta.content)
    except (openai.APIError, httpx2.HTTPError) as e:
        error = e
    return raw.headers["x-request-id"], chunks, error, time.monotonic() - t0


def test_a_stream_that_keeps_producing_outlives_the_route_timeout(gw: Gateway) -> None:
    rid, chunks, error, took = stream(gw, tpot_ms=100, max_tokens=25)  # ~2.5 s
    assert error is None and chunks == 25
    assert took > 2 * ROUTE_S
    rec = record(gw, rid)
    assert (rec["status"], rec["estimated"], rec["completion_tokens"]) == (200, False, 25)


def test_a_non_streaming_response_is_bounded_by_the_route_timeout(gw: Gateway) -> None:
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(
            model="demo", messages=MESSAGES, max_tokens=25,
            extra_headers={"x-sim-tpot-ms": "100"})
    assert time.monotonic() - t0 < ROUTE_S + 1
    assert e.value.status_code == GATEWAY_TIMEOUT
    rec = record(gw, e.value.response.headers["x-request-id"])
    assert rec["status"] == GATEWAY_TIMEOUT


def test_a_stalled_stream_is_cut_by_the_idle_timeout_and_recorded_504(gw: Gateway) -> None:
    rid, chunks, error, took = stream(gw, tpot_ms=4000, max_tokens=3)  # silent after one
    assert error is not None, "the stalled stream was not cut"
    # Cut in the first 4 s silence: the client's SDK sees the connection end mid-body.
    assert isinstance(error, openai.APIConnectionError), repr(error)
    assert chunks == 1 and IDLE_S <= took < 4
    rec = record(gw, rid)
    assert rec["status"] == GATEWAY_TIMEOUT, rec
    # The chunk, and the steps before an abort, up to its max_tokens.
    assert (rec["estimated"], rec["completion_tokens"]) == (True, min(3, 1 + ABORT_STEPS))


def test_a_stream_past_its_maximum_duration_is_cut_and_recorded_504(gw: Gateway) -> None:
    rid, chunks, error, took = stream(gw, tpot_ms=200, max_tokens=50)  # would take ~10 s
    assert error is not None, "the stream outlived max_stream_duration_s"
    assert MAX_S <= took < MAX_S + 2 and 0 < chunks < 50
    rec = record(gw, rid)
    assert rec["status"] == GATEWAY_TIMEOUT, rec
    # What the chunks carried, and the moment since the last at its pace (~200 ms: a
    # token or two at twice 5 a second).
    assert rec["estimated"] is True and \
        chunks <= rec["completion_tokens"] <= chunks + 3 + ABORT_STEPS
