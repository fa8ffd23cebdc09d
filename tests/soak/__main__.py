"""`python -m tests.soak [--duration S] [--clients N] [--chaos-interval S] [--fuzz N]`:
one soak run (tests/soak/run.py), its report on stdout; then, with `--fuzz N`, the
gateway fuzz (tests/e2e/test_fuzz_gateway.py) with N cases. Exit 1 when anything was
lost, recorded twice, overspent or left held, or the fuzz failed."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.soak.run import Options, run_soak


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=100, help="concurrent clients")
    p.add_argument("--chaos-interval", type=float, default=60.0,
                   help="seconds between chaos events (Redis, a replica, the upstream)")
    p.add_argument("--tpot-ms", type=float, default=5.0,
                   help="the simulator's time per output token")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fuzz", type=int, default=0, metavar="N",
                   help="then fuzz the gateway with N request bodies (0: no fuzz)")
    p.add_argument("--dir", type=Path, default=None,
                   help="where the processes' files and logs go (default: a new temp dir)")
    return p


def _fuzz(cases: int) -> int:
    env = {**os.environ, "TOKENBOOTH_FUZZ_CASES": str(cases)}
    argv = [sys.executable, "-m", "pytest", "tests/e2e/test_fuzz_gateway.py", "-q",
            "-p", "no:cacheprovider"]
    print(f"fuzz: {cases} cases: {' '.join(argv[1:])}", flush=True)
    return subprocess.run(argv, env=env, check=False).returncode


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # unwinds, so that every process started is stopped


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.duration <= 0 or args.clients <= 0 or args.chaos_interval <= 0:
        print("--duration, --clients and --chaos-interval must be positive", file=sys.stderr)
        return 2
    root = args.dir or Path(tempfile.mkdtemp(prefix="tokenbooth-soak-"))
    print(f"soak: files and logs in {root}", flush=True)
    res = run_soak(root, Options(args.duration, args.clients, args.chaos_interval,
                                 args.tpot_ms, args.seed))
    print("\n".join(res.lines), flush=True)
    (root / "report.txt").write_text("\n".join(res.lines) + "\n")
    rc = 1 if res.verdict.failures else 0
    if args.fuzz > 0 and _fuzz(args.fuzz) != 0:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
