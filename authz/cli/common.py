"""What every command module shares: the handler type, the parent parsers for
`--config` and `--listen`/`--upstream`, the config lookup, time parsing and the event
loop runner. Imports no command module."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from authz.runtime.defaults import DEFAULT_CONFIG
from authz.runtime.settings import Settings
from policy.config import Config

# A command: its parsed arguments and the process settings in, an exit status out.
Handler = Callable[[argparse.Namespace, Settings], int]
# What `add_subparsers()` returns (argparse does not export the type).
Subparsers = Any


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line (with a pointer to --help), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Parents:
    """Option groups that several commands share (argparse parent parsers)."""

    config: argparse.ArgumentParser
    overrides: argparse.ArgumentParser

    @classmethod
    def build(cls) -> Parents:
        config = Parser(add_help=False)
        config.add_argument("--config", help="policy file (default: $TOKENBOOTH_CONFIG or "
                            f"{DEFAULT_CONFIG})")
        overrides = Parser(add_help=False)
        overrides.add_argument("--listen", help="HOST:PORT for Envoy's listener")
        overrides.add_argument("--upstream", help="send every model to this backend URL")
        return cls(config, overrides)


def config_path(args: argparse.Namespace, settings: Settings) -> tuple[Path, bool]:
    """The config to use and whether it is the default (which `up` may create)."""
    if args.config:
        return Path(args.config), False
    if settings.config is not None:
        return settings.config, False
    return DEFAULT_CONFIG, True


def load(args: argparse.Namespace, settings: Settings) -> Config:
    """The policy file the command names (or the default one), validated."""
    return settings.load_config(config_path(args, settings)[0])


def parse_time(value: str) -> datetime:
    """An ISO 8601 time (`Z` allowed); a naive one is taken as UTC. ValueError if not."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected an ISO 8601 time, got {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run a server's main coroutine, on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n
