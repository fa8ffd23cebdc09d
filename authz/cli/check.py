"""`tokenbooth check-config FILE`: validate a policy file and list every problem."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from authz.cli.common import Parents, Subparsers
from authz.runtime.settings import Settings
from policy.config import ConfigError


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("check-config", parents=[parents.config], help="validate a config file")
    s.add_argument("file")
    s.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 and one `ok` line; else exit 2 and one line per problem on stderr."""
    try:
        cfg = settings.load_config(Path(args.file))
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    print(f"{args.file}: ok ({len(cfg.models)} model(s), {len(cfg.keys)} key(s))")
    return 0
