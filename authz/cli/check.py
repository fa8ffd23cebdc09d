"""`tokenbooth check-config FILE`: validate a policy file and list every problem; then
what this machine must provide for `up` or `serve` to start with it (its files)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from authz.cli.common import Parents, Subparsers
from authz.runtime.settings import Settings
from authz.runtime.tls_files import (
    backend_ca_problems,
    backend_key_problems,
    tls_problems,
    tls_warnings,
)
from policy.config import Config, ConfigError, price_warnings
from policy.keyrecord import reads_as_secret, redact_secrets


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("check-config", parents=[parents.config], help="validate a config file")
    s.add_argument("file")
    s.add_argument("--here", action="store_true",
                   help="also fail when this machine could not start the gateway with it "
                        "(TLS files unreadable or not a pair, data_dir not writable); "
                        "without it those are warnings")
    s.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 0 and one `ok` line; else exit 2 and one line per problem on stderr. What this
    machine lacks to start it is a warning line each (errors with `--here`): a config is
    often checked where it is written, not where it runs (a Secret mounted in a pod)."""
    try:
        cfg = settings.load_config(Path(args.file))
    except ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    missing = machine_problems(cfg, args.file, settings.backend_keys)
    if missing and args.here:
        print("\n".join(missing), file=sys.stderr)
        return 2
    for line in missing:
        print(f"warning: {line} (on this machine: fine if the gateway runs elsewhere)",
              file=sys.stderr)
    # Envoy serves such a certificate, and a model may be free: warnings, never errors.
    for line in (tls_warnings(cfg.tls.cert) if cfg.tls is not None else []) + \
            price_warnings(cfg) + secret_name_warnings(cfg):
        print(f"warning: {args.file}: {line}", file=sys.stderr)
    print(f"{args.file}: ok ({len(cfg.models)} model(s), {len(cfg.keys)} key(s))")
    return 0


def secret_name_warnings(cfg: Config) -> list[str]:
    """Names and ids in the config that read as a key's secret (one pasted there by
    mistake: listed in clear by every command). Said, not refused: a config written
    before the rule keeps loading. The secret is shown by its prefix only."""
    out = []
    for org in cfg.orgs:
        if reads_as_secret(org):
            out.append(f"orgs: {redact_secrets(org)!r} reads as a key's secret, not a name")
    for i, key in enumerate(cfg.keys):
        for field, value in (("id", key.id), ("org", key.org), ("name", key.name)):
            if reads_as_secret(value):
                out.append(f"keys[{i}].{field}: {redact_secrets(value)!r} reads as a key's "
                           "secret, not a name")
    return out


def machine_problems(cfg: Config, source: str, env: Mapping[str, str]) -> list[str]:
    """What would stop `up` (Envoy and the services) from starting or serving here with
    `cfg`: the TLS files (Envoy refuses to start without them, or with a key that is not
    the certificate's), backends' CA files and API keys (from `env`), and the data
    directory (state, records, spools, run files)."""
    out = []
    if cfg.tls is not None:
        out += [f"{source}: {line}" for line in tls_problems(cfg.tls.cert, cfg.tls.key)]
    out += [f"{source}: {line}" for line in backend_ca_problems(cfg.models)
            + backend_key_problems(cfg.models, env)]
    why = _not_writable_dir(cfg.data_dir)
    if why:
        out.append(f"{source}: data_dir: {cfg.data_dir}: {why}")
    return out


def _not_writable_dir(path: Path) -> str | None:
    """Why the services could not create or write `path` (None: they can). Tried, not
    asked of the mode bits (root passes every access check, and /proc refuses root): a
    directory made and removed in `path` or, while it does not exist, in its nearest
    existing parent."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tokenbooth-check-", dir=probe))
    except OSError as e:
        why = str(e.strerror or e).lower()
        return why if probe == path else f"cannot be created in {probe}: {why}"
    return None
