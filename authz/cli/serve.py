"""`tokenbooth up` (Envoy + services + simulator) and `tokenbooth serve` (the services)."""

from __future__ import annotations

import argparse

from authz.cli.common import Parents, Subparsers, config_path, run_async
from authz.runtime.settings import Settings


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("up", parents=[parents.config, parents.overrides],
                       help="run Envoy + services (+ sim)")
    s.set_defaults(func=cmd_up)
    s = sub.add_parser("serve", parents=[parents.config, parents.overrides],
                       help="run the gRPC services and the HTTP side port")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: the other commands need not load grpc and aiohttp.
    from authz.runtime.logs import setup_logging
    from authz.runtime.overrides import Overrides
    from authz.runtime.server import serve_forever
    from authz.runtime.snapshot import Runtime

    setup_logging(args.log_level)
    path, _ = config_path(args, settings)
    runtime = Runtime.from_file(path, Overrides(args.listen, args.upstream), settings)
    run_async(serve_forever(runtime))
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from authz.runtime.supervisor import run_up

    path, is_default = config_path(args, settings)
    return run_up(path, args.listen, args.upstream, create=is_default, settings=settings)
