"""The simulator answers as vLLM 0.32 does where tokenbooth reads the answer: the same
bodies go to the real vLLM and to `tokenbooth sim` with the same context length (512),
and the status, the error body's shape, `param` and `type`, and the usage rules (max_tokens
clipping, best_of ignored, n > 1 refused when greedy) must agree. The simulator's own
tokenizer differs, so usage is compared through the rule, not the numbers."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from authz.runtime.procs import http_ok, spawn, stop, wait_until
from authz.sim.responses_api import messages, template_fields
from authz.sim.tokens import prompt_tokens_chat
from tests.helpers import free_port
from tests.vllm.conftest import EMBED_MODEL, MODEL, VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

CONTEXT = 512  # the tier's --max-model-len
HI = [{"role": "user", "content": "hi"}]


@contextlib.contextmanager
def run_sim(*models: str) -> Iterator[str]:
    port = free_port()
    served = [arg for m in models for arg in ("--model", m)]
    proc = spawn([sys.executable, "-m", "authz.cli", "sim", "--listen", f"127.0.0.1:{port}",
                  *served, "--max-model-len", str(CONTEXT)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{url}/health"), "sim", alive=[proc])
        yield url
    finally:
        stop([proc])


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with run_sim(MODEL, "tiny-llama-2") as url:  # as vllm_server serves
        yield url


@pytest.fixture(scope="module")
def embed_sim_url() -> Iterator[str]:
    with run_sim(EMBED_MODEL) as url:
        yield url


def ask(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """Status and JSON body; a stream's chunks as a list of JSON objects."""
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    if not body.get("stream"):
        return status, json.loads(raw)
    events = [e.removeprefix("data: ") for e in raw.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    return status, [json.loads(e) for e in events[:-1]]


def usage_of(got: Any) -> dict[str, int]:
    usage: dict[str, int] = got[-1]["usage"] if isinstance(got, list) else got["usage"]
    return usage


BAD: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "nope", "messages": HI}),
    ("/v1/chat/completions", {"model": MODEL}),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": CONTEXT + 1}),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI,
                              "max_completion_tokens": CONTEXT + 1, "stream": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "n": 2, "temperature": 0}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "x"}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2, "temperature": 0,
                         "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {}}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi",
                         "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * (CONTEXT + 1), "max_tokens": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * CONTEXT, "max_tokens": 1}),
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": CONTEXT + 1}),
    ("/v1/responses", {"model": MODEL, "input": "hi", "previous_response_id": "resp_x"}),
    ("/tokenize", {"model": "nope", "prompt": "hi"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}),
    ("/v1/completions", {"model": MODEL, "prompt": ""}),
    ("/v1/completions", {"model": MODEL, "prompt": []}),
    ("/v1/completions", {"model": MODEL, "prompt": [[]]}),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", ""]}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}),
    # pydantic's lax mode: all accepted
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2.0, "n": "2",
                         "stream": "true", "stream_options": {"include_usage": "yes"}}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("/v1/responses", {"model": MODEL, "input": []}),
    ("/v1/responses", {"model": MODEL, "input": [], "instructions": "Hi.",
                       "max_output_tokens": 1}),
    ("/v1/responses", {"model": MODEL, "input": "hi", "temperature": -1}),
    ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 0}),
]


@pytest.mark.parametrize(("path", "body"), BAD)
def test_errors_match(vllm_server: VllmServer, sim_url: str, path: str,
                      body: dict[str, Any]) -> None:
    """Same status; on an error, vLLM 0.32's `{"error": {message, type, param, code}}` with
    the same type and param (and, where it is not a tokenizer's count or pydantic's
    wording, the same message)."""
    same_answer(vllm_server.url, sim_url, path, body)


POOLING_BAD: list[tuple[str, dict[str, Any]]] = [
    ("/v1/embeddings", {"model": "nope", "input": "a"}),
    ("/rerank", {"model": "nope", "query": "a", "documents": ["b"]}),
    ("/score", {"model": "nope", "queries": "a", "documents": ["b"]}),
    ("/tokenize", {"model": "nope", "prompt": "a"}),
    ("/v1/embeddings", {"model": EMBED_MODEL, "input": []}),
    ("/v1/embeddings", {"model": EMBED_MODEL, "input": ""}),
    ("/v1/embeddings", {"model": EMBED_MODEL, "input": ["a", ""]}),
    ("/v1/embeddings", {"model": EMBED_MODEL, "input": [[5] * (CONTEXT + 1)]}),
    ("/score", {"model": EMBED_MODEL, "queries": ["a", "b"], "documents": ["c", "d", "e"]}),
]


