"""Budget alert webhooks against a local HTTP receiver: thresholds in order, once each per
period (across restarts and replicas), retries after a 500, the signature, and a secret
that no log line carries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from authz.runtime.budget_alerts import (
    MAX_TIER,
    AlertFeed,
    AlertingSink,
    BudgetAlerts,
    FileMarks,
    Marks,
    RedisMarks,
    left_tier,
    reached,
)
from authz.runtime.budget_alerts import receiver as receiver_of
from authz.runtime.overrides import Overrides
from authz.runtime.server import Services
from authz.runtime.settings import Settings
from authz.runtime.snapshot import Runtime
from authz.state.limits.base import LimitStore
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from policy.config import AlertSettings, Config, ConfigError, OrgLimits, Price, load_config
from policy.errors import ApiError
from policy.limits import Ask, Limits, period_id, usd_to_nano
from policy.quota import org_hold
from policy.usage import Usage, UsageRecord, make_record
from tests.helpers import free_port, write_policy
from tests.redis_server import RedisServer

SECRET = "whsec-test-0123456789-do-not-log-me"
PATH_TOKEN = "T0KEN-IN-THE-PATH"
KEY = "k-budget"
KEYS = [{"id": KEY, "org": "acme", "sha256": "4" * 64, "budget_usd": "10",
         "budget_period": "day"},
        {"id": "k-free", "org": "acme", "sha256": "5" * 64}]
ORGS = {"acme": {"budget_usd": "100", "budget_period": "month"}}
DAY1 = datetime(2026, 3, 10, 12, tzinfo=UTC)


class Receiver:
    """A webhook receiver on a free port: keeps each request, answers the scripted
    statuses first, then 200."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]

    def delivered(self) -> list[tuple[str, str, str]]:
        """(owner, period, threshold) of each distinct alert received, in order."""
        out: list[tuple[str, str, str]] = []
        for b in self.bodies():
            item = (b["owner"], b["period"], b["threshold"])
            if item not in out:
                out.append(item)
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/{token}", r.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    r.url = f"http://127.0.0.1:{port}/hooks/{PATH_TOKEN}"
    try:
        yield r
    finally:
        await runner.cleanup()


def policy(tmp_path: Path, url: str, **alerts: Any) -> Config:
    settings = {"webhook_url": url, "thresholds": [0.5, 0.8, 1.0],
                "check_interval_s": 3600, "rescan_s": 3600, "max_attempts": 3,
                "timeout_s": 2, **alerts}
    return load_config(write_policy(tmp_path, "http://127.0.0.1:8000", keys=KEYS, orgs=ORGS,
                                    alerts=settings))


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def spend(store: LimitStore, owner: str, usd: str, kind: str, now: datetime) -> None:
    """Charge `usd` to the owner's ledger of the period `now` falls in."""
    nano = usd_to_nano(Decimal(usd))
    limits = Limits(budget_nano=usd_to_nano(Decimal(1000)), budget_period=kind)
    ask = Ask(f"r-{owner}-{now.timestamp()}-{usd}", owner, "acme", 0, nano,
              period_id(kind, now), 60.0)
    assert (await store.admit(limits, ask, now.timestamp())).allowed
    assert (await store.settle(limits, ask, 0, nano, now.timestamp())).applied


def make_alerts(cfg: Config, store: LimitStore, marks: Marks, clock: Clock,
                feed: AlertFeed | None = None, secret: str | None = SECRET) -> BudgetAlerts:
    return BudgetAlerts(lambda: cfg, store, None, marks, feed or AlertFeed(), secret, clock,
                        backoff_s=0.01)


async def checked(alerts: BudgetAlerts, everyone: bool = True) -> None:
    await alerts.check(everyone)
    await alerts.idle()


def test_reached_is_exact() -> None:
    ts = [Decimal("0.5"), Decimal("0.8"), Decimal(1)]
    assert reached(4_999_999_999, 10**10, ts) == []
    assert reached(5 * 10**9, 10**10, ts) == ts[:1]
    assert reached(10**10, 10**10, ts) == ts
    assert reached(0, 0, ts) == [] and reached(1, 0, ts) == ts


