"""CPU seconds of process trees, from /proc/<pid>/stat (utime + stime of every live process
in the tree, all threads included). Sample before and after a window; subtract."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return raw[raw.rfind(")") + 2:].split()


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def tree(root: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) … utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / _TICK


def sample(groups: Mapping[str, Iterable[int]]) -> dict[str, float]:
    """CPU seconds so far of each named group of process trees."""
    kids = _children()
    return {name: sum(cpu_seconds(p) for root in roots for p in tree(root, kids))
            for name, roots in groups.items()}


def _task_ns(pid: int) -> int:
    """Nanoseconds on CPU of every live thread of `pid` (/proc/<pid>/task/*/schedstat)."""
    total = 0
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def sample_ns(groups: Mapping[str, Iterable[int]]) -> dict[str, float]:
    """As `sample`, from the scheduler's nanosecond counters rather than clock ticks (10 ms
    each): for windows that use only tens of milliseconds of CPU. Threads that exit
    between two samples are not counted (long-lived servers: none here)."""
    kids = _children()
    return {name: sum(_task_ns(p) for root in roots for p in tree(root, kids)) / 1e9
            for name, roots in groups.items()}
