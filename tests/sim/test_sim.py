"""The simulator's OpenAI endpoints: shapes, exact usage, streaming and errors."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import yaml

from authz.sim.app import DEFAULT_MAX_MODEL_LEN
from authz.sim.tokens import output_text

from .conftest import Sim

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
# "Hello, world!" is 4 tokens; one message: 4 + 3 + 3 = 10 prompt tokens.
MESSAGES = [{"role": "user", "content": "Hello, world!"}]
CHAT_PROMPT_TOKENS = 10


async def post(sim: Sim, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    async with sim.http.post(sim.url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def stream_events(sim: Sim, path: str, body: Any) -> list[str]:
    """POST a streaming request; return the raw ``data:`` payloads in order."""
    async with sim.http.post(sim.url + path, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        text = await resp.text()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


def parse(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


async def test_health(sim: Sim) -> None:
    async with sim.http.get(sim.url + "/health") as resp:
        assert resp.status == 200
        assert await resp.read() == b""


async def test_models_list(sim: Sim) -> None:
    async with sim.http.get(sim.url + "/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-llama", "other-model"]
    card = body["data"][0]
    assert card["object"] == "model"
    assert card["owned_by"] == "vllm"
    assert card["root"] == "tiny-llama"
    assert card["parent"] is None
    assert isinstance(card["created"], int)
    assert isinstance(card["max_model_len"], int)
    assert card["permission"][0]["object"] == "model_permission"


async def test_chat_non_stream_exact_usage(sim: Sim) -> None:
    status, body = await post(
        sim, CHAT, {"model": "other-model", "messages": MESSAGES, "max_tokens": 7}
    )
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "other-model"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == output_text(7)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": CHAT_PROMPT_TOKENS,
        "total_tokens": CHAT_PROMPT_TOKENS + 7,
        "completion_tokens": 7,
    }


async def test_chat_max_completion_tokens_and_default(sim: Sim) -> None:
    base = {"model": "tiny-llama", "messages": MESSAGES}
    _, body = await post(sim, CHAT, {**base, "max_tokens": 9, "max_completion_tokens": 2})
    assert body["usage"]["completion_tokens"] == 2
    # No limit: up to the context length, as vLLM (no hidden cap).
    _, body = await post(sim, CHAT, base)
    assert body["usage"]["completion_tokens"] == DEFAULT_MAX_MODEL_LEN - CHAT_PROMPT_TOKENS


async def test_empty_stream_options_pass_without_a_stream_as_in_vllm(sim: Sim) -> None:
    """vLLM refuses stream_options without stream only when they are not empty."""
    status, body = await post(sim, CHAT, {"model": "tiny-llama", "messages": MESSAGES,
                                          "max_tokens": 2, "stream_options": {}})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


async def test_completions_non_stream_exact_usage(sim: Sim) -> None:
    status, body = await post(
        sim, COMPLETIONS, {"model": "tiny-llama", "prompt": "Say: a, b.", "max_tokens": 3}
    )
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == output_text(3)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 9, "completion_tokens": 3}
    _, body = await post(sim, COMPLETIONS, {"model": "tiny-llama", "prompt": [5, 6, 7]})
    assert body["usage"]["prompt_tokens"] == 3


async def test_chat_stream_with_usage(sim: Sim) -> None:
    n = 5
    events = await stream_events(
        sim,
        CHAT,
        {
            "model": "tiny-llama",
            "messages": MESSAGES,
            "max_tokens": n,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = parse(events)
    assert len(chunks) == 1 + n + 1  # role, tokens, usage
    first = chunks[0]
    assert first["id"].startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert (chunk["id"], chunk["created"], chunk["model"]) == (
            first["id"],
            first["created"],
            "tiny-llama",
        )
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    tokens = chunks[1:-1]
    for chunk in tokens[:-1]:
        (choice,) = chunk["choices"]
        assert choice["finish_reason"] is None
        assert choice["logprobs"] is None
        assert "usage" not in chunk
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == output_text(n)
    # The usage chunk, exactly as vLLM sends it.
    assert chunks[-1] == {
        "id": first["id"],
        "object": "chat.completion.chunk",
        "created": first["created"],
        "model": "tiny-llama",
        "choices": [],
        "usage": {
            "prompt_tokens": CHAT_PROMPT_TOKENS,
            "total_tokens": CHAT_PROMPT_TOKENS + n,
            "completion_tokens": n,
        },
    }


async def test_completions_stream_with_usage(sim: Sim) -> None:
    events = await stream_events(
        sim,
        COMPLETIONS,
        {
            "model": "tiny-llama",
            "prompt": "one two three",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = parse(events)
    assert len(chunks) == 4 + 1
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["id"] == chunks[0]["id"]
        assert chunk["id"].startswith("cmpl-")
    texts = [c["choices"][0] for c in chunks[:-1]]
    assert [t["finish_reason"] for t in texts] == [None, None, None, "length"]
    assert all(t["index"] == 0 and t["logprobs"] is None for t in texts)
    assert "".join(t["text"] for t in texts) == output_text(4)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_stream_without_include_usage_has_no_usage(sim: Sim, path: str) -> None:
    body: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 3, "stream": True}
    body |= {"messages": MESSAGES} if path == CHAT else {"prompt": "x"}
    events = await stream_events(sim, path, body)
    chunks = parse(events)
    assert len(chunks) == (4 if path == CHAT else 3)
    assert not any("usage" in c for c in chunks)
    assert all(c["choices"] for c in chunks)


VALIDATION = "Bad Request"  # vLLM 0.32's type for FastAPI's request validation errors
BAD = "BadRequestError"


@pytest.mark.parametrize(
    ("path", "body", "status", "err_type", "param", "needle"),
    [
        (CHAT, {"model": "nope", "messages": MESSAGES}, 404, "NotFoundError", "model",
         "The model `nope` does not exist. Valid aliases: tiny-llama, other-model."),
        (CHAT, {"model": "tiny-llama"}, 400, VALIDATION, "body.messages", "Field required"),
        (CHAT, {"model": "tiny-llama", "messages": "hi"}, 400, VALIDATION, "body.messages",
         "valid list"),
        (CHAT, {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 0}, 400, BAD,
         "max_tokens", "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
        (CHAT, {"model": "tiny-llama", "messages": MESSAGES, "max_completion_tokens": 0}, 400,
         BAD, "max_tokens", "max_tokens must be at least 1, got 0."),
        (CHAT, {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": "seven"}, 400,
         VALIDATION, "body.max_tokens", "valid integer"),
        (CHAT, {"model": "tiny-llama", "messages": MESSAGES, "stream": "maybe"}, 400,
         VALIDATION, "body.stream", "valid boolean"),
        (CHAT, {"model": "tiny-llama", "messages": MESSAGES,
                "stream_options": {"include_usage": True}}, 400, BAD, "stream_options",
         "Stream options can only be defined when `stream=True`. (parameter=stream_options)"),
        (CHAT, [1, 2], 400, VALIDATION, "body", "'input': '<list of 2 items>'"),
        (COMPLETIONS, {"model": "tiny-llama"}, 400, VALIDATION, "body.prompt", "prompt"),
        (COMPLETIONS, {"model": "tiny-llama", "prompt": 5}, 400, VALIDATION, "body.prompt",
         "prompt"),
        (COMPLETIONS, {"model": "tiny-llama", "prompt": "x", "max_tokens": -1}, 400, BAD,
         "max_tokens", "max_tokens must be at least 1, got -1."),
        (COMPLETIONS, {"model": "tiny-llama", "prompt": "x", "max_tokens": 10**6}, 400, BAD,
         "max_tokens", f"max_tokens=1000000 cannot be greater than max_model_len="
         f"{DEFAULT_MAX_MODEL_LEN}. Please request fewer output tokens."),
        (COMPLETIONS, {"model": 3, "prompt": "x"}, 400, VALIDATION, "body.model",
         "valid string"),
    ],
)  # fmt: skip
async def test_request_errors(sim: Sim, path: str, body: Any, status: int, err_type: str,
                              param: str, needle: str) -> None:
    """vLLM 0.32's error body: OpenAI's `{"error": {message, type, param, code}}`, with
    the parameter named (a validation error's dotted location, `body.messages`)."""
    got_status, got = await post(sim, path, body)
    assert got_status == status
    assert list(got) == ["error"]
    err = got["error"]
    assert list(err) == ["message", "type", "param", "code"]
    assert (err["code"], err["type"], err["param"]) == (status, err_type, param)
    assert needle in err["message"]


async def test_a_request_naming_no_model_gets_the_first_served(sim: Sim) -> None:
    """vLLM 0.32 serves a body without `model` with its (first) served model."""
    status, got = await post(sim, COMPLETIONS, {"prompt": "x", "max_tokens": 2})
    assert (status, got["model"]) == (200, "tiny-llama")
    status, got = await post(sim, CHAT, {"messages": MESSAGES, "max_tokens": 2})
    assert (status, got["model"]) == (200, "tiny-llama")


@pytest.mark.parametrize(("raw", "param", "needle"), [
    (b'{"model": "tiny-', "body.16", "JSON decode error"),
    (b"", "body", "Field required"),
])
async def test_invalid_json(sim: Sim, raw: bytes, param: str, needle: str) -> None:
    async with sim.http.post(
        sim.url + CHAT, data=raw, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 400
        body = (await resp.json())["error"]
    assert (body["type"], body["param"], body["code"]) == (VALIDATION, param, 400)
    assert needle in body["message"]


async def test_unknown_path_and_method(sim: Sim) -> None:
    async with sim.http.get(sim.url + "/v1/embedding") as resp:
        assert resp.status == 404
    for path in (CHAT, "/v1/embeddings", "/tokenize"):
        async with sim.http.get(sim.url + path) as resp:
            assert resp.status == 405


@pytest.mark.parametrize(
    ("status", "err_type"),
    [(503, "ServiceUnavailableError"), (429, "TooManyRequestsError"), (500, "InternalServerError")],
)
async def test_sim_status_hook(sim: Sim, status: int, err_type: str) -> None:
    body = {"model": "tiny-llama", "messages": MESSAGES, "stream": True}
    got_status, got = await post(sim, CHAT, body, **{"x-sim-status": str(status)})
    assert got_status == status
    assert got == {"error": {
        "message": f"Simulated error (x-sim-status: {status}).",
        "type": err_type,
        "param": None,
        "code": status,
    }}


async def test_sim_status_hook_rejects_non_errors(sim: Sim) -> None:
    got_status, got = await post(sim, CHAT, {}, **{"x-sim-status": "200"})
    assert got_status == 400
    assert "x-sim-status" in got["error"]["message"]


@pytest.mark.parametrize(("path", "role_chunks"), [(CHAT, 1), (COMPLETIONS, 0)])
async def test_sim_cut_after_breaks_stream(sim: Sim, path: str, role_chunks: int) -> None:
    body: dict[str, Any] = {
        "model": "tiny-llama",
        "max_tokens": 10,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body |= {"messages": MESSAGES} if path == CHAT else {"prompt": "x"}
    received = b""
    async with sim.http.post(sim.url + path, json=body, headers={"x-sim-cut-after": "3"}) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in resp.content.iter_any():
                received += data
    events = [e for e in received.decode().split("\n\n") if e]
    assert len(events) == role_chunks + 3
    assert b"[DONE]" not in received
    assert b'"usage"' not in received
    labels = {"model_name": "tiny-llama"}
    registry = sim.state.metrics.registry
    assert registry.get_sample_value("vllm:generation_tokens_total", labels) == 3
    assert registry.get_sample_value("vllm:num_requests_running", labels) == 0


@pytest.mark.parametrize(("path", "role_chunks"), [(CHAT, 1), (COMPLETIONS, 0)])
async def test_sim_error_after_ends_the_stream_with_vllms_error_event(
        sim: Sim, path: str, role_chunks: int) -> None:
    """As vLLM 0.32 when generation fails mid-stream: the error event, then [DONE]; no
    usage chunk, although it was asked for."""
    body: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 10, "stream": True,
                            "stream_options": {"include_usage": True}}
    body |= {"messages": MESSAGES} if path == CHAT else {"prompt": "x"}
    async with sim.http.post(sim.url + path, json=body,
                             headers={"x-sim-error-after": "3"}) as resp:
        assert resp.status == 200
        received = await resp.read()
    events = [e for e in received.decode().split("\n\n") if e]
    assert len(events) == role_chunks + 3 + 2
    assert json.loads(events[-2].removeprefix("data: ")) == {"error": {
        "message": "Internal server error", "type": "InternalServerError", "param": None,
        "code": 500}}
    assert events[-1] == "data: [DONE]"
    assert b'"usage"' not in received


async def test_requests_are_recorded(sim: Sim) -> None:
    async with sim.http.delete(sim.url + "/_sim/requests") as resp:
        assert resp.status == 204
    body = {"model": "tiny-llama", "prompt": "recorded", "max_tokens": 1}
    await post(sim, COMPLETIONS + "?a=1", body, **{"X-Tenant-Id": "acme"})
    async with sim.http.get(sim.url + "/v1/missing") as resp:
        assert resp.status == 404
    async with sim.http.get(sim.url + "/_sim/requests") as resp:
        log = await resp.json()
    assert [(r["method"], r["path"]) for r in log] == [
        ("POST", COMPLETIONS),
        ("GET", "/v1/missing"),
    ]
    first = log[0]
    assert first["query"] == "a=1"
    assert first["headers"]["x-tenant-id"] == "acme"
    assert first["headers"]["content-type"] == "application/json"
    assert all(name == name.lower() for name in first["headers"])
    assert json.loads(first["body"]) == body
    async with sim.http.delete(sim.url + "/_sim/requests") as resp:
        assert resp.status == 204
    async with sim.http.get(sim.url + "/_sim/requests") as resp:
        assert await resp.json() == []


async def test_tpot_header_slows_one_request(sim: Sim) -> None:
    import time

    t0 = time.monotonic()
    async with sim.http.post(
        f"{sim.url}/v1/completions",
        json={"model": "tiny-llama", "prompt": "x", "max_tokens": 4},
        headers={"x-sim-tpot-ms": "60"},
    ) as r:
        assert r.status == 200
        await r.read()
    assert time.monotonic() - t0 >= 0.18  # 3 gaps of 60 ms
    t0 = time.monotonic()
    async with sim.http.post(
        f"{sim.url}/v1/chat/completions",
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}],
              "max_tokens": 2, "stream": True},
        headers={"x-sim-ttft-ms": "200"},
    ) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")  # the role chunk comes at once, as vLLM's
        await r.content.readuntil(b"\n\n")  # the first token after the 200 ms
        assert time.monotonic() - t0 >= 0.2
    async with sim.http.post(
        f"{sim.url}/v1/completions",
        json={"model": "tiny-llama", "prompt": "x"},
        headers={"x-sim-tpot-ms": "soon"},
    ) as r:
        assert r.status == 400


