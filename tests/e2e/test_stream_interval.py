"""vLLM's `stream_interval` as a model setting: the gateway writes it into streams, so a
stream of N tokens reaches the gateway (and its ext_proc) in about N/8 chunks, while the
usage stays exact and a stream cut short is charged 8 tokens per chunk seen."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_gateway import last_upstream, records_for

pytestmark = pytest.mark.e2e
MESSAGES: list[Any] = [{"role": "user", "content": "Count for me."}]
INTERVAL = 8


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("gw-interval"),
                     demo={"stream_interval": INTERVAL}) as g:
        yield g


def test_grouped_stream_is_metered_exactly_and_hides_the_usage_chunk(gw: Gateway) -> None:
    raw = gw.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=41, stream=True)
    chunks = list(raw.parse())
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 1 + 40 // INTERVAL  # the first token alone, then 8 a chunk
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    assert json.loads(last_upstream(gw)["body"])["stream_interval"] == INTERVAL
    [rec] = records_for(gw, raw.headers["x-request-id"])
    assert (rec["completion_tokens"], rec["estimated"], rec["status"]) == (41, False, 200)


def test_a_stream_left_early_is_charged_per_chunk_seen(gw: Gateway) -> None:
    raw = gw.client().chat.completions.with_raw_response.create(
        model="demo", messages=MESSAGES, max_tokens=200, stream=True,
        extra_headers={"x-sim-tpot-ms": "20"})
    seen = 0
    stream = raw.parse()
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == 3:  # tokens 0, 1-8, 9-16
                break
    stream.close()
    rid = raw.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while not (recs := records_for(gw, rid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    [rec] = recs
    assert rec["estimated"] is True and rec["status"] == 499, rec
    # Every chunk the gateway saw counts 8 (Envoy may have read one or two past the
    # client), and the moment before the cut at its pace: never less than what was
    # delivered, never more than the bound.
    assert 3 * INTERVAL <= rec["completion_tokens"] <= 200
