"""`tokenbooth up` (Envoy + services + simulator) and `tokenbooth serve` (the services)."""

from __future__ import annotations

import argparse

from authz.cli.common import (
    Parents,
    Subparsers,
    backend_url,
    config_path,
    naming_data_dir,
    run_async,
    run_overrides,
)
from authz.runtime.settings import Settings


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("up", parents=[parents.config, parents.overrides, parents.ports],
                       help="run Envoy + services (+ sim)")
    s.add_argument("--sim", action="store_true",
                   help="send every model to the built-in simulator (not with --upstream)")
    s.set_defaults(func=cmd_up)
    s = sub.add_parser("serve", parents=[parents.config, parents.overrides, parents.ports],
                       help="run the gRPC services and the HTTP side port")
    s.add_argument("--default-upstream", metavar="URL", type=backend_url,
                   help="the backend of every model that has none (`backends: []`); "
                        "`up` sets it to its simulator")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: the other commands need not load grpc and aiohttp.
    from authz.runtime.logs import setup_logging
    from authz.runtime.server import serve_forever
    from authz.runtime.snapshot import Runtime

    setup_logging(args.log_level)
    path, _ = config_path(args, settings)
    runtime = Runtime.from_file(path, run_overrides(args, settings), settings)
    with naming_data_dir(runtime.snapshot.config.data_dir):
        run_async(serve_forever(runtime))
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from authz.runtime.supervisor import UpOptions, run_up

    if args.sim and args.upstream:
        raise ValueError("--sim and --upstream: choose one")
    path, is_default = config_path(args, settings)
    opts = UpOptions(path, create=is_default, overrides=run_overrides(args, settings),
                     sim=args.sim)
    return run_up(opts, settings)
