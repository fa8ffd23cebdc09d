"""`tokenbooth serve`: one grpc.aio server (ext_authz + ext_proc + ADS + health) and the
side port."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace import TracerProvider

from authz.envoy_config.xds_resources import build_resources
from authz.runtime import in_force, memdebug
from authz.runtime.admin import SERVER_OPTIONS, start_admin
from authz.runtime.admin_api import AdminContext
from authz.runtime.admin_auth import CurrentAdminTokens
from authz.runtime.budget_alerts import AlertFeed, AlertingSink, BudgetAlerts, make_marks
from authz.runtime.metrics import BudgetWatch, Metrics, ObservedKeyStore
from authz.runtime.procs import bind_problem
from authz.runtime.quiet_http import QuietAppRunner
from authz.runtime.recorder import Recorder
from authz.runtime.settings import ADMIN_TOKEN_ENV, where_set
from authz.runtime.side_port import make_side_app
from authz.runtime.snapshot import Runtime
from authz.runtime.tracing import (
    RegistryExport,
    otlp_metric_exporter,
    otlp_provider,
    tracer_of,
)
from authz.services import meter_reports, protos
from authz.services.ext_authz import AuthorizationService
from authz.services.ext_proc import ExternalProcessorService
from authz.services.keyauth import KeyAuthority
from authz.services.xds import AggregatedDiscoveryService, add_to_server
from authz.state.blocking import in_daemon_thread
from authz.state.keys.base import KeyAdmin, KeyStore
from authz.state.keys.factory import make_store
from authz.state.limits import resettle
from authz.state.limits.admission import Admission
from authz.state.limits.base import LimitStore
from authz.state.limits.factory import make_limit_store
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.orgs import OrgLimitsCache, make_org_store
from authz.state.tasks import cancel_and_wait
from authz.state.usage.records import JsonlUsageLog, UsageSink, make_sink
from authz.state.usage.redis_sink import RedisUsageSink
from policy.config import Config, OrgLimits, parse_hostport
from policy.keyrecord import KEY_PREFIX
from policy.keys import fingerprint

log = logging.getLogger("tokenbooth.server")

SERVICE_NAMES = (
    "envoy.service.auth.v3.Authorization",
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "envoy.service.discovery.v3.AggregatedDiscoveryService",
)
RELOAD_INTERVAL_S = 1.0
# A config file modified less than this long ago waits this long again (it may still be
# being written in place): see `Runtime.reload_if_changed`.
RELOAD_SETTLE_S = 0.25
# Past the streams' grace: a cut request's prompt count (authz/services/prompt_counter.py,
# 2 s at most), then its record and settlement.
PROMPT_COUNT_DRAIN_S = 5.0


# The least the gRPC messages between Envoy and the services may carry (see below).
MIN_GRPC_MESSAGE_BYTES = 64 << 20


def grpc_message_limit(cfg: Config) -> int:
    """The largest gRPC message either way, above what a request needs: the body (its
    rewrite is a little larger), one streamed event the services send back whole (up to
    envoy.max_event_bytes, with what was held before it), and a response's bytes Envoy
    buffered while it waited for an answer (with stream_metering: envoy, the body that
    came during the response headers' round trip: a JSON answer of megabytes was one
    message, refused at 1 MiB, and its record lost). The peer is Envoy alone."""
    need = 2 * max(cfg.max_request_body_bytes, cfg.envoy.max_event_bytes) + (1 << 20)
    return max(need, MIN_GRPC_MESSAGE_BYTES)


@dataclass
class Services:
    """The running services of one process; `start()` then `stop()`."""

    runtime: Runtime
    sink: UsageSink | None = None
    store: KeyStore | None = None
    limits: LimitStore | None = None
    # Traces: OTLP when the settings name a collector (or a provider given by tests).
    tracer_provider: TracerProvider | None = None
    # The GenAI metrics by OTLP, likewise (Prometheus on the side port either way).
    metric_exporter: MetricExporter | None = None
    grace_s: float = 10.0
    metrics: Metrics = field(default_factory=Metrics)
    grpc_port: int = 0
    http_port: int = 0
    _server: grpc.aio.Server | None = None
    _side: web.AppRunner | None = None
    _health: health.aio.HealthServicer | None = None
    _reload: asyncio.Task[None] | None = None
    _shadowed: asyncio.Task[None] | None = None  # the look for config keys' ids in the store
    _ready: bool = False
    _limits_closed: bool = False
    _hurried: bool = False  # a second stop signal: no more waiting (see `hurry`)
    _server_grace: float | None = None  # the grace of the gRPC server's stop, once begun
    _stops: set[asyncio.Future[None]] = field(default_factory=set)
    _admission: Admission | None = None
    _xds: AggregatedDiscoveryService | None = None
    _ext_proc: ExternalProcessorService | None = None
    _budgets: asyncio.Task[None] | None = None
    _resettling: asyncio.Task[tuple[int, int]] | None = None
    _alerts: BudgetAlerts | None = None
    _otlp_metrics: RegistryExport | None = None
    # Stored org limits (admin API), polled; the admin API's listener when served.
    orgs: OrgLimitsCache | None = None
    admin_port: int = 0
    _admin: web.AppRunner | None = None

    def ready(self) -> bool:
        return self._ready

    async def _start_state(self, cfg: Config) -> tuple[Recorder, Admission]:
        """Keys, records, limits and admission, in the order their starts need."""
        if self.store is None:
            self.store = make_store(cfg)
        await self.store.start()
        # The sink first: the limit store's start may write the records of lost holds.
        if self.sink is None:
            self.sink = make_sink(cfg)
        owed: list[resettle.Owed] = []
        if isinstance(self.sink, RedisUsageSink):
            # Before its start, whose drain retires the segments the last process left;
            # read and parsed in a thread (up to MAX_RECORDS).
            sink = self.sink
            owed = await asyncio.to_thread(lambda: resettle.owed(sink.previous_records(
                resettle.HORIZON_S, resettle.MAX_RECORDS), cfg.envoy.hold_lease_s))
            await sink.start()
        feed = AlertFeed()  # records mark the owners whose budget alerts to check
        recorder = Recorder(AlertingSink(self.sink, feed), self.metrics)
        if self.limits is None:
            self.limits = make_limit_store(
                cfg, on_lost=recorder.lost, on_reset=self.metrics.store_resets.inc,
                records_waiting=self.sink.waiting if isinstance(self.sink, JsonlUsageLog)
                else None)
        await self.limits.start()
        self._admission = Admission(
            # The outage policy in force: a reload may change it mid-outage.
            self.limits, lambda: self.runtime.snapshot.config.limits.on_store_error,
            spool_dir=cfg.data_dir / "settle-spool",
            on_lost=recorder.lost, on_spooled=recorder.spooled,
            on_hold=self.metrics.holds.update,
            on_store=lambda ok: self.metrics.store_result("limits", ok),
            on_exhausted=partial(_budget_refused, feed, self.metrics))
        await self._admission.start()
        if owed and isinstance(self.limits, RedisLimitStore):
            # The settlements the last process may not have made: in the background, as
            # long as Redis takes to answer (resettle.py).
            self._resettling = asyncio.create_task(resettle.resettle(
                self.limits, owed, lambda: self.runtime.clock().timestamp()),
                name="resettle")
        self._alerts = BudgetAlerts(lambda: self.runtime.snapshot.config, self.limits,
                                    self.store, make_marks(cfg), feed,
                                    self.runtime.settings.webhook_secret, self.runtime.clock,
                                    orgs=self._orgs_in_force)
        await self._alerts.start()
        return recorder, self._admission

    def _start_metrics(self, cfg: Config, admission: Admission) -> None:
        """OTLP when configured (never connects here), the config's metric settings, the
        spools' backlogs and the org budgets' poll."""
        m, settings, sink = self.metrics, self.runtime.settings, self.sink
        if self.metric_exporter is None:
            self.metric_exporter = otlp_metric_exporter(settings.otlp_endpoint)
        if self.metric_exporter is not None:
            self._otlp_metrics = RegistryExport(m, self.metric_exporter,
                                                settings.service_name)
            self._otlp_metrics.start()
        m.configure(cfg)
        self.runtime.on_reload = m.config_reload
        m.watch_spool("settlements", lambda: admission.spooled_bytes)
        if isinstance(sink, RedisUsageSink):
            m.watch_spool("usage", lambda: sink.pending)
        assert self.limits is not None
        watch = BudgetWatch(m, self.limits, lambda: self.runtime.snapshot.config,
                            self.runtime.clock, orgs=self._orgs_in_force)
        self._budgets = asyncio.create_task(watch.run(), name="budget-metrics")

    def _orgs_in_force(self, cfg: Config) -> Mapping[str, OrgLimits]:
        """The admin API's stored org limits over the config's (once the cache runs)."""
        return cfg.orgs if self.orgs is None else self.orgs.in_force(cfg)

    async def start(self) -> None:
        cfg = self.runtime.snapshot.config
        recorder, admission = await self._start_state(cfg)
        self._start_metrics(cfg, admission)
        await self._start_admin(cfg)
        assert self.store is not None
        if self.tracer_provider is None:
            settings = self.runtime.settings
            # Never connects here.
            self.tracer_provider = otlp_provider(settings.otlp_endpoint, settings.service_name)
        tracer = tracer_of(self.tracer_provider)
        limit = grpc_message_limit(cfg)
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Envoy PINGs every connection (clusters.SERVICES_PING_S) to find a frozen
                # replica; gRPC's default answers pings more often than every 5 minutes
                # on a quiet connection (an idle ADS stream) with a GOAWAY.
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
                ("grpc.http2.max_ping_strikes", 0),
            ]
        )
        protos.add_AuthorizationServicer_to_server(
            AuthorizationService(
                KeyAuthority(self.runtime, ObservedKeyStore(self.store, self.metrics)),
                self.metrics, tracer),
            server
        )
        reports = meter_reports.MeterReports()
        self._ext_proc = ExternalProcessorService(
            self.runtime, recorder, self.metrics, admission, tracer,
            self.orgs.org_limits if self.orgs else None, reports)
        protos.add_ExternalProcessorServicer_to_server(self._ext_proc, server)
        # Streams metered in Envoy report here at their end (envoy.stream_metering).
        meter_reports.add_to_server(meter_reports.AccessLogReceiver(reports), server)
        self._xds = AggregatedDiscoveryService(build_resources, cfg)
        add_to_server(self._xds, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host, port = parse_hostport(cfg.services.grpc_listen)
        with _listening(cfg.services.grpc_listen, where_set("services.grpc_listen")):
            bound = server.add_insecure_port(f"{_grpc_host(host)}:{port}")
            if bound == 0:
                raise OSError("gRPC could not bind")
        self.grpc_port = bound
        await server.start()
        self._server = server

        hhost, hport = parse_hostport(cfg.services.http_listen)
        # As the admin API's (a body claiming a coding logged aiohttp's traceback for
        # each unauthenticated request); nothing here reads a body.
        self._side = QuietAppRunner(make_side_app(self.metrics, self.ready), **SERVER_OPTIONS)
        await self._side.setup()
        with _listening(cfg.services.http_listen, where_set("services.http_listen")):
            await web.TCPSite(self._side, hhost, hport).start()
        self.http_port = self._side.addresses[0][1]

        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._reload = asyncio.create_task(self._reload_loop())
        self._ready = True
        self._record_in_force()
        self._look_for_shadowed_keys(cfg)
        log.info(
            "tokenbooth services ready",
            extra={"grpc": f"{host}:{self.grpc_port}", "http": f"{hhost}:{self.http_port}"},
        )

    async def _start_admin(self, cfg: Config) -> None:
        """The org limits cache, and the admin API when some admin token is configured."""
        if self.orgs is None:
            self.orgs = OrgLimitsCache(make_org_store(cfg))
        await self.orgs.start()
        env_token = self.runtime.settings.admin_token
        if env_token is not None and (env_token.startswith(KEY_PREFIX) or fingerprint(
                env_token) in {k.sha256 for k in cfg.keys}):
            # A client's key would be an admin's token too (admin review).
            raise ValueError(f"${ADMIN_TOKEN_ENV} is an API key's secret: an admin token "
                             "must be a secret of its own")
        if env_token is not None and fingerprint(env_token) in {
                t.sha256 for t in cfg.admin.tokens}:
            # (a `read` token of the same secret would be raised to `admin`: retest)
            raise ValueError(f"${ADMIN_TOKEN_ENV} is the secret of an admin token in the "
                             "config: give each token a secret of its own")
        tokens = CurrentAdminTokens(lambda: self.runtime.snapshot.config, env_token)
        if not tokens:  # none at start: no admin API (admin.listen is read at start only)
            return
        assert self.store is not None and self.limits is not None
        ctx = AdminContext(lambda: self.runtime.snapshot.config, self.store, self.limits,
                           self.orgs, tokens, clock=self.runtime.clock)
        with _listening(cfg.admin.listen, where_set("admin.listen")):
            self._admin, self.admin_port = await start_admin(
                ctx, parse_hostport(cfg.admin.listen))
        log.info("admin API ready", extra={"admin_api": cfg.admin.listen,
                                           "admin_port": self.admin_port})

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_SETTLE_S if self.runtime.unsettled
                                else RELOAD_INTERVAL_S)
            try:
                await self._reload_once()
            except Exception as e:  # never the end of reloads: the next edit may be good
                self.metrics.config_reload(False)
                log.error("config reload failed, keeping the last good config: %s: %s",
                          type(e).__name__, e)

    async def _reload_once(self) -> None:
        """Reload a changed file. It is looked at, read and validated in threads of their
        own: parsing a large file takes a second, during which the event loop would answer
        no decision (Envoy's decision timeout then fails requests), and a stat or a read
        may block outright (a stalled network mount, a named pipe). One look at a time:
        a look that never returns holds up reloads, not the loop, nor a pile of threads."""
        rt = self.runtime
        # Even the look (a stat) runs in the thread: on a stalled mount it blocks too.
        stamp = await in_daemon_thread(lambda: rt.changed(RELOAD_SETTLE_S),
                                       "tokenbooth-config-look")
        if stamp is None:
            return
        read, now, regular = await in_daemon_thread(rt.read_after, "tokenbooth-config-read")
        if rt.finish_reload(stamp, read, (now, regular)):
            self.metrics.configure(rt.snapshot.config)  # series of models added
            if self._xds is not None:
                await self._xds.update(rt.snapshot.config)
            self._look_for_shadowed_keys(rt.snapshot.config)
            self._record_in_force()

    def _record_in_force(self) -> None:
        """What this process acts on, for the CLI's state commands (`in_force.py`)."""
        rt = self.runtime
        if rt.config_path is None:
            return
        try:
            in_force.write(rt.snapshot.config.data_dir, rt.config_path, rt.start_text, rt.text)
        except OSError as e:  # the CLI then reads the file alone, as before
            log.warning("cannot record the config in force for the CLI: %s",
                        e.strerror or e)

    def _look_for_shadowed_keys(self, cfg: Config) -> None:
        """`_warn_shadowed_keys` in the background: it reads every stored key (one file
        read, or Redis' batched reads), which neither the start nor a reload waits for.
        A newer config's look replaces one still under way."""
        if not isinstance(self.store, KeyAdmin) or not cfg.keys:
            return
        if self._shadowed is not None:
            self._shadowed.cancel()
        self._shadowed = asyncio.create_task(self._warn_shadowed_keys(self.store, cfg))

    @staticmethod
    async def _warn_shadowed_keys(store: KeyAdmin, cfg: Config) -> None:
        """A key in the config file whose id a stored key has too: the stored one is refused
        at every use (`keyauth`) and the admin API will not touch it (the config owns the
        id). Said once, when the config is loaded, not only per refused request."""
        declared = {key.id: key for key in cfg.keys}
        try:
            stored = await store.list_keys()
        except Exception as e:  # a store away: the requests' own check still refuses
            log.warning("cannot look for stored keys shadowed by the config: %s", e)
            return
        for record in stored:
            key = declared.get(record.id)
            if key is not None and record.sha256 != key.sha256:
                log.error("the config file declares key %r, which is also a stored key's id "
                          "(org %r): the stored key is refused until one of them is renamed "
                          "(its requests get 401)", key.id, record.org,
                          extra={"key_id": key.id})

    async def stop(self) -> None:
        """Stop taking new streams; let in-flight ones finish within the grace period."""
        was_ready, self._ready = self._ready, False
        if was_ready and self.runtime.config_path is not None:
            in_force.remove(self.runtime.snapshot.config.data_dir)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        # Any may be in a Redis call. A re-settlement cut here leaves the spool unmarked
        # (below): the next start looks again, at what the spool still keeps of them.
        resettled = self._resettling is None or (self._resettling.done()
                                                 and not self._resettling.cancelled())
        await cancel_and_wait(self._reload, self._budgets, self._resettling, self._shadowed)
        if self._alerts is not None:
            await self._alerts.close()
        if self._xds is not None:
            self._xds.close()  # its streams never end on their own
        if self._server is not None:
            grace = 0.0 if self._hurried else self.grace_s
            if self._ext_proc is not None:
                # Streams still open when the grace ends are cancelled: their records
                # charge the whole hold (Envoy serves the rest unmetered).
                self._ext_proc.stopping(grace)
            self._server_grace = grace
            await self._server.stop(grace)
            if self._ext_proc is not None:
                await self._ext_proc.stalls.close()
                # Records waiting on a backend's prompt count, and their settlements.
                await self._ext_proc.drain(PROMPT_COUNT_DRAIN_S)
                if self._hurried:
                    log.warning(
                        "stop hurried by a second signal: %d request(s) in flight left "
                        "to the lost-hold sweep (charged in full, a `lost` record each)",
                        self._ext_proc.left_to_sweep,
                        extra={"left_to_sweep": self._ext_proc.left_to_sweep})
        if self._side is not None:
            await self._side.cleanup()
        if self._admin is not None:
            await self._admin.cleanup()
        if self.orgs is not None:
            await self.orgs.close()
        if self._admission is not None:
            await self._admission.close()  # after the streams: their settlements are in
        if isinstance(self.sink, RedisUsageSink):
            await self.sink.aclose()  # delivers what it can in ~2 s; the spool keeps the rest
            # Whole: every record's settlement made (or spooled), none cut by the drain's
            # bound, no re-settlement cut; then the next start re-settles nothing.
            if self._admission is not None and resettled and (
                    self._ext_proc is None or not self._ext_proc.unfinished):
                self.sink.mark_stopped()
        elif self.sink is not None:
            # The embedded state first: it snapshots only once every record is on disk
            # (else the requests whose records the disk refused stay in flight for the
            # next start, charged with `lost` records), which the sink's close would hide
            # by moving those records to the error log.
            if self.limits is not None:
                await self.limits.close()
                self._limits_closed = True
            self.sink.close()
        if self.store is not None:
            await self.store.close()
        if self.limits is not None and not self._limits_closed:
            await self.limits.close()
        # Bounded, side by side: an unreachable collector costs at most one export timeout.
        shutdowns = [asyncio.to_thread(p.shutdown)
                     for p in (self.tracer_provider, self._otlp_metrics) if p is not None]
        await asyncio.gather(*shutdowns)
        if was_ready:  # a start that failed says why, not that anything stopped
            log.info("tokenbooth services stopped")

    def hurry(self) -> None:
        """A second SIGTERM/SIGINT during `stop`: stop waiting for the streams in flight
        (the grace), the prompt counts and the meter reports. Money is not lost: a
        request without a record keeps its hold in the store (journaled with `state:
        memory`), which the lost-hold sweep charges in full with its `lost` record (at
        the next start, or in another replica once its lease ends), as if this process
        were killed; records and settlements already under way finish."""
        if self._hurried:
            return
        self._hurried = True
        if self._ext_proc is not None:
            self._ext_proc.hurry()
        if self._server is not None and self._server_grace:
            # A second stop with no grace cancels every open stream now (the first
            # `stop` call, still waiting on its grace, then returns as well). Only then:
            # before that stop began it takes no grace (`_hurried`), and two stops begun
            # at once crash grpc (a segfault in grpc.aio's Server.stop, 1.85).
            self._stops.add(task := asyncio.ensure_future(self._server.stop(0)))
            task.add_done_callback(self._stops.discard)


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve_forever(runtime: Runtime) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly."""
    services = Services(runtime)
    try:
        await services.start()
    except BaseException:
        await services.stop()  # whatever did start (e.g. gRPC when the side port is busy)
        raise
    memdebug.install(runtime.settings.tracemalloc, runtime.snapshot.config.data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        # The first stops; any later one hurries the stop (users expect a second Ctrl-C
        # to stop at once). One handler for both, so that a second signal whose callback
        # is queued behind the first (`up` sends both at once when hurried before the
        # services' turn) is never missed: swapping handlers after the first left such a
        # callback to the first's handler, and the stop was not hurried.
        if stop.is_set():
            services.hurry()
        else:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    log.info("shutting down")
    await services.stop()


@contextlib.contextmanager
def _listening(hostport: str, setting: str) -> Iterator[None]:
    """Around a bind: an OSError naming the address, the setting and why (a busy port
    read as `[Errno 98] … ('127.0.0.1', 9090)` or gRPC's "Failed to bind", naming no
    setting). Checked first too, so that gRPC logs no error line of its own."""
    host, port = parse_hostport(hostport)
    problem = bind_problem(host, port) if port else None
    if problem:
        raise OSError(f"{hostport} ({setting}) {problem}")
    try:
        yield
    except (OSError, RuntimeError) as e:  # grpc: RuntimeError("Failed to bind …")
        detail = e.strerror if isinstance(e, OSError) and e.strerror else e
        why = (bind_problem(host, port) if port else None) or (
            f"cannot be listened on ({detail})")
        raise OSError(f"{hostport} ({setting}) {why}") from None


def _budget_refused(feed: AlertFeed, metrics: Metrics, owner: str, org: str,
                    period: str) -> None:
    """A budget refused a request for want of what was left: the webhook's alerts and the
    metric's count."""
    feed.exhausted(owner, org, period)
    metrics.budget_refused(owner, org, period)
