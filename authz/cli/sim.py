"""`tokenbooth sim`: the vLLM-compatible upstream simulator."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from authz.cli.common import Parents, Subparsers, positive_int, run_async
from authz.runtime.procs import bind_problem
from authz.runtime.settings import Settings
from policy.config import ConfigError, load_config, parse_hostport


def add_parsers(sub: Subparsers, parents: Parents) -> None:
    s = sub.add_parser("sim", parents=[parents.config],
                       help="the vLLM-compatible upstream simulator")
    s.add_argument("--listen", default="127.0.0.1:8000")
    s.add_argument("--model", action="append", help="model name to serve (repeatable)")
    s.add_argument("--ttft-ms", type=float, default=0.0)
    s.add_argument("--tpot-ms", type=float, default=0.0)
    s.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context length: a chat request without max_tokens may generate up "
                        "to this less its prompt, as vLLM does (default 32768)")
    s.add_argument("--default-max-tokens", type=positive_int, default=None,
                   help="generate at most this many tokens when a request names no limit")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 paths (401 without "
                        "it), as vLLM's --api-key does")
    s.add_argument("--models-from", metavar="CONFIG", default=None,
                   help="also serve every upstream model this tokenbooth config names, "
                        "read again when a request names a model not served (`up` runs "
                        "its simulator so: a model a reload adds is served)")
    s.set_defaults(func=cmd_sim)


class ConfigModels:
    """The upstream model names of a tokenbooth config, read again only when the file
    changed (a client naming unknown models must not make each request parse it). A
    config that cannot be read (caught mid-edit, say) adds nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[float, int] | None = None

    def __call__(self) -> list[str]:
        try:
            st = self.path.stat()
        except OSError:
            return []
        if self._seen == (st.st_mtime, st.st_size):
            return []
        self._seen = (st.st_mtime, st.st_size)  # a broken one too: read again once changed
        try:
            cfg = load_config(self.path)
        except (ConfigError, OSError, ValueError):
            return []
        return sorted({m.upstream_model for m in cfg.models.values()})


def cmd_sim(args: argparse.Namespace, settings: Settings) -> int:
    from authz.sim import run_sim
    from authz.sim.app import DEFAULT_MAX_MODEL_LEN

    host, port = parse_hostport(args.listen)
    problem = bind_problem(host, port) if port else None
    if problem:  # in the words `serve` and `up` use (retest: Errno 98 and a tuple)
        raise OSError(f"{args.listen} (--listen) {problem}")
    models = args.model or ["tiny-llama"]
    with contextlib.suppress(KeyboardInterrupt):
        run_async(run_sim(host, port, models, args.ttft_ms, args.tpot_ms,
                          max_model_len=args.max_model_len or DEFAULT_MAX_MODEL_LEN,
                          default_max_tokens=args.default_max_tokens,
                          api_key=args.api_key or None,
                          models_from=ConfigModels(Path(args.models_from))
                          if args.models_from else None))
    return 0
