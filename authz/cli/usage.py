"""`tokenbooth usage`: usage records and their totals, filtered by org, key and time."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from authz.cli.common import Parents, Subparsers, load, parse_time
from authz.runtime.settings import Settings


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("usage", parents=[parents.config], help="usage records and totals")
    s.add_argument("--org")
    s.add_argument("--key", help="key id")
    s.add_argument("--since", help="ISO 8601 time")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_usage)


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from authz.state.usage.records import load_records

    try:
        since = parse_time(args.since) if args.since else None
    except ValueError as e:
        raise ValueError(f"--since: {e}") from None
    cfg = load(args, settings)
    rows = [r for r in load_records(cfg) if _selected(r, args.org, args.key, since)]
    totals = _totals(rows)
    if args.json:
        sys.stdout.write(orjson.dumps({"records": rows, "totals": totals}).decode() + "\n")
    else:
        _print_table(rows, totals)
    return 0


def _selected(rec: dict[str, Any], org: str | None, key: str | None,
              since: datetime | None) -> bool:
    if org and rec.get("org") != org:
        return False
    if key and rec.get("key_id") != key:
        return False
    return not (since and parse_time(str(rec.get("started_at"))) < since)


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests": len(rows),
        "prompt_tokens": sum(int(r["prompt_tokens"]) for r in rows),
        "completion_tokens": sum(int(r["completion_tokens"]) for r in rows),
        "total_tokens": sum(int(r["total_tokens"]) for r in rows),
        "cost_usd": format(sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0)), "f"),
    }


def _print_table(rows: list[dict[str, Any]], totals: dict[str, Any]) -> None:
    fmt = "{:<36} {:<16} {:<12} {:<14} {:>7} {:>7} {:>12} {:>6}"
    print(fmt.format("request_id", "key_id", "org", "model", "prompt", "compl", "cost_usd",
                     "status"))
    for r in rows:
        print(fmt.format(r["request_id"][:36], r["key_id"][:16], r["org"][:12], r["model"][:14],
                         r["prompt_tokens"], r["completion_tokens"], r["cost_usd"], r["status"]))
    print(f"total: {totals['requests']} request(s), {totals['prompt_tokens']} prompt + "
          f"{totals['completion_tokens']} completion tokens, ${totals['cost_usd']}")
