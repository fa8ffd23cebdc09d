"""Prometheus metrics (contract §6) and the OpenTelemetry GenAI metrics, in a registry
owned by the process, not a global.

Every usage record updates its metrics through one call, `Metrics.observe`, into this
registry alone: the series of a record's (model, upstream model, endpoint, status) are
looked up once per distinct combination and kept. OTLP, when configured, exports the
GenAI histograms from the registry (authz/runtime/tracing.py), so it adds nothing per
request. Label values come from the policy (model aliases, orgs, endpoints) and HTTP
statuses, never from request content; key ids label a metric only with
`metrics.key_labels: true`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from authz.state.keys.base import KeyStore, ReportsHealth, StoreUnavailable
from authz.state.limits.base import LimitStore, LimitStoreUnavailable
from policy.audit import ORG_PREFIX
from policy.config import Config, OrgLimits
from policy.keyrecord import KeyRecord
from policy.limits import Ask, period_id, usd_to_nano
from policy.usage import LOST, UsageRecord

log = logging.getLogger("tokenbooth.metrics")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Up to the timeouts decisions run under (a key store's 0.5 s, `decision_timeout_ms`'s
# 2 s): a slow store shows in the p99, which stopped at 0.1 s (observability tester).
_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1, 2.5, 5)
# The GenAI semantic conventions' recommended boundaries (gen-ai-metrics.md).
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                    20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)

# gen_ai.provider.name: vLLM is not among the spec's well-known values, which name API
# vendors ("openai" would claim OpenAI's own service); a custom value is allowed.
PROVIDER = "vllm"
# gen_ai.operation.name by the record's endpoint: the spec's well-known value where one
# applies (the Responses API generates a chat turn), else the endpoint's own name.
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "responses": "chat"}
_GENAI = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
          "gen_ai.response.model")
# Stores whose health is exported (`tokenbooth_store_up{store}`).
STORES = ("keys", "limits")
BUDGET_POLL_S = 10.0


def operation_name(endpoint: str) -> str:
    return OPERATIONS.get(endpoint, endpoint)


def error_type(status: int | str) -> str:
    """`error.type` of a record: "" for success, else its HTTP status ("499": the client
    went away or the stream was cut) or "lost" (its replica died)."""
    if isinstance(status, int) and status < 400:
        return ""
    return LOST if status == LOST else str(status)


@dataclass(frozen=True)
class GenAiMetric:
    """One GenAI semantic-convention histogram: its OTel name, unit, description and
    attributes, and their Prometheus form (OTel's naming rules: dots as underscores, the
    unit `s` as a `_seconds` suffix, a unit in braces such as `{token}` dropped)."""

    name: str
    unit: str
    description: str
    attributes: tuple[str, ...]
    buckets: tuple[float, ...]

    @property
    def prometheus_name(self) -> str:
        return self.name.replace(".", "_") + ("_seconds" if self.unit == "s" else "")

    @property
    def labels(self) -> dict[str, str]:
        """Prometheus label -> OTel attribute."""
        return {a.replace(".", "_"): a for a in self.attributes}


GENAI_METRICS = (
    GenAiMetric("gen_ai.server.request.duration", "s",
                "Generative AI server request duration", (*_GENAI, "error.type"),
                DURATION_BUCKETS),
    GenAiMetric("gen_ai.server.time_to_first_token", "s",
                "Time to generate first token for successful responses", _GENAI,
                TTFT_BUCKETS),
    GenAiMetric("gen_ai.server.time_per_output_token", "s",
                "Time per output token generated after the first token for successful "
                "responses", _GENAI, TPOT_BUCKETS),
    GenAiMetric("gen_ai.client.token.usage", "{token}",
                "Number of input and output tokens used", (*_GENAI, "gen_ai.token.type"),
                TOKEN_BUCKETS),
)


class _Series:
    """The labelled children one kind of record updates, looked up once."""

    __slots__ = ("duration", "latency", "ok", "requests", "tokens_in", "tokens_out", "tpot",
                 "ttft", "usage_in", "usage_out")

    def __init__(self, m: Metrics, rec: UsageRecord) -> None:
        err = error_type(rec.status)
        self.ok = not err
        self.requests = m.requests.labels(rec.model, rec.endpoint, str(rec.status))
        self.latency = m.latency.labels(rec.model, rec.endpoint)
        self.tokens_in = m.tokens.labels(rec.model, "input")
        self.tokens_out = m.tokens.labels(rec.model, "output")
        genai = (operation_name(rec.endpoint), PROVIDER, rec.model, rec.upstream_model)
        self.duration = m.genai_duration.labels(*genai, err)
        # Successful responses only (their series are the same for every status).
        self.ttft = m.genai_ttft.labels(*genai) if self.ok else None
        self.tpot = m.genai_tpot.labels(*genai) if self.ok else None
        self.usage_in = m.genai_tokens.labels(*genai, "input")
        self.usage_out = m.genai_tokens.labels(*genai, "output")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inference_requests", "Admitted inference requests by outcome",
            ("model", "endpoint", "status"), registry=r,
        )
        self.latency = Histogram(
            "inference_latency_seconds", "Request duration as seen by the gateway",
            ("model", "endpoint"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "tokens_processed", "Tokens metered, by type (input|output)",
            ("model", "type"), registry=r,
        )
        self.decisions = Counter(
            "tokenbooth_decisions", "Admission decisions",
            ("service", "decision", "reason"), registry=r,
        )
        self.decision_seconds = Histogram(
            "tokenbooth_decision_seconds", "Time to answer one Envoy message",
            ("service",), buckets=_DECISION_BUCKETS, registry=r,
        )
        # Money (issue 12): each should stay at zero; the audit explains a non-zero one.
        self.hold_bound_violations = Counter(
            "tokenbooth_hold_bound_violations",
            "Settlements whose real cost passed the admission hold (charged all the same)",
            ("model",), registry=r,
        )
        self.lost_holds = Counter(
            "tokenbooth_lost_holds",
            "Holds whose replica died, settled at the full hold with an estimated record",
            registry=r,
        )
        self.settlements_spooled = Counter(
            "tokenbooth_settlements_spooled",
            "Settlements that could not reach the limit store and were spooled to disk",
            registry=r,
        )
        self.oversize_events = Counter(
            "tokenbooth_sse_oversize_events",
            "Streamed events over envoy.max_event_bytes: passed through unread, their "
            "bytes estimated if the stream had no usage chunk",
            ("model",), registry=r,
        )
        self._add_genai(r)
        self._add_operations(r)
        self._series: dict[tuple[str, str, str, int | str], _Series] = {}
        # Each cost series' exact total in nano-USD: the counter is set to it, so floats
        # never add up (0.17900000000000005 where the records said 0.179: admin tester).
        self._cost_by: dict[tuple[str, str], _Exact] = {}
        self._key_cost_by: dict[tuple[str, str], _Exact] = {}
        self._key_cost: Counter | None = None
        self._key_tokens: Counter | None = None
        self.holds = HoldsInFlight(self.holds_in_flight)

    def _add_genai(self, r: CollectorRegistry) -> None:
        """The GenAI semantic conventions in Prometheus form (`GENAI_METRICS`)."""
        self.genai = tuple(Histogram(g.prometheus_name, g.description, tuple(g.labels),
                                     buckets=g.buckets, registry=r) for g in GENAI_METRICS)
        self.genai_duration, self.genai_ttft, self.genai_tpot, self.genai_tokens = self.genai

    def _add_operations(self, r: CollectorRegistry) -> None:
        """Spend, holds, spools, stores and budgets."""
        gauge, counter = partial(Gauge, registry=r), partial(Counter, registry=r)
        self.cost = counter("tokenbooth_cost_usd",
                            "Spend in USD from the usage records (their exact cost)",
                            ("org", "model"))
        self.holds_in_flight = gauge("tokenbooth_holds_in_flight",
                                     "Admitted requests not yet settled", ("org",))
        self.spool_bytes = gauge(
            "tokenbooth_spool_bytes",
            "Bytes waiting in an on-disk spool for the store (usage records, settlements)",
            ("spool",))
        self.store_up = gauge("tokenbooth_store_up",
                              "1 when the store's last call answered, 0 when it failed",
                              ("store",))
        self.store_errors = counter("tokenbooth_store_errors",
                                    "Calls to a store that failed (unavailable)", ("store",))
        self.store_resets = Counter(
            "tokenbooth_store_resets",
            "Times Redis was found to have lost its data (restarted without persistence, "
            "or flushed): ledgers, holds in flight, stored keys and unexported records",
            registry=r)
        # A refused reload leaves the last good config in force: these say so (alert on
        # `tokenbooth_config_last_reload_successful == 0`), beside the log line.
        self.config_reloads = counter(
            "tokenbooth_config_reloads",
            "Reloads of a changed config file, by result (success, failure: refused, the "
            "last good config stays in force)", ("result",))
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.config_last_reload_ok = gauge(
            "tokenbooth_config_last_reload_successful",
            "1 when the last reload of the config file succeeded (or none was tried since "
            "start), 0 when it was refused")
        self.config_last_reload_ok.set(1)
        self.budget_spent_ratio = gauge(
            "tokenbooth_budget_spent_ratio",
            "An org's spend in its current budget period over its budget", ("org",))
        # A budget refuses once what is left is below a request's worst case, often well
        # short of 90% spent: the ratio alone never said an org was blocked (observability
        # tester). `budget`: whose budget refused, the org's or its key's own.
        self.budget_refusals = counter(
            "tokenbooth_budget_refusals",
            "Requests a budget refused (429 insufficient_quota) because too little was "
            "left for their worst-case cost, by the key's org and whose budget it was "
            "(org, key)", ("org", "budget"))

    def budget_refused(self, owner: str, org: str, period: str) -> None:
        """A budget (`owner`: a key id, or `org:<name>` for its org's) refused a request
        for want of what was left (`Admission`'s `on_exhausted`)."""
        del period
        self.budget_refusals.labels(org, "org" if owner.startswith(ORG_PREFIX) else "key").inc()

    # -- configuration ----------------------------------------------------------------

    def enable_key_labels(self) -> None:
        """Spend and tokens by key too (`metrics.key_labels: true`): one series per key."""
        if self._key_cost is not None:
            return
        self._key_cost = Counter("tokenbooth_key_cost_usd", "Spend in USD by key",
                                 ("org", "key_id"), registry=self.registry)
        self._key_tokens = Counter("tokenbooth_key_tokens", "Tokens metered by key",
                                   ("org", "key_id", "type"), registry=self.registry)

    def configure(self, cfg: Config) -> None:
        """The policy's metric settings, and the series its alerts watch."""
        if key_labels_enabled(cfg):
            self.enable_key_labels()
        self._prime(cfg)

    def _prime(self, cfg: Config) -> None:
        """Create the counters that alerts watch at zero, so their first increment shows
        in `increase()` (a series born at 1 hides it)."""
        for model in cfg.models:
            self.hold_bound_violations.labels(model)
            self.oversize_events.labels(model)
        for store in STORES:
            self.store_errors.labels(store)
        for service in ("ext_authz", "ext_proc"):
            self.decisions.labels(service, "deny", "service_unavailable")

    def config_reload(self, ok: bool) -> None:
        """The outcome of one reload of a changed config file."""
        self.config_reloads.labels("success" if ok else "failure").inc()
        self.config_last_reload_ok.set(1 if ok else 0)

    def watch_spool(self, spool: str, pending_bytes: Callable[[], float]) -> None:
        """Export a spool's backlog, read at each scrape."""
        self.spool_bytes.labels(spool).set_function(pending_bytes)

    # -- events -----------------------------------------------------------------------

    def observe(self, rec: UsageRecord, ttft_s: float | None = None) -> None:
        """Every metric of one usage record. `ttft_s`: a stream's time to its first
        content chunk (None when not a stream or nothing was generated)."""
        key = (rec.model, rec.upstream_model, rec.endpoint, rec.status)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series(self, rec)
        seconds = rec.duration_ms / 1000
        p, c = rec.prompt_tokens, rec.completion_tokens
        s.requests.inc()
        if rec.status != LOST:
            # A lost record's duration is its lease (when it ended is not known): each
            # added a 630 s sample to the latency dashboards (admin tester).
            s.latency.observe(seconds)
            s.duration.observe(seconds)
        s.tokens_in.inc(p)
        s.tokens_out.inc(c)
        if p:
            s.usage_in.observe(p)
        if c:
            s.usage_out.observe(c)
        if ttft_s is not None and s.ttft is not None and s.tpot is not None:
            s.ttft.observe(ttft_s)
            if c > 1:
                s.tpot.observe(max(seconds - ttft_s, 0.0) / (c - 1))
        nano = usd_to_nano(Decimal(rec.cost_usd))
        if nano:
            _add_exact(self._cost_by, self.cost, (rec.org, rec.model), nano)
        if self._key_cost is not None:
            self._by_key(rec, nano)

    def _by_key(self, rec: UsageRecord, nano: int) -> None:
        assert self._key_cost is not None and self._key_tokens is not None
        _add_exact(self._key_cost_by, self._key_cost, (rec.org, rec.key_id), nano)
        self._key_tokens.labels(rec.org, rec.key_id, "input").inc(rec.prompt_tokens)
        self._key_tokens.labels(rec.org, rec.key_id, "output").inc(rec.completion_tokens)

    def store_result(self, store: str, ok: bool) -> None:
        """A store answered (`ok`) or failed as unavailable."""
        self.store_up.labels(store).set(1 if ok else 0)
        if not ok:
            self.store_errors.labels(store).inc()


@dataclass(slots=True)
class _Exact:
    series: Counter
    nano: int = 0


def _add_exact(totals: dict[tuple[str, str], _Exact], counter: Counter,
               labels: tuple[str, str], nano: int) -> None:
    """Add `nano` to a USD counter's series, kept exact: its value is set to the series'
    total in nano-USD over 1e9 (one rounding to a float, not one per record)."""
    entry = totals.get(labels)
    if entry is None:
        entry = totals[labels] = _Exact(counter.labels(*labels))
    entry.nano += nano
    entry.series._value.set(entry.nano / 1e9)  # (a counter offers no set of its own)


class HoldsInFlight:
    """`tokenbooth_holds_in_flight{org}`: up when admission admits a request, down at
    its settlement (once, however many settle calls it takes: key and org)."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._by_org: dict[str, Gauge] = {}
        self._held: dict[str, str] = {}  # request_id -> org

    def update(self, ask: Ask, admitted: bool) -> None:
        if admitted:
            org = self._held[ask.request_id] = ask.org
            self._child(org).inc()
        else:
            gone = self._held.pop(ask.request_id, None)
            if gone is not None:
                self._child(gone).dec()

    def _child(self, org: str) -> Gauge:
        child = self._by_org.get(org)
        if child is None:
            child = self._by_org[org] = self._gauge.labels(org)
        return child


class ObservedKeyStore:
    """The key store as the key check sees it, reporting the store's health: each lookup
    that answers sets `tokenbooth_store_up{store="keys"}` to 1, each unavailable to 0. A
    store that reads in the background (Redis: its version polls) reports every call
    itself (`on_health`), so an outage shows while cached keys are still served
    (observability tester: the gauge stayed 1 until an unknown key came)."""

    def __init__(self, store: KeyStore, metrics: Metrics) -> None:
        self._store = store
        self._up = metrics.store_up.labels("keys")
        self._up.set(1)  # until a call fails
        self._metrics = metrics
        self._self_reporting = isinstance(store, ReportsHealth)
        if isinstance(store, ReportsHealth):
            store.on_health = lambda ok: metrics.store_result("keys", ok)

    async def start(self) -> None:
        await self._store.start()

    async def close(self) -> None:
        await self._store.close()

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        if self._self_reporting:
            return await self._store.find(fingerprint, secret)
        try:
            record = await self._store.find(fingerprint, secret)
        except StoreUnavailable:
            self._metrics.store_result("keys", False)
            raise
        self._up.set(1)
        return record


@dataclass
class BudgetWatch:
    """Every `interval_s`, each org budget in force (the admin API's stored limits over
    the config's) as its spent fraction in its current period, into
    `tokenbooth_budget_spent_ratio{org}` (one read per org; the store is shared, so every
    replica exports the same value). Orgs leave the gauge when their budget goes; a
    store that does not answer keeps the last values."""

    metrics: Metrics
    store: LimitStore
    config: Callable[[], Config]
    clock: Callable[[], datetime]
    interval_s: float = BUDGET_POLL_S
    # The orgs' limits in force for a config (authz/state/orgs.py); else the config's.
    orgs: Callable[[Config], Mapping[str, OrgLimits]] | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # the loop must outlive any one failure
                log.exception("budget metrics poll failed")
            await asyncio.sleep(self.interval_s)

    async def poll(self) -> None:
        now = self.clock()
        gauge = self.metrics.budget_spent_ratio
        cfg = self.config()
        budgets = _org_budgets(cfg.orgs if self.orgs is None else self.orgs(cfg))
        for org, (period, budget) in budgets.items():
            # Its refusals' series, at 0 until one: the alert watches a series that exists.
            self.metrics.budget_refusals.labels(org, "org")
            pid = period_id(period, now)
            try:
                spent, _ = await self.store.budget(ORG_PREFIX + org, org, pid, now.timestamp())
            except LimitStoreUnavailable:
                return
            gauge.labels(org).set(spent / budget if budget else 1.0)
        for org in _orgs_of(gauge):
            if org not in budgets:
                with contextlib.suppress(KeyError):
                    gauge.remove(org)


def _org_budgets(orgs: Mapping[str, OrgLimits]) -> dict[str, tuple[str, int]]:
    """org -> (budget period, budget nano-USD), for the orgs with a budget."""
    return {name: (org.budget_period, usd_to_nano(org.budget_usd))
            for name, org in orgs.items() if org.budget_usd is not None}


def _orgs_of(gauge: Gauge) -> list[str]:
    return [s.labels["org"] for m in gauge.collect() for s in m.samples]


def key_labels_enabled(cfg: Config) -> bool:
    """The policy's `metrics.key_labels` (off by default)."""
    return cfg.metrics.key_labels
