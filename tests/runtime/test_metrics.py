"""Metrics: the GenAI conventions (Prometheus and OTel), spend, TTFT, holds, stores and
budgets, one update per record; through the running services as Envoy drives them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from authz.runtime.metrics import (
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    BudgetWatch,
    HoldsInFlight,
    Metrics,
    ObservedKeyStore,
    key_labels_enabled,
)
from authz.runtime.overrides import Overrides
from authz.runtime.recorder import Recorder
from authz.runtime.server import Services
from authz.runtime.settings import Settings
from authz.runtime.snapshot import Runtime
from authz.runtime.tracing import RegistryExport, make_provider
from authz.state.keys.base import StoreUnavailable
from authz.state.limits.admission import Admission
from authz.state.limits.base import LimitStoreUnavailable
from authz.state.limits.memory import MemoryLimitStore
from policy.config import Config, parse_config
from policy.errors import ApiError
from policy.keyrecord import KeyRecord
from policy.limits import Ask, Limits
from policy.usage import UsageRecord
from tests.grpc_harness import Running
from tests.helpers import write_policy
from tests.services.test_ext_proc import CHAT, STREAM, Stream, admit, records, resp_body

GENAI = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "vllm",
         "gen_ai_request_model": "demo", "gen_ai_response_model": "tiny-llama"}


def record(**over: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "request_id": "r-1", "key_id": "k-1", "org": "acme", "model": "demo",
        "upstream_model": "tiny-llama", "backend": "http://b", "prompt_tokens": 10,
        "completion_tokens": 5, "total_tokens": 15, "cost_usd": "0.0125", "status": 200,
        "stream": True, "estimated": False, "started_at": "2026-01-01T00:00:00Z",
        "duration_ms": 900.0, "endpoint": "chat"}
    return UsageRecord(**{**fields, **over})


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_one_record_updates_the_seed_genai_and_spend_series() -> None:
    m = Metrics()
    m.observe(record(), ttft_s=0.1)
    m.observe(record(request_id="r-2"), ttft_s=0.3)
    assert value(m, "inference_requests_total", model="demo", endpoint="chat",
                 status="200") == 2
    assert value(m, "tokens_processed_total", model="demo", type="output") == 10
    assert value(m, "gen_ai_server_request_duration_seconds_count", **GENAI,
                 error_type="") == 2
    assert value(m, "gen_ai_server_request_duration_seconds_sum", **GENAI,
                 error_type="") == pytest.approx(1.8)
    assert value(m, "gen_ai_client_token_usage_sum", **GENAI, gen_ai_token_type="input") == 20
    assert value(m, "gen_ai_client_token_usage_count", **GENAI,
                 gen_ai_token_type="output") == 2
    assert value(m, "gen_ai_server_time_to_first_token_seconds_sum", **GENAI) == \
        pytest.approx(0.4)
    # (duration - TTFT) / (completion_tokens - 1): (0.9-0.1)/4 + (0.9-0.3)/4
    assert value(m, "gen_ai_server_time_per_output_token_seconds_sum", **GENAI) == \
        pytest.approx(0.35)
    assert value(m, "tokenbooth_cost_usd_total", org="acme", model="demo") == \
        pytest.approx(0.025)
    text = _exposition(m)
    assert "k-1" not in text  # key ids label nothing by default


def test_failures_carry_error_type_and_no_ttft() -> None:
    m = Metrics()
    m.observe(record(status=503, prompt_tokens=0, completion_tokens=0, cost_usd="0"),
              ttft_s=None)
    m.observe(record(status="lost", endpoint="completions", cost_usd="0.5"), ttft_s=None)
    assert value(m, "gen_ai_server_request_duration_seconds_count", **GENAI,
                 error_type="503") == 1
    # A lost record's duration is its lease, not how long it ran: no duration sample
    # (each added 630 s to the latency dashboards: admin tester); counted as a request.
    lost = {**GENAI, "gen_ai_operation_name": "text_completion"}
    assert not value(m, "gen_ai_server_request_duration_seconds_count", **lost,
                     error_type="lost")
    assert not value(m, "inference_latency_seconds_count", model="demo",
                     endpoint="completions")
    assert value(m, "inference_requests_total", model="demo", endpoint="completions",
                 status="lost") == 1
    assert value(m, "gen_ai_server_time_to_first_token_seconds_count", **GENAI) is None
    # No tokens: no token-usage observation; no cost: nothing spent.
    assert not value(m, "gen_ai_client_token_usage_count", **GENAI,
                     gen_ai_token_type="input")
    assert value(m, "tokenbooth_cost_usd_total", org="acme", model="demo") == 0.5


def test_a_single_token_stream_has_ttft_but_no_per_token_time() -> None:
    m = Metrics()
    m.observe(record(completion_tokens=1), ttft_s=0.2)
    assert value(m, "gen_ai_server_time_to_first_token_seconds_count", **GENAI) == 1
    assert not value(m, "gen_ai_server_time_per_output_token_seconds_count", **GENAI)


def test_key_labels_only_when_the_policy_allows_them() -> None:
    base = {"models": {"demo": {"upstream_model": "m", "backends": []}}}
    assert not key_labels_enabled(parse_config(base))
    assert not key_labels_enabled(parse_config({**base, "metrics": {"key_labels": False}}))
    assert key_labels_enabled(parse_config({**base, "metrics": {"key_labels": True}}))
    m = Metrics()
    m.enable_key_labels()
    m.observe(record(), ttft_s=None)
    assert value(m, "tokenbooth_key_cost_usd_total", org="acme", key_id="k-1") == \
        pytest.approx(0.0125)
    assert value(m, "tokenbooth_key_tokens_total", org="acme", key_id="k-1",
                 type="input") == 10


class Captured(MetricExporter):
    """A metric exporter that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[MetricsData] = []

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000,
               **kwargs: Any) -> MetricExportResult:
        self.batches.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def otel_metrics(data: MetricsData) -> dict[str, Any]:
    return {metric.name: metric for rm in data.resource_metrics
            for sm in rm.scope_metrics for metric in sm.metrics}


