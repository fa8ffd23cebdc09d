"""`tokenbooth audit`: budget ledgers against usage records, and records against vLLM's
own token counters (the comparison itself is policy/audit.py)."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from authz.cli.common import Parents, Subparsers, load_for_state, parse_since
from authz.runtime.cells import cell, printable
from authz.runtime.settings import Settings
from policy.audit import (
    ORG_PREFIX,
    BackendAudit,
    LedgerAudit,
    LedgerBalance,
    VllmCounters,
    audit_backend,
    audit_ledgers,
    sort_records,
)
from policy.config import Config, redacted
from policy.limits import usd_text

EPILOG = """\
For each key and org with a budget, and each budget period, the ledger's spent is
compared with the usage records of that key (or org) and period: every record's
cost_usd rounded up to a nano-dollar, as settlement charged it, summed exactly. Any
difference is drift, and so is a reserved counter that is not the sum of its holds.
A request the ledger still holds is in flight: its record, if written, is left out.
A hold whose lease ended unsettled (its replica died) is listed; the next admission
or the lost-hold sweep charges it in full. It is drift only with --strict.

With --vllm URL, the backend's vllm:prompt_tokens_total and
vllm:generation_tokens_total (every label set summed) must equal the tokens of the
records it served since its process_start_time_seconds. Records tokenbooth had to
estimate (a cut stream) are listed apart; with any of them the counters must lie
between the exact records' sums and those plus the estimated records' bounds.

Audit a quiet gateway: a request settled while its record is still on its way to the
store (spooled on a replica during a Redis outage, say), tokens a backend is still
generating, or requests sent to a backend around the gateway all show as drift.

With state: redis the ledgers are read with SCAN (one node: not Redis Cluster); with
state: memory, from the limit state the running process journals in data_dir.
A key whose budget or budget period changed is compared per period, as charged: no
drift. Exit status: 0 no drift, 1 drift, 2 bad input or a store that cannot be read."""

BUDGET_MATCH = "tb:{k:*}:budget:*"
TIMEOUT_S = 5.0


class AuditInputError(ValueError):
    """A store or backend that cannot be read: one line, exit status 2."""


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser(
        "audit", parents=[parents.config], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="budget ledgers vs usage records (vs vLLM's counters); exit 1 on drift",
        description="Budget ledgers against usage records, and records against vLLM's "
                    "token counters.")
    s.add_argument("--since", help="ISO 8601 time, or an age such as 90m, 12h, 7d: only "
                                   "the budget periods that end after it (each compared whole)")
    s.add_argument("--vllm", action="append", default=[], metavar="URL",
                   help="a backend's base URL, as in the config (repeatable)")
    s.add_argument("--strict", action="store_true",
                   help="holds whose lease ended unsettled count as drift")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_audit)


@dataclass(frozen=True, slots=True)
class Report:
    ledgers: list[LedgerAudit]
    backends: list[BackendAudit]
    ledger_source: str  # what the ledgers were read from
    strict: bool
    since: datetime | None
    # Records before this were trimmed with no archive (see policy.audit.audit_ledger).
    trimmed_before: datetime | None = None
    # Records the audit could not read (what is wrong with each): drift, never left out
    # quietly; the rest are audited all the same.
    malformed: tuple[str, ...] = ()

    def ledger_problems(self, a: LedgerAudit) -> list[str]:
        return a.problems(self.strict)

    @property
    def drift(self) -> bool:
        return (bool(self.malformed) or any(self.ledger_problems(a) for a in self.ledgers)
                or any(b.drift or (self.strict and any(b.charged_short))
                       for b in self.backends))


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here, as the stores below: the other commands need not load them.
    from redis.exceptions import RedisError

    from authz.state.keys.base import StoreUnavailable
    from authz.state.limits.base import LimitStoreUnavailable

    now = datetime.now(UTC)
    since = parse_since(args.since, now) if args.since is not None else None
    cfg = load_for_state(args, settings)
    try:
        report = _collect(cfg, args.vllm, since, args.strict)
    except (OSError, RedisError, StoreUnavailable, LimitStoreUnavailable) as e:
        raise AuditInputError(f"cannot audit, a store or backend did not answer: "
                              f"{str(e) or type(e).__name__}") from None
    if args.json:
        sys.stdout.write(orjson.dumps(_as_json(report)).decode() + "\n")
    else:
        _print_report(report)
    return 1 if report.drift else 0


def _collect(cfg: Config, urls: list[str], since: datetime | None, strict: bool) -> Report:
    """Ledgers first, then records (see policy/audit.py), then the backends' counters."""
    from authz.state.usage.reading import trimmed_before
    from authz.state.usage.records import load_records

    ledgers, source, budget_periods = asyncio.run(_ledgers_and_keys(cfg))
    read_at = datetime.now(UTC)
    records, malformed = sort_records(load_records(cfg))
    horizon = asyncio.run(trimmed_before(cfg))
    audits = audit_ledgers(ledgers, records, budget_periods, read_at, since, horizon)
    backends = [audit_backend(scrape_vllm(url), records) for url in urls]
    return Report(audits, backends, source, strict, since, horizon, tuple(malformed))