@pytest.mark.parametrize(("path", "body"), POOLING_BAD)
def test_pooling_errors_match(vllm_embed_server: VllmServer, embed_sim_url: str, path: str,
                              body: dict[str, Any]) -> None:
    same_answer(vllm_embed_server.url, embed_sim_url, path, body)


def same_answer(real_url: str, sim_url: str, path: str, body: dict[str, Any]) -> None:
    (real_status, real), (sim_status, sim) = (ask(real_url, path, body),
                                              ask(sim_url, path, body))
    assert sim_status == real_status, (real, sim)
    if real_status == 200:
        return
    assert list(real) == list(sim) == ["error"]
    r, s = real["error"], sim["error"]
    assert list(r) == list(s) == ["message", "type", "param", "code"]
    assert (s["type"], s["param"], s["code"]) == (r["type"], r["param"], r["code"])
    if r["type"] != "Bad Request" and "input tokens" not in r["message"]:
        assert s["message"] == r["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_max_tokens_past_what_the_context_leaves_is_clipped(
        vllm_server: VllmServer, sim_url: str, path: str, stream: bool) -> None:
    """vLLM 0.32 clips a max_tokens (at most the context) to what the prompt leaves it:
    200, finish_reason "length", the clipped count in usage; the simulator too."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": CONTEXT, "ignore_eos": True}
    body |= {"messages": HI} if "chat" in path else {"prompt": [5] * 500}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    for url in (vllm_server.url, sim_url):
        status, got = ask(url, path, body)
        assert status == 200, got
        usage = usage_of(got)
        assert usage["completion_tokens"] == CONTEXT - usage["prompt_tokens"], url
        assert usage["total_tokens"] == CONTEXT
        finish = ([c["choices"][0]["finish_reason"] for c in got if c["choices"]][-1]
                  if stream else got["choices"][0]["finish_reason"])
        assert finish == "length"


def test_a_token_id_prompt_filling_the_context_is_refused(vllm_server: VllmServer,
                                                          sim_url: str) -> None:
    """What the gateway's 400 before the hold (policy/tokens.py, refuse_past_context)
    stands for: vLLM 0.32 clips max_tokens to the room the prompt leaves, and refuses 0."""
    for max_tokens in (None, 5):
        body: dict[str, Any] = {"model": MODEL, "prompt": [5] * CONTEXT}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        for url in (vllm_server.url, sim_url):
            status, got = ask(url, "/v1/completions", body)
            assert status == 400, (url, got)
            assert "max_tokens must be at least 1, got 0" in got["error"]["message"], url


@pytest.mark.parametrize("stream", [False, True])
def test_best_of_is_ignored(vllm_server: VllmServer, sim_url: str, stream: bool) -> None:
    """vLLM 0.32 generates (and counts) n sequences whatever best_of says, and takes
    best_of below n or with streaming."""
    for extra in ({"n": 1, "best_of": 3}, {"n": 3, "best_of": 2}):
        body: dict[str, Any] = {"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                "ignore_eos": True, **extra}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        for url in (vllm_server.url, sim_url):
            status, got = ask(url, "/v1/completions", body)
            assert status == 200, (url, got)
            assert usage_of(got)["completion_tokens"] == 2 * extra["n"], url


@pytest.mark.parametrize("stream", [False, True])
def test_an_echo_without_generation_counts_one_token(vllm_server: VllmServer, sim_url: str,
                                                     stream: bool) -> None:
    """Prompt scoring (`echo`, `max_tokens: 0`, lm-eval's loglikelihood): vLLM 0.32
    generates one token per sequence and counts it; the gateway holds that one
    (policy/request.py). Without echo, 0 is refused."""
    body: dict[str, Any] = {"model": MODEL, "prompt": ["hi there", "a b c"], "echo": True,
                            "logprobs": 1, "max_tokens": 0, "n": 2}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    for url in (vllm_server.url, sim_url):
        status, got = ask(url, "/v1/completions", body)
        assert status == 200, (url, got)
        assert usage_of(got)["completion_tokens"] == 1 * 2 * 2, (url, usage_of(got))
        status, _ = ask(url, "/v1/completions", {**body, "echo": False})
        assert status == 400, url


def _filling(count: Callable[[str], int]) -> str:
    """An input of `"x " * k` rendering to exactly CONTEXT tokens under `count`."""
    lo, hi = 1, 2 * CONTEXT
    while lo < hi:
        mid = (lo + hi) // 2
        if count("x " * mid) < CONTEXT:
            lo = mid + 1
        else:
            hi = mid
    assert count("x " * lo) == CONTEXT
    return "x " * lo


def test_a_responses_prompt_filling_the_context(vllm_server: VllmServer,
                                                sim_url: str) -> None:
    """A Responses prompt of exactly the context length: the Responses server's own 400
    (type invalid_request_error, param input), not a clip to zero tokens."""
    def real_count(text: str) -> int:
        _, got = ask(vllm_server.url, "/tokenize", {
            "model": MODEL, "messages": [{"role": "user", "content": text}],
            "add_generation_prompt": True})
        return int(got["count"])

    def sim_count(text: str) -> int:
        body = {"input": text}
        return prompt_tokens_chat(messages(body), template_fields(body))

    answers = [ask(url, "/v1/responses", {"model": MODEL, "input": _filling(count)})
               for url, count in ((vllm_server.url, real_count), (sim_url, sim_count))]
    for status, got in answers:
        assert status == 400, got
        assert got["error"] == {
            "message": f"The engine prompt length {CONTEXT} exceeds the max_model_len "
                       f"{CONTEXT}. Please reduce prompt.",
            "type": "invalid_request_error", "param": "input", "code": 400}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_grammar_that_does_not_compile_is_refused_in_the_stream(
        vllm_server: VllmServer, sim_url: str, path: str) -> None:
    """vLLM 0.32 validates a structured-output grammar once a stream has begun: a 200
    whose first event is the 400 error, then [DONE] (a JSON request: the 400 itself), and
    its counters do not move. The gateway charges such a stream nothing."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 5,
                            "structured_outputs": {"regex": "("}}
    body |= ({"messages": HI} if "chat" in path else {"prompt": "hi"})
    for url in (vllm_server.url, sim_url):
        status, got = ask(url, path, {**body, "stream": True})
        assert status == 200, (url, got)
        [event] = got
        assert (event["error"]["code"], event["error"]["type"]) == (400, "BadRequestError"), (
            url, event)
        status, got = ask(url, path, body)
        assert (status, got["error"]["code"]) == (400, 400), (url, got)