def test_the_alerts_section_is_validated(tmp_path: Path) -> None:
    cfg = policy(tmp_path, "https://hooks.example/x", thresholds=[1.0, 0.25, 0.25])
    assert cfg.alerts.thresholds == (Decimal("0.25"), Decimal(1))
    for bad in ({"webhook_url": "ftp://h/x"}, {"thresholds": [0]}, {"thresholds": [1.5]},
                {"thresholds": []}, {"max_attempts": 0}):
        with pytest.raises(ConfigError, match="alerts"):
            policy(tmp_path, "https://hooks.example/x", **bad)


async def test_thresholds_in_order_once_each_per_period(receiver: Receiver,
                                                        tmp_path: Path) -> None:
    cfg = policy(tmp_path, receiver.url)
    store, clock = MemoryLimitStore(), Clock(DAY1)
    marks_path = tmp_path / "alerts-sent.json"
    alerts = make_alerts(cfg, store, FileMarks(marks_path), clock)
    await alerts.start()
    try:
        await spend(store, KEY, "4.99", "day", DAY1)
        await checked(alerts)
        assert receiver.got == []
        await spend(store, KEY, "4.01", "day", DAY1)  # 9.00: past 0.5 and 0.8 at once
        await checked(alerts)
        await checked(alerts)  # nothing twice
        await spend(store, KEY, "1", "day", DAY1)
        await spend(store, "org:acme", "50", "month", DAY1)
        await checked(alerts)
        day1 = period_id("day", DAY1)
        assert receiver.delivered() == [(KEY, day1, "0.5"), (KEY, day1, "0.8"),
                                        (KEY, day1, "1"), ("org:acme", "month:2026-03", "0.5")]
        assert len(receiver.got) == 4
        first = receiver.bodies()[0]
        assert first | {"id": None, "at": None} == {
            "id": None, "type": "budget.threshold_reached", "owner": KEY, "kind": "key",
            "org": "acme", "key_id": KEY, "period": day1, "threshold": "0.5",
            "spent_usd": "9", "budget_usd": "10", "left_usd": "1", "ratio": "0.9000",
            "at": None}
        # The next day is a new period: its own spend, its own alerts.
        clock.now = DAY1 + timedelta(days=1)
        await checked(alerts)
        assert len(receiver.got) == 4
        await spend(store, KEY, "5", "day", clock.now)
        await checked(alerts)
        assert receiver.delivered()[-1] == (KEY, period_id("day", clock.now), "0.5")
    finally:
        await alerts.close()
    # A restart remembers what was sent (the file in data_dir).
    again = make_alerts(cfg, store, FileMarks(marks_path), clock)
    await again.start()
    try:
        await checked(again)
    finally:
        await again.close()
    assert len(receiver.got) == 5


