"""`tokenbooth usage`: usage records and their totals, filtered by org, key and time, and
grouped by key, org, model, day or hour. One pass over the records, streamed from the
JSON-lines file or read from the Redis stream a page at a time (the arithmetic is
policy/usage_report.py): memory does not grow with the records but for their ids.
With usage.sink (PostgreSQL): SQL aggregates over the archive plus the stream's tail.
`tokenbooth usage export`: the exporter of the stream into the sink."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from collections.abc import AsyncGenerator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from authz.cli import remote
from authz.cli.common import (
    Parents,
    Subparsers,
    admin_url_parser,
    load_for_state,
    parse_since,
    positive_int,
    run_async,
    seconds,
)
from authz.runtime.cells import cell, display_width, printable
from authz.runtime.settings import Settings
from policy.config import Config, redacted
from policy.keyrecord import KEY_PREFIX
from policy.keys import display_prefix
from policy.usage_report import GROUPS, Selection, UsageReport, parse_group_by

PAGE = 1000  # stream entries per XRANGE
TIMEOUT_S = 5.0


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("usage", parents=[parents.config, admin_url_parser()],
                       help="usage records and totals; `usage export`: into usage.sink")
    s.add_argument("action", nargs="?", choices=["export"],
                   help="export: move records from the Redis stream into the PostgreSQL "
                        "sink, until stopped (README: Usage records at volume)")
    s.add_argument("--org", type=_text)
    s.add_argument("--key", type=_key_id, help="key id")
    s.add_argument("--since", help="ISO 8601 time, or an age such as 90m, 24h, 7d")
    s.add_argument("--group-by", type=_group_by, metavar="G[,G]",
                   help=f"totals per group instead of the records: {', '.join(GROUPS)} "
                        "(day and hour in UTC); several, comma-separated, nest")
    s.add_argument("--json", action="store_true")
    _export_arguments(s)
    s.set_defaults(func=cmd_usage)


def _key_id(value: str) -> str:
    """A key id; a key's secret given instead is refused, as `keys show` refuses it (it
    matched no record, and the report said 0 requests: admin tester)."""
    if value.startswith(KEY_PREFIX):
        raise argparse.ArgumentTypeError(
            f"{display_prefix(value)}… is a key's secret, not its id: `keys list` shows "
            "each key's id beside its prefix")
    return _text(value)


def _text(value: str) -> str:
    """An argument as text: bytes that are not UTF-8 (`$'\\xff'`) reach Python as lone
    surrogates, which no store can be asked for (records tester: PostgreSQL's driver
    failed on one, reported as the store being unreadable, exit 1)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{value!a} is not UTF-8 text") from None
    return value