def _prompt_counter(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:prompt_tokens_total{")
               and f'model_name="{MODEL}"' in line)


def test_the_prompt_counter_counts_each_sequence(vllm_server: VllmServer,
                                                 sim_url: str) -> None:
    """vLLM's `vllm:prompt_tokens_total` reads a prompt once per sequence (n), where usage
    counts it once; `tokenbooth audit --vllm` weighs records so. The simulator counted it
    once (an audit against it read a drift for every n > 1)."""
    body = {"model": MODEL, "prompt": "hi there", "max_tokens": 2, "n": 3,
            "temperature": 1.0, "ignore_eos": True}
    for url in (vllm_server.url, sim_url):
        before = _prompt_counter(url)
        status, got = ask(url, "/v1/completions", body)
        assert status == 200, (url, got)
        prompt = usage_of(got)["prompt_tokens"]
        assert _prompt_counter(url) - before == 3 * prompt, url


@pytest.mark.parametrize("prompt", [[1.0, True, "7", " 8"], [["1"], [2.0, "3"]], ["1", "2"]])
def test_token_ids_in_other_forms_count_as_vllm_counts_them(
        vllm_server: VllmServer, sim_url: str, prompt: Any) -> None:
    """Ids written as floats, booleans or strings of integers among them are ids to vLLM
    0.32 (a list of strings alone is text prompts, one sequence each); the simulator
    counts them alike (the text's tokens are its own)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "ignore_eos": True}
    usages = []
    for url in (vllm_server.url, sim_url):
        status, got = ask(url, "/v1/completions", body)
        assert status == 200, (url, got)
        usages.append(usage_of(got))
    texts = all(isinstance(p, str) for p in prompt)
    for name in ("completion_tokens",) if texts else ("completion_tokens", "prompt_tokens"):
        assert usages[0][name] == usages[1][name], name
