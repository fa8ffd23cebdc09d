"""PostgreSQL, the usage ledger of record (config: usage.sink).

One row per request in `usage_records`, unique by `request_id`. A batch is written by
one INSERT … ON CONFLICT: a record already there is kept, except that a real record
replaces a `lost` one (a hold charged in full whose late settlement came after all);
a `lost` record never replaces a real one. Each row keeps the id of the first stream
entry of its request (`stream_ms`, `stream_seq`; the earliest, whatever order exporters
commit in): readers page by it (`ORDER_KEY`), so a request keeps one place, a `lost` one
corrected too (rows of a version before 4 have none and come first, in the order they
were exported, `seq`). Records
that cannot be stored (a field missing or of the wrong type) go whole to
`usage_rejected`, in the same transaction.

`migrate()` brings the schema to SCHEMA_VERSION on start (idempotent; several
processes may run it at once: it holds an advisory lock).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs
import orjson

from policy.usage import LOST, iso_z

log = logging.getLogger("tokenbooth.records")

SCHEMA_VERSION = 5
TABLE = "usage_records"
_LOCK_ID = 0x7462_7573  # pg_advisory_xact_lock key of the migration ("tbus")

_MIGRATIONS: dict[int, str] = {1: f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
  seq bigserial NOT NULL,
  request_id text PRIMARY KEY,
  key_id text NOT NULL,
  org text NOT NULL,
  model text NOT NULL,
  upstream_model text NOT NULL,
  backend text NOT NULL,
  prompt_tokens bigint NOT NULL,
  completion_tokens bigint NOT NULL,
  total_tokens bigint NOT NULL,
  cost_usd numeric NOT NULL,
  status text NOT NULL,
  stream boolean NOT NULL,
  estimated boolean NOT NULL,
  started_at timestamptz NOT NULL,
  duration_ms double precision NOT NULL,
  endpoint text NOT NULL,
  exported_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_seq ON {TABLE} (seq);
CREATE INDEX IF NOT EXISTS {TABLE}_org_started ON {TABLE} (org, started_at);
CREATE INDEX IF NOT EXISTS {TABLE}_key_started ON {TABLE} (key_id, started_at);
CREATE INDEX IF NOT EXISTS {TABLE}_model_started ON {TABLE} (model, started_at);
CREATE INDEX IF NOT EXISTS {TABLE}_started ON {TABLE} (started_at);
CREATE TABLE IF NOT EXISTS usage_rejected (
  stream_id text PRIMARY KEY,
  data text NOT NULL,
  problem text NOT NULL,
  rejected_at timestamptz NOT NULL DEFAULT now()
);
""",
# The ledgers each request was charged to ('' none: its owner had no budget; NULL: a
# record of a tokenbooth before this version, which did not say).
2: f"""
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS key_budget_period text,
                    ADD COLUMN IF NOT EXISTS org_budget_period text;
""",
# Sequences per prompt (`n`): NULL for a record of a tokenbooth before this version.
3: f"""
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS sequences integer;
""",
# The stream entry a row was exported from: its order (NULL for a row exported before).
# Every row written from now on must have one (NOT VALID: the rows before keep none): an
# exporter of version 3 still running in a rolling upgrade would store rows without it,
# ordered before everything, where a client paging with `after` never sees them; its
# INSERT fails instead, it stops (its migrate() refuses version 4) and a new exporter
# claims its batch.
4: f"""
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS stream_ms bigint,
                    ADD COLUMN IF NOT EXISTS stream_seq bigint,
                    DROP CONSTRAINT IF EXISTS {TABLE}_stream_id,
                    ADD CONSTRAINT {TABLE}_stream_id
                      CHECK (stream_ms IS NOT NULL AND stream_seq IS NOT NULL) NOT VALID;
CREATE INDEX IF NOT EXISTS {TABLE}_order
  ON {TABLE} ((coalesce(stream_ms, 0)), (coalesce(stream_seq, seq)));
""",
# The request's hold (prompt and completion bounds): NULL for a record before this
# version, or one that held no tokens.
5: f"""
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS prompt_bound bigint,
                    ADD COLUMN IF NOT EXISTS completion_bound bigint;
"""}

# Where a row stands in the order readers page by: its stream entry id, or (0, seq) for a
# row exported before version 4 (before every entry id; unique either way).
ORDER_KEY = "coalesce(stream_ms, 0), coalesce(stream_seq, seq)"
# The same order on a table still at version 3 (no entry ids yet: in a rolling upgrade,
# the exporters migrate it, and replicas of the new version may read it first).
ORDER_KEY_V3 = "0::bigint, seq"
OrderKey = tuple[int, int]

_COLUMNS = ("request_id", "key_id", "org", "model", "upstream_model", "backend",
            "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "status",
            "stream", "estimated", "started_at", "duration_ms", "endpoint",
            "key_budget_period", "org_budget_period", "sequences", "prompt_bound",
            "completion_bound")
_TYPES = ("text", "text", "text", "text", "text", "text", "bigint", "bigint", "bigint",
          "numeric", "text", "boolean", "boolean", "timestamptz", "float8", "text",
          "text", "text", "int4", "int8", "int8")
