"""The audit: budget ledgers against usage records, and records against vLLM's counters.

Ledgers are integer nano-USD per (owner, period): the owner is a key id or `org:<name>`.
Settlement charges `cost_nano(prompt, completion, price)` once per request, rounded up,
and the record of that request carries the exact `cost_usd` of the same tokens, so
`spent` must equal the sum over its records of `usd_to_nano(cost_usd)`, exactly.

A record whose request the ledger still holds is settling (the record is written just
before the settlement) and is left out of the sum. A hold whose lease ended but that is
still in the ledger belongs to a replica that died: the next admission or the lost-hold
sweep charges it in full; it is drift only when the audit is strict. Read the ledgers
before the records: a request that ends in between is then held in the one and
recorded in the other, and is left out, as it should be.

Pure: records are the dicts the usage store returns (checked by `sort_records`),
ledgers and counters are read by the caller, the clock is an argument.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from policy.limits import period_id, usd_to_nano
from policy.usage_report import record_cost

ORG_PREFIX = "org:"
PERIOD_KINDS = ("day", "month", "total")

Record = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class LedgerBalance:
    """One budget ledger as a store keeps it."""

    owner: str  # a key id, or `org:<name>`
    period: str  # a period id (policy.limits.period_id)
    spent: int
    reserved: int  # the stored counter: the sum of `holds`' costs
    holds: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (cost, exp)
    # Holds charged in full when their lease ended (a late settlement corrects them).
    lost: Mapping[str, int] = field(default_factory=dict)  # rid -> cost


@dataclass(frozen=True, slots=True)
class LedgerAudit:
    owner: str
    period: str
    ledger_found: bool
    spent: int
    records: int  # records counted into `records_nano`
    records_nano: int
    settling: int  # records whose request the ledger still holds: not counted yet
    reserved: int  # the stored counter
    live_holds: int
    live_nano: int
    expired_holds: int  # lease ended, not yet settled (a replica died)
    expired_nano: int
    lost_charges: int  # holds charged in full as lost, still correctable
    # Some of the period's records were trimmed with no archive to read them from
    # (usage.retention_s without a usage.sink): its spend cannot be compared.
    trimmed: bool = False

    @property
    def drift_nano(self) -> int:
        """What the ledger charged beyond its records (negative: records not charged)."""
        return self.spent - self.records_nano

    def problems(self, strict: bool = False) -> list[str]:
        """Why this ledger is drift; empty when it is not."""
        out = []
        if self.drift_nano and not self.trimmed:
            out.append(f"spent {self.spent} nano-USD, records {self.records_nano}")
        if self.reserved != self.live_nano + self.expired_nano:
            out.append(f"reserved {self.reserved} nano-USD, holds "
                       f"{self.live_nano + self.expired_nano}")
        if strict and self.expired_holds:
            out.append(f"{self.expired_holds} expired hold(s) not settled")
        return out


@dataclass(frozen=True, slots=True)
class VllmCounters:
    """One backend's `/metrics`: token counters since its process started."""

    url: str
    prompt_tokens: int
    generation_tokens: int
    process_start: float | None  # epoch seconds; None: not exported (count every record)


@dataclass(frozen=True, slots=True)
class BackendAudit:
    counters: VllmCounters
    records: int  # exact records (the backend's own usage)
    prompt_tokens: int
    completion_tokens: int
    estimated_records: int  # tokenbooth's estimates: they cannot match exactly
    estimated_prompt: int
    estimated_completion: int
    # What the estimated requests could have made the backend count at most (their holds'
    # bounds, prompts weighed by sequences); None when a record does not say (written
    # before records carried their bounds): then no ceiling is known.
    estimated_prompt_bound: int | None = None
    estimated_completion_bound: int | None = None

    @property
    def charged_short(self) -> tuple[int, int]:
        """Prompt and generation tokens vLLM counted past what the records charged, the
        estimated ones included (0, 0 when none): a cut stream's estimate fell short of
        what its backend generated (real-vLLM tester: a backend whose API server lagged
        its engine), within the bounds `drift` allows. On a quiet backend, that is money
        not charged; `limits.abort_lag_steps` raises the estimates."""
        c = self.counters
        return (max(0, c.prompt_tokens - self.prompt_tokens - self.estimated_prompt),
                max(0, c.generation_tokens - self.completion_tokens
                    - self.estimated_completion))

    @property
    def drift(self) -> bool:
        """Without estimates the counters equal the records' sums; with estimates they
        are at least the exact records' sums and at most those plus the estimated
        requests' bounds: tokens served past the gateway show up even beside a client that
        left mid-stream (with the floor alone, one such record hid any excess)."""
        c = self.counters
        if self.estimated_records == 0:
            return (c.prompt_tokens, c.generation_tokens) != (self.prompt_tokens,
                                                              self.completion_tokens)
        if c.prompt_tokens < self.prompt_tokens or c.generation_tokens < self.completion_tokens:
            return True
        return (self.estimated_prompt_bound is not None
                and c.prompt_tokens > self.prompt_tokens + self.estimated_prompt_bound) or (
            self.estimated_completion_bound is not None
            and c.generation_tokens > self.completion_tokens + self.estimated_completion_bound)