def test_otlp_export_follows_the_semantic_conventions() -> None:
    m = Metrics()
    m.observe(record(), ttft_s=0.1)
    m.observe(record(request_id="r-2"), ttft_s=0.3)
    m.observe(record(status=500, prompt_tokens=0, completion_tokens=0), ttft_s=None)
    data = RegistryExport(m, Captured()).collect()
    found = otel_metrics(data)
    assert {n: found[n].unit for n in found} == {
        "gen_ai.server.request.duration": "s", "gen_ai.server.time_to_first_token": "s",
        "gen_ai.server.time_per_output_token": "s", "gen_ai.client.token.usage": "{token}"}
    [ttft] = found["gen_ai.server.time_to_first_token"].data.data_points
    assert tuple(ttft.explicit_bounds) == TTFT_BUCKETS
    assert dict(ttft.attributes) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "vllm",
        "gen_ai.request.model": "demo", "gen_ai.response.model": "tiny-llama"}
    assert (ttft.count, ttft.sum) == (2, pytest.approx(0.4))
    # Per-bucket counts (Prometheus keeps cumulative ones): 0.1 and 0.3 seconds.
    counts = dict(zip([*TTFT_BUCKETS, math.inf], ttft.bucket_counts, strict=True))
    assert (counts[0.1], counts[0.5], sum(ttft.bucket_counts)) == (1, 1, 2)
    assert ttft.start_time_unix_nano > 0
    tokens = found["gen_ai.client.token.usage"].data.data_points
    assert tuple(tokens[0].explicit_bounds) == TOKEN_BUCKETS
    assert {p.attributes["gen_ai.token.type"]: p.sum for p in tokens if p.count} == \
        {"input": 20, "output": 10}
    errors = [p.attributes.get("error.type")
              for p in found["gen_ai.server.request.duration"].data.data_points]
    assert sorted(e or "" for e in errors) == ["", "500"]
    # The OTLP encoding takes it (min and max unset: Prometheus keeps neither).
    [point] = encode_metrics(data).resource_metrics[0].scope_metrics[0].metrics[1] \
        .histogram.data_points
    assert not point.HasField("min") and point.count == 2


def test_holds_in_flight_count_each_request_once() -> None:
    m = Metrics()
    holds = HoldsInFlight(m.holds_in_flight)
    ask = Ask(request_id="r", key_id="k", org="acme", tokens=1, cost_nano=1,
              period="total", lease_s=60)
    holds.update(ask, True)
    assert value(m, "tokenbooth_holds_in_flight", org="acme") == 1
    holds.update(ask, False)
    holds.update(ask, False)  # the org's settlement of the same request
    assert value(m, "tokenbooth_holds_in_flight", org="acme") == 0


