"""What a request that Envoy or the services' own stop cut short is charged, with the
real processes (Envoy, `tokenbooth serve`, the simulator):

- Envoy's route timeout ends a non-streaming request with its own 504: the backend had
  the request, so the record estimates it (the prompt), never zero as for a backend's
  refusal.
- `serve` gets SIGTERM with a stream longer than its shutdown grace (10 s): the server
  cancels the stream and Envoy serves the rest unmetered (on_metering_loss: serve), so
  the record charges what the backend could generate (the completion bound, the prompt
  as its /tokenize counts it) with the backend's status, not a 499 of what was seen.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.sim.tokens import prompt_tokens_chat
from policy.config import load_config
from policy.endpoints import lookup
from policy.request import InferenceRequest, parse_request
from policy.stream_pace import ABORT_STEPS
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_money_faults import gone, jsonl_raw, poll, processes, serve_pid, sigkill
from tests.helpers import SECRET

HEADERS = {"authorization": f"Bearer {SECRET}", "content-type": "application/json"}


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    with run_gateway(tmp_path, envoy={"route_timeout_s": 2}) as g:
        yield g


def parsed(gw: Gateway, body: dict[str, Any],
           path: str = "/v1/chat/completions") -> InferenceRequest:
    endpoint = lookup("POST", path)
    assert endpoint is not None
    return parse_request(json.dumps(body).encode(), endpoint, load_config(gw.config_path))


def record_of(gw: Gateway, rid: str, timeout: float = 10) -> dict[str, Any]:
    poll(lambda: any(r["request_id"] == rid for r in jsonl_raw(gw.data_dir)),
         f"the record of {rid}", timeout)
    [rec] = [r for r in jsonl_raw(gw.data_dir) if r["request_id"] == rid]
    return rec


class Reader:
    """A stream read to its end in a thread: `first` once a byte came; then `rid`, `data`."""

    def __init__(self, base_url: str, body: dict[str, Any], tpot_ms: int) -> None:
        self.first = threading.Event()
        self.rid, self.data = "", b""
        self._args = (base_url, body, tpot_ms)
        self._thread = threading.Thread(target=self._read)
        self._thread.start()

    def _read(self) -> None:
        base_url, body, tpot_ms = self._args
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", content=json.dumps(body),
                          timeout=60, headers={**HEADERS, "x-sim-tpot-ms": str(tpot_ms)}) as r:
            self.rid = r.headers["x-request-id"]
            for chunk in r.iter_bytes():
                self.data += chunk
                self.first.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive()


def test_a_route_timeout_is_estimated_not_free(gw: Gateway) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hello " * 50}],
            "max_tokens": 60}
    r = httpx.post(f"{gw.base_url}/v1/chat/completions", content=json.dumps(body),
                   headers={**HEADERS, "x-sim-tpot-ms": "100"}, timeout=30)  # ~6 s > 2 s
    assert r.status_code == 504, r.text
    rec = record_of(gw, r.headers["x-request-id"])
    # vLLM was generating the answer it writes only once whole, and no count of how far
    # it got reaches the gateway: its completion bound, estimated, and its prompt as the
    # backend counts it (its /tokenize, as for a cut stream; it was the prompt's bound).
    req = parsed(gw, body)
    counted = httpx.post(f"{gw.sim_url}/tokenize", json={
        "model": "tiny-llama", "messages": body["messages"]}, timeout=10).json()["count"]
    assert 0 < counted < req.prompt_bound
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"]) == (504, counted, req.completion_bound, True)


def cut_after(gw: Gateway, path: str, body: dict[str, Any], events: int) -> str:
    """Stream `body`, leave after `events` data lines: the request id."""
    with httpx.stream("POST", f"{gw.base_url}{path}", content=json.dumps(body), timeout=30,
                      headers={**HEADERS, "x-sim-tpot-ms": "50"}) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == events:
                break
        return r.headers["x-request-id"]


def test_a_cut_stream_whose_prompt_no_tokenize_counts_is_charged_its_bound(
        gw: Gateway) -> None:
    """A client that takes a few deltas and leaves before the usage event, on a
    Responses request that /tokenize cannot count as the backend rendered it
    (`truncation: auto`: vLLM may cut the prompt). Its prompt is charged at its bound,
    never the byte estimate (~4 bytes a token: a text of ~1 token a byte, emoji here,
    would pay a quarter of what the backend read)."""
    body = {"model": "demo", "input": "\U0001F600" * 100, "max_output_tokens": 50,
            "stream": True, "truncation": "auto"}
    rec = record_of(gw, cut_after(gw, "/v1/responses", body, 4))
    req = parsed(gw, body, "/v1/responses")
    assert (rec["status"], rec["estimated"]) == (499, True)
    assert rec["prompt_tokens"] == req.prompt_bound > 2 * req.prompt_estimate


def test_a_cut_responses_stream_is_charged_the_backends_count(gw: Gateway) -> None:
    """The same Responses request without `truncation`: its instructions and input are
    the chat messages vLLM renders, counted by the backend's /tokenize; the record's
    prompt is what its usage says in full (it was the bound)."""
    body = {"model": "demo", "instructions": "Be brief.", "input": "\U0001F600" * 100,
            "max_output_tokens": 50, "stream": True}
    rec = record_of(gw, cut_after(gw, "/v1/responses", body, 4))
    whole = httpx.post(f"{gw.base_url}/v1/responses", headers=HEADERS, timeout=30,
                       content=json.dumps({**body, "stream": False}))
    prompt = whole.json()["usage"]["input_tokens"]
    assert (rec["status"], rec["estimated"], rec["prompt_tokens"]) == (499, True, prompt)
    req = parsed(gw, body, "/v1/responses")
    assert req.prompt_estimate != prompt < req.prompt_bound


def test_a_cut_batch_of_prompts_is_counted_prompt_by_prompt(gw: Gateway) -> None:
    """A batched completions stream cut short: each prompt is counted by the backend's
    /tokenize, the sum what its usage says in full."""
    body = {"model": "demo", "prompt": ["\U0001F600" * 50, "hello there"],
            "max_tokens": 50, "stream": True}
    rec = record_of(gw, cut_after(gw, "/v1/completions", body, 4))
    whole = httpx.post(f"{gw.base_url}/v1/completions", headers=HEADERS, timeout=30,
                       content=json.dumps({**body, "stream": False, "max_tokens": 1}))
    prompt = whole.json()["usage"]["prompt_tokens"]
    assert (rec["status"], rec["estimated"], rec["prompt_tokens"]) == (499, True, prompt)
    assert prompt != parsed(gw, body, "/v1/completions").prompt_estimate


def test_a_stream_past_the_shutdown_grace_is_charged_its_completion_bound(
        gw: Gateway) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 60, "stream": True}
    reader = Reader(gw.base_url, body, 200)  # ~12 s at 200 ms a token: past the grace
    assert reader.first.wait(10)
    pid = serve_pid(gw.config_path)
    os.kill(pid, signal.SIGTERM)
    reader.join(30)
    poll(lambda: gone(pid), "serve to exit", 20)
    # Envoy served the stream to its end (unmetered past the grace) ...
    assert reader.data.rstrip().endswith(b"data: [DONE]")
    assert reader.data.count(b'"content"') >= 60
    # ... and its one record charges what the backend could generate (nothing timed out,
    # nobody left): the completion bound, and the prompt as the backend counts it (its
    # /tokenize, asked before the services exited), not the prompt's bound.
    rec = record_of(gw, reader.rid, timeout=1)
    req = parsed(gw, body)
    assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
            rec["estimated"]) == (200, prompt_tokens_chat(body["messages"]),
                                  req.completion_bound, True)
    assert rec["prompt_tokens"] < req.prompt_bound


def test_a_backend_never_reached_charges_nothing(tmp_path: Path) -> None:
    """The backend dies (SIGKILL) and nothing listens at its address: Envoy's connect
    fails (502 after its retries, or 503 once the backend is ejected). The backend never
    had the request, so its record charges nothing, as the backend's own refusal does."""
    with run_gateway(tmp_path) as g:
        port = g.sim_url.rsplit(":", 1)[1]
        [sim] = [pid for pid, _, argv in processes()
                 if "sim" in argv and f"127.0.0.1:{port}" in argv]
        sigkill(sim)
        poll(lambda: gone(sim), "the sim gone", 10)
        body = {"model": "demo", "messages": [{"role": "user", "content": "hello " * 50}],
                "max_tokens": 60}
        for stream in (False, True):
            r = httpx.post(f"{g.base_url}/v1/chat/completions",
                           content=json.dumps({**body, "stream": stream}), headers=HEADERS,
                           timeout=30)
            assert r.status_code in (502, 503), r.text
            rec = record_of(g, r.headers["x-request-id"])
            assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
                    rec["cost_usd"], rec["estimated"]) == (r.status_code, 0, 0, "0", False)


