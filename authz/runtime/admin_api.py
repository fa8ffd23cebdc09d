"""The admin API's endpoints, one coroutine per row of policy/admin_schema.py's ROUTES,
over the running process's key store, limit store, org limits and usage records."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import unicodedata
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any, Literal, cast

from pydantic import BaseModel, ValidationError

from authz.runtime.admin_auth import AdminTokens, CurrentAdminTokens, FailureLimiter
from authz.state.keys.base import KeyAdmin, KeyExists, KeyStore
from authz.state.limits.base import LimitStore, LimitStoreUnavailable
from authz.state.limits.peek import show_state
from authz.state.orgs import OrgLimitsCache
from authz.state.usage.reading import Records, archived, load_usage, stream_usage
from authz.state.usage.records import USAGE_FILE, log_lines
from policy.admin_schema import (
    NDJSON,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    KeyQuery,
    KeyState,
    KeyUpdate,
    OrgOut,
    Spend,
    UnknownCursor,
    UsageGroup,
    UsagePage,
    UsageQuery,
    UsageRecordOut,
    UsageStreamEnd,
    UsageTotals,
)
from policy.audit import ORG_PREFIX
from policy.config import Config, OrgLimits, origin
from policy.errors import type_for
from policy.keyrecord import (
    BudgetPeriod,
    KeyRecord,
    expiry_in_past,
    new_org_problem,
    reads_as_secret,
    valid_org_name,
)
from policy.keys import (
    display_prefix,
    fingerprint,
    new_secret,
    no_key_message,
    redact_secrets,
)
from policy.limits import nano_to_usd, period_id, usd_to_nano
from policy.names import twin_problem
from policy.usage_paging import UnknownAfter, UsagePager
from policy.usage_report import OnePerRequest, Totals, record_cost

__all__ = ["ENDPOINTS", "AdminContext", "Records", "load_usage", "stream_usage"]


# Records a streamed usage answer reads between two turns of the event loop.
STREAM_BATCH = 200


@dataclass(frozen=True)
class Streamed:
    """An answer written as it is produced: `lines`, each one JSON document and a
    newline. An AdminError raised before the first line is an ordinary error answer."""

    lines: AsyncGenerator[bytes, None]
    content_type: str = NDJSON


class AdminError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None,
                 type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        # The gateway's type for the status unless named (a 429 is `rate_limit_error`).
        self.type, self.headers = type or type_for(status), headers or {}


@dataclass
class AdminContext:
    """What the endpoints act on; `config` gives the current policy."""

    config: Callable[[], Config]
    keys: KeyStore
    limits: LimitStore
    orgs: OrgLimitsCache
    tokens: AdminTokens | CurrentAdminTokens
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    limiter: FailureLimiter = field(default_factory=FailureLimiter)
    usage: Callable[[Config], Awaitable[Records]] = load_usage
    # The records as written, one at a time (streamed answers).
    usage_stream: Callable[[Config], AsyncGenerator[dict[str, Any], None]] = stream_usage
    # Usage pages computed at once (each a pass over every record).
    pages: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    # Streamed usage answers at once: places of their own (a reader that stops reading
    # holds its place until the write timeout; it must not hold the pages').
    streams: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    def writable_keys(self) -> KeyAdmin:
        if not isinstance(self.keys, KeyAdmin):
            url = origin(self.config().key_store.validation_url or "")
            raise AdminError(409, f"keys are managed by the validation service at {url}; "
                             "key writes are refused here", "keys_read_only")
        return self.keys


@dataclass
class Call:
    """One request: path parameters, the validated query and body, what the audit line
    names (a key id, an org; never a secret)."""

    params: dict[str, str]
    accept: str = ""
    query: BaseModel | None = None
    body: BaseModel | None = None
    key_id: str | None = None
    org: str | None = None

    def audit(self) -> dict[str, object]:
        # As the caller typed them, but a key's secret given where an id belongs (a leaked
        # key revoked by its secret) is cut to its listed prefix.
        key_id = self.key_id or self.params.get("key_id")
        org = self.org or self.params.get("org")
        return {k: redact_secrets(v) for k, v in (("key_id", key_id), ("org", org)) if v}


def _check_models(cfg: Config, models: Iterable[str]) -> None:
    unknown = sorted(set(models) - set(cfg.models))
    if unknown:
        raise AdminError(400, f"models: unknown alias(es) {unknown}; known: "
                         f"{sorted(cfg.models)}", "invalid_request", param="models")


def _out(rec: KeyRecord, source: str = "store") -> KeyOut:
    return KeyOut.model_validate({**rec.model_dump(), "source": source})


async def _find(ctx: AdminContext, key_id: str) -> KeyOut:
    for k in ctx.config().keys:
        if k.id == key_id:
            return _out(k, "config")
    rec = await ctx.keys.get(key_id) if isinstance(ctx.keys, KeyAdmin) else None
    if rec is None:
        raise _no_key(key_id)
    return _out(rec)


def _no_key(key_id: str) -> AdminError:
    return AdminError(404, no_key_message(key_id), "key_not_found")


def _not_in_config(cfg: Config, key_id: str) -> None:
    if any(k.id == key_id for k in cfg.keys):
        raise AdminError(409, f"key {key_id!r} is declared in the config file; change it "
                         "there", "key_in_config")


# -- keys -------------------------------------------------------------------------------


async def create_key(ctx: AdminContext, call: Call) -> KeyCreated:
    req = cast(KeyCreate, call.body)
    store = ctx.writable_keys()
    cfg = ctx.config()
    await _org_to_create(ctx, req.org)
    _check_models(cfg, req.models)
    expired = expiry_in_past(req.expires_at, ctx.clock())
    if expired:
        raise AdminError(400, expired, "invalid_request", param="expires_at")
    secret = new_secret()
    fields = req.model_dump()
    record = KeyRecord(id="key_" + secrets.token_hex(6), sha256=fingerprint(secret),
                       prefix=display_prefix(secret), created_at=ctx.clock(),
                       **{**fields, "models": tuple(dict.fromkeys(req.models))})
    if any(k.id == record.id for k in cfg.keys):
        raise AdminError(409, "key id collision with the config file; try again",
                         "key_exists")
    try:
        await store.create(record)
    except KeyExists as e:
        raise AdminError(409, str(e), "key_exists") from None
    call.key_id, call.org = record.id, record.org
    return KeyCreated.model_validate({**_out(record).model_dump(), "key": secret})


async def list_keys(ctx: AdminContext, call: Call) -> KeyList:
    q = cast(KeyQuery, call.query)
    cfg = ctx.config()
    rows = [_out(k, "config") for k in cfg.keys]
    if isinstance(ctx.keys, KeyAdmin):
        rows += [_out(k) for k in await ctx.keys.list_keys(q.org)]
    rows = sorted((r for r in rows if (q.org is None or r.org == q.org)
                   and (q.status is None or r.status == q.status)), key=lambda r: r.id)
    if q.after is not None:
        rows = [r for r in rows if r.id > q.after]
    page = rows[:q.limit]
    return KeyList(data=page, has_more=len(rows) > q.limit,
                   last_id=page[-1].id if page else None)


async def get_key(ctx: AdminContext, call: Call) -> KeyOut:
    return await _find(ctx, call.params["key_id"])


async def update_key(ctx: AdminContext, call: Call) -> KeyOut:
    key_id = call.params["key_id"]
    store = ctx.writable_keys()
    cfg = ctx.config()
    _not_in_config(cfg, key_id)
    changes = cast(KeyUpdate, call.body).changes()
    if not changes:
        raise AdminError(400, "nothing to change: send at least one field",
                         "invalid_request")
    _check_models(cfg, changes.get("models", ()))
    try:
        new = await store.update(key_id, changes)
    except ValueError as e:
        param = str(e).partition(":")[0] if ":" in str(e) else None
        raise AdminError(400, str(e), "invalid_request", param=param) from None
    if new is None:
        raise _no_key(key_id)
    call.org = new.org
    return _out(new)


async def revoke_key(ctx: AdminContext, call: Call) -> KeyOut:
    key_id = call.params["key_id"]
    store = ctx.writable_keys()
    _not_in_config(ctx.config(), key_id)
    new = await store.revoke(key_id)
    if new is None:
        raise _no_key(key_id)
    call.org = new.org
    return _out(new)


# -- spend and orgs ---------------------------------------------------------------------


def _usd(nano: int) -> str:
    return format(nano_to_usd(nano), "f")


async def _spend(ctx: AdminContext, owner: Literal["key", "org"], ident: str, org: str,
                 period: BudgetPeriod, budget: Decimal | None) -> Spend:
    now = ctx.clock()
    pid = period_id(period, now)
    if budget is None:
        # No budget, so no ledger (none is kept without one): no figure, where "0" read
        # as nothing spent (admin tester); its spend is in GET /v1/usage.
        return Spend(owner=owner, id=ident, org=org, budget_period=period, period=pid,
                     budget_usd=None, spent_usd=None, reserved_usd=None, remaining_usd=None)
    ledger = ident if owner == "key" else ORG_PREFIX + org
    spent, reserved = await ctx.limits.budget(ledger, org, pid, now.timestamp())
    total = usd_to_nano(budget)
    return Spend(owner=owner, id=ident, org=org, budget_period=period, period=pid,
                 budget_usd=format(budget, "f"), spent_usd=_usd(spent),
                 reserved_usd=_usd(reserved),
                 remaining_usd=_usd(max(total - spent - reserved, 0)))


async def key_spend(ctx: AdminContext, call: Call) -> Spend:
    key = await _find(ctx, call.params["key_id"])
    call.org = key.org
    return await _spend(ctx, "key", key.id, key.org, key.budget_period, key.budget_usd)


async def key_state(ctx: AdminContext, call: Call) -> KeyState:
    key = await _find(ctx, call.params["key_id"])
    call.org = key.org
    cfg = ctx.config()
    try:
        state = await show_state(cfg, key, ctx.clock(), ctx.orgs.org_limits(cfg, key.org),
                                 live=ctx.limits)
    except (OSError, LimitStoreUnavailable) as e:
        raise AdminError(503, f"the limit store did not answer: {e}", "service_unavailable",
                         headers={"retry-after": "1"}) from None
    return KeyState.model_validate(state)


def _org_out(ctx: AdminContext, org: str) -> OrgOut:
    stored = ctx.orgs.stored(org)
    if stored is not None:
        return OrgOut(org=org, source="store", limits=stored)
    default = ctx.config().orgs.get(org)
    return OrgOut(org=org, source="none" if default is None else "config", limits=default)


async def _org_to_create(ctx: AdminContext, org: str) -> None:
    """A 400 for an org name that reads as another (`new_org_problem`: it travels in a
    request header and prints in reports) unless the org exists already: a key of it,
    its limits in the config or the store, written before the rule (an upgrade must not
    strand an org that has a trailing blank)."""
    problem = new_org_problem(org)
    if problem is None and unicodedata.normalize("NFKC", org) != org:
        cfg = ctx.config()
        known = {*cfg.orgs, *(k.org for k in cfg.keys), *ctx.orgs.in_force(cfg)}
        if isinstance(ctx.keys, KeyAdmin):
            known.update(k.org for k in await ctx.keys.list_keys())
        problem = twin_problem(org, known, "org")
    if problem is None or await _org_exists(ctx, org):
        return
    raise AdminError(400, f"org: {problem}, got {redact_secrets(org[:64])!r}",
                     "invalid_request", param="org")


def _org_param(call: Call) -> str:
    """The path's org, if it can be one (a key's org: 1 to 128 characters, no control
    character); a 400 otherwise, as PUT gives (GET answered 200 for `%00`)."""
    org = call.params["org"]
    if not valid_org_name(org):
        raise AdminError(400, f"org: expected 1 to 128 characters and no control "
                         f"character, got {redact_secrets(org[:64])!r}", "invalid_request",
                         param="org")
    if reads_as_secret(org):  # (GET echoed it whole in its answer: security tester)
        raise AdminError(400, "org: expected an org's name, got what reads as a key's "
                         f"secret, {redact_secrets(org[:64])!r}", "invalid_request",
                         param="org")
    return org


async def get_org(ctx: AdminContext, call: Call) -> OrgOut:
    return _org_out(ctx, _org_param(call))


async def set_org(ctx: AdminContext, call: Call) -> OrgOut:
    org = _org_param(call)
    await _org_to_create(ctx, org)
    await ctx.orgs.put(org, cast(OrgLimits, call.body))
    return _org_out(ctx, org)


async def delete_org(ctx: AdminContext, call: Call) -> OrgOut:
    org = _org_param(call)
    await ctx.orgs.put(org, None)
    return _org_out(ctx, org)


async def _org_exists(ctx: AdminContext, org: str) -> bool:
    """A key of it, or its limits in the config or the store."""
    cfg = ctx.config()
    if org in cfg.orgs or any(k.org == org for k in cfg.keys) \
            or ctx.orgs.stored(org) is not None:
        return True
    return isinstance(ctx.keys, KeyAdmin) and bool(await ctx.keys.list_keys(org))


async def org_spend(ctx: AdminContext, call: Call) -> Spend:
    org = _org_param(call)
    if not await _org_exists(ctx, org):  # a 200 of zeros for any name (admin tester)
        raise AdminError(404, f"no org {redact_secrets(org[:64])!r}: no key of it, nor its "
                         "limits in the config or the store", "org_not_found", param="org")
    limits = ctx.orgs.org_limits(ctx.config(), org) or OrgLimits()
    return await _spend(ctx, "org", org, org, limits.budget_period, limits.budget_usd)


# -- usage ------------------------------------------------------------------------------


def _selected(rec: dict[str, Any], q: UsageQuery) -> bool:
    if (q.org and rec.get("org") != q.org) or (q.key and rec.get("key_id") != q.key):
        return False
    if q.since is None:
        return True
    try:
        started = datetime.fromisoformat(str(rec.get("started_at")).replace("Z", "+00:00"))
    except ValueError:
        return False
    since = q.since if q.since.tzinfo else q.since.replace(tzinfo=UTC)
    return (started if started.tzinfo else started.replace(tzinfo=UTC)) >= since


def _record(rec: dict[str, Any], q: UsageQuery) -> UsageRecordOut | None:
    if not _selected(rec, q):
        return None
    try:
        out = UsageRecordOut.model_validate(rec)
        record_cost(out.cost_usd)
    except (ValidationError, ValueError, ArithmeticError):
        return None  # a damaged record: `tokenbooth audit` reports those
    return out


@dataclass
class _Tally:
    """Totals (and groups) of the selected records: a page's, or those a stream has
    written."""

    group_by: str | None
    totals: Totals = field(default_factory=Totals)
    groups: dict[str, Totals] = field(default_factory=dict)

    def count(self, rec: UsageRecordOut) -> None:
        amounts = (rec.prompt_tokens, rec.completion_tokens, rec.total_tokens,
                   Decimal(rec.cost_usd))
        self.totals.add(*amounts)
        if self.group_by is not None:
            group = getattr(rec, {"key": "key_id", "org": "org", "model": "model"}[
                self.group_by])
            self.groups.setdefault(group, Totals()).add(*amounts)

    def line(self, rec: UsageRecordOut) -> bytes:
        self.count(rec)
        return rec.model_dump_json().encode() + b"\n"

    def end(self) -> bytes:
        groups = None if self.group_by is None else [
            UsageGroup(group=g, **t.as_dict()) for g, t in sorted(self.groups.items())]
        end = UsageStreamEnd(totals=UsageTotals(**self.totals.as_dict()), groups=groups)
        return end.model_dump_json().encode() + b"\n"


async def _usage_lines(ctx: AdminContext, q: UsageQuery) -> AsyncGenerator[bytes, None]:
    """One line per selected record, deduplicated as they come (policy/usage_report.py:
    a `lost` record waits for the end, in case a real one replaces it); totals last."""
    dedup, tally = OnePerRequest(), _Tally(q.group_by)
    # A few at a time (places of their own), and the event loop's other work (every
    # ext_authz and ext_proc answer) between batches of records (six streams at once held
    # the loop half a second at a time: admin review).
    async with ctx.streams, contextlib.aclosing(ctx.usage_stream(ctx.config())) as records:
        n = 0
        async for raw in records:
            rec = dedup.feed(raw)
            if rec is not None and (out := _record(rec, q)) is not None:
                yield tally.line(out)
            n += 1
            if n % STREAM_BATCH == 0:
                await asyncio.sleep(0)
    for rec in dedup.finish():
        if (out := _record(rec, q)) is not None:
            yield tally.line(out)
    yield tally.end()


def _stream_query(q: UsageQuery) -> None:
    for name in ("limit", "after"):
        if name in q.model_fields_set:
            raise AdminError(400, f"{name}: a streamed answer has every record (no paging)",
                             "invalid_request", param=name)


async def usage(ctx: AdminContext, call: Call) -> UsagePage | Streamed:
    q = cast(UsageQuery, call.query)
    if q.stream or NDJSON in call.accept:
        _stream_query(q)
        return Streamed(_usage_lines(ctx, q))
    cfg = ctx.config()
    try:
        if archived(cfg) and ctx.usage is load_usage:
            from authz.state.usage.page import sql_page

            return await sql_page(cfg, q)  # SQL aggregates and keyset pages
        # One pass that keeps only the page (policy/usage_paging.py), in a worker
        # thread: validating and summing every record is seconds of CPU for a large
        # file, and the event loop, with every ext_proc answer, keeps its pace.
        async with ctx.pages:
            if ctx.usage is not load_usage:  # a source of its own (tests)
                return await asyncio.to_thread(_page, await ctx.usage(cfg), q)
            if cfg.state_is_redis:  # the stream, a batch of entries at a time
                return await asyncio.to_thread(_stream_page, ctx.usage_stream(cfg), q)
            return await asyncio.to_thread(_page, log_lines(cfg.data_dir / USAGE_FILE), q)
    except UnknownCursor as e:
        raise AdminError(400, str(e), "invalid_request", param="after") from None


def _stream_page(stream: AsyncGenerator[dict[str, Any], None], q: UsageQuery) -> UsagePage:
    """`_page` over an async source, read on an event loop of this worker thread."""
    records = _drain(stream)
    try:
        return _page(records, q)
    finally:
        records.close()


def _drain(stream: AsyncGenerator[dict[str, Any], None]) -> Generator[dict[str, Any]]:
    """`stream`'s records, pulled a batch at a time on a loop of the calling thread (its
    Redis client is made, and closed, on that loop)."""
    loop = asyncio.new_event_loop()
    try:
        while batch := loop.run_until_complete(_next_batch(stream)):
            yield from batch
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


async def _next_batch(stream: AsyncGenerator[dict[str, Any], None],
                      n: int = 1000) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for rec in stream:  # a break leaves the generator where it was
        out.append(rec)
        if len(out) >= n:
            break
    return out


def _page(records: Iterable[dict[str, Any]], q: UsageQuery) -> UsagePage:
    tally = _Tally(q.group_by)
    pager = UsagePager(partial(_record, q=q), tally.count, q.limit, q.after)
    try:
        page = pager.feed_all(records)
    except UnknownAfter:
        raise UnknownCursor(q.after or "") from None
    groups = None if q.group_by is None else [
        UsageGroup(group=g, **t.as_dict()) for g, t in sorted(tally.groups.items())]
    return UsagePage(data=page.rows, totals=UsageTotals(**tally.totals.as_dict()),
                     groups=groups, has_more=page.has_more,
                     last_id=page.rows[-1].request_id if page.rows else None)


Endpoint = Callable[[AdminContext, Call], Awaitable[BaseModel | Streamed]]
ENDPOINTS: dict[str, Endpoint] = {
    "create_key": create_key, "list_keys": list_keys, "get_key": get_key,
    "update_key": update_key, "revoke_key": revoke_key, "key_spend": key_spend,
    "key_state": key_state,
    "get_org": get_org, "set_org": set_org, "delete_org": delete_org,
    "org_spend": org_spend, "usage": usage,
}