# -- reading the state ------------------------------------------------------------------


async def _ledgers_and_keys(cfg: Config) -> tuple[list[LedgerBalance], str, dict[str, str]]:
    if cfg.state_is_redis:
        ledgers, source = await redis_ledgers(cfg.state), f"redis {redacted(cfg.state)}"
    else:
        ledgers, source = await memory_ledgers(cfg), f"memory {cfg.data_dir}"
    return ledgers, source, await budget_periods(cfg)


async def budget_periods(cfg: Config) -> dict[str, str]:
    """Budget period kind per owner with a budget: keys of the config and of the key
    store (a validation service cannot list its keys: their ledgers tell), and orgs."""
    from authz.state.keys.base import KeyAdmin
    from authz.state.keys.factory import make_store

    keys = list(cfg.keys)
    store = make_store(cfg)
    if isinstance(store, KeyAdmin):
        await store.start()
        try:
            keys += await store.list_keys(None)
        finally:
            await store.close()
    out: dict[str, str] = {k.id: k.budget_period for k in keys if k.budget_usd is not None}
    out.update({ORG_PREFIX + name: o.budget_period for name, o in cfg.orgs.items()
                if o.budget_usd is not None})
    return out


async def redis_ledgers(url: str) -> list[LedgerBalance]:
    """Every `tb:{k:<owner>}:budget:<period>` hash (found with SCAN) with its holds'
    expiries, each ledger read in one MULTI (its keys share a slot)."""
    from authz.state.keys.redis_store import connect

    client = connect(url, TIMEOUT_S)
    try:
        names = sorted({n.decode() async for n in client.scan_iter(match=BUDGET_MATCH,
                                                                    count=1000)})
        out = []
        for name in names:
            cut = name.rindex("}:budget:")
            owner, period = name[len("tb:{k:"):cut], name[cut + len("}:budget:"):]
            async with client.pipeline(transaction=True) as pipe:
                pipe.hgetall(name)
                pipe.zrange(f"{name[:cut]}}}:resv:{period}", 0, -1, withscores=True)
                fields, exps = await pipe.execute()
            out.append(_ledger(owner, period, fields, dict(exps)))
        return out
    finally:
        await client.aclose()


def _ledger(owner: str, period: str, fields: dict[bytes, bytes],
            exps: dict[bytes, float]) -> LedgerBalance:
    """A ledger hash: spent, reserved, r:<rid> -> a hold's cost, l:<rid> -> a lost one's."""
    try:
        holds = {k[2:].decode(): (int(v), float(exps.get(k[2:], float("-inf"))))
                 for k, v in fields.items() if k.startswith(b"r:")}
        lost = {k[2:].decode(): int(v) for k, v in fields.items() if k.startswith(b"l:")}
        return LedgerBalance(owner, period, int(fields.get(b"spent", 0)),
                             int(fields.get(b"reserved", 0)), holds, lost)
    except ValueError:
        raise AuditInputError(f"the ledger of {owner!r} for {period} is not integers: "
                              f"{fields!r}") from None


