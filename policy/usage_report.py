"""Usage totals, whole or grouped, computed in one pass over a stream of records.

`UsageReport.feed` takes the records one at a time, in the order they were written,
and keeps only what the answer needs: the totals per group (bounded by the number of
keys, orgs, models, days or hours) and the request ids seen, for the deduplication
(`OnePerRequest`, the streaming form of authz.state.usage.records.one_per_request).
No I/O: the caller reads the records and prints the answer.

The ids are the one thing that grows with the records. `IdSet` keeps each as its
64-bit hash in a flat table at most half full: 16 to 32 bytes an id, where a Python
set of the 32-character ids takes ~110 (a million records: 16 MB against ~110 MB).
Two distinct ids share a hash with probability about n²/2⁶⁵ (3·10⁻⁸ for a million,
3·10⁻⁴ for a hundred million); such a pair counts as one request. The hash is
Python's string hash, keyed per process, so no one can choose ids that collide.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from policy.usage import LOST

# --group-by values: a record field, or a UTC calendar bucket of `started_at`.
FIELD_GROUPS: Final = {"key": "key_id", "org": "org", "model": "model"}
TIME_GROUPS: Final = ("day", "hour")
GROUPS: Final = (*FIELD_GROUPS, *TIME_GROUPS)

_MASK64 = (1 << 64) - 1
# No record costs this much (a budget is at most 2^53 nano-USD, ~9 million): a record
# that says so is damaged, and sums of such amounts could overflow.
MAX_RECORD_DIGITS: Final = 15  # 10^15 USD


class IdSet:
    """A set of strings kept as their 64-bit hashes (see the module): linear probing in
    an array of unsigned 64-bit integers, 0 meaning empty, doubled when half full."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        size = 1 << max(4, (capacity - 1).bit_length())
        self._table = array("Q", [0]) * size
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """The table's size in bytes."""
        return len(self._table) * self._table.itemsize

    def add(self, item: str) -> bool:
        """Add `item`; True if it was not there (by its hash)."""
        h = (hash(item) & _MASK64) or 1
        if _insert(self._table, h):
            self._n += 1
            if 2 * self._n > len(self._table):
                self._grow()
            return True
        return False

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", [0]) * (2 * len(old))
        for h in old:
            if h:
                _insert(self._table, h)


def _insert(table: array[int], h: int) -> bool:
    mask = len(table) - 1
    i = h & mask
    while True:
        v = table[i]
        if v == 0:
            table[i] = h
            return True
        if v == h:
            return False
        i = (i + 1) & mask


class OnePerRequest:
    """One record per `request_id`, streaming: the first one, except that a real record
    supersedes a `lost` one whichever came first. A real record is final when first
    seen and is returned at once; a `lost` one (rare) waits in `finish()` for a real
    record that may still come."""

    def __init__(self) -> None:
        self._seen = IdSet()
        self._lost: dict[str, dict[str, Any]] = {}

    def feed(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """The record to count now, if any."""
        rid = rec.get("request_id")
        if not isinstance(rid, str):
            return None
        if rec.get("status") == LOST:
            if self._seen.add(rid):
                self._lost[rid] = rec
            return None
        if self._lost.pop(rid, None) is not None:
            return rec  # a late settlement's record replaces the lost one
        return rec if self._seen.add(rid) else None

    def finish(self) -> list[dict[str, Any]]:
        """The `lost` records no real record replaced, in the order they came."""
        out, self._lost = list(self._lost.values()), {}
        return out

    @property
    def ids_bytes(self) -> int:
        return self._seen.nbytes


@dataclass(slots=True)
class Totals:
    """Sums over records; cost exact (the records' decimal strings)."""

    cost_usd: Decimal = field(default_factory=Decimal)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt: int, completion: int, total: int, cost: Decimal) -> None:
        self.requests += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens += total
        self.cost_usd += cost

    def merge(self, other: Totals) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.cost_usd += other.cost_usd

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
                # Normalized: a sum in PostgreSQL keeps its numeric scale ("10.9404000000"
                # where the records' own sum reads "10.9404").
                "cost_usd": format(self.cost_usd.normalize(), "f")}


@dataclass(frozen=True, slots=True)
class Selection:
    """Which records count: of this org, of this key, started at or after `since`."""

    org: str | None = None
    key: str | None = None
    since: datetime | None = None


