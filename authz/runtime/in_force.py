"""The config a running `serve` acts on, for the CLI commands that share its state
(`keys`, `usage`, `audit`).

The services keep the last good config while the file on disk is refused, and keep the
`state`, `data_dir`, `key_store` and `usage` they started with until they restart. The
CLI read only the file: a refused file stopped every `keys revoke` (a bad ConfigMap push
blocked an emergency revocation), and an edited `state` had `keys create` write a key to
a store the gateway does not read (reload tester). So `serve` writes what it acts on to
`<data_dir>/run/in-force.json` (its pid, its start, the file's path, the file's text at
start and at the last reload in force; mode 0600: the text may hold a Redis password, as
the file does), and a state command run with the same file uses it while that process
lives.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from authz.runtime.settings import Settings
from authz.runtime.snapshot import keep_running, restart_only_changes
from policy.config import Config, ConfigError

RECORD = Path("run") / "in-force.json"
# The settings that say where keys, limits and records are.
STATE_SETTINGS = ("state", "data_dir", "key_store", "usage")


@dataclass(frozen=True)
class InForce:
    """What a running `serve` acts on."""

    pid: int
    config_path: Path
    config: Config


def write(data_dir: Path, config_path: Path, start_text: str, text: str) -> None:
    """Record what this process acts on (atomically: a reader sees the old or the new)."""
    target = data_dir / RECORD
    target.parent.mkdir(parents=True, exist_ok=True)
    body = orjson.dumps({"pid": os.getpid(), "started": _started(os.getpid()),
                         "config_path": str(config_path.absolute()),
                         "start_text": start_text, "text": text})
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    os.replace(tmp, target)


def remove(data_dir: Path) -> None:
    """At a clean stop: this process acts on nothing any more."""
    target = data_dir / RECORD
    with contextlib.suppress(OSError, ValueError):
        if orjson.loads(target.read_bytes()).get("pid") == os.getpid():
            target.unlink()


def running(data_dir: Path, config_path: Path, settings: Settings,
            file_text: str | None = None) -> InForce | None:
    """What the `serve` recorded in `data_dir` acts on, when it runs still and was started
    with the file at `config_path`; None otherwise (none, gone, another file, a record
    that cannot be read or whose config no longer validates, or one that acts on the
    file's own `file_text` as it is: nothing to parse again)."""
    try:
        rec = orjson.loads((data_dir / RECORD).read_bytes())
        pid, started = int(rec["pid"]), rec["started"]
        path = Path(rec["config_path"])
        start_text, text = str(rec["start_text"]), str(rec["text"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if path != config_path.absolute() or pid == os.getpid() or _started(pid) != started \
            or not _alive(pid) or start_text == text == file_text:
        return None
    try:
        at_start = settings.config_from_text(start_text, path)
        last = settings.config_from_text(text, path)
    except ConfigError:
        return None
    cfg = keep_running(at_start, last) if restart_only_changes(at_start, last) else last
    return InForce(pid, path, cfg)


def data_dir_of(config_path: Path) -> Path:
    """Where a config file's `data_dir` is, read leniently (the file may be refused for
    another reason): its value when it has a text one, else the default."""
    data_dir = ".tokenbooth"
    with contextlib.suppress(OSError, ValueError, yaml.YAMLError, RecursionError):
        data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("data_dir"), str):
            data_dir = data["data_dir"]
    return config_path.parent.resolve() / data_dir


def _started(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), so a pid reused by
    another process is not taken for the one that wrote the record; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True
