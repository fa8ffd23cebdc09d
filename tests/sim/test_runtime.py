"""Metrics, the request ring buffer, latency knobs, disconnects and run_sim's lifecycle."""

from __future__ import annotations

import asyncio
import socket
import time
import types
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import authz.sim.app as app_module
import authz.sim.streaming as streaming_module
from authz.sim import make_app, run_sim
from authz.sim.recorder import RequestLog
from tests.helpers import free_port

from .conftest import Sim, serve

MESSAGES = [{"role": "user", "content": "Hello, world!"}]  # 10 prompt tokens


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of a Prometheus text page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


async def test_metrics_names_and_values(sim: Sim) -> None:
    chat = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 4}
    async with sim.http.post(sim.url + "/v1/chat/completions", json=chat) as resp:
        assert resp.status == 200
    stream = {"model": "other-model", "prompt": "a b", "max_tokens": 2, "stream": True}
    async with sim.http.post(sim.url + "/v1/completions", json=stream) as resp:
        await resp.read()
    # n = 3: vLLM reads (and counts) the prompt once per sequence; usage counts it once.
    three = {"model": "other-model", "prompt": "a b", "max_tokens": 1, "n": 3,
             "temperature": 1.0}
    async with sim.http.post(sim.url + "/v1/completions", json=three) as resp:
        assert (await resp.json())["usage"]["prompt_tokens"] == 2
    # Rejected requests are not counted.
    async with sim.http.post(sim.url + "/v1/completions", json={"model": "tiny-llama"}) as resp:
        assert resp.status == 400

    async with sim.http.get(sim.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert "# TYPE vllm:prompt_tokens_total counter" in text
    assert "# TYPE vllm:generation_tokens_total counter" in text
    assert "# TYPE vllm:num_requests_running gauge" in text
    assert "# TYPE vllm:num_requests_waiting gauge" in text
    samples = _samples(text)
    assert samples['vllm:prompt_tokens_total{model_name="tiny-llama"}'] == 10
    assert samples['vllm:generation_tokens_total{model_name="tiny-llama"}'] == 4
    assert samples['vllm:prompt_tokens_total{model_name="other-model"}'] == 2 + 3 * 2
    assert samples['vllm:generation_tokens_total{model_name="other-model"}'] == 2 + 3
    for model in ("tiny-llama", "other-model"):
        assert samples[f'vllm:num_requests_running{{model_name="{model}"}}'] == 0
        assert samples[f'vllm:num_requests_waiting{{model_name="{model}"}}'] == 0
    # As vLLM's: `audit --vllm` counts the records of this process's life only (a
    # restarted simulator was compared with every record it had served; replicas tester).
    assert 0 < time.time() - samples["process_start_time_seconds"] < 24 * 3600


async def test_running_gauge_during_request() -> None:
    app = make_app(["m"], ttft_ms=600)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}"
    key = 'vllm:num_requests_running{model_name="m"}'
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "m", "prompt": "x", "max_tokens": 1}
            task = asyncio.create_task(http.post(url + "/v1/completions", json=body))
            running = 0.0
            for _ in range(40):  # poll while the request sits in its time-to-first-token
                await asyncio.sleep(0.01)
                async with http.get(url + "/metrics") as resp:
                    running = _samples(await resp.text())[key]
                if running:
                    break
            assert running == 1
            async with await task as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()


def test_request_log_is_bounded() -> None:
    log = RequestLog(size=3)
    headers = CIMultiDictProxy(CIMultiDict([("X-A", "1"), ("x-a", "2"), ("Host", "h")]))
    for i in range(5):
        log.add("POST", f"/p{i}", "", headers, b"\xffbody")
    entries = log.snapshot()
    assert [e["path"] for e in entries] == ["/p2", "/p3", "/p4"]
    assert entries[0]["headers"] == {"x-a": "1, 2", "host": "h"}
    assert entries[0]["body"] == "\ufffdbody"


def test_request_log_keeps_headers_that_are_not_utf8_as_json() -> None:
    """aiohttp keeps such header bytes as surrogates, which JSON cannot carry: the log
    (GET /_sim/requests) failed with a 500 after one such request."""
    log = RequestLog(size=1)
    raw = b"\xff\xfe ok".decode("utf-8", "surrogateescape")
    log.add("GET", "/p", "", CIMultiDictProxy(CIMultiDict([("X-Trace", raw)])), b"")
    [entry] = log.snapshot()
    assert entry["headers"] == {"x-trace": "\ufffd\ufffd ok"}
    orjson.dumps(entry)