class _DownKeys:
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        raise StoreUnavailable("down")


async def test_store_health_follows_the_last_call() -> None:
    m = Metrics()
    keys = ObservedKeyStore(_DownKeys(), m)
    assert value(m, "tokenbooth_store_up", store="keys") == 1
    with pytest.raises(StoreUnavailable):
        await keys.find("fp", "secret")
    assert value(m, "tokenbooth_store_up", store="keys") == 0
    assert value(m, "tokenbooth_store_errors_total", store="keys") == 1

    class DownLimits(MemoryLimitStore):
        async def sweep(self, now: float) -> list[Ask]:
            raise LimitStoreUnavailable("down")

    for store, up in ((MemoryLimitStore(), 1), (DownLimits(), 0)):
        adm = Admission(store, on_store=lambda ok: m.store_result("limits", ok))
        await adm.sweep()
        assert value(m, "tokenbooth_store_up", store="limits") == up


async def test_each_admission_and_settlement_the_store_failed_is_counted() -> None:
    """Observability tester: only the sweep (every second) reported the limit store, so
    the gauge lagged an outage and the counter measured its length, not its failures."""
    m = Metrics()

    class Flaky(MemoryLimitStore):
        down = False

        async def admit(self, limits: Limits, ask: Ask, now: float,
                        take: bool = True) -> Any:
            if self.down:
                raise LimitStoreUnavailable("down")
            return await super().admit(limits, ask, now, take)

        async def settle(self, limits: Limits, ask: Ask, used_tokens: int, cost_nano: int,
                         now: float) -> Any:
            if self.down:
                raise LimitStoreUnavailable("down")
            return await super().settle(limits, ask, used_tokens, cost_nano, now)

    store = Flaky()
    adm = Admission(store, on_store=lambda ok: m.store_result("limits", ok))
    limits = Limits(rpm=100)
    now = datetime(2026, 3, 5, tzinfo=UTC)

    def ask(i: int) -> Ask:
        return Ask(request_id=f"r{i}", key_id="k", org="acme", tokens=1, cost_nano=0,
                   period="total", lease_s=60)

    await adm.admit(limits, ask(0), now)
    store.down = True
    for i in (1, 2, 3):
        with pytest.raises(ApiError) as e:
            await adm.admit(limits, ask(i), now)
        assert e.value.status == 503  # failing closed
    assert value(m, "tokenbooth_store_up", store="limits") == 0
    assert value(m, "tokenbooth_store_errors_total", store="limits") == 3
    await adm.settle(limits, ask(0), 1, 0, now)  # spooled or logged: a failed call
    assert value(m, "tokenbooth_store_errors_total", store="limits") == 4
    store.down = False
    await adm.admit(limits, ask(4), now)
    assert value(m, "tokenbooth_store_up", store="limits") == 1
    assert value(m, "tokenbooth_store_errors_total", store="limits") == 4


async def test_budget_watch_exports_each_org_budget_fraction() -> None:
    m = Metrics()
    store = MemoryLimitStore()
    now = datetime(2026, 3, 5, tzinfo=UTC)
    orgs: dict[str, Any] = {
        "acme": SimpleNamespace(budget_usd=__import__("decimal").Decimal("2"),
                                budget_period="month"),
        "free": SimpleNamespace(budget_usd=None, budget_period="month")}
    cfg = cast(Config, SimpleNamespace(orgs=orgs))
    limits = Limits(budget_nano=2 * 10**9, budget_period="month")
    ask = Ask(request_id="r", key_id="org:acme", org="acme", tokens=0,
              cost_nano=10**9, period="month:2026-03", lease_s=60)
    assert (await store.admit(limits, ask, now.timestamp())).allowed
    await store.settle(limits, ask, 0, 5 * 10**8, now.timestamp())
    watch = BudgetWatch(m, store, lambda: cfg, lambda: now)
    await watch.poll()
    assert value(m, "tokenbooth_budget_spent_ratio", org="acme") == 0.25
    assert value(m, "tokenbooth_budget_spent_ratio", org="free") is None
    # The refusals' series of an org with a budget exists at 0: its alert has a series.
    assert value(m, "tokenbooth_budget_refusals_total", org="acme", budget="org") == 0
    assert value(m, "tokenbooth_budget_refusals_total", org="free", budget="org") is None
    del orgs["acme"]
    await watch.poll()
    assert value(m, "tokenbooth_budget_spent_ratio", org="acme") is None
    # The admin API's stored limits are in force too (over the config's): a budget set
    # there is watched, against its own amount.
    stored = {"acme": SimpleNamespace(budget_usd=__import__("decimal").Decimal("1"),
                                      budget_period="month")}
    watch = BudgetWatch(m, store, lambda: cfg, lambda: now,
                        orgs=lambda c: {**c.orgs, **stored})
    await watch.poll()
    assert value(m, "tokenbooth_budget_spent_ratio", org="acme") == 0.5