async def test_retries_after_a_500_then_gives_up_then_a_later_check_sends_it(
        receiver: Receiver, tmp_path: Path) -> None:
    cfg = policy(tmp_path, receiver.url, thresholds=[0.5])
    store, clock = MemoryLimitStore(), Clock(DAY1)
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock)
    await alerts.start()
    try:
        await spend(store, KEY, "6", "day", DAY1)
        receiver.statuses = [500, 503]  # then 200: the third attempt delivers
        await checked(alerts)
        assert len(receiver.got) == 3
        assert len({body for _, body in receiver.got}) == 1  # the same body each time
        await spend(store, "org:acme", "60", "month", DAY1)
        receiver.statuses = [500, 502, 500]  # max_attempts: 3, then the claim is released
        await checked(alerts)
        assert len(receiver.got) == 6
        await checked(alerts)  # tried again, and delivered
        assert len(receiver.got) == 7
        assert receiver.delivered() == [(KEY, period_id("day", DAY1), "0.5"),
                                        ("org:acme", "month:2026-03", "0.5")]
        # A receiver that refuses (a 4xx) is not asked again this period.
        store2 = MemoryLimitStore()
        other = make_alerts(cfg, store2, FileMarks(tmp_path / "m2.json"), clock)
        await other.start()
        await spend(store2, KEY, "6", "day", DAY1)
        receiver.statuses = [400]
        await checked(other)
        await checked(other)
        await other.close()
        assert len(receiver.got) == 8
    finally:
        await alerts.close()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_no_delivery_and_is_tried_again(
        receiver: Receiver, tmp_path: Path, status: int,
        caplog: pytest.LogCaptureFixture) -> None:
    """A 3xx was taken as the receiver refusing the alert for good: an http -> https
    redirect lost every alert (admin review). Not followed; tried again."""
    cfg = policy(tmp_path, receiver.url, thresholds=[0.5])
    store, clock = MemoryLimitStore(), Clock(DAY1)
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock)
    await alerts.start()
    try:
        await spend(store, KEY, "6", "day", DAY1)
        receiver.statuses = [status]  # then 200
        await checked(alerts)
        assert len(receiver.got) == 2
        assert receiver.delivered() == [(KEY, period_id("day", DAY1), "0.5")]
        assert any("a redirect, not followed" in str(getattr(r, "error", ""))
                   for r in caplog.records)
    finally:
        await alerts.close()


async def test_the_signature_verifies_and_no_log_carries_the_secret(
        receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = policy(tmp_path, receiver.url, thresholds=[0.5])
    store, clock = MemoryLimitStore(), Clock(DAY1)
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock)
    await alerts.start()
    try:
        await spend(store, KEY, "6", "day", DAY1)
        receiver.statuses = [500]
        await checked(alerts)
    finally:
        await alerts.close()
    for headers, body in receiver.got:
        mac = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Tokenbooth-Signature"] == f"sha256={mac}"
        assert headers["X-Tokenbooth-Event"] == "budget.threshold_reached"
        assert headers["X-Tokenbooth-Delivery"] == json.loads(body)["id"]
    assert len(receiver.got) == 2
    logged = [r.getMessage() + repr(vars(r)) for r in caplog.records]
    assert any("budget alert delivered" in line for line in logged)
    assert any("not delivered" in line and "500" in line for line in logged)
    assert not [line for line in logged if SECRET in line or PATH_TOKEN in line]
    assert SECRET not in repr(Settings(webhook_secret=SECRET))
    assert Settings.from_env({"TOKENBOOTH_WEBHOOK_SECRET": SECRET}).webhook_secret == SECRET


async def test_unsigned_without_a_secret(receiver: Receiver, tmp_path: Path) -> None:
    cfg = policy(tmp_path, receiver.url, thresholds=[0.5])
    store = MemoryLimitStore()
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), Clock(DAY1), secret=None)
    await alerts.start()
    try:
        await spend(store, KEY, "6", "day", DAY1)
        await checked(alerts)
    finally:
        await alerts.close()
    [(headers, _)] = receiver.got
    assert "X-Tokenbooth-Signature" not in headers


