"""Traces: spans are children of the request's trace; a dead collector blocks nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from authz.envoy_config.names import EXT_PROC
from authz.runtime.overrides import Overrides
from authz.runtime.procs import http_ok, wait_until
from authz.runtime.server import Services
from authz.runtime.snapshot import Runtime
from authz.runtime.tracing import make_provider, otlp_metric_exporter, otlp_provider
from tests.grpc_harness import Running
from tests.helpers import PORTS, SECRET, write_policy
from tests.services.test_ext_authz import check, check_request
from tests.services.test_ext_proc import CHAT, Stream, req_body, resp_body

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[Running, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        services={"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"})
    services = Services(Runtime.from_file(path, Overrides()), grace_s=1.0,
                        tracer_provider=make_provider(SimpleSpanProcessor(exporter)))
    await services.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{services.grpc_port}")
    try:
        yield Running(services, channel, path, tmp_path / "data"), exporter
    finally:
        await channel.close()
        await services.stop()


async def test_spans_are_children_of_the_request_trace(
    traced: tuple[Running, InMemorySpanExporter],
) -> None:
    running, exporter = traced
    await check(running, "GET", "/v1/models", authorization=f"Bearer {SECRET}",
                traceparent=TRACEPARENT)
    s = Stream(running)
    # The traceparent reaches ext_proc as a request attribute.
    msg = req_body(json.dumps(CHAT).encode(), rid="t-1")
    msg.attributes[EXT_PROC].update({"request.headers['traceparent']": TRACEPARENT})
    assert (await s.send(msg)).HasField("request_body")
    await s.close()
    for _ in range(100):
        if len(exporter.get_finished_spans()) >= 2:
            break
        await asyncio.sleep(0.02)
    spans = {sp.name: sp for sp in exporter.get_finished_spans()}
    assert set(spans) == {"ext_authz.check", "ext_proc"}
    for sp in spans.values():
        assert sp.parent is not None
        assert format(sp.context.trace_id, "032x") == TRACE_ID
        assert format(sp.parent.span_id, "016x") == PARENT_ID
    assert spans["ext_authz.check"].attributes["tokenbooth.key_id"] == "k-main"
    assert spans["ext_proc"].attributes["tokenbooth.request_id"] == "t-1"
    # The secret is in no span.
    assert SECRET not in repr([dict(sp.attributes or {}) for sp in spans.values()])


async def test_without_a_traceparent_a_requests_spans_are_one_trace(
    traced: tuple[Running, InMemorySpanExporter],
) -> None:
    """Observability tester: without a client `traceparent` the Check's span and the
    ext_proc span of one request began two traces. Now the Check's is the root of the
    request's own trace (ids from its request id) and the ext_proc span its child; another
    request is another trace."""
    running, exporter = traced
    for rid in ("t-a", "t-b"):
        req = check_request("POST", "/v1/chat/completions", {
            "authorization": f"Bearer {SECRET}", "x-request-id": rid})
        stub = external_auth_pb2_grpc.AuthorizationStub(running.channel)
        await stub.Check(req)
        s = Stream(running)
        assert (await s.send(req_body(json.dumps(CHAT).encode(), rid=rid))).HasField(
            "request_body")
        await s.close()
    for _ in range(100):
        if len(exporter.get_finished_spans()) >= 4:
            break
        await asyncio.sleep(0.02)
    spans = exporter.get_finished_spans()
    by_trace: dict[int, dict[str, ReadableSpan]] = {}
    for sp in spans:
        by_trace.setdefault(sp.context.trace_id, {})[sp.name] = sp
    assert len(by_trace) == 2
    for trace in by_trace.values():
        check_span, proc_span = trace["ext_authz.check"], trace["ext_proc"]
        assert check_span.parent is None
        assert proc_span.parent is not None
        assert proc_span.parent.span_id == check_span.context.span_id
        assert check_span.attributes is not None and proc_span.attributes is not None
        assert check_span.attributes["tokenbooth.request_id"] == \
            proc_span.attributes["tokenbooth.request_id"]


async def test_a_refused_check_is_one_span_with_its_request_id_and_status(
    traced: tuple[Running, InMemorySpanExporter],
) -> None:
    """Observability tester: a request ext_authz refused left an `ext_proc` span outside
    the client's trace with an empty request id (its local reply passed ext_proc's
    response phase), and the Check's span said neither the request id nor the status."""
    running, exporter = traced
    req = check_request("POST", "/v1/chat/completions", {
        "authorization": "Bearer sk-not-a-key", "traceparent": TRACEPARENT,
        "x-request-id": "t-401"})
    # Envoy's own stream number, not the request id the client and the records have.
    req.attributes.request.http.id = "5569409462642433364"  # type: ignore[attr-defined]
    stub = external_auth_pb2_grpc.AuthorizationStub(running.channel)
    await stub.Check(req)
    s = Stream(running)  # the 401 Envoy sends passes ext_proc's response phase
    await s.send(resp_body(b'{"error": {"code": "invalid_api_key"}}', status=401))
    await s.close()
    await asyncio.sleep(0.2)
    spans = exporter.get_finished_spans()
    assert [sp.name for sp in spans] == ["ext_authz.check"]
    attrs = spans[0].attributes or {}
    assert (attrs["tokenbooth.request_id"], attrs["tokenbooth.decision"],
            attrs["http.response.status_code"]) == ("t-401", "deny", 401)
    assert format(spans[0].context.trace_id, "032x") == TRACE_ID


def test_an_unreachable_collector_blocks_neither_start_nor_stop(tmp_path: Path) -> None:
    # A collector that accepts connections and never answers: the worst kind.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
    ports = PORTS
    http = f"127.0.0.1:{ports.free_port()}"
    grpc_listen = f"127.0.0.1:{ports.free_port()}"
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        services={"grpc_listen": grpc_listen, "http_listen": http})
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz.cli", "serve", "--config", str(path)],
        env={**__import__("os").environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            wait_until(lambda: http_ok(f"http://{http}/readyz"), "serve", timeout=10,
                       alive=[proc])
        except (RuntimeError, TimeoutError):
            proc.kill()
            raise AssertionError(proc.communicate()[1]) from None
        assert time.monotonic() - t0 < 10
        # Requests make spans; their export goes nowhere, and requests do not wait for it.
        with grpc.insecure_channel(grpc_listen) as ch:
            stub = external_auth_pb2_grpc.AuthorizationStub(ch)
            for _ in range(20):
                t1 = time.monotonic()
                stub.Check(check_request("GET", "/v1/models", {
                    "authorization": f"Bearer {SECRET}", "traceparent": TRACEPARENT}),
                    timeout=5)
                assert time.monotonic() - t1 < 1.0
        time.sleep(1.2)  # let the batch exporter try
        t2 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - t2 < 8, "shutdown waited on the collector"
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        blackhole.close()


def test_the_collectors_password_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Observability tester: `exporting traces by OTLP` logged the endpoint whole, its
    user:password included."""
    endpoint = "http://otuser:OTELPW@127.0.0.1:4317"
    with caplog.at_level("INFO", logger="tokenbooth.tracing"):
        provider = otlp_provider(endpoint, "tokenbooth")
        exporter = otlp_metric_exporter(endpoint)
    assert provider is not None and exporter is not None
    provider.shutdown()
    exporter.shutdown(timeout_millis=100)
    shown = [r.__dict__["endpoint"] for r in caplog.records]
    assert shown == ["http://otuser:***@127.0.0.1:4317"] * 2
    assert "OTELPW" not in caplog.text
