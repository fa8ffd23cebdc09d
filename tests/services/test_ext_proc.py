"""ext_proc Process streams over a real gRPC socket, message by message, as Envoy sends them.

The inference path sends no header messages (authz/envoy_config/http_filters.py): the request body
comes with the request's attributes and ext_authz's metadata; the response comes as body
chunks, the first with the status and the serving endpoint as attributes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from authz.envoy_config.names import EXT_AUTHZ, EXT_PROC
from authz.envoy_config.stream_meter import METER_KEY
from authz.runtime.server import Services
from authz.state.usage.records import USAGE_FILE, read_records
from policy.limits import RATE_HEADER_NAMES
from policy.routing import CLUSTER_KEY, model_cluster_name
from policy.stream_pace import ABORT_STEPS
from tests.grpc_harness import Running

CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}]}
CLUSTER = model_cluster_name("demo")


PRINCIPALS = {"k-main": ("acme", []), "k-limited": ("beta", ["demo"]),
              "k-metered": ("acme", [])}
METERED = {"tpm": "1000", "max_concurrent": "1", "budget_nano": str(10 * 10**9),
           "budget_period": "total"}
BACKEND = "http://127.0.0.1:8000"
# Envoy's text rendering of the serving endpoint's metadata (the bootstrap sets it).
HOST_METADATA = ('filter_metadata { key: "tokenbooth" value { fields { key: "backend" '
                 f'value {{ string_value: "{BACKEND}" }} }} }} }}')


def _principal(msg: Any, key_id: str) -> None:
    """ext_authz's metadata, as Envoy forwards it."""
    if key_id:
        org, models = PRINCIPALS[key_id]
        msg.metadata_context.filter_metadata[EXT_AUTHZ].update(
            {"key_id": key_id, "org": org, "models": models,
             **(METERED if key_id == "k-metered" else {})})


def req_body(data: bytes, key_id: str = "k-main", rid: str = "rid-1",
             path: str = "/v1/chat/completions") -> Any:
    """The one request-side message of the inference path."""
    msg = ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=True))
    msg.attributes[EXT_PROC].update({"request.path": path, "request.method": "POST",
                                     "request.id": rid})
    _principal(msg, key_id)
    return msg


def models_headers(key_id: str = "k-main", path: str = "/v1/models",
                   rid: str = "m-1") -> Any:
    """GET /v1/models: its route sends the request headers."""
    hh = ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode())
        for k, v in {":method": "GET", ":path": path, "x-request-id": rid}.items()
    ]), end_of_stream=True)
    msg = ep.ProcessingRequest(request_headers=hh)
    _principal(msg, key_id)
    return msg


def resp_body(data: bytes, end: bool = True, status: int | None = 200) -> Any:
    """A response chunk; pass `status` on the first (it carries the attributes)."""
    msg = ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=end))
    if status is not None:
        msg.attributes[EXT_PROC].update({"response.code": status,
                                         "xds.upstream_host_metadata": HOST_METADATA})
    return msg


class Stream:
    def __init__(self, running: Running) -> None:
        stub = external_processor_pb2_grpc.ExternalProcessorStub(running.channel)
        self.call = stub.Process()

    async def send(self, msg: Any) -> Any:
        await self.call.write(msg)
        return await asyncio.wait_for(self.call.read(), 5)

    async def close(self) -> None:
        await self.call.done_writing()


def immediate(resp: Any) -> tuple[int, dict[str, Any]]:
    ir = resp.immediate_response
    return ir.status.code, json.loads(ir.body)


def proc_metadata(resp: Any) -> dict[str, Any]:
    """What the answer hands Envoy as ext_proc's dynamic metadata."""
    md = resp.dynamic_metadata.fields[EXT_PROC].struct_value.fields
    return {k: v.string_value for k, v in md.items()}


async def records(running: Running, n: int) -> list[dict[str, Any]]:
    path = running.data_dir / USAGE_FILE
    for _ in range(100):
        got = list(read_records(path))
        if len(got) >= n:
            return got
        await asyncio.sleep(0.02)
    return list(read_records(path))


async def admit(s: Stream, body: dict[str, Any], key_id: str = "k-main",
                rid: str = "rid-1") -> Any:
    r = await s.send(req_body(json.dumps(body).encode(), key_id, rid))
    assert r.HasField("request_body")
    return r


