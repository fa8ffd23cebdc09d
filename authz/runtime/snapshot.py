"""One generation of policy: the config plus the indexes derived from it.

Servicers read `Runtime.snapshot` once per request; a reload swaps in a new
snapshot atomically, so a request never sees half of two configs.
"""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from authz.runtime.defaults import RunOverrides
from authz.runtime.overrides import Overrides
from authz.runtime.settings import Settings
from policy.config import Config, ConfigError, read_config_text
from policy.keyrecord import KeyRecord
from policy.keys import index_keys
from policy.routing import Router

log = logging.getLogger("tokenbooth.config")
# A read of the config file: the config and the text it was read from, or why not.
Read = tuple[Config, str] | ConfigError

# The longest a file that keeps changing waits to be read (each change restarts the
# settle wait): a change, a revocation, is live within about 2 s however often the file
# is rewritten.
MAX_SETTLE_S = 1.0


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Snapshot:
    config: Config
    keys_by_fingerprint: dict[str, KeyRecord]
    router: Router
    aliases: tuple[str, ...]
    config_key_ids: frozenset[str] = frozenset()

    @classmethod
    def build(cls, cfg: Config) -> Snapshot:
        return cls(
            config=cfg,
            keys_by_fingerprint=index_keys(cfg.keys),
            router=Router(cfg),
            aliases=tuple(sorted(cfg.models)),
            config_key_ids=frozenset(k.id for k in cfg.keys),
        )


@dataclass
class Runtime:
    """What the servicers share: the current snapshot, the clock, the process settings."""

    snapshot: Snapshot
    config_path: Path | None = None
    clock: Callable[[], datetime] = utc_now
    monotonic: Callable[[], float] = time.monotonic  # how long a file keeps changing
    overrides: Overrides = field(default_factory=Overrides)
    settings: Settings = field(default_factory=Settings)
    _stamp: tuple[int, ...] = ()
    unsettled: bool = False  # the file changed moments ago: check again soon
    _unsettled_since: float | None = None  # monotonic: since when it keeps changing
    # Told the outcome of each reload of a changed file (True: in force; False: refused).
    on_reload: Callable[[bool], None] = lambda ok: None
    # The file's text as it was at start (its restart-only settings are in force) and as
    # it was at the last reload in force: what the CLI's state commands act on while
    # this process runs (`authz/runtime/in_force.py`).
    start_text: str = ""
    text: str = ""

    @classmethod
    def from_file(cls, path: Path, overrides: Overrides | None = None,
                  settings: Settings | None = None) -> Runtime:
        overrides = overrides or Overrides()
        settings = settings or Settings()
        text = read_config_text(path)
        cfg = overrides.apply(settings.config_from_text(text, path))
        rt = cls(Snapshot.build(cfg), config_path=path, overrides=overrides, settings=settings,
                 start_text=text, text=text)
        rt._stamp = _stamp(path)
        return rt

    def reload_if_changed(self, settle_s: float = 0.0) -> bool:
        """Re-read the config file when it changed; keep the last good one on error.
        `Services` does the same in steps, reading the file in a worker thread."""
        stamp = self.changed(settle_s)
        return stamp is not None and self.finish_reload(stamp, self.read_config())

    def changed(self, settle_s: float = 0.0) -> tuple[int, ...] | None:
        """The file's stamp when it changed and may be read now, else None.
        `settle_s`: a file modified less than this long ago may still be being written
        (an editor or `cat >` writing in place: its first half parses as a config with
        fewer keys or models) and waits (`unsettled`); one moved into place whole (a
        rename, Kubernetes' ConfigMap swap) keeps its older time and loads at once."""
        self.unsettled = False
        if self.config_path is None:
            return None
        stamp = _stamp(self.config_path)
        if stamp == self._stamp:
            return None
        if stamp and settle_s > 0:
            age_s = self.clock().timestamp() - stamp[0] / 1e9
            # A time ahead of this clock (another host's clock) cannot be waited out.
            if -1.0 < age_s < settle_s:
                mono = self.monotonic()
                if self._unsettled_since is None:
                    self._unsettled_since = mono
                if mono - self._unsettled_since < MAX_SETTLE_S:
                    self.unsettled = True
                    return None
                # Rewritten over and over (a tool writing it every few tenths of a
                # second): read now, or no change, a revocation, loads until the writes
                # stop (t1 tester). A read the next write overlaps is read again.
        self._unsettled_since = None
        return stamp

    def read_config(self) -> Read:
        """The file as a config and its text, or why not. Touches no state of this
        runtime, so it may run in a worker thread (a large file takes a second to parse; a
        file on a stalled mount, or a named pipe, blocks until it answers)."""
        assert self.config_path is not None
        try:
            text = read_config_text(self.config_path)
            return self.overrides.apply(self.settings.config_from_text(
                text, self.config_path)), text
        except ConfigError as e:
            return e

    def read_after(self) -> tuple[Read, tuple[int, ...], bool]:
        """`read_config`, then the file's stamp and whether it is a regular file: all
        that touches the file system, for a worker thread (a stat on a stalled network
        mount blocks as a read does)."""
        assert self.config_path is not None
        read = self.read_config()
        return read, _stamp(self.config_path), _regular(self.config_path)

    def finish_reload(self, stamp: tuple[int, ...], read: Read,
                      after: tuple[tuple[int, ...], bool] | None = None) -> bool:
        """Swap in what `read_config` read of the file `changed` saw as `stamp`; or refuse
        it, once, keeping the last good config. A regular file that moved on while it was
        read (an editor began rewriting it in place just after the look) may have been
        read half-written: it is read again once it stands still. `after`: the file's
        stamp and regularity looked at after the read (`read_after`), else looked at now."""
        assert self.config_path is not None
        now, regular = after or (_stamp(self.config_path), _regular(self.config_path))
        if now != stamp:
            if regular:
                self.unsettled = True
                return False
            stamp = now  # a named pipe's times move as it is written: what was read is this
        self._stamp = stamp
        if isinstance(read, ConfigError):
            log.error("config reload refused, keeping the last good config: %s", read)
            self.on_reload(False)
            return False
        (cfg, text), old = read, self.snapshot.config
        if later := restart_only_changes(old, cfg):
            cfg = keep_running(old, cfg)
        self.snapshot = Snapshot.build(cfg)
        self.text = text
        log.info("config reloaded from %s", self.config_path)
        if filled := _newly_defaulted(old, cfg, self.overrides):
            # A typo'd `backends: []` under `up` is served (and billed) by its simulator:
            # said, not silent (review).
            log.warning("config reloaded: these models have no backend of their own and "
                        "go to the default upstream (`up`'s simulator): %s", ", ".join(filled))
        if unserved := sorted(a for a, m in cfg.models.items() if not m.backends):
            # (`up` fills them with its simulator: these are `serve`'s without one)
            log.warning("config reloaded, but these models have no backend and this "
                        "process no --default-upstream: they answer 503 until one is "
                        "given: %s", ", ".join(unserved))
        if later:
            log.warning("config reloaded, but these changes take effect only when the "
                        "process (or Envoy) restarts: %s", ", ".join(later))
        self.on_reload(True)
        return True


