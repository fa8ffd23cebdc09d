"""Fuzzing request bodies through the real gateway (issue 18 part 4): Envoy, `tokenbooth
serve` and the simulator, a valid key with a budget. Hypothesis draws the requests:
valid, near-valid and garbage bodies for every metered endpoint (wrong types, huge and
negative numbers, unicode, nested junk, missing and extra fields, bytes that are not
JSON, wrong content types), sent concurrently in batches.

Every answer: no 5xx (the simulator never fails unless asked, so a 5xx is the
gateway's own), and every error OpenAI-shaped (`{"error": {"message", "type", ...}}`).
After the run: no hold left in the key's ledger and no drift (`tokenbooth audit`), and
no "Traceback" in any process log.

TOKENBOOTH_FUZZ_CASES sets the number of requests (default 3,000; `make soak` sends
100,000). A failing batch is reported as is (no shrinking: each case is an HTTP round
trip), with each bad request's method, path, content type and body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_money_faults import audit_settled, budget_key
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

CASES = int(os.environ.get("TOKENBOOTH_FUZZ_CASES", "3000"))
BATCH = 10  # requests drawn per example and sent at once
KEY = "sk-tb-test-fuzz-0123456789abcdefghijklmnopqrstu"
KEY_ID = "k-fuzz"

POST_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
              "/v1/rerank", "/v1/score", "/tokenize", "/detokenize",
              "/v1/audio/transcriptions")
CONTENT_TYPES = ("application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/octet-stream", "")


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    content_type: str
    body: bytes

    def __str__(self) -> str:
        return f"{self.method} {self.path} [{self.content_type!r}] {self.body[:300]!r}"


# -- strategies --------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=20))
junk = st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                    | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
models = st.sampled_from(["demo", "other", "nope", "", "tiny-llama"]) | junk
counts = st.integers(-3, 300) | st.sampled_from([0, 2**31, 2**63, 10**30, -(2**63)]) | junk
texts = st.text(max_size=40) | st.sampled_from(["hello", "\x00", "\ud7ff" * 5, "é" * 30])
message = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | junk,
                  "content": texts | st.lists(st.fixed_dictionaries(
                      {"type": st.just("text"), "text": texts}), max_size=2) | junk})
common = {"max_tokens": counts, "stream": st.booleans() | junk, "n": counts,
          "stream_options": st.fixed_dictionaries({}, optional={
              "include_usage": st.booleans() | junk}) | junk,
          "temperature": st.floats() | junk, "best_of": counts, "user": junk,
          "max_completion_tokens": counts, "extra_field": junk}
prompts = texts | st.lists(texts, max_size=3) | st.lists(st.integers(-5, 2**40), max_size=5)

BODIES: dict[str, Any] = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {}, optional={"model": models, "messages": st.lists(message, max_size=3) | junk,
                      **common}),
    "/v1/completions": st.fixed_dictionaries(
        {}, optional={"model": models, "prompt": prompts | junk, **common}),
    "/v1/embeddings": st.fixed_dictionaries(
        {}, optional={"model": models, "input": prompts | junk, "dimensions": counts,
                      "encoding_format": st.sampled_from(["float", "base64"]) | junk}),
    "/v1/responses": st.fixed_dictionaries(
        {}, optional={"model": models, "input": texts | st.lists(message, max_size=2) | junk,
                      "max_output_tokens": counts, "stream": st.booleans() | junk,
                      "instructions": texts | junk}),
    "/v1/rerank": st.fixed_dictionaries(
        {}, optional={"model": models, "query": texts | junk,
                      "documents": st.lists(texts, max_size=3) | junk, "top_n": counts}),
    "/v1/score": st.fixed_dictionaries(
        {}, optional={"model": models, "text_1": prompts | junk, "text_2": prompts | junk}),
    "/tokenize": st.fixed_dictionaries(
        {}, optional={"model": models, "prompt": prompts | junk,
                      "messages": st.lists(message, max_size=2) | junk}),
    "/detokenize": st.fixed_dictionaries(
        {}, optional={"model": models, "tokens": st.lists(counts, max_size=4) | junk}),
    "/v1/audio/transcriptions": st.fixed_dictionaries({}, optional={"model": models,
                                                                    "file": junk}),
}


def _dumps(value: Any) -> bytes:
    """JSON text; NaN and the infinities as Python writes them (not JSON: near-valid)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def cases(draw: st.DrawFn) -> Case:
    path = draw(st.sampled_from(POST_PATHS))
    how = draw(st.sampled_from(["shaped"] * 6 + ["junk", "bytes", "cut", "get"]))
    if how == "get":
        return Case("GET", draw(st.sampled_from(["/v1/models", "/v1/models/demo"])
                                | st.text("abc-/%.", max_size=12).map(
                                    lambda s: f"/v1/models/{s}")), "", b"")
    content_type = draw(st.sampled_from(CONTENT_TYPES[:2]) | st.sampled_from(CONTENT_TYPES))
    if how == "bytes":
        body = draw(st.binary(max_size=300))
    elif how == "junk":
        body = _dumps(draw(junk))
    else:
        body = _dumps(draw(BODIES[path]))
        if how == "cut":  # near-valid JSON: truncated, or trailing garbage
            body = body[:draw(st.integers(0, len(body)))] + draw(st.binary(max_size=8))
    return Case("POST", path, content_type, body)


