"""`tokenbooth up`: Envoy + tokenbooth services + the simulator (not with `--upstream`).

Models go to the config's backends; the simulator serves the models that have none
(`backends: []`, as in the generated default config, or added by a reload), or every
model with `--sim`; `--upstream` sends every model to one URL. Every child runs in its
own session and dies with the supervisor; Ctrl-C or SIGTERM stops them all, and so does any one of
them exiting; a second Ctrl-C hurries that stop (`stop_children`). Readiness counts
only when the answering process is `up`'s own child (the services' PID on /readyz, a
per-run nonce in Envoy's node metadata), so another instance on the same ports is
reported as a busy port, never as "up".
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from authz.envoy_config.binary import LOG_FORMAT, envoy_path
from authz.envoy_config.bootstrap import render_yaml
from authz.runtime.cells import cell, display_width, printable
from authz.runtime.defaults import (
    RunOverrides,
    migrate_default_config,
    read_demo_key,
    write_default_config,
)
from authz.runtime.procs import (
    PortAllocator,
    bind_problem,
    http_get,
    http_json,
    http_ok,
    spawn,
    wait_until,
)
from authz.runtime.settings import Settings, where_set
from authz.runtime.side_port import PID_HEADER
from authz.runtime.tls_files import (
    backend_ca_problems,
    backend_key_problems,
    tls_problems,
    tls_warnings,
)
from policy.config import OWN_ENV_PREFIX, Config, ConfigError, parse_hostport, price_warnings
from policy.keys import fingerprint

# Envoy's node metadata key for the run's nonce (shown by the admin's /server_info).
RUN_METADATA_KEY = "tokenbooth_up_run"

Procs = list[subprocess.Popen[bytes]]


# After a second Ctrl-C, how long `up` still waits for each child but `serve` (which
# hurries its own stop on the forwarded signal, and is not cut: its records and
# settlements under way finish) before it kills it.
HURRY_KILL_S = 1.0
# How long a child may take to stop after its SIGTERM before it is killed.
STOP_S = 10.0


class _Stop(Exception):
    pass


class _Signals:
    """SIGINT/SIGTERM in `up`: the first stops it (raises _Stop where it runs); one during
    the stop hurries it (`hurried`): see `stop_children`."""

    def __init__(self) -> None:
        self.stopping = False  # the stop has begun: a signal now hurries it
        self.hurried = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise _Stop
        self.hurried = True  # (no print here: a handler may interrupt one)


def stop_children(procs: Procs, services: subprocess.Popen[bytes] | None,
                  signals: _Signals) -> None:
    """Stop `procs`, the last started first: Envoy ends its streams before the services
    stop, and the services record them (a cut stream's prompt counted by its backend)
    while the simulator still answers. All at once, a stream cut by the stop was charged
    its prompt's bound (hundreds of tokens for "Hello!"). Each gets SIGTERM and up to
    STOP_S to exit, then SIGKILL. Once `signals.hurried` (a second Ctrl-C): `services`
    gets a second signal, SIGINT (`serve` then stops waiting for streams, prompt counts
    and meter reports, losing no money: see Services.hurry), before its turn too, and
    every other child is killed after HURRY_KILL_S."""
    told_hurry = False
    for p in reversed(procs):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + STOP_S
        while p.poll() is None and time.monotonic() < deadline:
            if signals.hurried and not told_hurry:
                told_hurry = True
                print("hurrying: the services skip their wait (in-flight requests go to "
                      "the lost-hold sweep); the rest are killed", flush=True)
                if services is not None and services.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        if services is not p and procs.index(services) < procs.index(p):
                            services.terminate()  # not asked to stop yet: the first
                        # The second as SIGINT: two SIGTERMs sent at once can reach it
                        # as one (a pending signal is not queued twice).
                        services.send_signal(signal.SIGINT)
                if p is not services:
                    deadline = min(deadline, time.monotonic() + HURRY_KILL_S)
            time.sleep(0.05)
        if p.poll() is None:
            p.kill()
        p.wait()


def _self(*args: str) -> list[str]:
    return [sys.executable, "-m", "authz.cli", *args]


def child_name(argv: Any) -> str:
    """What a child of `up` is, for a line naming it (README: `up` names the one that
    exited)."""
    args = [str(a) for a in argv] if isinstance(argv, list | tuple) else [str(argv)]
    if args[1:3] == ["-m", "authz.cli"] and len(args) > 3:
        return {"serve": "the services (tokenbooth serve)", "sim": "the simulator",
                "usage": "the usage exporter"}.get(args[3], f"tokenbooth {args[3]}")
    return "Envoy" if args and Path(args[0]).name.startswith("envoy") else "a child process"


def how_it_ended(returncode: int) -> str:
    """`exited with status N`, or `was killed by SIGKILL` for a signal's death."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass(frozen=True)
class UpOptions:
    """What the command line says: the config (and whether `up` may create it), the
    ports and upstream that replace the config's, and `--sim`."""

    config_path: Path
    create: bool = False
    overrides: RunOverrides = field(default_factory=RunOverrides)
    sim: bool = False


def run_up(opts: UpOptions, settings: Settings) -> int:
    """Start the simulator (unless `--upstream`), the services and Envoy; run until a
    signal or until one of them exits. Children inherit this process's environment."""
    fresh_secret = _ensure_config(opts)
    cfg = settings.load_config(opts.config_path)
    bad = (tls_problems(cfg.tls.cert, cfg.tls.key) if cfg.tls is not None else []) + \
        backend_ca_problems(cfg.models)
    if bad:
        # Before anything starts: Envoy refused the pair after the services and the
        # simulator had started, and `up` said only "envoy: a process exited" (TLS tester).
        raise ConfigError([f"{opts.config_path}: {line}" for line in bad])
    # A certificate Envoy serves but clients refuse (expired, say), a model whose tokens
    # cost nothing for want of a price, a backend key Envoy cannot load (its model's
    # requests get 503; not under --sim, whose simulator needs none): said, not refused.
    for line in (tls_warnings(cfg.tls.cert) if cfg.tls is not None else []) + \
            price_warnings(cfg) + \
            ([] if opts.sim else backend_key_problems(cfg.models, settings.backend_keys)):
        print(f"tokenbooth: warning: {opts.config_path}: {line}", file=sys.stderr, flush=True)
    admin_api = bool(cfg.admin.tokens or settings.admin_token)  # served only then
    _check_ports_free(opts.overrides.apply(cfg),
                      _LISTENERS + ((_ADMIN_API,) if admin_api else ()))
    run_dir = cfg.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)

    signals = _Signals()
    signals.install()
    procs: Procs = []
    services: subprocess.Popen[bytes] | None = None
    try:
        overrides, sim_url = _with_sim(cfg, opts, procs)
        eff = overrides.apply(cfg)
        services = _start_services(eff, opts.config_path, overrides, procs)
        _start_envoy(eff, run_dir / "envoy.yaml", procs, envoy_env(settings.backend_keys))
        exporter = _Exporter(eff, opts.config_path, procs)
        if exporter.others_dead():
            raise RuntimeError("a child process exited during start-up")
        _banner(eff, opts.config_path, fresh_secret, sim_url, admin_api)
        while not exporter.others_dead():
            exporter.watch()
            time.sleep(0.2)
        dead = next(p for p in procs if p.returncode is not None and p is not exporter.proc)
        print(f"tokenbooth: error: {child_name(dead.args)} (pid {dead.pid}) "
              f"{how_it_ended(dead.returncode)}; stopping the rest", file=sys.stderr)
        return 1
    except _Stop:
        print("\nstopping… (Ctrl-C again to hurry)", flush=True)
        return 0
    finally:
        signals.stopping = True  # also when a child exited: a signal now hurries
        stop_children(procs, services, signals)