def _newly_defaulted(old: Config, new: Config, overrides: Overrides) -> list[str]:
    """The models a reload sends to the default upstream that did not go there before."""
    default = overrides.default_upstream if isinstance(overrides, RunOverrides) else None
    if not default:
        return []

    def defaulted(cfg: Config, alias: str) -> bool:
        m = cfg.models.get(alias)
        return m is not None and [b.url for b in m.backends] == [default]

    return sorted(a for a in new.models if defaulted(new, a) and not defaulted(old, a))


# Settings read at start only, by Envoy (its bootstrap) or by the services.
RESTART_ONLY = ("listen", "tls", "envoy", "max_request_body_bytes", "services", "state",
                "data_dir", "key_store", "usage")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The settings a reload changed that only a restart applies (README, "Live
    configuration")."""
    out = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    if old.admin.listen != new.admin.listen:
        out.append("admin.listen")
    return out


def keep_running(old: Config, new: Config) -> Config:
    """`new` with the restart-only settings `old` runs with. Until a restart, the services
    must act on what Envoy and they themselves run with, not on the file: Envoy's timeouts
    bound a hold's lease (a lease shorter than a stream Envoy still lets run had the sweep
    charge it as lost mid-stream and free its concurrency slot), `on_metering_loss` says
    what a stream cut by a stop costs, and `state` / `data_dir` are where records go."""
    update: dict[str, object] = {name: getattr(old, name) for name in RESTART_ONLY}
    update["admin"] = new.admin.model_copy(update={"listen": old.admin.listen})
    # Envoy may be restarted first (the ingress pattern rolls it apart from the services):
    # a lease must outlast the responses of either config, so the longer limits count.
    update["envoy"] = old.envoy.model_copy(update={
        "route_timeout_s": max(old.envoy.route_timeout_s, new.envoy.route_timeout_s),
        "max_stream_duration_s": max(old.envoy.max_stream_duration_s,
                                     new.envoy.max_stream_duration_s)})
    return new.model_copy(update=update)


def _stamp(path: Path) -> tuple[int, ...]:
    """What tells a changed file: its time in ns, size, inode and ctime (a file written
    twice within the mtime's tick, or replaced by one with the same mtime, still moves
    the size, the inode or the ctime)."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


def _regular(path: Path) -> bool:
    """A regular file (not a named pipe, whose times move as it is written to)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False