# -- records --------------------------------------------------------------------------


def started_at(rec: Record) -> datetime:
    """A record's start time (ISO 8601, `Z` allowed; naive taken as UTC)."""
    t = datetime.fromisoformat(str(rec["started_at"]).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def record_nano(rec: Record) -> int:
    """What settlement charged for this record: its cost rounded up to a nano-dollar."""
    return usd_to_nano(Decimal(str(rec["cost_usd"])))


def valid_records(records: Iterable[Record]) -> list[Record]:
    """The records, each checked for what the audit reads; ValueError naming the first
    malformed one's request."""
    good, bad = sort_records(records)
    if bad:
        raise ValueError(bad[0])
    return good


def sort_records(records: Iterable[Record]) -> tuple[list[Record], list[str]]:
    """The records the audit can read, and what is wrong with each other one (naming its
    request): a damaged record is drift to report beside the rest, not a reason to
    compare nothing (CLI tester)."""
    good, bad = [], []
    for rec in records:
        problem = _record_problem(rec)
        if problem is None:
            good.append(rec)
        else:
            bad.append(problem)
    return good, bad


def _record_problem(rec: Record) -> str | None:
    """What makes a record one the audit cannot read, or None."""
    try:
        started_at(rec)
        try:
            record_cost(rec["cost_usd"])
        except ArithmeticError:  # decimal's InvalidOperation: not a number at all
            raise ValueError(f"cost_usd {str(rec['cost_usd'])[:40]!r} is not a "
                             "decimal number") from None
        for name, kind in (("request_id", str), ("key_id", str), ("org", str),
                           ("prompt_tokens", int), ("completion_tokens", int)):
            if not isinstance(rec[name], kind):
                raise TypeError(f"{name} is not {kind.__name__}")
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
        rid = rec.get("request_id") if isinstance(rec, dict) else None
        return f"usage record {rid!r} is malformed ({type(e).__name__}: {e})"
    return None


def record_owners(rec: Record) -> tuple[str, str]:
    """The ledgers a request is charged to: its key's and its org's."""
    return str(rec["key_id"]), ORG_PREFIX + str(rec["org"])


# -- periods ----------------------------------------------------------------------------


def period_kind(period: str) -> str:
    """`day:2026-01-02` -> `day`; `month:2026-01` -> `month`; `total` -> `total`."""
    return period.partition(":")[0]


def period_end(period: str) -> datetime | None:
    """When a period id ends (None: `total` never does). ValueError if not a period id."""
    kind, _, start = period.partition(":")
    if kind == "total" and not start:
        return None
    if kind == "day":
        return datetime.fromtimestamp(
            datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC).timestamp() + 86400, UTC)
    if kind == "month":
        t = datetime.strptime(start, "%Y-%m").replace(tzinfo=UTC)
        return datetime(t.year + t.month // 12, t.month % 12 + 1, 1, tzinfo=UTC)
    raise ValueError(f"not a budget period id: {period!r}")


def period_start(period: str) -> datetime | None:
    """When a period id begins (None: `total` has always run)."""
    kind, _, start = period.partition(":")
    if kind == "day":
        return datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC)
    if kind == "month":
        return datetime.strptime(start, "%Y-%m").replace(tzinfo=UTC)
    period_end(period)  # ValueError if not a period id
    return None


def in_window(period: str, since: datetime | None) -> bool:
    """Whether a period is audited: every period, or those that end after `since`."""
    if since is None:
        return True
    end = period_end(period)
    return end is None or end > since


def owner_kinds(budget_periods: Mapping[str, str],
                ledgers: Iterable[LedgerBalance]) -> dict[str, str]:
    """Each owner's budget period kind: the configured one, else the one its ledgers show
    (a key the gateway knows but cannot list, such as a validation service's)."""
    kinds = dict(budget_periods)
    for led in ledgers:
        kinds.setdefault(led.owner, period_kind(led.period))
    return kinds


# A record's fields naming the ledger each of its owners was charged to.
LEDGER_FIELDS = ("key_budget_period", "org_budget_period")


