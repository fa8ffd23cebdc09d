"""The config `tokenbooth up` writes on first run, with a demo key.

The demo key's secret is kept in `demo.key` (mode 0600) next to the config
so that `make run` can print a working key every time; the config holds
only its fingerprint. Nothing else ever stores a secret.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    backends:
      - url: http://127.0.0.1:8000
        weight: 1
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


def read_demo_key(config_path: Path) -> str | None:
    """The demo secret next to a config, if `up` wrote one and it still matches a key."""
    try:
        secret = (config_path.parent / DEMO_KEY_FILE).read_text().strip()
    except OSError:
        return None
    return secret or None
