"""What `tokenbooth up` adds to a policy file: the config it writes on first run (with a
demo key), and the command line's ports and simulator on top of a config.

The demo key's secret is kept in `demo.key` (mode 0600) next to the config
so that `make run` can print a working key every time; the config holds
only its fingerprint. Nothing else ever stores a secret.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from authz.runtime.overrides import Overrides
from policy.config import Backend, Config, ConfigError, parse_hostport, port_clashes
from policy.keys import fingerprint, new_secret

DEFAULT_CONFIG = Path(".tokenbooth/config.yaml")
DEMO_KEY_FILE = "demo.key"

_TEMPLATE = """\
# Written by `tokenbooth up` on first run. Edit freely: changes to models and
# keys take effect without a restart. The reference is in the README.
listen: 127.0.0.1:8080
state: memory          # or redis://host:port/db
data_dir: data         # usage records (relative to this file)
models:
  demo:                          # the alias clients send as "model"
    upstream_model: {upstream_model}
    # No backend: `tokenbooth up` serves it from its simulator. For a real vLLM:
    #   backends: [{{url: http://127.0.0.1:8000, weight: 1}}]
    backends: []
    price_per_1k_tokens: {{input: 0.50, output: 1.50}}   # USD
    max_tokens: 1024             # cap and default reservation
keys:
  - id: demo
    org: demo-org
    name: demo key written by tokenbooth up
    sha256: "{sha256}"   # only the fingerprint: the secret is in {demo_key_file}
"""


def write_default_config(path: Path, upstream_model: str = "tiny-llama") -> str:
    """Create `path` and its demo key; return the secret (shown once to the user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = new_secret()
    key_path = path.parent / DEMO_KEY_FILE
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    path.write_text(
        _TEMPLATE.format(
            upstream_model=upstream_model,
            sha256=fingerprint(secret),
            demo_key_file=DEMO_KEY_FILE,
        )
    )
    return secret


# What earlier versions wrote for `demo`: a placeholder that `up` always overrode with
# its simulator. `up` now honours backends, so an untouched file gets `backends: []`.
_OLD_BACKENDS = """\
    backends:
      - url: http://127.0.0.1:8000
        weight: 1
"""
_NEW_BACKENDS = """\
    backends: []   # none: `tokenbooth up` serves it from its simulator
"""


def migrate_default_config(path: Path) -> bool:
    """Rewrite the placeholder backend of a default config written by an earlier version
    (as written: a file edited there is left alone); True if it did."""
    try:
        text = path.read_text()
    except OSError:
        return False
    if not text.startswith(_TEMPLATE.splitlines()[0]) or text.count(_OLD_BACKENDS) != 1:
        return False
    path.write_text(text.replace(_OLD_BACKENDS, _NEW_BACKENDS))
    return True


def read_demo_key(config_path: Path) -> str | None:
    """The demo secret next to a config, if `up` wrote one and it still matches a key."""
    try:
        secret = (config_path.parent / DEMO_KEY_FILE).read_text().strip()
    except OSError:
        return None
    return secret or None


@dataclass(frozen=True)
class RunOverrides(Overrides):
    """`Overrides` plus the other three ports and `default_upstream`, the backend of every
    model that has none (`up`'s simulator). Applied again on every reload."""

    grpc_listen: str | None = None
    http_listen: str | None = None
    admin_listen: str | None = None
    default_upstream: str | None = None

    def apply(self, cfg: Config) -> Config:
        cfg = super().apply(cfg)
        update: dict[str, object] = {}
        services = {k: v for k, v in (("grpc_listen", self.grpc_listen),
                                      ("http_listen", self.http_listen)) if v}
        for value in (*services.values(), *filter(None, [self.admin_listen])):
            parse_hostport(value)
        if services:
            update["services"] = cfg.services.model_copy(update=services)
        if self.admin_listen:
            update["envoy"] = cfg.envoy.model_copy(update={"admin_listen": self.admin_listen})
        if self.default_upstream:
            fill = [Backend(url=self.default_upstream)]
            update["models"] = {alias: m if m.backends else m.model_copy(
                update={"backends": fill}) for alias, m in cfg.models.items()}
        cfg = cfg.model_copy(update=update) if update else cfg
        if clashes := port_clashes(cfg):
            raise ConfigError(f"{clashes[0]} (with the ports from flags or the environment)")
        return cfg
