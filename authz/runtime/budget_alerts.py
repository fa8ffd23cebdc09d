"""Budget alerts: a webhook called when a key's or an org's spend reaches a configured
fraction of its budget (`alerts:` in the policy), once per threshold and budget period,
never on a request's path.

- Feed: the recorder writes every usage record through `AlertingSink`, which marks the
  record's key and org for a check (`AlertFeed`: a bounded set, O(1), no I/O; when it
  is full the next check reads every owner instead).
- Check: every `check_interval_s` the marked owners' ledgers are read through the limit
  store (`LimitStore.budget`), and every `rescan_s` those of every owner with a budget
  (keys of the config and of the key store, and orgs): that finds what no record of
  this replica announced: a settlement applied late from the spool, a budget lowered
  by `keys update`. Each threshold reached and not known to be sent goes to the
  delivery queue (bounded; what does not fit waits for the next check), lowest first.
- Delivery: one task, in order. It claims the alert first (`Marks`: with Redis a
  `SET NX` of `tb:{k:<owner>}:alert:<period>:<threshold>` shared by every replica;
  with the embedded state a file in data_dir), then POSTs it, retrying with
  exponential backoff (1 s, 2 s, … at most 60 s; `max_attempts`) after a connection
  error, a timeout, 408, 429 or a 5xx. Answered 2xx, or refused with another 4xx (a
  retry would be refused too): marked sent for the period. Given up: the claim is
  released and a later check tries again.
- Signature: with $TOKENBOOTH_WEBHOOK_SECRET set, `X-Tokenbooth-Signature: sha256=<hex
  HMAC-SHA256 of the raw body>`. The secret is never logged, nor is the webhook URL
  beyond its scheme, host and port (a URL's path may be a credential too).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from authz.state.keys.base import KeyAdmin, KeyStore, StoreUnavailable
from authz.state.limits.base import LimitStore, LimitStoreUnavailable
from authz.state.tasks import cancel_and_wait
from authz.state.usage.records import UsageSink
from policy.config import Config, OrgLimits, redacted
from policy.limits import (
    period_id,
    period_start,
    previous_period_id,
    usd_text,
    usd_to_nano,
)
from policy.usage import UsageRecord, iso_z

log = logging.getLogger("tokenbooth.alerts")

ORG_PREFIX = "org:"
EVENT = "budget.threshold_reached"
# A budget's refusal of a request for what is left, once per halving of what is left and
# period (spend alone seldom reaches the budget: a request is refused once its worst case
# does not fit).
REFUSED_EVENT = "budget.request_refused"
MARKS_FILE = "alerts-sent.json"
BACKOFF_S = 1.0
BACKOFF_MAX_S = 60.0
QUEUE_SIZE = 1000
FEED_SIZE = 10_000
RETRY_STATUSES = frozenset({408, 429})
# How long this replica trusts what it learnt of a marker before asking again.
KNOWN_SENT_S = 86400.0
KNOWN_CLAIMED_S = 300.0
# Sent markers: how long they are kept (`total` budgets: for good).
SENT_TTL_S = {"day": 3 * 86400, "month": 40 * 86400}
# How long after a period turns a rescan also reads the period before (a request
# admitted before the turn settles into it up to its lease later, or from the spool
# after an outage); and the first rescan after a start always does (a restart's
# recovery settles the requests of the last run).
LATE_WINDOW_S = 3600.0


# -- what is checked and what is sent ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budgeted:
    """An owner with a budget: a key (`owner` = its id) or an org (`org:<name>`)."""

    owner: str
    org: str
    budget_nano: int
    period_kind: str  # day | month | total

    @property
    def key_id(self) -> str | None:
        return None if self.owner.startswith(ORG_PREFIX) else self.owner


def reached(spent: int, budget: int, thresholds: Sequence[Decimal]) -> list[Decimal]:
    """The thresholds `spent` has reached, in order (any spend reaches a budget of 0)."""
    if budget <= 0:
        return list(thresholds) if spent > 0 else []
    return [t for t in thresholds if spent >= t * budget]


@dataclass(frozen=True, slots=True)
class Alert:
    who: Budgeted
    period: str  # the period id (policy.limits.period_id)
    threshold: Decimal | None  # None: `REFUSED_EVENT` (see `left_tier`)
    spent: int  # nano-USD when the check read it
    at: datetime

    @property
    def left(self) -> int:
        """What is left of the budget, nano-USD (0 at or past it)."""
        return max(self.who.budget_nano - self.spent, 0)

    @property
    def event(self) -> str:
        return EVENT if self.threshold is not None else REFUSED_EVENT

    @property
    def marker(self) -> tuple[str, str, str]:
        if self.threshold is None:
            tier = left_tier(self.left, self.who.budget_nano)
            return self.who.owner, self.period, f"refused:{tier}"
        return self.who.owner, self.period, format(self.threshold.normalize(), "f")

    @property
    def id(self) -> str:
        """The same for every delivery of this alert (receivers may deduplicate by it)."""
        return hashlib.sha256(orjson.dumps(self.marker)).hexdigest()[:32]

    def body(self) -> bytes:
        budget = self.who.budget_nano
        ratio = (format((Decimal(self.spent) / budget).quantize(Decimal("0.0001")), "f")
                 if budget else None)
        return orjson.dumps({
            "id": self.id, "type": self.event, "owner": self.who.owner,
            "kind": "org" if self.who.key_id is None else "key",
            "org": self.who.org, "key_id": self.who.key_id, "period": self.period,
            "threshold": None if self.threshold is None else self.marker[2],
            "spent_usd": usd_text(self.spent), "budget_usd": usd_text(budget),
            "left_usd": usd_text(self.left), "ratio": ratio, "at": iso_z(self.at)})


MAX_TIER = 10  # a refusal with 1/1024 of the budget left or less: the last one said


def left_tier(left: int, budget: int) -> int:
    """Which halving of the budget `left` is in: 0 for more than half left, 1 for a
    quarter to a half, ... `MAX_TIER` for (nearly) nothing. A refusal is said once per
    tier and period: the first one (perhaps of one large request, with most of the
    budget left) does not silence the later ones as the budget runs out (retest tester)."""
    if budget <= 0 or left <= 0:
        return MAX_TIER
    tier = 0
    while tier < MAX_TIER and left * 2 ** (tier + 1) <= budget:
        tier += 1
    return tier


def signature(secret: str, body: bytes) -> str:
    """The `X-Tokenbooth-Signature` header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def receiver(url: str) -> str:
    """What logs may say of the webhook URL: its scheme, host and port."""
    parts = urlsplit(redacted(url))
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