@pytest.mark.parametrize(("path", "field"), [("/v1/chat/completions", "content"),
                                             ("/v1/completions", "text")])
async def test_stream_interval_groups_tokens_as_vllm_does(sim: Sim, path: str,
                                                          field: str) -> None:
    """vLLM's `stream_interval`: the first token alone, then N tokens a chunk; the text
    and the usage are those of the ungrouped stream."""
    base: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 13, "stream": True,
                            "stream_options": {"include_usage": True}}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
                else {"prompt": "hi"})

    def texts(chunks: list[dict[str, Any]]) -> list[str]:
        out = []
        for c in chunks:
            for ch in c["choices"]:
                piece = ch["delta"].get("content") if field == "content" else ch["text"]
                if piece:
                    out.append(piece)
        return out

    one = parse(await stream_events(sim, path, base))
    grouped = parse(await stream_events(sim, path, {**base, "stream_interval": 4}))
    assert len(texts(one)) == 13 and len(texts(grouped)) == 4  # 1 + 4 + 4 + 4
    assert "".join(texts(grouped)) == "".join(texts(one))
    assert grouped[-1]["usage"] == one[-1]["usage"]
    status, body = await post(sim, path, {**base, "stream_interval": 0})
    assert status == 400 and body["error"]["param"] == "body.stream_interval"