async def test_request_ring_keeps_last_256(sim: Sim) -> None:
    async def hit(i: int) -> None:
        async with sim.http.get(sim.url + f"/health?i={i}") as resp:
            assert resp.status == 200

    for i in range(300):
        await hit(i)
    async with sim.http.get(sim.url + "/_sim/requests") as resp:
        log = await resp.json()
    assert len(log) == 256
    assert log[0]["query"] == "i=44"
    assert log[-1]["query"] == "i=299"


async def _timed_stream(url: str, body: dict[str, Any]) -> tuple[float, float]:
    """(seconds to the first token event, total seconds) of one streamed request."""
    async with aiohttp.ClientSession() as http:
        start = time.perf_counter()
        first = 0.0
        async with http.post(url, json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"lorem"' in line and not first:
                    first = time.perf_counter() - start
        return first, time.perf_counter() - start


async def test_latency_knobs() -> None:
    app = make_app(["m"], ttft_ms=120, tpot_ms=30)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}"
    try:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 5, "stream": True}
        first, total = await _timed_stream(url + "/v1/chat/completions", body)
        assert 0.11 <= first < 0.5
        assert total >= 0.12 + 4 * 0.03 - 0.01
        start = time.perf_counter()
        async with aiohttp.ClientSession() as http:
            body = {"model": "m", "messages": MESSAGES, "max_tokens": 5}
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
        assert time.perf_counter() - start >= 0.12 + 4 * 0.03 - 0.01
    finally:
        await runner.cleanup()


async def test_zero_delays_never_sleep(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_sleep(delay: float) -> None:
        raise AssertionError(f"slept {delay}")

    fake = types.SimpleNamespace(sleep=no_sleep)
    monkeypatch.setattr(streaming_module, "asyncio", fake)
    monkeypatch.setattr(app_module, "asyncio", fake)
    for stream in (False, True):
        body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 8, "stream": stream}
        async with sim.http.post(sim.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert (await resp.read()).endswith(b"}" if not stream else b"[DONE]\n\n")


async def test_client_disconnect_mid_stream() -> None:
    app = make_app(["m"], tpot_ms=20)
    runner, port = await serve(app)
    url = f"http://127.0.0.1:{port}"
    registry = app[app_module.SIMULATOR_KEY].metrics.registry
    labels = {"model_name": "m"}
    try:
        async with aiohttp.ClientSession() as http:
            body = {"model": "m", "prompt": "x", "max_tokens": 1000, "stream": True}
            async with http.post(url + "/v1/completions", json=body) as resp:
                await resp.content.readline()
                resp.close()  # drop the connection
        for _ in range(100):
            if registry.get_sample_value("vllm:num_requests_running", labels) == 0:
                break
            await asyncio.sleep(0.02)
        assert registry.get_sample_value("vllm:num_requests_running", labels) == 0
        generated = registry.get_sample_value("vllm:generation_tokens_total", labels)
        assert generated is not None and 1 <= generated < 1000
    finally:
        await runner.cleanup()


async def test_run_sim_serves_until_cancelled() -> None:
    port = free_port()
    task = asyncio.create_task(run_sim("127.0.0.1", port, []))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(url + "/v1/models") as resp:
                    models = await resp.json()
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)
        assert [m["id"] for m in models["data"]] == ["tiny-llama"]  # the default model
        # A header as long as Envoy passes on (60 KiB): served (security tester: past
        # aiohttp's 8 KiB, a 400 quoting it and a traceback in `up`'s log).
        async with http.get(url + "/v1/models", headers={"x-note": "a" * 50_000}) as resp:
            assert resp.status == 200
        # A body as sent, as vLLM reads it: a "gzip" one that is not is a 400, not a 500.
        async with http.post(url + "/v1/completions", data=b"abcd",
                             headers={"content-encoding": "gzip"}) as resp:
            assert resp.status == 400
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The listening socket is gone once the runner is cleaned up.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
