"""`tokenbooth envoy render`: the Envoy bootstrap for a policy file, on stdout."""

from __future__ import annotations

import argparse
import sys

from authz.cli.common import Parents, Subparsers, load
from authz.runtime.settings import Settings


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("envoy", help="Envoy helpers")
    esub = s.add_subparsers(dest="envoy_command", required=True, metavar="COMMAND")
    r = esub.add_parser("render", parents=[parents.config, parents.overrides],
                        help="print the Envoy bootstrap")
    r.set_defaults(func=cmd_render)


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    from authz.envoy_config.bootstrap import render_yaml
    from authz.runtime.overrides import Overrides

    cfg = Overrides(args.listen, args.upstream).apply(load(args, settings))
    sys.stdout.write(render_yaml(cfg))
    return 0
