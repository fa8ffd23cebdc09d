"""Finding what grows in a running `serve`: TOKENBOOTH_TRACEMALLOC=1 (Settings.tracemalloc)
starts tracemalloc, and each SIGUSR1 appends to `<data_dir>/tracemalloc.txt` the RSS, the
live objects by type, and the allocation sites that grew most since the previous SIGUSR1
(the first: since start).

Costs memory and CPU while on (tracemalloc records every allocation): a debugging aid,
off unless asked for.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import tracemalloc
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("tokenbooth.memdebug")

FILE = "tracemalloc.txt"
_FRAMES = 8
_TOP = 25


def rss_bytes() -> int:
    """This process's resident set size (Linux: /proc/self/statm; 0 elsewhere)."""
    try:
        resident = Path("/proc/self/statm").read_text().split()[1]
    except (OSError, IndexError):
        return 0
    return int(resident) * os.sysconf("SC_PAGE_SIZE")


def object_counts(top: int = _TOP) -> list[tuple[str, int]]:
    """The most numerous live objects that the garbage collector tracks, by type."""
    counts = Counter(type(o).__qualname__ for o in gc.get_objects())
    return counts.most_common(top)


class MemoryDebug:
    """Snapshots on demand, each compared with the one before."""

    def __init__(self, out: Path) -> None:
        self._out = out
        tracemalloc.start(_FRAMES)
        self._last = tracemalloc.take_snapshot()

    def dump(self) -> None:
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__),))
        grown = snap.compare_to(self._last, "traceback")[:_TOP]
        self._last = snap
        lines = [f"== {datetime.now(UTC).isoformat()} rss={rss_bytes()} "
                 f"traced={tracemalloc.get_traced_memory()[0]}",
                 "-- live objects by type"]
        lines += [f"{n:>10} {name}" for name, n in object_counts()]
        lines.append("-- allocation sites, growth since the previous dump")
        for stat in grown:
            lines.append(f"{stat.size_diff:>+10} B {stat.count_diff:>+8} blocks")
            lines += [f"    {f.filename}:{f.lineno}" for f in stat.traceback]
        with self._out.open("a") as f:
            f.write("\n".join(lines) + "\n")
        log.info("tracemalloc snapshot written", extra={"path": str(self._out)})


def install(on: bool, data_dir: Path) -> MemoryDebug | None:
    """When `on`, trace allocations and dump on SIGUSR1."""
    if not on:
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    debug = MemoryDebug(data_dir / FILE)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, debug.dump)
    log.info("tracemalloc on: SIGUSR1 writes a snapshot", extra={"path": str(data_dir / FILE)})
    return debug