# -- through the running services ------------------------------------------------------


@contextlib.asynccontextmanager
async def observed(tmp_path: Path, **policy: Any
                   ) -> AsyncIterator[tuple[Running, Captured, InMemorySpanExporter]]:
    spans, exported = InMemorySpanExporter(), Captured()
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        services={"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"},
                        **policy)
    services = Services(Runtime.from_file(path, Overrides()), grace_s=1.0,
                        tracer_provider=make_provider(SimpleSpanProcessor(spans)),
                        metric_exporter=exported)
    await services.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{services.grpc_port}")
    try:
        yield Running(services, channel, path, tmp_path / "data"), exported, spans
    finally:
        await channel.close()
        await services.stop()


def _exposition(m: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


async def _scrape(running: Running) -> str:
    url = f"http://127.0.0.1:{running.services.http_port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    return await asyncio.to_thread(get)


async def test_a_stream_leaves_genai_metrics_spend_and_span_attributes(
    tmp_path: Path,
) -> None:
    async with observed(tmp_path, orgs={"acme": {"budget_usd": "5"}}) as (run, exported, spans):
        s = Stream(run)
        await admit(s, {**CHAT, "stream": True})
        m = run.services.metrics
        assert value(m, "tokenbooth_holds_in_flight", org="acme") == 1
        first = STREAM.index(b"Hi")  # the role-only chunk first: no content yet
        await s.send(resp_body(STREAM[:first - 20], end=False))
        await asyncio.sleep(0.05)
        await s.send(resp_body(STREAM[first - 20:], end=True, status=None))
        await s.close()
        [rec] = await records(run, 1)
        for _ in range(100):
            if value(m, "tokenbooth_holds_in_flight", org="acme") == 0 and \
                    spans.get_finished_spans():
                break
            await asyncio.sleep(0.02)
        assert value(m, "tokenbooth_holds_in_flight", org="acme") == 0
        ttft = value(m, "gen_ai_server_time_to_first_token_seconds_sum", **GENAI)
        assert ttft is not None and 0.05 <= ttft < rec["duration_ms"] / 1000
        assert value(m, "gen_ai_server_time_per_output_token_seconds_count", **GENAI) == 1
        assert value(m, "tokenbooth_cost_usd_total", org="acme", model="demo") == \
            pytest.approx(float(rec["cost_usd"]))
        text = await _scrape(run)
        for line in ('tokenbooth_spool_bytes{spool="settlements"} 0.0',
                     'tokenbooth_store_up{store="keys"} 1.0',
                     'tokenbooth_budget_spent_ratio{org="acme"} 0.0',
                     'tokenbooth_hold_bound_violations_total{model="demo"} 0.0',
                     'tokenbooth_lost_holds_total 0.0'):
            assert line in text, line
        [span] = spans.get_finished_spans()
        attrs = dict(span.attributes or {})
        assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) \
            == (7, 2)
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.response.model"] == "tiny-llama"
        assert "error.type" not in attrs
    # Stopped: the last values went out by OTLP.
    assert "gen_ai.server.time_to_first_token" in otel_metrics(exported.batches[-1])