async def memory_ledgers(cfg: Config) -> list[LedgerBalance]:
    """The ledgers the embedded state journals in data_dir (authz/state/limits/durable.py)."""
    from authz.state.limits.durable import DurableMemoryLimitStore

    store = DurableMemoryLimitStore(cfg.data_dir)
    await store.load()  # reads the snapshot and journals; no lock, writes nothing
    return [LedgerBalance(owner, period, led.spent, led.reserved, dict(led.holds),
                          {rid: cost for rid, (cost, _) in led.lost.items()})
            for (owner, period), led in sorted(store.ledgers().items())]


def scrape_vllm(url: str) -> VllmCounters:
    """A backend's token counters (every label set summed) and process start."""
    import urllib.parse
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    base = url.rstrip("/").removesuffix("/metrics")
    try:
        shown = printable(redacted(base))  # never a password in the URL (admin retest)
        parts = urllib.parse.urlsplit(base)
    except ValueError:
        raise ValueError("--vllm: expected an http(s):// URL") from None
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--vllm: expected an http(s):// URL, got {shown!r}")
    if parts.query or parts.fragment or "?" in base or "#" in base:
        # (a `?token=` was printed, and /metrics asked for under it)
        raise ValueError("--vllm: expected a backend's http(s)://host:port, no query or "
                         "fragment")
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=TIMEOUT_S) as r:  # noqa: S310
            text = r.read().decode()
    except (OSError, ValueError, http.client.HTTPException) as e:  # (InvalidURL too)
        why = str(e)
        secret = urllib.parse.urlsplit(base).password
        if secret:
            why = why.replace(secret, "***")
        raise AuditInputError(f"--vllm {shown}: cannot read /metrics: "
                              f"{printable(why)}") from None
    sums: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    except ValueError as e:
        raise AuditInputError(f"--vllm {base}: /metrics is not Prometheus text: {e}") from None
    if "vllm:prompt_tokens_total" not in sums or "vllm:generation_tokens_total" not in sums:
        raise AuditInputError(f"--vllm {base}: /metrics has no vllm:prompt_tokens_total / "
                              "vllm:generation_tokens_total")
    return VllmCounters(base, int(sums["vllm:prompt_tokens_total"]),
                        int(sums["vllm:generation_tokens_total"]),
                        sums.get("process_start_time_seconds"))


# -- output -----------------------------------------------------------------------------


def _ledger_json(a: LedgerAudit, problems: list[str]) -> dict[str, Any]:
    return {
        "owner": a.owner, "period": a.period, "ledger_found": a.ledger_found,
        "spent_nano": a.spent, "spent_usd": usd_text(a.spent),
        "records": a.records, "records_nano": a.records_nano,
        "records_usd": usd_text(a.records_nano), "drift_nano": a.drift_nano,
        "settling": a.settling, "reserved_nano": a.reserved,
        "live_holds": a.live_holds, "live_nano": a.live_nano,
        "expired_holds": a.expired_holds, "expired_nano": a.expired_nano,
        "lost_charges": a.lost_charges, "trimmed": a.trimmed,
        "drift": bool(problems), "problems": problems,
    }


def _backend_json(b: BackendAudit) -> dict[str, Any]:
    c = b.counters
    start = c.process_start
    return {
        "url": c.url,
        "process_start": (datetime.fromtimestamp(start, UTC).isoformat()
                          if start is not None else None),
        "vllm_prompt_tokens": c.prompt_tokens, "vllm_generation_tokens": c.generation_tokens,
        "records": b.records, "prompt_tokens": b.prompt_tokens,
        "completion_tokens": b.completion_tokens,
        "estimated": {"records": b.estimated_records, "prompt_tokens": b.estimated_prompt,
                      "completion_tokens": b.estimated_completion,
                      "prompt_bound": b.estimated_prompt_bound,
                      "completion_bound": b.estimated_completion_bound},
        "charged_short": {"prompt_tokens": b.charged_short[0],
                          "generation_tokens": b.charged_short[1]},
        "drift": b.drift,
    }