async def test_models_answered_from_policy_for_the_key(running: Running) -> None:
    """Answered here, counted against the key's limits, and so recorded: one record
    each, no backend, no tokens, no cost."""
    s = Stream(running)
    status, body = immediate(await s.send(models_headers("k-limited")))
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["demo"]
    assert body["object"] == "list"
    s = Stream(running)
    status, body = immediate(await s.send(models_headers("k-limited", "/v1/models/demo",
                                                         "m-2")))
    assert (status, body["id"]) == (200, "demo")
    recs = await records(running, 2)
    assert [(r["request_id"], r["endpoint"], r["model"], r["upstream_model"]) for r in recs] \
        == [("m-1", "models", "", ""), ("m-2", "model", "demo", "tiny-llama")]
    for r in recs:
        assert (r["status"], r["total_tokens"], r["cost_usd"], r["backend"]) == (200, 0, "0", "")
        assert (r["key_id"], r["org"], r["estimated"]) == ("k-limited", "beta", False)


async def test_body_rewrite_routes_by_metadata(running: Running) -> None:
    s = Stream(running)
    r = await admit(s, {**CHAT, "stream": True})
    common = r.request_body.response
    # Envoy honours clear_route_cache in a body answer only with a header mutation.
    assert common.clear_route_cache and common.HasField("header_mutation")
    md = proc_metadata(r)
    assert md[CLUSTER_KEY] == CLUSTER
    assert METER_KEY not in md  # ext_proc reads the stream (stream_metering's default)
    assert set(md) - {CLUSTER_KEY, "stream"} <= set(RATE_HEADER_NAMES)
    new_body = json.loads(common.body_mutation.body)
    assert new_body["model"] == "tiny-llama"
    assert new_body["stream_options"] == {"include_usage": True}
    await s.close()


async def test_rate_limit_headers_travel_as_metadata(running: Running) -> None:
    s = Stream(running)
    md = proc_metadata(await admit(s, CHAT, key_id="k-metered"))
    assert md["x-ratelimit-limit-tokens"] == "1000"
    assert int(md["x-ratelimit-remaining-tokens"]) < 1000
    assert "x-ratelimit-limit-requests" not in md  # this key has no RPM limit
    await s.close()


async def test_json_response_usage_is_recorded_once(running: Running) -> None:
    s = Stream(running)
    await admit(s, {**CHAT, "max_tokens": 5})
    upstream = json.dumps({"id": "x", "choices": [], "usage": {
        "prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}).encode()
    # JSON arrives streamed like any body, in whatever pieces Envoy read it.
    r = await s.send(resp_body(upstream[:20], end=False))
    assert not r.response_body.response.HasField("body_mutation")
    r = await s.send(resp_body(upstream[20:], end=False, status=None))
    r = await s.send(resp_body(b"", end=True, status=None))
    assert not r.response_body.response.HasField("body_mutation")
    await s.close()
    [rec] = await records(running, 1)
    assert rec["request_id"] == "rid-1"
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (11, 5, 16)
    assert rec["cost_usd"] == "0.013"  # 11 * 0.50/1k + 5 * 1.50/1k
    assert rec["estimated"] is False and rec["status"] == 200 and rec["stream"] is False
    assert (rec["key_id"], rec["org"], rec["model"], rec["upstream_model"]) == (
        "k-main", "acme", "demo", "tiny-llama")
    assert rec["backend"] == BACKEND


async def test_unmarked_error_is_passed_through_and_records_no_tokens(running: Running) -> None:
    """An error answer Envoy did not mark as the backend's (its own local reply after
    admission, already OpenAI-shaped) passes as is; a backend's: test_upstream_errors.py."""
    s = Stream(running)
    await admit(s, {**CHAT, "stream": True})
    error = b'{"error": {"message": "boom", "type": "server_error"}}'
    r = await s.send(resp_body(error, status=500))
    assert not r.response_body.response.HasField("body_mutation")  # not metered as SSE
    await s.close()
    [rec] = await records(running, 1)
    assert (rec["status"], rec["total_tokens"], rec["estimated"]) == (500, 0, False)


async def test_local_reply_without_admission_is_passed_at_once(running: Running) -> None:
    """Envoy's own replies (an ext_authz refusal, say) pass through ext_proc too."""
    s = Stream(running)
    r = await s.send(resp_body(b'{"error": {}}', status=401))
    assert r.HasField("response_body")
    await s.close()
    assert await records(running, 0) == []


def sse(*objs: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + \
        b"data: [DONE]\n\n"


STREAM = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
    {"choices": [{"index": 0, "delta": {"content": " you"}, "finish_reason": "length"}]},
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}},
)


async def stream_through(running: Running, body: dict[str, Any], split: int) -> bytes:
    s = Stream(running)
    await admit(s, body)
    out = b""
    for i in range(0, len(STREAM), split):
        chunk = STREAM[i:i + split]
        r = await s.send(resp_body(chunk, end=i + split >= len(STREAM),
                                   status=200 if i == 0 else None))
        common = r.response_body.response
        out += common.body_mutation.body if common.HasField("body_mutation") else chunk
    await s.close()
    return out


async def test_sse_usage_chunk_stripped_when_client_did_not_ask(running: Running) -> None:
    out = await stream_through(running, {**CHAT, "stream": True}, split=13)
    assert b"usage" not in out
    assert out.endswith(b"data: [DONE]\n\n")
    assert out == STREAM.replace(
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, '
        b'"total_tokens": 9}}\n\n', b"")
    [rec] = await records(running, 1)
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["estimated"]) == (7, 2, False)
    assert rec["stream"] is True


