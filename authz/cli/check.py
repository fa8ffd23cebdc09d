"""`tokenbooth check-config FILE`: validate a policy file."""

from __future__ import annotations

import argparse
from pathlib import Path

from authz.cli.common import Parents, Subparsers
from authz.runtime.settings import Settings


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("check-config", parents=[parents.config], help="validate a config file")
    s.add_argument("file")
    s.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    cfg = settings.load_config(Path(args.file))
    print(f"{args.file}: ok ({len(cfg.models)} model(s), {len(cfg.keys)} key(s))")
    return 0
