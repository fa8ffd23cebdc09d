"""vLLM's continuous_usage_stats through the gateway: each chunk's usage is its own
choice's, so a stream cut before the usage-only chunk is estimated, never charged the
last chunk's one-choice count."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from authz.sim.tokens import prompt_tokens_chat
from policy.stream_pace import ABORT_STEPS
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_gateway import records_for

MESSAGES: list[Any] = [{"role": "user", "content": "Count to ten, please."}]


@pytest.fixture(scope="module", params=["ext_proc", "envoy"])
def metered(request: pytest.FixtureRequest, gateway: Gateway,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The session's gateway (the services meter streams), and one whose Envoy does."""
    if request.param == "ext_proc":
        yield gateway
        return
    with run_gateway(tmp_path_factory.mktemp("gw-envoy-continuous"),
                     envoy={"stream_metering": "envoy"}) as gw:
        yield gw


def test_a_cut_stream_with_continuous_usage_is_estimated(metered: Gateway) -> None:
    gateway = metered
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=50, n=4, stream=True,
        extra_body={"stream_options": {"include_usage": True,
                                       "continuous_usage_stats": True}},
        # Slow enough that the client has the headers before the backend dies.
        extra_headers={"x-sim-cut-after": "8", "x-sim-tpot-ms": "50"})
    rid = raw.headers["x-request-id"]
    received = 0
    with pytest.raises(openai.APIError):
        for chunk in raw.parse():
            # Every chunk says one choice's count so far: at most 2 tokens here.
            assert chunk.usage is not None and chunk.usage.completion_tokens <= 2
            received += any(c.delta.content for c in chunk.choices)
    [rec] = records_for(gateway, rid)
    # 8 token chunks of 4 choices were sent (the last may be lost with the cut): the
    # chunks counted, not the last chunk's 2; and the moment before the cut at the pace
    # of the 4 choices (a step of each, doubled, at most), and each choice's steps
    # before the abort lands.
    assert rec["estimated"] and max(3, received) <= rec["completion_tokens"] <= \
        8 + 2 * 4 + 4 * ABORT_STEPS, (
        rec["completion_tokens"], received)
    assert rec["prompt_tokens"] == prompt_tokens_chat(MESSAGES)