# -- the feed ---------------------------------------------------------------------------


class AlertFeed:
    """Owners to check, marked by usage records: (key id, org) pairs, at most `size`;
    past that, `overflow` asks the next check to read every owner."""

    def __init__(self, size: int = FEED_SIZE) -> None:
        self._size = size
        self._pairs: set[tuple[str, str]] = set()
        self.overflow = False
        # (owner, period) of the budgets that refused a request for what is left
        # (`exhausted`), since the checker's last look; bounded as the pairs are.
        self._exhausted: set[tuple[str, str]] = set()
        # (owner, period) of the ledgers records were charged to: a request admitted
        # before a period turned settles into the old one, which the check reads as well
        # as the current one (time tester: an old day's threshold was never said).
        self._charged: set[tuple[str, str]] = set()

    def notify(self, rec: UsageRecord) -> None:
        self._mark(rec.key_id, rec.org)
        for owner, period in ((rec.key_id, rec.key_budget_period),
                              (ORG_PREFIX + rec.org, rec.org_budget_period)):
            if owner and period and len(self._charged) < self._size:
                self._charged.add((owner, period))

    def exhausted(self, owner: str, org: str, period: str) -> None:
        """`owner`'s budget (a key id or `org:<name>`) refused a request in `period` (its
        id): too little was left for the request's worst case."""
        self._mark("" if owner.startswith(ORG_PREFIX) else owner, org)
        if len(self._exhausted) < self._size:
            self._exhausted.add((owner, period))

    def _mark(self, key_id: str, org: str) -> None:
        if len(self._pairs) < self._size:
            self._pairs.add((key_id, org))
        else:
            self.overflow = True

    def drain_exhausted(self) -> set[tuple[str, str]]:
        out, self._exhausted = self._exhausted, set()
        return out

    def drain_charged(self) -> set[tuple[str, str]]:
        out, self._charged = self._charged, set()
        return out

    def drain(self) -> tuple[set[tuple[str, str]], bool]:
        pairs, overflow = self._pairs, self.overflow
        self._pairs, self.overflow = set(), False
        return pairs, overflow


