"""The `tokenbooth` command. Bad input gives one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from authz.cli import audit, check, envoy, keys, serve, sim, usage
from authz.cli.common import Handler, Parents, Parser, add_config_option
from authz.runtime.cells import printable
from authz.runtime.settings import Settings
from authz.state.keys.base import KeyExists, ReadOnlyStore, StoreUnavailable
from policy.config import ConfigError

# Errors whose message is meant for users: printed as one line.
_USER_ERRORS = (ConfigError, ValueError, LookupError, OSError, RuntimeError, TimeoutError,
                ReadOnlyStore, KeyExists, StoreUnavailable)


def version() -> str:
    """The installed package's version."""
    try:
        return importlib.metadata.version("tokenbooth")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="tokenbooth", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_config_option(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = Parents.build()
    # One module per command group, in the order `--help` lists them.
    for group in (serve, sim, envoy, check, keys, usage, audit):
        group.add_parsers(sub, parents)
    return p


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one command. `env` (default: the process environment) is read here, once."""
    settings = Settings.from_env(os.environ if env is None else env)
    args = parser().parse_args(argv)
    func: Handler = args.func
    try:
        rc = func(args, settings)
        sys.stdout.flush()  # here, not at exit: a reader that left is one more case below
        return rc
    except BrokenPipeError:
        # The reader left (`tokenbooth usage | head`): stop quietly, as `ls | head` does,
        # with the status a SIGPIPE gives; nothing more is written to the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except _USER_ERRORS as e:
        print(f"tokenbooth: error: {_one_line(e)}", file=sys.stderr)
        code = getattr(e, "exit_code", None)  # (the admin API's client says which)
        if isinstance(code, int):
            return code
        return 2 if isinstance(e, ConfigError | ValueError) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the last line of defence: one line, not a traceback
        if settings.debug:
            raise
        print(f"tokenbooth: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    """A validation error as one line (pydantic's own text is a multi-line dump)."""
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: "
            f"{str(err['msg']).removeprefix('Value error, ')}" for err in e.errors())
    if type(e) is KeyError:  # a record or an answer without a field: its name alone said
        # nothing ("'status'": admin retest)
        return (f"a record or answer without its {printable(str(e))} field (damaged, "
                "or not tokenbooth's)")
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