def _ensure_config(opts: UpOptions) -> str | None:
    """Write the default config on first run; its demo secret, when it was written now."""
    if opts.config_path.exists():
        if opts.create and migrate_default_config(opts.config_path):
            print(f"{opts.config_path}: demo now uses the simulator (`backends: []`)",
                  flush=True)
        return None
    if not opts.create:
        raise ConfigError(f"{opts.config_path}: no such config file")  # bad input: exit 2
    secret = write_default_config(opts.config_path)
    print(f"wrote a default config to {opts.config_path}", flush=True)
    return secret


# The four listeners: where each is in the config, and which child binds it.
_LISTENERS = (("listen", "envoy"), ("services.grpc_listen", "services"),
              ("services.http_listen", "services"), ("envoy.admin_listen", "envoy"))
# The services' admin API, checked too where some admin token turns it on (newcomer
# tester: `up` started everything, then said the services exited).
_ADMIN_API = ("admin.listen", "services")


def _hostport(cfg: Config, path: str) -> str:
    section, _, name = path.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, name)
    return str(value)


def _check_ports_free(cfg: Config, listeners: tuple[tuple[str, str], ...]) -> None:
    """OSError naming the first of these listeners' ports that cannot be bound now."""
    for path, _ in listeners:
        hostport = _hostport(cfg, path)
        host, port = parse_hostport(hostport)
        problem = bind_problem(host, port) if port else None
        if problem:
            raise OSError(f"{hostport} ({where_set(path)}) {problem}")