def _group_by(text: str) -> tuple[str, ...]:
    try:
        return parse_group_by(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "export":
        return cmd_export(args, settings)
    if args.until_idle or args.batch != 2000 or args.claim_idle != 60.0:
        raise ValueError("--batch, --claim-idle and --until-idle are options of "
                         "`tokenbooth usage export`")
    since = parse_since(args.since, datetime.now(UTC)) if args.since is not None else None
    report = UsageReport(Selection(args.org, args.key, since), args.group_by or ())
    out = sys.stdout
    if args.admin_url:  # a remote gateway's records, through the same report
        client = remote.AdminClient.from_settings(args.admin_url, settings)
        found = remote.usage(client, args.org, args.key,
                             since.isoformat() if since else None)["records"]
        recs: Iterator[dict[str, Any]] = iter(found)
    else:
        cfg = load_for_state(args, settings)
        if args.group_by and archived(cfg):  # SQL aggregates, then the stream's tail
            sql_report(cfg, report)
            recs = iter(())
        else:
            recs = _started(records(cfg, report.selection))
    if args.group_by:
        for rec in recs:
            report.feed(rec)
        report.finish()
        (_groups_json if args.json else _groups_table)(report, out)
    elif args.json:
        _records_json(report, recs, out)
    else:
        _records_table(report, recs, out)
    if report.skipped:
        print(f"tokenbooth: warning: {report.skipped} record(s) could not be counted "
              "(a field missing or malformed)", file=sys.stderr)
    return 0


def _started(recs: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The same records, the first read before anything is printed: a store that cannot
    be read fails the command with its one error line, not after a table header."""
    first = next(recs, None)
    return recs if first is None else itertools.chain((first,), recs)


# -- export: the stream into the PostgreSQL sink (authz/state/usage/exporter.py) -------


def _export_arguments(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("usage export")
    g.add_argument("--batch", type=positive_int, default=2000, help="records per transaction")
    g.add_argument("--claim-idle", type=seconds, default=60.0, metavar="SECONDS",
                   help="take over the records a stopped exporter held this long")
    g.add_argument("--until-idle", action="store_true",
                   help="exit once the stream holds nothing more to export")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])


def check_config(cfg: Config) -> str:
    """The sink's URL; ValueError when export cannot run with this config."""
    if not cfg.state_is_redis:
        raise ValueError("usage export reads the Redis stream: it needs state: redis://…")
    if not cfg.usage.sink:
        raise ValueError("usage export needs usage.sink: postgresql://… in the config")
    return cfg.usage.sink


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from authz.runtime.logs import setup_logging

    cfg = load_for_state(args, settings)
    sink = check_config(cfg)
    setup_logging(args.log_level)
    run_async(_export(cfg, sink, args))
    return 0


async def _export(cfg: Config, sink: str, args: argparse.Namespace) -> None:
    import logging

    from authz.state.usage.exporter import Exporter
    from authz.state.usage.records import USAGE_STREAM
    from authz.state.usage.trim import TrimPolicy

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    exporter = Exporter(cfg.state, sink, stream=USAGE_STREAM, batch=args.batch,
                        claim_idle_s=args.claim_idle,
                        trim_policy=TrimPolicy.from_config(cfg.usage),
                        trim_every_s=cfg.usage.trim_every_s)
    log = logging.getLogger("tokenbooth.records")
    log.info("usage export started", extra={"sink": redacted(sink),
                                            "consumer": exporter.consumer})
    try:
        await exporter.run(stop, until_idle=args.until_idle)
    finally:
        await exporter.aclose()
        log.info("usage export stopped", extra={"exported": exporter.exported})


# -- reading: one record at a time ------------------------------------------------------


def archived(cfg: Config) -> bool:
    """Whether PostgreSQL holds the records (usage.sink, with a Redis state)."""
    return cfg.state_is_redis and cfg.usage.sink is not None


def records(cfg: Config, selection: Selection | None = None) -> Iterator[dict[str, Any]]:
    """Every record of the configured state backend, in the order written, duplicates
    included (the report drops them). With a sink: the archive's rows of `selection`
    (in SQL), then the stream's unexported tail."""
    if archived(cfg):
        return archive_records(cfg, selection or Selection())
    if cfg.state_is_redis:
        from authz.state.usage.records import USAGE_STREAM

        return stream_records(cfg.state, USAGE_STREAM)
    from authz.state.usage.records import USAGE_FILE

    if not cfg.data_dir.exists():
        # A data_dir changed in the file reaches a running gateway only at its restart
        # (t1 tester: an empty report, no word why).
        print(f"tokenbooth: warning: data_dir {cfg.data_dir} does not exist: no gateway "
              "has written records there (a data_dir changed in the config takes effect "
              "when the gateway restarts)", file=sys.stderr)
    return jsonl_records(cfg.data_dir / USAGE_FILE)


def jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines log, its rotated files first, line by line (a damaged
    line is skipped)."""
    from authz.state.usage.records import LogReader

    reader = LogReader(path)  # a rotation while it reads loses nothing
    try:
        while lines := reader.next_lines():
            for line in lines:
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    yield rec
    finally:
        reader.close()


def archive_records(cfg: Config, selection: Selection) -> Iterator[dict[str, Any]]:
    """The records of the PostgreSQL sink and the stream's tail, a page at a time."""
    from authz.state.usage.query import every_record

    loop = asyncio.new_event_loop()
    pages = every_record(cfg, selection)
    try:
        while True:
            try:
                page = loop.run_until_complete(_next(pages, cfg))
            except StopAsyncIteration:
                return
            yield from page
    finally:
        loop.run_until_complete(pages.aclose())
        loop.close()


async def _next(pages: AsyncGenerator[list[dict[str, Any]], None], cfg: Config,
                ) -> list[dict[str, Any]]:
    try:
        return await anext(pages)
    except StopAsyncIteration:
        raise
    except Exception as e:  # asyncpg's and redis' errors: one line, the URL redacted
        raise OSError(_sink_error(cfg, e)) from None


def _sink_error(cfg: Config, e: Exception) -> str:
    return (f"cannot read usage records from {redacted(cfg.usage.sink or '')} and "
            f"{redacted(cfg.state)}: {type(e).__name__}: {e}")


def sql_report(cfg: Config, report: UsageReport) -> None:
    """Fills `report` with the archive's SQL aggregates and the stream's tail."""
    try:
        asyncio.run(_sql_report(cfg, report))
    except Exception as e:
        raise OSError(_sink_error(cfg, e)) from None


async def _sql_report(cfg: Config, report: UsageReport) -> None:
    from authz.state.usage import archive, query

    assert cfg.usage.sink is not None
    conn = await archive.connect(cfg.usage.sink)
    try:
        async with query.snapshot(conn):
            t = await query.tail(cfg, conn)
            sel = report.selection
            for group, totals in await query.aggregate(conn, sel, report.group_by,
                                                       t.exclude):
                report.merge(group, totals)
    finally:
        await conn.close()
    for rec in t.records:
        report.feed(rec)
    report.finish()


def stream_records(url: str, stream: str, page: int = PAGE) -> Iterator[dict[str, Any]]:
    """The records of a Redis stream, `page` entries per XRANGE."""
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S,
                                  socket_connect_timeout=TIMEOUT_S)
    start = "-"
    try:
        while True:
            try:
                entries: list[Any] = client.xrange(stream, start, "+", count=page) or []
            except (RedisError, OSError) as e:
                raise OSError(f"cannot read usage records from {redacted(url)}: {e}") from None
            for _id, fields in entries:
                rec = _loads(fields.get(b"data"))
                if rec is not None:
                    yield rec
            if len(entries) < page:
                return
            start = "(" + entries[-1][0].decode()  # after the last (Redis 6.2+)
    finally:
        client.close()


def _loads(raw: bytes | None) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


# -- output -----------------------------------------------------------------------------

_ROW = "{} {} {} {} {:>7} {:>7} {:>12} {:>6}"
_NAMED = (("request_id", 36), ("key_id", 16), ("org", 12), ("model", 14))


def _records_table(report: UsageReport, recs: Iterator[dict[str, Any]], out: IO[str]) -> None:
    out.write(_ROW.format(*(cell(f, w) for f, w in _NAMED), "prompt", "compl",
                          "cost_usd", "status") + "\n")
    for r in _counted(report, recs):
        out.write(_ROW.format(*(cell(str(r.get(f)), w) for f, w in _NAMED),
                              r["prompt_tokens"], r["completion_tokens"], r["cost_usd"],
                              r["status"]) + "\n")
    t = report.totals
    out.write(f"total: {t.requests} request(s), {t.prompt_tokens} prompt + "
              f"{t.completion_tokens} completion tokens, ${t.as_dict()['cost_usd']}\n")


def _records_json(report: UsageReport, recs: Iterator[dict[str, Any]], out: IO[str]) -> None:
    """{"records": [...], "totals": {...}}, written as the records come, from the first
    one on: a store that cannot be read leaves nothing half-written on stdout."""
    counted = _counted(report, recs)
    first = next(counted, None)
    out.write('{"records":[')
    if first is not None:
        out.write(orjson.dumps(first).decode())
    for r in counted:
        out.write("," + orjson.dumps(r).decode())
    out.write('],"totals":' + orjson.dumps(report.totals.as_dict()).decode() + "}\n")


def _counted(report: UsageReport, recs: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The records the report counts, as it counts them (`lost` ones last)."""
    for raw in recs:
        rec = report.feed(raw)
        if rec is not None:
            yield rec
    yield from report.finish()


def _groups_json(report: UsageReport, out: IO[str]) -> None:
    groups = [dict(zip(report.group_by, g, strict=True)) | t.as_dict()
              for g, t in report.groups()]
    out.write(orjson.dumps({"group_by": list(report.group_by), "groups": groups,
                            "totals": report.totals.as_dict()}).decode() + "\n")


NO_VALUE = "(none)"  # a group of records with no value there (GET /v1/models: no model)


def _groups_table(report: UsageReport, out: IO[str]) -> None:
    groups = [(tuple(printable(v or NO_VALUE) for v in g), t) for g, t in report.groups()]
    widths = [max([len(name), 5 if i == 0 else 0, *(display_width(g[i]) for g, _ in groups)])
              for i, name in enumerate(report.group_by)]
    head = "  ".join(cell(n, w) for n, w in zip(report.group_by, widths, strict=True))
    num = "{:>9} {:>12} {:>12} {:>14}"
    out.write(head + "  " + num.format("requests", "prompt", "completion", "cost_usd") + "\n")
    total = ("total", *("" for _ in widths[1:]))
    rows = [*groups, (total, report.totals)]
    for g, t in rows:
        d = t.as_dict()
        out.write("  ".join(cell(v, w) for v, w in zip(g, widths, strict=True)) + "  "
                  + num.format(d["requests"], d["prompt_tokens"], d["completion_tokens"],
                               d["cost_usd"]) + "\n")
