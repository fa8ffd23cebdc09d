"""`tokenbooth envoy render`: the Envoy bootstrap for a policy file, on stdout."""

from __future__ import annotations

import argparse
import sys

from authz.cli.common import Parents, Subparsers, load, run_overrides
from authz.runtime.settings import Settings


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("envoy", parents=[parents.config], help="Envoy helpers")
    esub = s.add_subparsers(dest="envoy_command", required=True, metavar="COMMAND")
    r = esub.add_parser("render", parents=[parents.config, parents.overrides, parents.ports],
                        help="print the Envoy bootstrap (the model clusters are not in it: "
                             "`serve` gives them to Envoy over ADS, so --upstream changes "
                             "nothing here)")
    r.set_defaults(func=cmd_render)


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    from authz.envoy_config.bootstrap import render_yaml

    cfg = run_overrides(args, settings).apply(load(args, settings))
    sys.stdout.write(render_yaml(cfg))
    return 0