async def test_models_from_a_config_grow_with_it(tmp_path: Any) -> None:
    """`up`'s simulator (`--models-from`) serves the models a reload adds to the
    gateway's config; a name in no config is still vLLM's 404."""
    from authz.cli.sim import ConfigModels
    from authz.sim import make_app
    from authz.sim.app import SIMULATOR_KEY
    from tests.helpers import write_policy

    from .conftest import serve

    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    models = ConfigModels(path)
    app = make_app(["tiny-llama"], models_from=models)
    runner, port = await serve(app)
    try:
        async with aiohttp.ClientSession() as http:
            sim = Sim(f"http://127.0.0.1:{port}", port, http, app[SIMULATOR_KEY])
            body = {"messages": MESSAGES, "max_tokens": 2}
            status, _ = await post(sim, CHAT, {**body, "model": "added-later"})
            assert status == 404
            cfg = yaml.safe_load(path.read_text())
            cfg["models"]["later"] = {**cfg["models"]["demo"], "upstream_model": "added-later"}
            path.write_text(yaml.safe_dump(cfg))
            status, got = await post(sim, CHAT, {**body, "model": "added-later"})
            assert (status, got["model"]) == (200, "added-later")
            async with http.get(sim.url + "/v1/models") as r:
                assert "added-later" in [m["id"] for m in (await r.json())["data"]]
            path.write_text("models: [broken")  # caught mid-edit: nothing added, no 500
            status, _ = await post(sim, CHAT, {**body, "model": "other"})
            assert status == 404
    finally:
        await runner.cleanup()