def group_records(records: Iterable[Record], kinds: Mapping[str, str]
                  ) -> dict[tuple[str, str], list[Record]]:
    """Records by (owner, period): the ledger each record says it was charged to (none
    where its owner had no budget then, whatever the owner's budget is now); a record
    that does not say (written before records did) by its owner's budget period kind."""
    out: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for rec in records:
        for owner, name in zip(record_owners(rec), LEDGER_FIELDS, strict=True):
            if name in rec:
                period = rec[name]
                if isinstance(period, str) and period:
                    out[(owner, period)].append(rec)
                continue
            kind = kinds.get(owner)
            if kind is not None:
                out[(owner, period_id(kind, started_at(rec)))].append(rec)
    return out


# -- ledgers ----------------------------------------------------------------------------


def audit_ledger(owner: str, period: str, ledger: LedgerBalance | None,
                 records: Sequence[Record], now: float,
                 trimmed_before: datetime | None = None) -> LedgerAudit:
    """One ledger against its records. A request the ledger still holds is not charged
    yet: its record, if written, is left out (counted as settling). A hold is live while
    now < its expiry. Records before `trimmed_before` are gone: a period that began
    earlier is marked `trimmed` (its holds are still checked, its spend cannot be)."""
    start = period_start(period)
    trimmed = trimmed_before is not None and (start is None or start < trimmed_before)
    holds = ledger.holds if ledger is not None else {}
    live = [cost for cost, exp in holds.values() if now < exp]
    expired = [cost for cost, exp in holds.values() if not now < exp]
    counted = [r for r in records if r["request_id"] not in holds]
    return LedgerAudit(
        owner=owner, period=period, ledger_found=ledger is not None,
        spent=ledger.spent if ledger is not None else 0,
        records=len(counted), records_nano=sum(record_nano(r) for r in counted),
        settling=len(records) - len(counted),
        reserved=ledger.reserved if ledger is not None else 0,
        live_holds=len(live), live_nano=sum(live),
        expired_holds=len(expired), expired_nano=sum(expired),
        lost_charges=len(ledger.lost) if ledger is not None else 0,
        trimmed=trimmed,
    )


def audit_ledgers(ledgers: Iterable[LedgerBalance], records: Iterable[Record],
                  budget_periods: Mapping[str, str], now: datetime,
                  since: datetime | None = None,
                  trimmed_before: datetime | None = None) -> list[LedgerAudit]:
    """Every (owner, period) that has a ledger or records of an owner with a budget,
    among the periods that end after `since`, sorted by owner and period.
    `budget_periods`: owner (key id or `org:<name>`) -> its budget period kind.
    `trimmed_before`: records before it were trimmed, with no archive (see audit_ledger)."""
    ledgers = list(ledgers)
    by_entry = {(led.owner, led.period): led for led in ledgers}
    grouped = group_records(records, owner_kinds(budget_periods, ledgers))
    entries = sorted(e for e in set(by_entry) | set(grouped) if in_window(e[1], since))
    ts = now.timestamp()
    return [audit_ledger(o, p, by_entry.get((o, p)), grouped.get((o, p), []), ts,
                         trimmed_before) for o, p in entries]


# -- backends ---------------------------------------------------------------------------


def _sequences(rec: Record) -> int:
    """A record's sequences per prompt (1 for records written before they said)."""
    n = rec.get("sequences")
    return n if type(n) is int and n >= 1 else 1


def audit_backend(counters: VllmCounters, records: Iterable[Record]) -> BackendAudit:
    """The records this backend served since its process started, against its counters."""
    url = counters.url.rstrip("/")
    mine = [r for r in records if str(r.get("backend", "")).rstrip("/") == url
            and (counters.process_start is None
                 or started_at(r).timestamp() >= counters.process_start)]
    exact = [r for r in mine if not r.get("estimated")]
    guessed = [r for r in mine if r.get("estimated")]
    return BackendAudit(
        counters=counters, records=len(exact),
        # vLLM counts a prompt once per sequence (`n`); usage, and so the record, once.
        prompt_tokens=sum(int(r["prompt_tokens"]) * _sequences(r) for r in exact),
        completion_tokens=sum(int(r["completion_tokens"]) for r in exact),
        estimated_records=len(guessed),
        # As vLLM counts them too (its counter rose 56 for a 14-token prompt at n 4, and
        # the report read 14: 42 tokens that looked served past the gateway).
        estimated_prompt=sum(int(r["prompt_tokens"]) * _sequences(r) for r in guessed),
        estimated_completion=sum(int(r["completion_tokens"]) for r in guessed),
        estimated_prompt_bound=_bound_sum(guessed, "prompt_bound", weigh=True),
        estimated_completion_bound=_bound_sum(guessed, "completion_bound"),
    )


def _bound_sum(records: list[Record], name: str, weigh: bool = False) -> int | None:
    """The records' `name` bounds summed (prompts weighed by their sequences), or None
    when one of them does not say."""
    total = 0
    for r in records:
        v = r.get(name)
        if type(v) is not int or v < 0:
            return None
        total += v * _sequences(r) if weigh else v
    return total