class AlertingSink:
    """A usage sink that also marks each record's owners in the feed."""

    def __init__(self, sink: UsageSink, feed: AlertFeed) -> None:
        self._sink, self._feed = sink, feed

    def write(self, record: UsageRecord) -> None:
        self._feed.notify(record)
        self._sink.write(record)

    def close(self) -> None:
        self._sink.close()


# -- markers: once per threshold and period, across replicas ----------------------------


class Marks(Protocol):
    async def claim(self, alert: Alert) -> bool:
        """True if this caller sends `alert` (nobody sent it or is sending it)."""

    async def sent(self, alert: Alert) -> None:
        """Delivered: never again this period."""

    async def release(self, alert: Alert) -> None:
        """Not delivered: a later claim may send it."""

    async def close(self) -> None: ...


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisMarks:
    """`tb:{k:<owner>}:alert:<period>:<threshold>`: a claim (a token, `claim_s` long),
    then `sent` (kept SENT_TTL_S, for good for `total`)."""

    def __init__(self, url: str, timeout_s: float, claim_s: float) -> None:
        from authz.state.keys.redis_store import connect

        self._redis = connect(url, timeout_s)
        self._claim_ms = math.ceil(claim_s * 1000)
        self._token = os.urandom(8).hex()

    @staticmethod
    def _key(alert: Alert) -> str:
        owner, period, threshold = alert.marker
        return f"tb:{{k:{owner}}}:alert:{period}:{threshold}"

    async def claim(self, alert: Alert) -> bool:
        return bool(await self._redis.set(self._key(alert), self._token, nx=True,
                                          px=self._claim_ms))

    async def sent(self, alert: Alert) -> None:
        ttl = SENT_TTL_S.get(alert.who.period_kind)
        await self._redis.set(self._key(alert), "sent", ex=ttl)

    async def release(self, alert: Alert) -> None:
        await self._redis.eval(_RELEASE, 1, self._key(alert), self._token)

    async def close(self) -> None:
        await self._redis.aclose()