async def test_models_a_valid_config_added_are_served_after_it_broke(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reload tester: a model added (the services loaded it), then the file broken (they
    keep it, their last good config): the simulator read the file only when a request
    named the model, found it broken, and answered 404. It looks as the services do."""
    from authz.cli.sim import ConfigModels
    from authz.sim import app as sim_app
    from authz.sim import make_app
    from authz.sim.app import SIMULATOR_KEY
    from tests.helpers import write_policy

    from .conftest import serve

    monkeypatch.setattr(sim_app, "MODELS_LOOK_S", 0.05)
    path = write_policy(tmp_path, "http://127.0.0.1:8000")
    app = make_app(["tiny-llama"], models_from=ConfigModels(path))
    runner, port = await serve(app)
    try:
        async with aiohttp.ClientSession() as http:
            sim = Sim(f"http://127.0.0.1:{port}", port, http, app[SIMULATOR_KEY])
            cfg = yaml.safe_load(path.read_text())
            cfg["models"]["later"] = {**cfg["models"]["demo"], "upstream_model": "added-later"}
            path.write_text(yaml.safe_dump(cfg))
            for _ in range(100):
                if "added-later" in sim.state.models:
                    break
                await asyncio.sleep(0.02)
            path.write_text("models:\n\tbroken: [")
            status, _ = await post(sim, CHAT, {"messages": MESSAGES, "max_tokens": 2,
                                               "model": "added-later"})
            assert status == 200
    finally:
        await runner.cleanup()
