"""The `tokenbooth` command. Bad input gives one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import orjson

from authz.runtime.defaults import DEFAULT_CONFIG
from authz.state.keys.base import KeyExists, ReadOnlyStore, StoreUnavailable
from policy.config import ConfigError, load_config, parse_hostport

Handler = Callable[[argparse.Namespace], int]


def config_path(args: argparse.Namespace) -> tuple[Path, bool]:
    """The config to use and whether it is the default (which `up` may create)."""
    given = args.config or os.environ.get("TOKENBOOTH_CONFIG")
    return (Path(given), False) if given else (DEFAULT_CONFIG, True)


def _run_async(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    from authz.runtime.logs import setup_logging
    from authz.runtime.overrides import Overrides
    from authz.runtime.server import serve_forever
    from authz.runtime.snapshot import Runtime

    setup_logging(args.log_level)
    path, _ = config_path(args)
    runtime = Runtime.from_file(path, Overrides(args.listen, args.upstream))
    _run_async(serve_forever(runtime))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from authz.runtime.supervisor import run_up

    path, is_default = config_path(args)
    return run_up(path, args.listen, args.upstream, create=is_default)


def cmd_sim(args: argparse.Namespace) -> int:
    from authz.sim import run_sim

    host, port = parse_hostport(args.listen)
    models = args.model or ["tiny-llama"]
    with contextlib.suppress(KeyboardInterrupt):
        _run_async(run_sim(host, port, models, args.ttft_ms, args.tpot_ms))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from authz.envoy_config.bootstrap import render_yaml
    from authz.runtime.overrides import Overrides

    path, _ = config_path(args)
    cfg = Overrides(args.listen, args.upstream).apply(load_config(path))
    sys.stdout.write(render_yaml(cfg))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.file))
    print(f"{args.file}: ok ({len(cfg.models)} model(s), {len(cfg.keys)} key(s))")
    return 0


def _parse_since(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: expected an ISO 8601 time, got {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def cmd_usage(args: argparse.Namespace) -> int:
    from authz.state.usage.records import load_records

    path, _ = config_path(args)
    cfg = load_config(path)
    since = _parse_since(args.since) if args.since else None
    rows: list[dict[str, Any]] = []
    for rec in load_records(cfg):
        if args.org and rec.get("org") != args.org:
            continue
        if args.key and rec.get("key_id") != args.key:
            continue
        if since and _parse_since(str(rec.get("started_at"))) < since:
            continue
        rows.append(rec)
    totals = {
        "requests": len(rows),
        "prompt_tokens": sum(int(r["prompt_tokens"]) for r in rows),
        "completion_tokens": sum(int(r["completion_tokens"]) for r in rows),
        "total_tokens": sum(int(r["total_tokens"]) for r in rows),
        "cost_usd": format(sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0)), "f"),
    }
    if args.json:
        sys.stdout.write(orjson.dumps({"records": rows, "totals": totals}).decode() + "\n")
        return 0
    fmt = "{:<36} {:<16} {:<12} {:<14} {:>7} {:>7} {:>12} {:>6}"
    print(fmt.format("request_id", "key_id", "org", "model", "prompt", "compl", "cost_usd",
                     "status"))
    for r in rows:
        print(fmt.format(r["request_id"][:36], r["key_id"][:16], r["org"][:12], r["model"][:14],
                         r["prompt_tokens"], r["completion_tokens"], r["cost_usd"], r["status"]))
    print(f"total: {totals['requests']} request(s), {totals['prompt_tokens']} prompt + "
          f"{totals['completion_tokens']} completion tokens, ${totals['cost_usd']}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line (with a pointer to --help), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--config", help="policy file (default: $TOKENBOOTH_CONFIG or "
                        f"{DEFAULT_CONFIG})")
    overrides = _Parser(add_help=False)
    overrides.add_argument("--listen", help="HOST:PORT for Envoy's listener")
    overrides.add_argument("--upstream", help="send every model to this backend URL")

    p = _Parser(prog="tokenbooth", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("up", parents=[common, overrides], help="run Envoy + services (+ sim)")
    s.set_defaults(func=cmd_up)
    s = sub.add_parser("serve", parents=[common, overrides],
                       help="run the gRPC services and the HTTP side port")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("sim", parents=[common], help="the vLLM-compatible upstream simulator")
    s.add_argument("--listen", default="127.0.0.1:8000")
    s.add_argument("--model", action="append", help="model name to serve (repeatable)")
    s.add_argument("--ttft-ms", type=float, default=0.0)
    s.add_argument("--tpot-ms", type=float, default=0.0)
    s.set_defaults(func=cmd_sim)
    s = sub.add_parser("envoy", help="Envoy helpers")
    esub = s.add_subparsers(dest="envoy_command", required=True, metavar="COMMAND")
    r = esub.add_parser("render", parents=[common, overrides], help="print the Envoy bootstrap")
    r.set_defaults(func=cmd_render)
    s = sub.add_parser("check-config", parents=[common], help="validate a config file")
    s.add_argument("file")
    s.set_defaults(func=cmd_check)
    from authz.cli.keys import add_parsers as add_keys_parsers

    add_keys_parsers(sub, common)
    s = sub.add_parser("usage", parents=[common], help="usage records and totals")
    s.add_argument("--org")
    s.add_argument("--key", help="key id")
    s.add_argument("--since", help="ISO 8601 time")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_usage)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except (ConfigError, ValueError, LookupError, OSError, RuntimeError, TimeoutError,
            ReadOnlyStore, KeyExists, StoreUnavailable) as e:
        print(f"tokenbooth: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError | ValueError) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the last line of defence: one line, not a traceback
        if os.environ.get("TOKENBOOTH_DEBUG"):
            raise
        print(f"tokenbooth: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