def test_a_stream_served_while_serve_stood_still_is_charged_its_whole_hold(
    tmp_path: Path,
) -> None:
    """`serve` frozen (SIGSTOP) mid-stream past Envoy's message timeout: Envoy gives up on
    ext_proc and, failing open, serves the rest unmetered. When serve wakes it finds the
    stream cut; the client did not leave and got every token, so the record charges the
    completion bound (its prompt as the backend counts it), not a 499 of the tokens seen
    before the freeze."""
    with run_gateway(tmp_path, envoy={"decision_timeout_ms": 500}) as g:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 30, "stream": True}
        reader = Reader(g.base_url, body, 100)  # ~3 s at 100 ms a token
        assert reader.first.wait(10)
        pid = serve_pid(g.config_path)
        os.kill(pid, signal.SIGSTOP)
        try:
            reader.join(20)  # the stream ends while serve stands still
        finally:
            os.kill(pid, signal.SIGCONT)
        assert reader.data.rstrip().endswith(b"data: [DONE]")
        assert reader.data.count(b'"content"') >= 30
        rec = record_of(g, reader.rid)
        req = parsed(g, body)
        assert (rec["status"], rec["prompt_tokens"], rec["completion_tokens"],
                rec["estimated"]) == (200, prompt_tokens_chat(body["messages"]),
                                      req.completion_bound, True)