def _as_json(r: Report) -> dict[str, Any]:
    return {
        "drift": r.drift, "strict": r.strict,
        "since": r.since.isoformat() if r.since else None,
        "ledger_source": r.ledger_source,
        "records_trimmed_before": r.trimmed_before.isoformat() if r.trimmed_before else None,
        "ledgers": [_ledger_json(a, r.ledger_problems(a)) for a in r.ledgers],
        "backends": [_backend_json(b) for b in r.backends],
        "malformed_records": list(r.malformed),
    }


_ROW = "{} {:<16} {:>14} {:>14} {:>6} {:>8} {:>12} {:>7}  {}"
_MALFORMED_SHOWN = 20


def _ceiling(b: BackendAudit) -> str:
    """What the estimated requests could have counted at most, when their records say."""
    if not b.estimated_records:
        return ""
    p, c = b.estimated_prompt_bound, b.estimated_completion_bound
    return (", at most " + ("?" if p is None else str(p)) + " / "
            + ("?" if c is None else str(c)))


def _print_report(r: Report) -> None:
    print(f"ledgers: {r.ledger_source}")
    print(_ROW.format(cell("owner", 24), "period", "spent_usd", "records_usd", "recs", "settling",
                      "reserved_usd", "expired", "status"))
    for a in r.ledgers:
        problems = r.ledger_problems(a)
        print(_ROW.format(cell(a.owner, 24), a.period, usd_text(a.spent), usd_text(a.records_nano),
                          a.records, a.settling, usd_text(a.reserved), a.expired_holds,
                          "DRIFT: " + "; ".join(problems) if problems else
                          "ok (records trimmed)" if a.trimmed else "ok"))
    if r.trimmed_before is not None:
        print(f"records before {r.trimmed_before.isoformat()} were trimmed "
              "(usage.retention_s, no usage.sink): the spend of periods that began "
              "earlier is not compared")
    for b in r.backends:
        c = b.counters
        print(f"backend {c.url}: vLLM {c.prompt_tokens} prompt / {c.generation_tokens} "
              f"generation tokens; records {b.prompt_tokens} / {b.completion_tokens} "
              f"({b.records} requests); estimated {b.estimated_prompt} / "
              f"{b.estimated_completion} ({b.estimated_records} requests"
              f"{_ceiling(b)}): {'DRIFT' if b.drift else 'ok'}")
        short_p, short_g = b.charged_short
        if short_p or short_g:
            print(f"  vLLM counted {short_p} prompt / {short_g} generation tokens more than "
                  "the records charged: cut streams' estimates fell short (raise "
                  "limits.abort_lag_steps), or requests whose records name no backend (a "
                  "client gone before its answer began) were served"
                  f"{' (--strict: drift)' if r.strict else ''}")
    for problem in r.malformed[:_MALFORMED_SHOWN]:
        print(f"DRIFT: {problem}: its cost is in no total")
    if len(r.malformed) > _MALFORMED_SHOWN:
        print(f"DRIFT: {len(r.malformed) - _MALFORMED_SHOWN} more malformed record(s)")
    bad = sum(1 for a in r.ledgers if r.ledger_problems(a))
    bad_b = sum(1 for b in r.backends if b.drift or (r.strict and any(b.charged_short)))
    print(f"drift: {bad} ledger(s), {bad_b} backend(s)"
          + (f", {len(r.malformed)} malformed record(s)" if r.malformed else "") if r.drift else
          f"no drift ({len(r.ledgers)} ledger(s), {len(r.backends)} backend(s))")


__all__ = ["add_parsers"]