def parse_group_by(text: str) -> tuple[str, ...]:
    """`org`, `org,model`, …: the groups in order, each once. ValueError if unknown."""
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [n for n in names if n not in GROUPS]
    if bad or not names:
        raise ValueError(f"expected one or more of {', '.join(GROUPS)} (comma-separated), "
                         f"got {text!r}")
    return names


def started_at(rec: dict[str, Any]) -> datetime:
    """A record's `started_at` in UTC (a naive time is taken as UTC). ValueError if not
    an ISO 8601 time."""
    t = datetime.fromisoformat(str(rec["started_at"]))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


class UsageReport:
    """Totals of the selected records, whole and per group, fed one record at a time.
    Records that cannot be counted (a field missing or of the wrong type) are skipped
    and counted in `skipped`."""

    def __init__(self, selection: Selection = Selection(),
                 group_by: Iterable[str] = ()) -> None:
        self.selection = selection
        self.group_by = tuple(group_by)
        if any(g not in GROUPS for g in self.group_by):
            raise ValueError(f"group_by: expected some of {GROUPS}, got {self.group_by}")
        self._timed = selection.since is not None or any(g in TIME_GROUPS
                                                         for g in self.group_by)
        self._dedup = OnePerRequest()
        self.totals = Totals()
        self.skipped = 0
        self._groups: dict[tuple[str, ...], Totals] = {}

    def feed(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """Take the next record; returns it if it was counted now."""
        first = self._dedup.feed(rec)
        return first if first is not None and self._count(first) else None

    def finish(self) -> list[dict[str, Any]]:
        """Count the `lost` records nothing replaced; returns those counted."""
        return [r for r in self._dedup.finish() if self._count(r)]

    def merge(self, group: tuple[str, ...], totals: Totals) -> None:
        """Add totals computed elsewhere (a database's GROUP BY over records this report
        is not fed): `group` has a value per `group_by`, () without."""
        self.totals.merge(totals)
        if self.group_by:
            acc = self._groups.get(group)
            if acc is None:
                acc = self._groups[group] = Totals()
            acc.merge(totals)

    def groups(self) -> list[tuple[tuple[str, ...], Totals]]:
        """Per group, sorted by its values (names alphabetically, times in order)."""
        return sorted(self._groups.items())

    @property
    def ids_bytes(self) -> int:
        """Memory the deduplication holds (the only part that grows with the records)."""
        return self._dedup.ids_bytes

    def _count(self, rec: dict[str, Any]) -> bool:
        sel = self.selection
        if (sel.org is not None and rec.get("org") != sel.org) or (
                sel.key is not None and rec.get("key_id") != sel.key):
            return False
        try:
            t = started_at(rec) if self._timed else None
            amounts = (int(rec["prompt_tokens"]), int(rec["completion_tokens"]),
                       int(rec["total_tokens"]), record_cost(rec["cost_usd"]))
            group = tuple(_group_value(g, rec, t) for g in self.group_by)
        except (KeyError, ValueError, TypeError, InvalidOperation):
            self.skipped += 1
            return False
        if sel.since is not None and t is not None and t < sel.since:
            return False
        self.totals.add(*amounts)
        if self.group_by:
            acc = self._groups.get(group)
            if acc is None:
                acc = self._groups[group] = Totals()
            acc.add(*amounts)
        return True


def record_cost(value: Any) -> Decimal:
    """A record's `cost_usd`; ValueError (or InvalidOperation) unless a number from 0 to
    below 10^MAX_RECORD_DIGITS USD. A "NaN" or "Infinity" in a hand-edited log made every
    total it joined NaN, and "1E+999999999" overflowed the sum (an internal error); no
    charge is negative (a tampered pair netting to the ledger passed the audit). A string,
    as records write it: a JSON number reads as a float, inexact (records tester: `usage`
    summed 0.33 as 0.33000000000000001554, where the admin API left it out)."""
    if not isinstance(value, str):
        raise ValueError(f"cost_usd {str(value)[:40]!r} is not a string")
    cost = Decimal(value)
    if not cost.is_finite() or cost < 0 or cost.adjusted() >= MAX_RECORD_DIGITS:
        raise ValueError(f"cost_usd {str(value)[:40]!r}")
    return cost


def _group_value(group: str, rec: dict[str, Any], t: datetime | None) -> str:
    if group in FIELD_GROUPS:
        value = rec[FIELD_GROUPS[group]]
        if not isinstance(value, str):
            raise TypeError(group)
        return value
    assert t is not None
    return f"{t:%Y-%m-%d}" if group == "day" else f"{t:%Y-%m-%dT%H}:00Z"