def test_a_json_answer_served_while_serve_stood_still_is_charged_its_whole_hold(
    tmp_path: Path,
) -> None:
    """Overload tester: a JSON request forwarded before `serve` froze, its answer coming
    while it stood still: Envoy gave up on ext_proc and served the answer unmetered (the
    client got its 200 with usage), and the record said the client left (499) with no
    backend, which `audit --vllm` counted as drift. Now it was served out of sight: its
    whole completion bound, its status not known (`lost`), its model's one backend."""
    with run_gateway(tmp_path, envoy={"decision_timeout_ms": 500}) as g:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 30}
        pid = serve_pid(g.config_path)
        out: dict[str, Any] = {}

        def call() -> None:
            out["r"] = httpx.post(f"{g.base_url}/v1/chat/completions",
                                  content=json.dumps(body), timeout=30,
                                  headers={**HEADERS, "x-sim-tpot-ms": "60"})

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.4)  # forwarded; its answer comes ~1.8 s on, while serve stands still
        os.kill(pid, signal.SIGSTOP)
        try:
            t.join(20)
            time.sleep(0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        r = out["r"]
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30
        rec = record_of(g, r.headers["x-request-id"])
        # Alone, serve reads the answer on waking (exact); under load it finds the stream
        # cancelled first (tests/services/test_stood_still.py): the bound, status `lost`.
        # Never a 499 with no backend.
        assert (rec["status"], rec["completion_tokens"], rec["estimated"]) in (
            (200, 30, False), ("lost", parsed(g, body).completion_bound, True)), rec
        assert rec["backend"] == load_config(g.config_path).models["demo"].backends[0].url


def test_a_client_leaving_well_after_a_stall_is_a_499(tmp_path: Path) -> None:
    """serve stands still longer than Envoy's message timeout while none of the stream's
    messages waits (its next token is far off): Envoy never gives up on it, the stream
    goes on metered, and a client that leaves later is a 499 of what it saw (its 1.5 s
    steps are no stall here: limits.stalled_stream_s is raised past them)."""
    with run_gateway(tmp_path, envoy={"decision_timeout_ms": 500},
                     limits={"stalled_stream_s": 10}) as g:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 30, "stream": True}
        pid = serve_pid(g.config_path)
        with httpx.stream("POST", f"{g.base_url}/v1/chat/completions",
                          content=json.dumps(body), timeout=60,
                          headers={**HEADERS, "x-sim-tpot-ms": "1500"}) as r:
            rid, events = r.headers["x-request-id"], 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    os.kill(pid, signal.SIGSTOP)  # just after a token: none waits
                    time.sleep(0.9)
                    os.kill(pid, signal.SIGCONT)
                if events == 6:
                    break  # the client leaves, ~4 s after the stall
        rec = record_of(g, rid)
        assert (rec["status"], rec["estimated"]) == (499, True)
        assert 4 <= rec["completion_tokens"] <= 6 + ABORT_STEPS, rec