_BOUNDS = ("prompt_bound", "completion_bound")
_PERIODS = ("key_budget_period", "org_budget_period")
# What the exporter writes besides the record: the stream entry's id.
_WRITTEN = (*_COLUMNS, "stream_ms", "stream_seq")
_WRITTEN_TYPES = (*_TYPES, "bigint", "bigint")
_T = TABLE
_CORRECTS = f"({_T}.status = '{LOST}' AND EXCLUDED.status <> '{LOST}')"
_EARLIER = (f"({_T}.stream_ms IS NULL OR (EXCLUDED.stream_ms, EXCLUDED.stream_seq) < "
            f"({_T}.stream_ms, {_T}.stream_seq))")
# A record already stored is kept, except that a real one replaces a `lost` one; the
# place is the earlier of the two entries' (a row of a version before 4 takes the new
# one: every row written now has one).
_SET = ", ".join(
    [f"{c} = CASE WHEN {_CORRECTS} THEN EXCLUDED.{c} ELSE {_T}.{c} END"
     for c in _COLUMNS[1:]]
    + [f"{c} = CASE WHEN {_EARLIER} THEN EXCLUDED.{c} ELSE {_T}.{c} END"
       for c in ("stream_ms", "stream_seq")])
SELECT_COLUMNS = ", ".join(_COLUMNS)
# The same on a table still at version 4 (no bounds yet: a rolling upgrade's replicas may
# read it before an exporter migrates it).
SELECT_COLUMNS_V4 = ", ".join(f"NULL::int8 AS {c}" if c in _BOUNDS else c for c in _COLUMNS)
# A batch is COPied (binary) into a temporary table, then moved by one INSERT … SELECT:
# COPY encodes rows faster than a statement's array parameters. SQL here is built from
# constants only; values always travel as parameters or COPY data.
_STAGE = "usage_records_in"
_CREATE_STAGE = (f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ("
                 + ", ".join(f"{c} {t}" for c, t in zip(_WRITTEN, _WRITTEN_TYPES,
                                                        strict=True))
                 + ") ON COMMIT DELETE ROWS")
_INSERTED = ", ".join(_WRITTEN)
_INSERT = (
    f"INSERT INTO {TABLE} ({_INSERTED}) SELECT {_INSERTED} FROM {_STAGE} "  # noqa: S608
    f"ON CONFLICT (request_id) DO UPDATE SET {_SET} WHERE {_CORRECTS} OR {_EARLIER}")


async def connect(dsn: str, timeout_s: float = 10.0) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=timeout_s, command_timeout=60)