class FileMarks:
    """The embedded state's markers (one process): `<data_dir>/alerts-sent.json`, the
    markers sent with when, rewritten whole (atomically) at each delivery; day and
    month markers are dropped once older than SENT_TTL_S."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._claimed: set[str] = set()
        self._sent: dict[str, float] = {}
        try:
            doc = orjson.loads(path.read_bytes())
            self._sent = {str(k): float(v) for k, v in doc.items()}
        except FileNotFoundError:
            pass
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.warning("budget alerts: %s is damaged; alerts of this period may repeat",
                        path)

    async def claim(self, alert: Alert) -> bool:
        m = orjson.dumps(alert.marker).decode()
        if m in self._sent or m in self._claimed:
            return False
        self._claimed.add(m)
        return True

    async def sent(self, alert: Alert) -> None:
        m = orjson.dumps(alert.marker).decode()
        self._claimed.discard(m)
        now = time.time()
        self._sent[m] = now
        self._sent = {k: t for k, t in self._sent.items() if now - t < _keep_s(k)}
        tmp = self._path.with_name(self._path.name + ".tmp")
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(orjson.dumps(self._sent))
        tmp.chmod(0o600)
        os.replace(tmp, self._path)

    async def release(self, alert: Alert) -> None:
        self._claimed.discard(orjson.dumps(alert.marker).decode())

    async def close(self) -> None:
        return None


def _keep_s(marker: str) -> float:
    period = orjson.loads(marker)[1]
    return float(SENT_TTL_S.get(period.partition(":")[0], math.inf))


def make_marks(cfg: Config) -> Marks:
    """Redis markers for `state: redis://`, else the file in data_dir."""
    a = cfg.alerts
    if cfg.state_is_redis:
        claim_s = a.max_attempts * (a.timeout_s + BACKOFF_MAX_S) + 60
        return RedisMarks(cfg.state, cfg.key_store.timeout_s, claim_s)
    return FileMarks(cfg.data_dir / MARKS_FILE)


# -- the checks and the deliveries ------------------------------------------------------


@dataclass
class BudgetAlerts:
    """The background tasks of `tokenbooth serve` (see the module). `config` is read at
    each check, so `alerts:` changes with a reload; without a webhook_url nothing runs
    but the feed's draining."""

    config: Callable[[], Config]
    limits: LimitStore
    keys: KeyStore | None
    marks: Marks
    feed: AlertFeed
    secret: str | None
    clock: Callable[[], datetime]
    backoff_s: float = BACKOFF_S
    queue_size: int = QUEUE_SIZE
    # Every org's limits in force (the admin API's stored ones over the config's);
    # default: the config's `orgs:`.
    orgs: Callable[[Config], Mapping[str, OrgLimits]] | None = None

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(self.queue_size)
        self._pending: set[tuple[str, str, str]] = set()  # queued or being sent
        # (owner, period) refused for what is left, not checked yet
        self._exhausted: set[tuple[str, str]] = set()
        # (owner, period) of the ledgers records were charged to, not checked yet
        self._charged: set[tuple[str, str]] = set()
        self._known: dict[tuple[str, str, str], float] = {}  # marker -> trusted until
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._next_rescan = 0.0
        self._rescanned = False  # a rescan has read every owner since the start
        self._keys_failing = False  # the keys could not be read: said once until they are
        self._warned: str | None = None  # the webhook URL last warned about as unsigned

    def _warn_unsigned(self, webhook_url: str | None) -> None:
        """Once per webhook URL (at start, or when a reload sets one): alerts sent
        without TOKENBOOTH_WEBHOOK_SECRET carry no signature a receiver can check."""
        if webhook_url is not None and not self.secret and webhook_url != self._warned:
            log.warning("budget alerts are not signed: TOKENBOOTH_WEBHOOK_SECRET is not set",
                        extra={"receiver": receiver(webhook_url)})
        self._warned = webhook_url

    async def start(self) -> None:
        self._warn_unsigned(self.config().alerts.webhook_url)
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._check_loop(), name="budget-alerts-check"),
                       asyncio.create_task(self._send_loop(), name="budget-alerts-send")]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        if self._session is not None:
            await self._session.close()
        await self.marks.close()

    async def idle(self) -> None:
        """Until the queue is empty and nothing is being sent (for tests)."""
        await self._queue.join()

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config().alerts.check_interval_s)
            try:
                await self.check()
            except Exception:  # the loop must outlive any one failure
                log.exception("budget alert check failed")

    async def check(self, everyone: bool = False) -> None:
        """Read the marked owners' ledgers (every owner's when a rescan is due, or with
        `everyone`) and queue the thresholds they reached."""
        cfg = self.config()
        pairs, overflow = self.feed.drain()
        exhausted = self.feed.drain_exhausted()
        charged = self.feed.drain_charged()
        self._warn_unsigned(cfg.alerts.webhook_url)
        if cfg.alerts.webhook_url is None:
            return
        # Kept until a check reads them all (their owners are among the pairs too).
        self._exhausted |= exhausted
        self._charged |= charged
        mono = time.monotonic()
        rescan = everyone or overflow or mono >= self._next_rescan
        try:
            if rescan:
                self._next_rescan = mono + cfg.alerts.rescan_s
                owners = await self._everyone(cfg)
            else:
                owners = await self._owners_of(cfg, pairs)
        except StoreUnavailable as e:
            # Said when the store goes away and when it is back, not at every check.
            if not self._keys_failing:
                self._keys_failing = True
                log.warning("budget alerts: cannot read the keys: %s (retried; said again "
                            "once read)", e)
            self._next_rescan = 0.0
            return
        if self._keys_failing:
            self._keys_failing = False
            log.warning("budget alerts: the keys are read again")
        now = self.clock()
        refused: dict[str, list[str]] = {}  # owner -> the periods it was refused in
        for owner, refused_in in (self._exhausted if cfg.alerts.on_refusal else ()):
            refused.setdefault(owner, []).append(refused_in)
        charged_in: dict[str, set[str]] = {}  # owner -> the periods records were charged to
        for owner, period in self._charged:
            charged_in.setdefault(owner, set()).add(period)
        if rescan:  # and the period before, where a late settlement may have gone
            for who in owners:
                if (late := self._late_period(who.period_kind, now)) is not None:
                    charged_in.setdefault(who.owner, set()).add(late)
        for who in owners:
            if not await self._check_one(cfg, who, now, sorted(refused.get(who.owner, ())),
                                         charged_in.get(who.owner, set())):
                self._next_rescan = 0.0  # the store or the queue failed: look again soon
                return
        self._exhausted.clear()
        self._charged.clear()
        self._rescanned = self._rescanned or rescan

    def _late_period(self, kind: str, now: datetime) -> str | None:
        """The period before `now`'s, when a rescan reads it: at its first since the start
        (retest tester: serve killed just after midnight never alerted the day before,
        charged by the settlement it had just made), and within LATE_WINDOW_S of the
        turn."""
        start = period_start(kind, now)
        if start is None or (self._rescanned
                             and (now - start).total_seconds() >= LATE_WINDOW_S):
            return None
        return previous_period_id(kind, now)

    async def _check_one(self, cfg: Config, who: Budgeted, now: datetime,
                         refused: list[str], charged_in: set[str]) -> bool:
        period = period_id(who.period_kind, now)
        # The current period, and an earlier one of the same kind that a late settlement
        # charged (a request admitted before the period turned).
        periods = {period} | {p for p in charged_in
                              if p.partition(":")[0] == who.period_kind}
        spent_in: dict[str, int] = {}
        try:
            for p in sorted(periods | set(refused)):
                spent_in[p], _ = await self.limits.budget(who.owner, who.org, p,
                                                          now.timestamp())
        except LimitStoreUnavailable as e:
            log.warning("budget alerts: cannot read the ledgers: %s", e)
            return False
        alerts = [Alert(who, p, t, spent_in[p], now) for p in sorted(periods)
                  for t in reached(spent_in[p], who.budget_nano, cfg.alerts.thresholds)]
        # Refused before the period turned: that period's spend.
        alerts += [Alert(who, p, None, spent_in[p], now) for p in refused]
        for alert in alerts:
            m = alert.marker
            if m in self._pending or self._known.get(m, 0.0) > time.monotonic():
                continue
            try:
                self._queue.put_nowait(alert)
            except asyncio.QueueFull:
                log.warning("budget alerts: the delivery queue is full")
                return False
            self._pending.add(m)
        return True

    async def _owners_of(self, cfg: Config, pairs: set[tuple[str, str]]) -> list[Budgeted]:
        """The budgeted keys and orgs among the pairs a feed marked."""
        orgs = self._orgs(cfg)
        out = {o.owner: o for o in filter(None, (_org(orgs, org) for _, org in pairs))}
        static = {k.id: k for k in cfg.keys}
        for key_id in {k for k, _ in pairs if k}:
            rec = static.get(key_id)
            if rec is None and isinstance(self.keys, KeyAdmin):
                rec = await self.keys.get(key_id)
            if rec is not None and rec.budget_usd is not None:
                out[rec.id] = Budgeted(rec.id, rec.org, usd_to_nano(rec.budget_usd),
                                       rec.budget_period)
        return list(out.values())

    async def _everyone(self, cfg: Config) -> list[Budgeted]:
        keys = list(cfg.keys)
        if isinstance(self.keys, KeyAdmin):
            keys += await self.keys.list_keys(None)
        out = [Budgeted(k.id, k.org, usd_to_nano(k.budget_usd), k.budget_period)
               for k in keys if k.budget_usd is not None and k.status == "active"]
        orgs = self._orgs(cfg)
        return out + list(filter(None, (_org(orgs, org) for org in orgs)))

    def _orgs(self, cfg: Config) -> Mapping[str, OrgLimits]:
        return cfg.orgs if self.orgs is None else self.orgs(cfg)

    async def _send_loop(self) -> None:
        while True:
            alert = await self._queue.get()
            try:
                await self._send(alert)
            except Exception as e:  # a marker store that failed: a later check retries
                log.warning("budget alert not sent: %s: %s", type(e).__name__, e)
            finally:
                self._pending.discard(alert.marker)
                self._queue.task_done()

    async def _send(self, alert: Alert) -> None:
        m = alert.marker
        if not await self.marks.claim(alert):
            self._known[m] = time.monotonic() + KNOWN_CLAIMED_S
            return
        if await self.post(alert):
            await self.marks.sent(alert)
            self._forget_old()
            self._known[m] = time.monotonic() + KNOWN_SENT_S
        else:
            await self.marks.release(alert)

    def _forget_old(self) -> None:
        now = time.monotonic()
        if len(self._known) > 4 * FEED_SIZE:
            self._known = {m: t for m, t in self._known.items() if t > now}

    async def post(self, alert: Alert) -> bool:
        """POST the alert until answered (see the module). True: done with it (delivered,
        or refused for good); False: gave up."""
        a = self.config().alerts
        if a.webhook_url is None or self._session is None:
            return False
        body = alert.body()
        headers = {"Content-Type": "application/json", "User-Agent": "tokenbooth",
                   "X-Tokenbooth-Event": alert.event, "X-Tokenbooth-Delivery": alert.id}
        if self.secret:
            headers["X-Tokenbooth-Signature"] = signature(self.secret, body)
        where = {"receiver": receiver(a.webhook_url), "owner": alert.who.owner,
                 "period": alert.period, "threshold": alert.marker[2]}
        for attempt in range(1, a.max_attempts + 1):
            status, why = await self._attempt(a.webhook_url, body, headers, a.timeout_s)
            if status is not None and 200 <= status < 300:
                log.info("budget alert delivered", extra={**where, "attempt": attempt})
                return True
            if status is not None and 400 <= status < 500 and status not in RETRY_STATUSES:
                log.error("budget alert refused by the receiver",
                          extra={**where, "status": status})
                return True
            if status is not None and 300 <= status < 400:
                # Not followed (it could carry the signature elsewhere), nor taken for
                # delivery: tried again, and said (an http->https redirect lost every
                # alert: admin review).
                why = "a redirect, not followed: point webhook_url at where it leads"
            log.warning("budget alert not delivered", extra={**where, "attempt": attempt,
                                                             "status": status, "error": why})
            if attempt < a.max_attempts:
                await asyncio.sleep(min(BACKOFF_MAX_S, self.backoff_s * 2 ** (attempt - 1)))
        log.error("budget alert: gave up for now", extra=where)
        return False

    async def _attempt(self, url: str, body: bytes, headers: dict[str, str],
                       timeout_s: float) -> tuple[int | None, str | None]:
        assert self._session is not None
        try:
            async with self._session.post(url, data=body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=timeout_s),
                                          allow_redirects=False) as resp:
                return resp.status, None
        except (aiohttp.ClientError, TimeoutError) as e:
            return None, type(e).__name__


def _org(orgs: Mapping[str, OrgLimits], name: str) -> Budgeted | None:
    org = orgs.get(name)
    if org is None or org.budget_usd is None:
        return None
    return Budgeted(ORG_PREFIX + name, name, usd_to_nano(org.budget_usd), org.budget_period)


__all__ = ["AlertFeed", "AlertingSink", "BudgetAlerts", "make_marks", "signature"]
