"""The processes of a soak run: redis-server (AOF, fsync always: a SIGKILL loses no
acknowledged write), the simulator, two `tokenbooth serve` replicas sharing Redis, and
one Envoy with both replicas as endpoints of its services cluster. Each can be SIGKILLed
and started again on the same ports, directories and config."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from authz.envoy_config.binary import envoy_path
from authz.envoy_config.bootstrap import render_yaml
from authz.runtime.procs import http_ok, spawn, stop, wait_until
from policy.config import HOLD_LEASE_SLACK_S, load_config
from policy.keys import fingerprint
from tests.e2e.conftest import _backend_healthy
from tests.e2e.test_money_faults import kill_redis, sigkill
from tests.e2e.test_replicas import _replica_config, _services_healthy
from tests.helpers import free_port, policy_dict
from tests.redis_server import RedisServer

# Every response is bounded by this (non-streaming by the route timeout, streams by
# their total duration), so that a dead replica's holds are swept soon after.
RESPONSE_LIMIT_S = 5.0
LEASE_S = RESPONSE_LIMIT_S + HOLD_LEASE_SLACK_S


@dataclass(frozen=True)
class Key:
    id: str
    secret: str
    weight: int  # share of the clients' requests
    budget: Decimal
    rpm: int | None = None
    org: str = "acme"

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "org": self.org,
                               "sha256": fingerprint(self.secret),
                               "budget_usd": str(self.budget), "budget_period": "total"}
        if self.rpm is not None:
            out["rpm"] = self.rpm
        return out


# A budget on every key, so that each has a ledger the audit compares with its records.
KEYS = (
    Key("k-soak-main", "sk-tb-soak-main-0123456789abcdefghijklmnopqrst", 7,
        Decimal(1_000_000)),
    Key("k-soak-other", "sk-tb-soak-other-0123456789abcdefghijklmnopqrs", 1,
        Decimal(1_000_000), org="beta"),
    # Spent within seconds: its later requests are refused 429 insufficient_quota.
    Key("k-soak-budget", "sk-tb-soak-budget-0123456789abcdefghijklmnopqr", 1, Decimal(5)),
    # 429 rate_limit_exceeded past 60 requests a minute.
    Key("k-soak-rpm", "sk-tb-soak-rpm-0123456789abcdefghijklmnopqrstu", 1,
        Decimal(1_000_000), rpm=60),
)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        suffix = "" if self.starts == 1 else f"-{self.starts}"
        with (self.log_dir / f"{self.name}{suffix}.log").open("wb") as log:
            self.proc = spawn(self.argv, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill(self) -> None:
        """SIGKILL, waited for."""
        assert self.proc is not None
        sigkill(self.proc.pid)
        self.proc.wait(10)


@dataclass
class Cluster:
    root: Path
    base_url: str
    admin: str
    sim_url: str
    configs: list[Path]
    sides: list[str]
    redis: RedisServer
    sim: Proc
    serves: list[Proc]
    envoy: Proc
    procs: list[Proc] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def pids(self) -> dict[str, int | None]:
        """The live process of each role (a restarted one is a new process)."""
        out = {p.name: p.pid for p in [self.envoy, *self.serves, self.sim]}
        proc = self.redis.proc
        out["redis"] = proc.pid if proc is not None and proc.poll() is None else None
        return out

    # -- chaos ----------------------------------------------------------------------

    def kill_redis(self) -> None:
        kill_redis(self.redis)

    def start_redis(self) -> None:
        self.redis.start()

    def kill_replica(self, i: int) -> None:
        self.serves[i].kill()

    def start_replica(self, i: int) -> None:
        self.serves[i].start()
        wait_until(lambda: http_ok(f"{self.sides[i]}/readyz"), f"replica {i} again",
                   timeout=60, alive=self._popens())
        wait_until(lambda: _services_healthy(self.admin) == 2, "Envoy sees both replicas",
                   timeout=60, alive=self._popens())

    def kill_sim(self) -> None:
        self.sim.kill()

    def start_sim(self) -> None:
        self.sim.start()
        wait_until(lambda: http_ok(f"{self.sim_url}/health"), "the simulator again",
                   alive=self._popens())
        wait_until(lambda: _backend_healthy(self.admin), "backend health", timeout=60,
                   alive=self._popens())

    def _popens(self) -> list[subprocess.Popen[bytes]]:
        return [p.proc for p in self.procs if p.proc is not None]

    def stop(self) -> None:
        stop(self._popens())
        self.redis.stop()


def start_cluster(root: Path, tpot_ms: float = 5.0) -> Cluster:
    """Everything started and healthy; `Cluster.stop` ends it (also on failure here)."""
    (root / "redis").mkdir(parents=True)
    (root / "logs").mkdir()
    redis = RedisServer(root / "redis", persist=True)
    redis.start()
    sim_listen = f"127.0.0.1:{free_port()}"
    grpcs = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    https = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    envoy_cfg = {"admin_listen": admin, "services_addresses": grpcs,
                 "route_timeout_s": RESPONSE_LIMIT_S,
                 "max_stream_duration_s": RESPONSE_LIMIT_S}
    base = policy_dict(f"http://{sim_listen}", listen=listen, state=redis.url,
                       envoy=envoy_cfg, keys=[k.entry() for k in KEYS])
    configs = [_replica_config(root / f"r{i}", base, grpcs[i], https[i]) for i in range(2)]
    (root / "envoy.yaml").write_text(render_yaml(load_config(configs[0])))
    py = [sys.executable, "-m", "authz.cli"]
    logs = root / "logs"
    sim = Proc("sim", [*py, "sim", "--listen", sim_listen, "--model", "tiny-llama",
                       "--model", "tiny-llama-2", "--tpot-ms", str(tpot_ms)], logs)
    serves = [Proc(f"serve{i}", [*py, "serve", "--config", str(c)], logs)
              for i, c in enumerate(configs)]
    envoy = Proc("envoy", [str(envoy_path()), "-c", str(root / "envoy.yaml"),
                           "--log-level", "warn", "--use-dynamic-base-id"], logs)
    c = Cluster(root, f"http://{listen}", f"http://{admin}", f"http://{sim_listen}", configs,
                [f"http://{h}" for h in https], redis, sim, serves, envoy,
                [sim, *serves, envoy])
    try:
        for p in c.procs:
            p.start()
        wait_until(lambda: all(http_ok(f"{s}/readyz") for s in c.sides), "both replicas",
                   timeout=60, alive=c._popens())
        wait_until(lambda: _services_healthy(c.admin) == 2 and _backend_healthy(c.admin),
                   "envoy and its clusters", timeout=60, alive=c._popens())
    except BaseException:
        c.stop()
        raise
    return c


def rss_kib(pid: int | None) -> int | None:
    """Resident set size (VmRSS) of a live process, KiB."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None
