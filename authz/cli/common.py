"""What every command module shares: the handler type, the parent parsers for
`--config`, `--listen`/`--upstream` and the other ports, the config lookup, time parsing
and the event loop runner. Imports no command module."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import sys
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from authz.runtime.defaults import DEFAULT_CONFIG, RunOverrides
from authz.runtime.settings import PORT_ENV, Settings
from policy.config import Backend, Config, ConfigError, parse_hostport, read_config_text

# A command: its parsed arguments and the process settings in, an exit status out.
Handler = Callable[[argparse.Namespace, Settings], int]
# What `add_subparsers()` returns (argparse does not export the type).
Subparsers = Any
# `--since` as an age: a number and a unit.
_AGE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class Parser(argparse.ArgumentParser):
    """Usage mistakes are one line (with a pointer to --help), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Parents:
    """Option groups that several commands share (argparse parent parsers)."""

    config: argparse.ArgumentParser
    overrides: argparse.ArgumentParser
    ports: argparse.ArgumentParser

    @classmethod
    def build(cls) -> Parents:
        config = Parser(add_help=False)
        add_config_option(config, default=argparse.SUPPRESS)
        overrides = Parser(add_help=False)
        overrides.add_argument("--listen", type=hostport, metavar="HOST:PORT",
                               help="Envoy's listener, replacing the config's (`up` and "
                                    "`serve`: else $TOKENBOOTH_LISTEN)")
        overrides.add_argument("--upstream", type=backend_url, metavar="URL",
                               help="send every model to this backend URL")
        ports = Parser(add_help=False)
        for flag, what in (("grpc", "the services' gRPC port"),
                           ("http", "the services' HTTP side port"),
                           ("admin", "Envoy's admin port")):
            ports.add_argument(f"--{flag}-listen", type=hostport, metavar="HOST:PORT",
                               help=f"{what} (default: $TOKENBOOTH_{flag.upper()}_LISTEN or "
                                    "the config's)")
        return cls(config, overrides, ports)


def add_config_option(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """`--config`, taken before or after the command (`tokenbooth --config F up`, `tokenbooth
    up --config F`): the top-level parser sets the default (None), and a command's own
    `--config` is SUPPRESSed when absent so that its parse does not reset the top-level one."""
    parser.add_argument("--config", default=default, metavar="F",
                        help=f"policy file (default: $TOKENBOOTH_CONFIG or {DEFAULT_CONFIG})")


def run_overrides(args: argparse.Namespace, settings: Settings) -> RunOverrides:
    """The ports and upstreams that replace the config's: a flag, else the environment."""
    ports = {name: getattr(args, name) or _env_port(settings, name)
             for name in ("listen", "grpc_listen", "http_listen", "admin_listen")}
    return RunOverrides(upstream=args.upstream,
                        default_upstream=getattr(args, "default_upstream", None), **ports)


def _env_port(settings: Settings, name: str) -> str | None:
    value: str | None = getattr(settings, name)
    if value is not None:
        try:
            parse_hostport(value)
        except ValueError as e:
            raise ValueError(f"${PORT_ENV[name]}: {e}") from None
    return value


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


def load_for_state(args: argparse.Namespace, settings: Settings) -> Config:
    """`load`, for the commands that act on the running services' state (`keys`, `usage`,
    `audit`): while a `serve` started with this file runs, what it acts on — its last
    good config when the file is refused, the `state`, `data_dir`, `key_store` and
    `usage` it started with when the file changed them (they apply at its restart);
    each said in a warning. Otherwise the file, as `load`."""
    from authz.runtime import in_force
    from authz.runtime.snapshot import restart_only_changes

    path = config_path(args, settings)[0]
    text = None
    try:
        text = read_config_text(path)
        cfg = settings.config_from_text(text, path)
    except ConfigError as err:
        serving = in_force.running(in_force.data_dir_of(path), path, settings)
        if serving is None:
            raise
        first = str(err).splitlines()[0]
        _warn(f"{first}; the services running with it (pid {serving.pid}) keep their last "
              "good config: this command uses it too")
        return serving.config
    serving = in_force.running(cfg.data_dir, path, settings, text)
    if serving is None:
        return cfg
    later = [n for n in restart_only_changes(serving.config, cfg) if n in in_force.STATE_SETTINGS]
    if not later:
        return cfg
    _warn(f"{path}: {', '.join(later)} changed since the services running with it (pid "
          f"{serving.pid}) started, and apply when they restart: this command uses theirs")
    return serving.config


def _warn(line: str) -> None:
    print(f"tokenbooth: warning: {line}", file=sys.stderr, flush=True)


def parse_time(value: str) -> datetime:
    """An ISO 8601 time (`Z` or `z` allowed); a naive one is taken as UTC. ValueError if
    not, or if it is no time in UTC (years 1 to 9999: `0001-01-01T00:00+01:00` is not)."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected an ISO 8601 time, got {value!r}") from None
    t = t if t.tzinfo else t.replace(tzinfo=UTC)
    try:
        t.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value!r} is out of range (years 1 to 9999 in UTC)") from None
    return t


def parse_since(value: str, now: datetime) -> datetime:
    """`--since`: an ISO 8601 time, or an age before `now` (`30s`, `90m`, `12h`, `7d`,
    `2w`). ValueError, naming the option, if neither."""
    m = _AGE.match(value.strip())
    if m:
        try:
            return now - timedelta(seconds=int(m[1]) * _UNITS[m[2]])
        except OverflowError:
            raise ValueError(f"--since: {value!r} reaches back past the year 1") from None
    try:
        return parse_time(value)
    except ValueError as e:
        if "out of range" in str(e):
            raise ValueError(f"--since: {e}") from None
        raise ValueError(f"--since: expected an ISO 8601 time or an age such as 7d, "
                         f"got {value!r}") from None


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    """Run a server's main coroutine, on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def hostport(text: str) -> str:
    """An argparse type: HOST:PORT."""
    try:
        parse_hostport(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def backend_url(text: str) -> str:
    """An argparse type: a backend's http(s)://host[:port]."""
    try:
        return Backend(url=text).url
    except ValidationError as e:
        msg = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
        raise argparse.ArgumentTypeError(msg) from None


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1, in ASCII digits (Python's int() also
    takes `1_000`, `+5` and other scripts' digits, which no config or API here does)."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    n = int(stripped)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, at least 0."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return v


def admin_url_parser() -> argparse.ArgumentParser:
    """`--admin-url URL`: act on a remote gateway through its admin API (the token from
    TOKENBOOTH_ADMIN_TOKEN)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--admin-url", metavar="URL",
                   help="a gateway's admin API (token: $TOKENBOOTH_ADMIN_TOKEN)")
    return p


@contextlib.contextmanager
def naming_data_dir(data_dir: Path) -> Iterator[None]:
    """An OSError on a file in `data_dir` (read-only, full, not ours) says which setting
    it is: a bare `[Errno 30] Read-only file system: '…/usage.jsonl'` named none."""
    try:
        yield
    except OSError as e:
        name, why = e.filename, e.strerror
        if not isinstance(name, str) or why is None:
            raise
        try:
            Path(name).resolve().relative_to(data_dir.resolve())
        except ValueError:
            raise e from None
        raise OSError(f"data_dir {data_dir}: {name}: {why.lower()}") from None