# Bodies the fuzz found wrong answers for once (kept as explicit cases: they run first).
FOUND = [
    Case("POST", "/v1/embeddings", "application/json",
         b'{"model": "demo", "input": "hello", "encoding_format": []}'),
    Case("POST", "/v1/embeddings", "application/json",
         b'{"model": "demo", "input": "hello", "encoding_format": {"a": 1}}'),
    Case("POST", "/tokenize", "application/json", b'{"model": "demo", "messages": [null]}'),
    Case("POST", "/tokenize", "application/json", b'{"model": "other", "messages": [[1]]}'),
    Case("POST", "/v1/embeddings", "application/json",
         b'{"model": "demo", "input": "hello", "dimensions": 2147483648}'),
]


# -- sending and judging -------------------------------------------------------------------


def send(http: httpx.Client, case: Case) -> httpx.Response | str:
    """The answer, or why none came."""
    headers = {"authorization": f"Bearer {KEY}"}
    if case.content_type:
        headers["content-type"] = case.content_type
    try:
        return http.request(case.method, case.path, content=case.body or None,
                            headers=headers)
    except httpx.HTTPError as e:
        return f"no answer: {type(e).__name__}: {e}"


def problem(resp: httpx.Response | str) -> str | None:
    """What is wrong with an answer, or None."""
    if isinstance(resp, str):
        return resp
    if resp.status_code >= 500:
        return f"status {resp.status_code}: {resp.text[:300]!r}"
    if resp.status_code < 400:
        return None
    try:
        err = resp.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"status {resp.status_code}, not an OpenAI error: {resp.text[:300]!r}"
    if not (isinstance(err, dict) and isinstance(err.get("message"), str)
            and isinstance(err.get("type"), str)):
        return f"status {resp.status_code}, error without message and type: {err!r}"
    return None


def tracebacks(logs: Path) -> list[str]:
    """Log lines with "Traceback" in the gateway's logs and the simulator's."""
    return [f"{p.name}: {line[:300]}"
            for p in sorted([*logs.glob("*.log"), logs.parent.parent / "sim.log"])
            for line in p.read_text(errors="replace").splitlines() if "Traceback" in line]


# The simulator runs with its address space capped: a body that makes it allocate without
# bound (a huge `n`, `dimensions`...) then fails there, not the machine.
SIM_MEMORY = 1 << 30
_LIMITED = ("import resource, runpy; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({SIM_MEMORY}, {SIM_MEMORY})); "
            "runpy.run_module('authz.cli', run_name='__main__')")


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("fuzz")
    sim_listen = f"127.0.0.1:{free_port()}"
    with (root / "sim.log").open("wb") as log:
        sim = spawn([sys.executable, "-c", _LIMITED, "sim", "--listen", sim_listen,
                     "--model", "tiny-llama", "--model", "tiny-llama-2"],
                    stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: http_ok(f"http://{sim_listen}/health"), "sim", alive=[sim])
        (root / "gw").mkdir()
        with run_gateway(root / "gw", upstream=f"http://{sim_listen}",
                         keys=[budget_key(KEY_ID, KEY, "1000000")]) as gw:
            yield gw
    finally:
        stop([sim])


@pytest.mark.timeout(120 + CASES // 10)
def test_fuzzed_requests_get_openai_errors_and_leave_nothing_held(
        fuzz_gateway: Gateway) -> None:
    gw = fuzz_gateway
    sent: list[int] = []
    with httpx.Client(base_url=gw.base_url, timeout=30) as http, \
            ThreadPoolExecutor(BATCH) as pool:

        @settings(max_examples=max(1, CASES // BATCH), deadline=None, database=None,
                  derandomize=True, phases=(Phase.explicit, Phase.generate),
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(cases(), min_size=BATCH, max_size=BATCH))
        @example(FOUND)
        def batch(batch_cases: list[Case]) -> None:
            answers = list(pool.map(lambda c: send(http, c), batch_cases))
            sent.append(len(answers))
            bad = [f"{c} -> {p}" for c, r in zip(batch_cases, answers, strict=True)
                   if (p := problem(r)) is not None]
            assert not bad, "\n".join(bad)

        batch()
    assert sum(sent) >= CASES * 0.9, f"only {sum(sent)} requests sent"
    audit_settled(gw.config_path, KEY_ID, wait=15)
    assert not tracebacks(gw.logs), tracebacks(gw.logs)