async def test_sse_passes_through_untouched_when_client_asked_for_usage(
    running: Running,
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    assert await stream_through(running, body, split=7) == STREAM


async def test_cut_stream_leaves_one_estimated_record(running: Running) -> None:
    s = Stream(running)
    await admit(s, {**CHAT, "stream": True})
    await s.send(resp_body(STREAM[:150], end=False))
    s.call.cancel()  # Envoy drops the stream: the client or the upstream went away
    [rec] = await records(running, 1)
    assert rec["estimated"] is True
    # One content chunk seen before the cut, and the steps vLLM takes before its abort.
    assert rec["completion_tokens"] == 1 + ABORT_STEPS
    assert rec["status"] == 499


async def test_validation_errors_are_openai_shaped_and_leave_no_record(
    running: Running,
) -> None:
    cases: list[tuple[bytes, int, str, str | None]] = [
        (b"not json", 400, "invalid_request", None),
        (b"[1]", 400, "invalid_request", None),
        (b'{"messages": []}', 400, "invalid_request", "model"),
        (b'{"model": "nope", "messages": [{"role": "user"}]}', 404, "model_not_found", "model"),
        (json.dumps({**CHAT, "max_tokens": 0}).encode(), 400, "invalid_request", "max_tokens"),
        (json.dumps({**CHAT, "max_tokens": 257}).encode(), 400, "invalid_request", "max_tokens"),
        (json.dumps({**CHAT, "stream": "maybe"}).encode(), 400, "invalid_request", "stream"),
        (json.dumps({"model": "demo", "messages": "hi"}).encode(), 400, "invalid_request",
         "messages"),
    ]
    for raw, status, code, param in cases:
        s = Stream(running)
        got_status, body = immediate(await s.send(req_body(raw)))
        assert (got_status, body["error"]["code"], body["error"]["param"]) == (
            status, code, param), raw
    assert await records(running, 0) == []


async def test_a_refused_body_writes_a_log_line(running: Running,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """One line a refusal, naming who asked and the refusal's code, not its message."""
    caplog.set_level(logging.INFO, logger="tokenbooth.ext_proc")
    s = Stream(running)
    immediate(await s.send(req_body(json.dumps({**CHAT, "max_tokens": 0}).encode())))
    [line] = [r for r in caplog.records if r.getMessage().startswith("request refused")]
    assert line.getMessage() == "request refused: 400 invalid_request"
    assert (line.org, line.key_id, line.param) == (  # type: ignore[attr-defined]
        "acme", "k-main", "max_tokens")
    # The model where it was read (t1 tester: every refusal logged "model": ""): a field
    # refused, the model not allowed to the key; never an alias the config does not have.
    assert line.model == "demo"  # type: ignore[attr-defined]
    immediate(await Stream(running).send(req_body(json.dumps(
        {**CHAT, "model": "other"}).encode(), "k-limited")))
    immediate(await Stream(running).send(req_body(json.dumps(
        {**CHAT, "model": "no-such-model"}).encode())))
    *_, allowed, unknown = [r for r in caplog.records
                            if r.getMessage().startswith("request refused")]
    assert (allowed.code, allowed.model) == (  # type: ignore[attr-defined]
        "model_not_allowed", "other")
    assert (unknown.code, unknown.model) == ("model_not_found", "")  # type: ignore[attr-defined]
    # A param past the field names the client's own text (an object's key): left out.
    secret_text = "my SSN is 123-45-6789 " * 1000
    immediate(await Stream(running).send(req_body(json.dumps(
        {**CHAT, "logit_bias": {secret_text: "x"}}).encode())))
    last = [r for r in caplog.records if r.getMessage().startswith("request refused")][-1]
    assert last.param == "logit_bias"  # type: ignore[attr-defined]
    assert "SSN" not in str(vars(last)) and "SSN" not in caplog.text


async def test_model_allow_list(running: Running) -> None:
    s = Stream(running)
    status, body = immediate(await s.send(req_body(
        json.dumps({**CHAT, "model": "other"}).encode(), key_id="k-limited")))
    assert (status, body["error"]["code"]) == (403, "model_not_allowed")


async def test_without_ext_authz_identity_the_request_is_refused(running: Running) -> None:
    s = Stream(running)
    status, body = immediate(await s.send(req_body(json.dumps(CHAT).encode(), key_id="")))
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_health_service_reports_serving(running: Running) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(running.channel)
    for name in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_stop_lets_an_inflight_stream_finish(running: Running) -> None:
    s = Stream(running)
    await admit(s, {**CHAT, "max_tokens": 5})
    services: Services = running.services
    stopping = asyncio.create_task(services.stop())
    await asyncio.sleep(0.1)
    assert not services.ready()
    # The in-flight stream still gets answers during the grace period.
    r = await s.send(resp_body(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}'))
    assert r.HasField("response_body")
    await s.close()
    await stopping
    [rec] = list(read_records(running.data_dir / USAGE_FILE))
    assert rec["estimated"] is False
    # New streams are refused once stopped.
    try:
        await Stream(running).send(req_body(json.dumps(CHAT).encode()))
    except grpc.aio.AioRpcError:
        pass
    else:
        raise AssertionError("a stopped server accepted a new stream")


async def test_a_killed_stream_settles_every_counter_to_what_was_used(
    running: Running,
) -> None:
    """TPM, concurrency and budget return to exactly the usage seen before the cut."""
    from datetime import UTC, datetime

    from policy.limits import Ask, Limits, cost_nano

    fixed = datetime(2026, 11, 23, 12, tzinfo=UTC)
    running.services.runtime.clock = lambda: fixed  # no refill between the steps
    store = running.services.limits
    assert store is not None
    s = Stream(running)
    await admit(s, {**CHAT, "stream": True, "max_tokens": 100}, key_id="k-metered", rid="cut-1")
    await s.send(resp_body(STREAM[:150], end=False))  # one content chunk
    s.call.cancel()
    [rec] = await records(running, 1)
    assert rec["estimated"] is True and rec["completion_tokens"] == 1 + ABORT_STEPS
    for _ in range(100):  # settlement runs right after the record
        spent, reserved = await store.budget("k-metered", "acme", "total", fixed.timestamp())
        if reserved == 0:
            break
        await asyncio.sleep(0.02)
    price = running.services.runtime.snapshot.config.models["demo"].price_per_1k_tokens
    assert (spent, reserved) == (cost_nano(rec["prompt_tokens"], 1 + ABORT_STEPS, price), 0)
    # The concurrency slot is free and the bucket holds exactly 1000 - used.
    limits = Limits(tpm=1000, max_concurrent=1, budget_nano=10 * 10**9, budget_period="total")
    probe = Ask(request_id="probe", key_id="k-metered", org="acme", tokens=1, cost_nano=0,
                period="total", lease_s=60)
    d = await store.admit(limits, probe, fixed.timestamp())
    assert d.allowed
    assert d.remaining_tokens == 1000 - rec["total_tokens"] - 1