def _busy(cfg: Config, path: str) -> OSError:
    return OSError(f"{_hostport(cfg, path)} ({where_set(path)}) is already in use")



@contextlib.contextmanager
def _starting(cfg: Config, child: str) -> Iterator[None]:
    """Around a child's start: when it exits early, name the port it could not bind."""
    try:
        yield
    except RuntimeError:
        _check_ports_free(cfg, tuple(x for x in _LISTENERS if x[1] == child))
        raise


def _with_sim(cfg: Config, opts: UpOptions, procs: Procs) -> tuple[RunOverrides, str | None]:
    """The overrides with the simulator in them, unless `--upstream` sends every model
    elsewhere; its URL, or None when none was started. It runs also when every model has
    a backend: a model a reload adds with `backends: []` is served by it at once (ops
    tester: started without one, such a model answered 503 until `up` restarted)."""
    if opts.overrides.upstream and not opts.sim:
        return opts.overrides, None
    url = _start_sim(cfg, PortAllocator(), procs, opts.config_path)
    if opts.sim:
        return replace(opts.overrides, upstream=url), url
    return replace(opts.overrides, default_upstream=url), url


def _start_sim(cfg: Config, ports: PortAllocator, procs: Procs, config_path: Path) -> str:
    """The simulator serving every upstream model of the config, and those a reload
    adds to it (`--models-from`); returns its URL."""
    port = ports.free_port()
    url = f"http://127.0.0.1:{port}"
    sim_args = ["sim", "--listen", f"127.0.0.1:{port}", "--models-from", str(config_path)]
    for m in sorted({m.upstream_model for m in cfg.models.values()}):
        sim_args += ["--model", m]
    procs.append(spawn(_self(*sim_args)))
    wait_until(lambda: http_ok(f"{url}/health"), "simulator", alive=procs)
    return url


def _serve_args(config_path: Path, o: RunOverrides) -> list[str]:
    args = ["serve", "--config", str(config_path)]
    for flag, value in (("--listen", o.listen), ("--grpc-listen", o.grpc_listen),
                        ("--http-listen", o.http_listen), ("--admin-listen", o.admin_listen),
                        ("--upstream", o.upstream), ("--default-upstream", o.default_upstream)):
        args += [flag, value] if value else []
    return args


def _start_services(eff: Config, config_path: Path, overrides: RunOverrides,
                    procs: Procs) -> subprocess.Popen[bytes]:
    child = spawn(_self(*_serve_args(config_path, overrides)))
    procs.append(child)
    readyz = f"http://{eff.services.http_listen}/readyz"

    def ready() -> bool:
        answer = http_get(readyz)
        if answer is None:
            return False
        if answer[1].get(PID_HEADER) != str(child.pid):
            raise _busy(eff, "services.http_listen")  # another process answered
        return answer[0] == 200

    with _starting(eff, "services"):
        wait_until(ready, "tokenbooth services", alive=procs)
    return child


EXPORTER_RESTART_S = 30.0  # how long `up` waits to start an exporter that exited again


class _Exporter:
    """`tokenbooth usage export` (Redis stream -> PostgreSQL), only with a usage.sink and
    a Redis state. One that exits does not stop the gateway (it stopped every request
    when a rolled-back exporter met a newer schema): the records wait in the stream, and
    it is started again every EXPORTER_RESTART_S, as Kubernetes restarts a crashing pod,
    with an error line each time it exits."""

    def __init__(self, eff: Config, config_path: Path, procs: Procs) -> None:
        self.args = _self("usage", "export", "--config", str(config_path))
        self.procs = procs
        self.proc: subprocess.Popen[bytes] | None = None
        self.restart_at: float | None = None
        if eff.usage.sink and eff.state_is_redis:
            self._start()

    def _start(self) -> None:
        self.proc = spawn(self.args)
        self.procs.append(self.proc)
        self.restart_at = None

    def others_dead(self) -> bool:
        """Whether a child other than the exporter exited (the exporter is never asked:
        it may exit between a `watch` and this look)."""
        return any(p.poll() is not None for p in self.procs if p is not self.proc)

    def watch(self) -> None:
        """Take an exited exporter out of the children `up` watches; start it again when
        its time came."""
        now = time.monotonic()
        if self.proc is not None and self.proc.poll() is not None:
            self.procs.remove(self.proc)
            print(f"tokenbooth: error: the usage exporter (pid {self.proc.pid}) exited with "
                  f"status {self.proc.returncode}; requests go on, their records wait in the "
                  f"Redis stream; starting it again in {EXPORTER_RESTART_S:.0f} s",
                  file=sys.stderr, flush=True)
            self.proc, self.restart_at = None, now + EXPORTER_RESTART_S
        if self.restart_at is not None and now >= self.restart_at:
            self._start()