async def test_a_webhook_a_reload_sets_warns_it_is_unsigned_once(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Without TOKENBOOTH_WEBHOOK_SECRET the warning came only at start: a webhook added
    by a reload sent unsigned alerts silently. Now once per webhook URL, at start or at
    the first check that sees it."""
    configs = [policy(tmp_path / "a", receiver.url).model_copy(
        update={"alerts": AlertSettings()})]
    alerts = BudgetAlerts(lambda: configs[-1], MemoryLimitStore(), None,
                          FileMarks(tmp_path / "m.json"), AlertFeed(), None, Clock(DAY1))
    caplog.set_level(logging.WARNING, "tokenbooth.alerts")
    await alerts.start()
    try:
        await alerts.check()
        assert "not signed" not in caplog.text
        configs.append(policy(tmp_path / "b", receiver.url))  # the reload
        for _ in range(3):
            await alerts.check()
        [warning] = [r for r in caplog.records if "not signed" in r.getMessage()]
        assert getattr(warning, "receiver", None) == receiver_of(receiver.url)
        assert PATH_TOKEN not in caplog.text  # the URL's path may be a secret
    finally:
        await alerts.close()


async def test_the_feed_picks_the_owners_to_check(receiver: Receiver, tmp_path: Path) -> None:
    cfg = policy(tmp_path, receiver.url, thresholds=[0.5])
    store, clock, feed = MemoryLimitStore(), Clock(DAY1), AlertFeed(size=1)
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock, feed)
    await alerts.start()
    written: list[str] = []

    class Sink:
        def write(self, rec: UsageRecord) -> None:
            written.append(rec.request_id)

        def close(self) -> None:
            return None

    sink = AlertingSink(Sink(), feed)
    try:
        await checked(alerts, False)  # the first check reads every owner: nothing yet
        await spend(store, KEY, "6", "day", DAY1)
        await checked(alerts, False)  # no record announced it, no rescan due: not seen yet
        assert receiver.got == []
        sink.write(record(KEY))
        assert written == ["r1"]
        await checked(alerts, False)
        assert receiver.delivered() == [(KEY, period_id("day", DAY1), "0.5")]
        # A full feed asks for a rescan instead.
        await spend(store, "org:acme", "60", "month", DAY1)
        sink.write(record("k-free"))
        sink.write(record("k-free", "r2"))
        assert feed.overflow
        await checked(alerts, False)
        assert receiver.delivered()[-1] == ("org:acme", "month:2026-03", "0.5")
    finally:
        await alerts.close()


async def test_a_budgets_first_refusal_in_a_period_is_alerted_once(
        receiver: Receiver, tmp_path: Path) -> None:
    """Newcomer tester: with thresholds 0.5, 0.8 and 1.0 a key was refused at 75 % of
    its budget (what was left could not cover the next request's worst case), and no
    alert said so: spend alone never reached 1.0. A refusal is its own event,
    `budget.request_refused`, of the period it happened in (review: one just before
    midnight was sent for the next day, and took that day's marker), once per halving
    of what is left."""
    cfg = policy(tmp_path, receiver.url)
    store, clock, feed = MemoryLimitStore(), Clock(DAY1), AlertFeed()
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock, feed)
    await alerts.start()
    day1, day2 = period_id("day", DAY1), period_id("day", DAY1 + timedelta(days=1))
    try:
        await checked(alerts, False)  # the first check reads every owner: nothing yet
        await spend(store, KEY, "7.5", "day", DAY1)
        feed.exhausted(KEY, "acme", day1)
        feed.exhausted("org:acme", "acme", "month:2026-03")
        await checked(alerts, False)
        mine = [b for b in receiver.bodies() if b["owner"] == KEY]
        assert [(b["type"], b["period"], b["threshold"], b["ratio"]) for b in mine] == [
            ("budget.threshold_reached", day1, "0.5", "0.7500"),
            ("budget.request_refused", day1, None, "0.7500")]
        [org] = [b for b in receiver.bodies() if b["owner"] == "org:acme"]
        assert (org["type"], org["kind"], org["threshold"]) == (
            "budget.request_refused", "org", None)
        refused = [h for h, b in receiver.got if json.loads(b)["owner"] == KEY][1]
        assert refused["X-Tokenbooth-Event"] == "budget.request_refused"
        # Refused again with as much left (2.5 of 10: an eighth to a quarter): not again.
        feed.exhausted(KEY, "acme", day1)
        await checked(alerts, False)
        assert len(receiver.got) == 3
        # Spend past 0.8: its threshold; refused with 1 of 10 left (a sixteenth to an
        # eighth): said again, as the budget runs out (retest tester: the first
        # refusal, of one large request with most of the budget left, silenced these).
        await spend(store, KEY, "1.5", "day", DAY1)
        feed.notify(record(KEY))
        feed.exhausted(KEY, "acme", day1)
        await checked(alerts, False)
        assert [(b["type"], b["threshold"], b["left_usd"]) for b in receiver.bodies()[3:]] \
            == [("budget.threshold_reached", "0.8", "1"),
                ("budget.request_refused", None, "1")]
        # A refusal just before midnight, checked after it: that day's (already sent),
        # and the next day's first refusal is still said.
        feed.exhausted(KEY, "acme", day1)
        clock.now = DAY1 + timedelta(days=1, seconds=5)
        await checked(alerts, False)
        assert len(receiver.got) == 5
        feed.exhausted(KEY, "acme", day2)
        await checked(alerts, False)
        assert receiver.bodies()[-1] | {"id": None, "at": None} == {
            "id": None, "type": "budget.request_refused", "owner": KEY, "kind": "key",
            "org": "acme", "key_id": KEY, "period": day2, "threshold": None,
            "spent_usd": "0", "budget_usd": "10", "left_usd": "10", "ratio": "0.0000",
            "at": None}
        # A refusal before the period turned, checked after: the ledger of its period.
        feed.exhausted("org:acme", "acme", "month:2026-02")
        await spend(store, "org:acme", "99", "month", DAY1 - timedelta(days=30))
        await checked(alerts, False)
        last = receiver.bodies()[-1]
        assert (last["owner"], last["period"], last["spent_usd"]) == (
            "org:acme", "month:2026-02", "99")
    finally:
        await alerts.close()


async def test_a_late_settlement_into_the_last_period_is_alerted(
        receiver: Receiver, tmp_path: Path) -> None:
    """Time tester: a stream admitted at 23:59:56 settled after midnight into the old
    day's ledger (15.7 % of its budget), and only the new day was ever checked: the old
    day's threshold was never said. A record names the period it was charged to, and
    the check reads that ledger as well as the current one."""
    cfg = policy(tmp_path, receiver.url, thresholds=[0.1, 0.5])
    store, clock, feed = MemoryLimitStore(), Clock(DAY1), AlertFeed()
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock, feed)
    await alerts.start()
    day1 = period_id("day", DAY1)
    try:
        await checked(alerts, False)  # the first check reads every owner: nothing yet
        clock.now = DAY1 + timedelta(days=1)
        await spend(store, KEY, "1.57", "day", DAY1)  # charged to the day it began in
        late = replace(record(KEY), key_budget_period=day1,
                       org_budget_period="month:2026-03")
        feed.notify(late)
        await checked(alerts, False)
        assert receiver.delivered() == [(KEY, day1, "0.1")]
        # Said once: the same record's period read again sends nothing more.
        feed.notify(late)
        await checked(alerts, False)
        assert len(receiver.got) == 1
        # A record of another period kind (the key's budget was monthly once) is not
        # read as this budget's.
        other = replace(record(KEY, "r2"), key_budget_period="month:2026-03")
        await spend(store, KEY, "9", "month", DAY1)
        feed.notify(other)
        await checked(alerts, False)
        assert len(receiver.got) == 1
    finally:
        await alerts.close()


async def test_a_rescan_reads_the_period_before_at_start_and_after_the_turn(
        receiver: Receiver, tmp_path: Path) -> None:
    """Retest tester: serve killed just after midnight, when the settlement of a stream
    admitted before it had charged the day before (15 % of its budget): the record's
    mark was gone with the process, and rescans read only the current period, so that
    day's thresholds were never said. The first rescan after a start reads the period
    before too, as do rescans within an hour of the turn."""
    cfg = policy(tmp_path, receiver.url, thresholds=[0.1, 0.5])
    store = MemoryLimitStore()
    day1 = period_id("day", DAY1)
    await spend(store, KEY, "1.57", "day", DAY1)  # what the last run settled, then died
    clock = Clock(DAY1.replace(hour=0) + timedelta(days=1, hours=5))  # far past the turn
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock)
    await alerts.start()
    try:
        await checked(alerts)  # the first rescan since the start
        assert receiver.delivered() == [(KEY, day1, "0.1")]
        # The next day, within the hour after its turn: a late settlement into day 2.
        clock.now = DAY1.replace(hour=0) + timedelta(days=2, minutes=10)
        await spend(store, KEY, "6", "day", DAY1 + timedelta(days=1))
        await checked(alerts)
        assert receiver.delivered()[1:] == [
            (KEY, period_id("day", DAY1 + timedelta(days=1)), "0.1"),
            (KEY, period_id("day", DAY1 + timedelta(days=1)), "0.5")]
        # Past the hour, a rescan reads the current period alone (nothing more to say).
        clock.now = DAY1.replace(hour=0) + timedelta(days=2, hours=2)
        await checked(alerts)
        assert len(receiver.delivered()) == 3
    finally:
        await alerts.close()


async def test_refusals_are_not_alerted_when_turned_off(receiver: Receiver,
                                                        tmp_path: Path) -> None:
    cfg = policy(tmp_path, receiver.url, on_refusal=False)
    store, clock, feed = MemoryLimitStore(), Clock(DAY1), AlertFeed()
    alerts = make_alerts(cfg, store, FileMarks(tmp_path / "m.json"), clock, feed)
    await alerts.start()
    try:
        feed.exhausted(KEY, "acme", period_id("day", DAY1))
        await checked(alerts, False)
    finally:
        await alerts.close()
    assert receiver.got == []


async def test_serve_alerts_a_budget_admission_refused(receiver: Receiver,
                                                       tmp_path: Path) -> None:
    """Through `serve`'s own admission: a request whose worst case does not fit what is
    left of its key's budget is refused, and the alert says so; its org's too."""
    services = alerting_services(receiver, tmp_path, thresholds=[1.0])
    await services.start()
    try:
        assert services.limits is not None and services._admission is not None
        now = services.runtime.clock()
        await spend(services.limits, KEY, "9", "day", now)
        limits = Limits(budget_nano=usd_to_nano(Decimal(10)), budget_period="day")
        ask = Ask("r-big", KEY, "acme", 10, usd_to_nano(Decimal(2)), period_id("day", now),
                  60.0)
        with pytest.raises(ApiError, match="insufficient_quota"):
            await services._admission.admit(limits, ask, now)
        # The org's: $1 a month, $0.60 of it spent, a request whose worst case is $0.50.
        small = replace(ask, request_id="r2", cost_nano=usd_to_nano(Decimal("0.5")))
        org = org_hold(OrgLimits(budget_usd=Decimal(1), budget_period="month"), small, now)
        await spend(services.limits, "org:acme", "0.6", "month", now)
        with pytest.raises(ApiError, match="insufficient_quota"):
            await services._admission.admit_all(org, Limits(), small, now)
        await wait_for(lambda: len(receiver.got) >= 2)
        # Counted for the shipped alert too, by whose budget refused (observability
        # tester: an org blocked at 39% spent set off nothing).
        count = services.metrics.registry.get_sample_value
        assert [count("tokenbooth_budget_refusals_total", {"org": "acme", "budget": b})
                for b in ("key", "org")] == [1.0, 1.0]
    finally:
        await services.stop()
    bodies = sorted((json.loads(b) for _, b in receiver.got), key=lambda b: b["owner"])
    assert [(b["owner"], b["type"], b["threshold"]) for b in bodies] == [
        (KEY, "budget.request_refused", None),
        ("org:acme", "budget.request_refused", None)]
    assert (bodies[0]["spent_usd"], bodies[0]["ratio"]) == ("9", "0.9000")


def record(key: str, rid: str = "r1") -> UsageRecord:
    return make_record(request_id=rid, key_id=key, org="acme", model="demo",
                       upstream_model="tiny-llama", backend="", usage=Usage(1, 1),
                       price=Price(), status=200, stream=False, estimated=False,
                       started_at=DAY1, duration_ms=1.0, endpoint="chat")


async def test_replicas_sharing_redis_send_each_alert_once(receiver: Receiver,
                                                           tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        cfg = policy(tmp_path, receiver.url)
        store = RedisLimitStore(server.url, timeout_s=2.0)
        clock = Clock(DAY1)
        replicas = [make_alerts(cfg, store, RedisMarks(server.url, 2.0, 60.0), clock)
                    for _ in range(3)]
        for r in replicas:
            await r.start()
        await spend(store, KEY, "8", "day", DAY1)
        await spend(store, "org:acme", "100", "month", DAY1)
        for _ in range(2):
            await asyncio.gather(*(checked(r) for r in replicas))
        for r in replicas:
            await r.close()
        await store.close()
    finally:
        server.stop()
    day1 = period_id("day", DAY1)
    expected = {(KEY, day1, "0.5"), (KEY, day1, "0.8"), ("org:acme", "month:2026-03", "0.5"),
                ("org:acme", "month:2026-03", "0.8"), ("org:acme", "month:2026-03", "1")}
    assert len(receiver.got) == 5 and set(receiver.delivered()) == expected


def alerting_services(receiver: Receiver, tmp_path: Path,
                      thresholds: list[float] | None = None) -> Services:
    """`tokenbooth serve`'s Services, alerting `receiver` at half of each budget."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000", keys=KEYS, orgs=ORGS,
                        services={"grpc_listen": f"127.0.0.1:{free_port()}",
                                  "http_listen": f"127.0.0.1:{free_port()}"},
                        alerts={"webhook_url": receiver.url,
                                "thresholds": thresholds or [0.5],
                                "check_interval_s": 0.05, "rescan_s": 0.05})
    return Services(Runtime.from_file(path, Overrides(), Settings(webhook_secret=SECRET)),
                    grace_s=1.0)


async def test_serve_runs_the_alerts(receiver: Receiver, tmp_path: Path) -> None:
    """`tokenbooth serve`'s Services: the checks run in the background, with the
    settings' secret, and stop with the services."""
    services = alerting_services(receiver, tmp_path)
    await services.start()
    try:
        assert services.limits is not None
        now = services.runtime.clock()
        await spend(services.limits, KEY, "5", "day", now)
        await wait_for(lambda: len(receiver.got) >= 1)
    finally:
        await services.stop()
    [(headers, body)] = receiver.got
    assert json.loads(body)["owner"] == KEY
    assert headers["X-Tokenbooth-Signature"].startswith("sha256=")


async def test_org_budgets_set_over_the_admin_api_are_alerted(receiver: Receiver,
                                                               tmp_path: Path) -> None:
    """Org limits stored by the admin API (PUT /v1/orgs/{org}) replace the config's for
    the alerts too: a stored budget over the config's one, and an org only stored."""
    services = alerting_services(receiver, tmp_path)
    await services.start()
    try:
        assert services.limits is not None and services.orgs is not None
        now = services.runtime.clock()
        await services.orgs.put("acme", OrgLimits(budget_usd=Decimal(10), budget_period="day"))
        await services.orgs.put("globex", OrgLimits(budget_usd=Decimal(2)))
        await spend(services.limits, "org:acme", "6", "day", now)  # 6 of the stored 10
        await spend(services.limits, "org:globex", "1", "month", now)
        await wait_for(lambda: len(receiver.delivered()) >= 2)
    finally:
        await services.stop()
    got = {b["owner"]: (b["period"], b["budget_usd"]) for b in receiver.bodies()}
    assert got == {"org:acme": (period_id("day", now), "10"),
                   "org:globex": (period_id("month", now), "2")}


async def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_left_tiers_halve_the_budget() -> None:
    assert [left_tier(left, 1000) for left in (1000, 501, 500, 251, 250, 126, 125, 1, 0,
                                               -5)] == [0, 0, 1, 1, 2, 2, 3, 9, 10, 10]
    assert left_tier(5, 0) == MAX_TIER