async def test_bound_violations_and_lost_holds_are_counted(tmp_path: Path) -> None:
    async with observed(tmp_path) as (run, _, _):
        m = run.services.metrics
        # A hold whose lease ended unsettled: admitted as if long ago, the sweep claims it.
        clock = run.services.runtime.clock
        past = datetime.now(UTC) - timedelta(days=1)
        run.services.runtime.clock = lambda: past
        s = Stream(run)
        await admit(s, CHAT, key_id="k-metered", rid="lost-1")
        await _until(lambda: value(m, "tokenbooth_lost_holds_total") == 1, limit_s=5)
        [lost] = await records(run, 1)
        assert (lost["request_id"], lost["status"]) == ("lost-1", "lost")
        s.call.cancel()
        run.services.runtime.clock = clock
        # A backend that reports more than the hold's worst case.
        s = Stream(run)
        await admit(s, CHAT, key_id="k-metered", rid="over-1")
        usage = {"prompt_tokens": 100_000, "completion_tokens": 1}
        await s.send(resp_body(json.dumps({"choices": [], "usage": usage}).encode()))
        await s.close()
        await _until(lambda: value(m, "tokenbooth_hold_bound_violations_total",
                                   model="demo") == 1)


async def _until(cond: Any, limit_s: float = 3.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def test_recorder_counts_lost_records(tmp_path: Path) -> None:
    written: list[UsageRecord] = []

    class Sink:
        def write(self, rec: UsageRecord) -> None:
            written.append(rec)

        def close(self) -> None: ...

    m = Metrics()
    rec = Recorder(cast(Any, Sink()), m)
    rec.lost(record(status="lost", estimated=True))
    rec.bound_violation("demo")
    assert value(m, "tokenbooth_lost_holds_total") == 1
    assert value(m, "tokenbooth_hold_bound_violations_total", model="demo") == 1
    assert len(written) == 1


def test_a_record_that_ends_after_its_log_closed_goes_to_the_error_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A request that ends after the services closed the usage log (a late prompt count
    during the stop): the record goes whole to the error log, and the caller goes on to
    settle (the closed log's ValueError escaped, and the settlement after it was lost)."""
    from authz.state.usage.records import JsonlUsageLog

    sink = JsonlUsageLog(tmp_path)
    sink.close()
    with caplog.at_level("ERROR", logger="tokenbooth.usage"):
        Recorder(sink, Metrics()).record(record(request_id="late-1"))
    [line] = [r for r in caplog.records if "usage record not stored" in r.getMessage()]
    assert line.record["request_id"] == "late-1"  # type: ignore[attr-defined]


async def test_the_genai_metrics_reach_an_otlp_collector(tmp_path: Path) -> None:
    """The real OTLP/gRPC exporter, against a collector of the test's own."""
    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2,
        metrics_service_pb2_grpc,
    )

    got: list[Any] = []

    class Collector(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
        async def Export(self, request: Any, context: Any) -> Any:
            got.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.aio.server()
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        services={"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"})
    settings = Settings(otlp_endpoint=f"http://127.0.0.1:{port}", service_name="tb-test")
    services = Services(Runtime.from_file(path, Overrides(), settings), grace_s=1.0,
                        tracer_provider=make_provider(SimpleSpanProcessor(
                            InMemorySpanExporter())))
    await services.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{services.grpc_port}") as channel:
            run = Running(services, channel, path, tmp_path / "data")
            s = Stream(run)
            await admit(s, CHAT)
            await s.send(resp_body(json.dumps(
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
            ).encode()))
            await s.close()
            await records(run, 1)
    finally:
        await services.stop()  # the last export
        await server.stop(None)
    metrics = {m.name: m for req in got for rm in req.resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.server.request.duration", "gen_ai.client.token.usage"} <= set(metrics)
    resource = {a.key: a.value.string_value for a in got[-1].resource_metrics[0].resource
                .attributes}
    assert resource["service.name"] == "tb-test"
    points = metrics["gen_ai.client.token.usage"].histogram.data_points
    assert sorted(p.sum for p in points) == [3, 4]


def test_the_cost_counters_keep_the_records_exact_sum() -> None:
    """Admin tester: 0.17900000000000005 where the records said 0.179 (floats added one
    record at a time). Each series is the exact nano-USD total, rounded once."""
    from decimal import Decimal

    m = Metrics()
    m.enable_key_labels()
    costs = ["0.0001234", "0.000777731", "0.1", "0.02", "0.059", "0.000000001"] * 37
    for i, cost in enumerate(costs):
        m.observe(record(request_id=f"r-{i}", cost_usd=cost), ttft_s=None)
    exact = sum(Decimal(c) for c in costs)
    assert value(m, "tokenbooth_cost_usd_total", org="acme", model="demo") == float(exact)
    assert value(m, "tokenbooth_key_cost_usd_total", org="acme", key_id="k-1") == \
        float(exact)
    assert repr(float(exact)) in _exposition(m)