def envoy_env(env: Mapping[str, str]) -> dict[str, str]:
    """Envoy's environment: `up`'s, less tokenbooth's own settings (the admin token, the
    webhook secret): Envoy reads only the backends' keys (`api_key_env`) from it."""
    return {k: v for k, v in env.items() if not k.upper().startswith(OWN_ENV_PREFIX)}


def _start_envoy(eff: Config, envoy_yaml: Path, procs: Procs,
                 env: Mapping[str, str] | None = None) -> None:
    """Envoy of `eff`'s bootstrap, with `env` (None: this process's environment)."""
    envoy_yaml.write_text(render_yaml(eff))
    nonce = secrets.token_hex(8)
    node = json.dumps({"node": {"metadata": {RUN_METADATA_KEY: nonce}}})
    procs.append(
        spawn([str(envoy_path()), "-c", str(envoy_yaml), "--config-yaml", node,
               "--log-level", "warn", "--log-format", LOG_FORMAT, "--use-dynamic-base-id"],
              env=env)
    )
    admin = f"http://{eff.envoy.admin_listen}"

    def ready() -> bool:
        if not http_ok(f"{admin}/ready"):
            return False
        info = http_json(f"{admin}/server_info") or {}
        if info.get("node", {}).get("metadata", {}).get(RUN_METADATA_KEY) != nonce:
            raise _busy(eff, "envoy.admin_listen")  # another Envoy answered
        return True

    with _starting(eff, "envoy"):
        wait_until(ready, "envoy", timeout=60, alive=procs)


# The widest the banner's alias column grows.
ALIAS_COLUMNS = 40


def _backend_lines(cfg: Config, sim_url: str | None) -> list[str]:
    """One line per alias: where its requests go. The alias column is as wide as the
    widest alias up to `ALIAS_COLUMNS` (a longer one is cut, ending in "…"), so that one
    long alias does not push every row off the screen."""
    width = min(max(display_width(printable(a)) for a in cfg.models), ALIAS_COLUMNS)
    lines = []
    for alias, m in sorted(cfg.models.items()):
        urls = [b.url + (f" (weight {b.weight})" if len(m.backends) > 1 else "")
                for b in m.backends]
        where = ", ".join(urls)
        if sim_url is not None and [b.url for b in m.backends] == [sim_url]:
            where = f"simulator at {sim_url}"
        lines.append(f"    {cell(alias, width)} -> {where}  (model {m.upstream_model})")
    return lines


def _banner(cfg: Config, config_path: Path, secret: str | None, sim_url: str | None,
            admin_api: bool = False) -> None:
    scheme = "https" if cfg.tls else "http"
    base = f"{scheme}://{cfg.listen}"
    secret = secret or read_demo_key(config_path)
    known = {k.sha256 for k in cfg.keys if k.status == "active"}
    alias = sorted(cfg.models)[0]
    print(f"\ntokenbooth is up on {base}", flush=True)
    print("  models (alias -> backend):")
    print("\n".join(_backend_lines(cfg, sim_url)))
    if sim_url is not None and all([b.url for b in m.backends] != [sim_url]
                                   for m in cfg.models.values()):
        print(f"  simulator at {sim_url}: for models a reload adds with `backends: []`")
    if secret and fingerprint(secret) in known:
        print(f"  demo API key: {secret}")
        print("  try:")
        print(
            f"    curl -s {base}/v1/chat/completions -H 'Authorization: Bearer {secret}' "
            "-H 'Content-Type: application/json' "
            f"-d '{{\"model\":\"{alias}\",\"max_tokens\":32,\"messages\":[{{\"role\":"
            "\"user\",\"content\":\"Hello!\"}]}'"
        )
    else:
        # (The config may still list the demo key: only its secret, in demo.key, is gone.)
        print(f"  (no demo key to show: create one with `tokenbooth keys create --org ORG "
              f"--config {config_path}`)")
    print(f"  config: {config_path}   metrics: http://{cfg.services.http_listen}/metrics")
    if admin_api:
        print(f"  admin API: http://{cfg.admin.listen}/v1/keys (its token: "
              "$TOKENBOOTH_ADMIN_TOKEN or admin.tokens)")
    print("  Ctrl-C stops everything.", flush=True)
