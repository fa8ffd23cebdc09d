"""At start, with `state: redis://…`: the settlements the previous process may not have
made, made again from its usage records.

A request's end writes its usage record (to the Redis sink's on-disk spool), then
settles its holds: its key's, then its org's (`org:<name>`). A process killed between
the two leaves a hold unsettled until its lease ends; the lost-hold sweep then charges
it in full, with a `lost` record, and the real record, delivered from the spool,
supersedes that record: the ledger says the whole hold, the records the real cost
(drift in `tokenbooth audit`). A process started on the same spool (its `data_dir`,
kept by a restarted container) settles again, at each record's real usage, the key's
and the org's holds of the real records written last (`RedisUsageSink.previous_records`),
as the embedded store does at its start (durable.py, `_settle_dead`). SETTLE is
idempotent (redis_scripts.py): a hold settled already is gone, and nothing changes (0);
a live one is settled (1); one the sweep charged as lost is corrected to the real cost
(2) while its charge is correctable (LOST_TTL_S).

Only real records: a `lost` one is what a sweep charged, and settling it again would
take the lost charge out of the ledger, so that the late real settlement it waits for
(another replica's, or a spooled one) would find nothing to correct.

Request metrics are not touched: a request whose hold the sweep charged as lost was
counted, once, as that `lost` record (so a correction counts nothing, as in
Lifecycle.settle); one whose hold is settled here was counted by nobody, its process
having died before the count that follows a settlement (its counters died with it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from authz.state.limits.base import LimitStoreRefused, LimitStoreUnavailable
from authz.state.limits.redis_limits import RedisLimitStore
from policy.config import EnvoySettings
from policy.limits import Ask, Limits, period_id
from policy.quota import ORG_KEY_PREFIX
from policy.recorded import SLACK_S as SLACK_S  # (re-exported: tests)
from policy.recorded import Owes, owes

log = logging.getLogger("tokenbooth.limits")

# How far before the previous process's last record its records are settled again. A
# settlement is sent as soon as its record is written and its answer is out to Envoy
# (cut by Envoy's decision timeout, 2 s by default), and waits for the store at most
# `key_store.timeout_s` (10 s at most), after which it goes to the settle spool, which the
# next start replays: so only those written in the last seconds may lack theirs. 30 s
# is that with room for an event loop running late under load.
HORIZON_S = 30.0
# And at most this many (the newest): a start re-settles ~30 s of one replica's traffic,
# not the hundreds of thousands of records a spool may hold after an outage. Each one is
# a SETTLE per hold, pipelined: ~50,000 take seconds in the background.
MAX_RECORDS = 50_000
BATCH = 256  # holds per round trip (a SETTLE and an index removal each)
RETRY_S = 5.0  # while Redis does not answer, how often to try again
# A hold without a budget has no ledger entry to find, whatever its period: the period
# its Ask had is guessed with the default kind (only its entry in the sweep's index is
# named with it: an entry missed is dropped by the sweep, which finds no hold).
_NO_BUDGET = Limits().budget_period
# A hold's lease by default (a stream's or not), as the services compute it from their
# config (`Services` passes its own): its admission's `now` plus this is its lease end.
_LEASE_S = EnvoySettings().hold_lease_s
# (the hold to settle, what its request's record says it owes)
Owed = tuple[Ask, Owes]


def settlements(rec: Mapping[str, Any], lease_s: Callable[[bool], float] = _LEASE_S
                ) -> list[Owed]:
    """What the request of a real record owes (policy/recorded.py: its cost, and what
    tells its own holds from another request's under the same id) for its key's hold
    and, if it has an org, the org's; the Ask names the hold's keys as its admission
    did (request id, owner, budget period: `RedisLimitStore._hold_keys`). ValueError
    for a record that does not say."""
    rid = rec.get("request_id")
    if not (isinstance(rid, str) and rid):
        raise ValueError("a record without its request id")
    o = owes(rec, lease_s)
    key_id, org = o.key_id, o.org
    started = datetime.fromisoformat(str(rec["started_at"]))

    def hold(owner: str, field: str) -> Owed:
        # The period the lifecycle gave the Ask (`_make_ask`, `org_hold`): the record's
        # budget period id, which `_budget_periods` derived from the same start.
        period = rec.get(field)
        if not isinstance(period, str) or not period:
            period = period_id(_NO_BUDGET, started)
        return Ask(rid, owner, org, 0, 0, period, 0.0), o

    out = [hold(key_id, "key_budget_period")]
    if org:
        out.append(hold(ORG_KEY_PREFIX + org, "org_budget_period"))
    return out


def owed(records: Iterable[Mapping[str, Any]], lease_s: Callable[[bool], float] = _LEASE_S
         ) -> list[Owed]:
    """The `settlements` of real records (an unreadable one skipped, with a warning).
    Decimal arithmetic for each: run it in a thread for many."""
    items: list[Owed] = []
    unreadable = 0
    for rec in records:
        try:
            items += settlements(rec, lease_s)
        except ValueError:
            unreadable += 1
    if unreadable:
        log.warning("re-settling at start: %d unreadable usage record(s) skipped", unreadable)
    return items


async def resettle(store: RedisLimitStore, items: Sequence[Owed],
                   clock: Callable[[], float], *, retry_s: float = RETRY_S
                   ) -> tuple[int, int]:
    """Settle again each (ask, used tokens, cost nano) of `owed`, in batches; while Redis
    does not answer, tried again every `retry_s` (one warning). Returns (live holds
    settled, lost charges corrected), and says so in one info line."""
    done = corrected = 0
    i, warned = 0, False
    while i < len(items):
        try:
            results = await store.settle_again(items[i:i + BATCH], clock())
        except LimitStoreRefused as e:  # not for waiting out: the next batch goes on
            log.error("re-settling at start: a batch of %d holds answered with an error "
                      "(any of them not settled is left as it was): %s",
                      len(items[i:i + BATCH]), e)
            i += BATCH
            continue
        except LimitStoreUnavailable as e:
            if not warned:
                log.warning("re-settling at start: %s; trying again every %gs", e, retry_s)
                warned = True
            await asyncio.sleep(retry_s)
            continue
        except Exception:  # never unseen until the stop (a task nobody awaits)
            log.exception("re-settling at start failed", extra={"settled": done,
                                                               "corrected": corrected})
            return done, corrected
        done += results.count(1)
        corrected += results.count(2)
        i += BATCH
    log.info("re-settled the requests recorded last before the previous stop",
             extra={"requests": len({owed[0].request_id for owed in items}),
                    "holds": len(items), "settled": done, "corrected": corrected})
    return done, corrected