async def migrate(conn: asyncpg.Connection) -> int:
    """Creates or upgrades the schema; the version it is at."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute("CREATE TABLE IF NOT EXISTS tokenbooth_schema ("
                           "component text PRIMARY KEY, version integer NOT NULL)")
        found = await conn.fetchval(
            "SELECT version FROM tokenbooth_schema WHERE component = 'usage'") or 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(f"usage schema is at version {found}, newer than this "
                               f"tokenbooth ({SCHEMA_VERSION}): upgrade tokenbooth, or to "
                               "roll back on purpose see the README's Upgrade/rollback "
                               f"(the way back to schema {SCHEMA_VERSION}); nothing is lost "
                               "meanwhile, the records wait in the stream")
        if found and await conn.fetchval(
                "SELECT to_regclass($1) IS NULL OR to_regclass('usage_rejected') IS NULL",
                TABLE):
            # Dropped by hand (tokenbooth_schema still names a version): every batch
            # failed, for good, until the table was made again (storage tester).
            log.error("usage schema: the table %s or usage_rejected is gone although "
                      "tokenbooth_schema says version %d (dropped?): made again; the rows "
                      "it held are gone with it (restore them from a backup; `tokenbooth "
                      "audit` shows them missing)", TABLE, found)
            found = 0
        for version in range(found + 1, SCHEMA_VERSION + 1):
            await conn.execute(_MIGRATIONS[version])
        await conn.execute(
            "INSERT INTO tokenbooth_schema VALUES ('usage', $1) ON CONFLICT (component) "
            "DO UPDATE SET version = EXCLUDED.version", SCHEMA_VERSION)
    return SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class Rejected:
    stream_id: str
    data: str
    problem: str


def row(rec: dict[str, Any], entry_id: OrderKey | None = None) -> tuple[Any, ...]:
    """A record's column values, then its stream entry's id (`entry_id`, NULL without
    one); ValueError naming what is wrong."""
    try:
        cost = Decimal(str(rec["cost_usd"]))
        out = (
            _str(rec, "request_id"), _str(rec, "key_id"), _str(rec, "org"),
            _str(rec, "model", empty=True), str(rec.get("upstream_model") or ""),
            str(rec.get("backend") or ""), _int(rec, "prompt_tokens"),
            _int(rec, "completion_tokens"), _int(rec, "total_tokens"),
            cost, str(rec["status"]), bool(rec.get("stream")),
            bool(rec.get("estimated")), _time(rec["started_at"]),
            float(rec.get("duration_ms") or 0.0), str(rec.get("endpoint") or ""),
            *(_period(rec, name) for name in _PERIODS), _sequences(rec),
            *(_bound(rec, name) for name in _BOUNDS),
            *(entry_id or (None, None)))
    except (KeyError, TypeError, InvalidOperation, OverflowError) as e:
        raise ValueError(f"bad or missing field {e}") from None
    if not cost.is_finite():
        raise ValueError("cost_usd is not a number")
    # What PostgreSQL's numeric holds, as asyncpg writes it (pipeline tester: 1e-20000
    # stopped every export behind it; 1e200000 was stored as 0).
    exponent = cost.as_tuple().exponent
    if cost < 0 or (isinstance(exponent, int) and exponent < -_NUMERIC_SCALE) or (
            cost and cost.adjusted() >= _NUMERIC_DIGITS):
        raise ValueError("cost_usd is out of range")
    if any(isinstance(v, str) and "\x00" in v for v in out):
        # PostgreSQL text cannot hold NUL: the whole batch would fail, again and again.
        raise ValueError("a text field holds a NUL character")
    return out


def _sequences(rec: dict[str, Any]) -> int | None:
    """`sequences`, or None (NULL) for a record that does not say."""
    v = rec.get("sequences")
    if v is None:
        return None
    if type(v) is not int or not 1 <= v < 2**31:
        raise TypeError("sequences")
    return v


def _bound(rec: dict[str, Any], name: str) -> int | None:
    """A hold bound, or None (NULL) for a record that does not say."""
    v = rec.get(name)
    if v is None:
        return None
    if type(v) is not int or not 0 <= v < 2**63:
        raise TypeError(name)
    return v


def _str(rec: dict[str, Any], name: str, empty: bool = False) -> str:
    """A text field; empty only where `empty` (a GET /v1/models record names no model)."""
    v = rec[name]
    if not isinstance(v, str) or not (v or empty):
        raise TypeError(name)
    return v


def _int(rec: dict[str, Any], name: str) -> int:
    """A count, as a bigint holds it (one past it stopped every export behind it)."""
    v = rec[name]
    if type(v) is not int or not 0 <= v < 2**63:
        raise TypeError(name)
    return v


def _time(v: Any) -> datetime:
    """In UTC, as PostgreSQL stores it (year 1 at +14:00 is year 0 there: asyncpg's
    OverflowError stopped every export behind it)."""
    t = datetime.fromisoformat(str(v))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# PostgreSQL numeric: up to 131072 digits before the point, 16383 after.
_NUMERIC_DIGITS = 131072
_NUMERIC_SCALE = 16383


def one_per_request(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One row per request_id in a batch (ON CONFLICT cannot touch a row twice in one
    statement): the first, except that a real record supersedes a `lost` one; at the
    earliest entry's place."""
    out: dict[str, tuple[Any, ...]] = {}
    for r in rows:
        old = out.get(r[0])
        if old is None:
            out[r[0]] = r
            continue
        kept = r if old[10] == LOST and r[10] != LOST else old
        place = min(old[-2:], r[-2:]) if None not in (*old[-2:], *r[-2:]) else kept[-2:]
        out[r[0]] = (*kept[:-2], *place)
    return list(out.values())


async def store(conn: asyncpg.Connection, rows: list[tuple[Any, ...]],
                rejected: list[Rejected]) -> None:
    """Writes a batch in one transaction (committed when this returns)."""
    rows = one_per_request(rows)
    async with conn.transaction():
        if rows:
            await conn.execute(_CREATE_STAGE)
            await conn.copy_records_to_table(_STAGE, records=rows, columns=_WRITTEN)
            await conn.execute(_INSERT)
        if rejected:
            await conn.executemany(
                "INSERT INTO usage_rejected (stream_id, data, problem) VALUES ($1, $2, $3)"
                " ON CONFLICT (stream_id) DO NOTHING",
                [(r.stream_id, r.data, r.problem) for r in rejected])


def record(r: asyncpg.Record | tuple[Any, ...]) -> dict[str, Any]:
    """A row (SELECT_COLUMNS) as the usage record it was made from."""
    out = dict(zip(_COLUMNS, tuple(r), strict=True))
    status = out["status"]
    out["status"] = int(status) if status.isdigit() else status
    out["cost_usd"] = format(out["cost_usd"], "f")
    out["started_at"] = iso_z(out["started_at"].astimezone(UTC))
    for name in _PERIODS:  # '' none; NULL: not said (an older record), left out
        if out[name] is None:
            del out[name]
        elif not out[name]:
            out[name] = None
    for name in ("sequences", *_BOUNDS):  # NULL: a record that did not say
        if out[name] is None:
            del out[name]
    return out


def _period(rec: dict[str, Any], name: str) -> str | None:
    """A budget period column: the period id, '' for none, NULL when the record does not
    say (written before records carried it)."""
    if name not in rec:
        return None
    v = rec[name]
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"bad field {name!r}")
    return v


def loads(raw: bytes) -> dict[str, Any]:
    rec = orjson.loads(raw)
    if not isinstance(rec, dict):
        raise ValueError("not a JSON object")
    return rec
