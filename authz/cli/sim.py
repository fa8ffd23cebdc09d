"""`tokenbooth sim`: the vLLM-compatible upstream simulator."""

from __future__ import annotations

import argparse
import contextlib

from authz.cli.common import Parents, Subparsers, run_async
from authz.runtime.settings import Settings
from policy.config import parse_hostport


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("sim", parents=[parents.config],
                       help="the vLLM-compatible upstream simulator")
    s.add_argument("--listen", default="127.0.0.1:8000")
    s.add_argument("--model", action="append", help="model name to serve (repeatable)")
    s.add_argument("--ttft-ms", type=float, default=0.0)
    s.add_argument("--tpot-ms", type=float, default=0.0)
    s.set_defaults(func=cmd_sim)


def cmd_sim(args: argparse.Namespace, settings: Settings) -> int:
    from authz.sim import run_sim

    host, port = parse_hostport(args.listen)
    models = args.model or ["tiny-llama"]
    with contextlib.suppress(KeyboardInterrupt):
        run_async(run_sim(host, port, models, args.ttft_ms, args.tpot_ms))
    return 0
