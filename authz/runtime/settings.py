"""Process settings: what the environment says, read once by the CLI and passed down.

Only `authz.cli` calls `Settings.from_env(os.environ)`; everything below takes a
`Settings` (or one of its values) as an argument, so no module reads the environment
itself and a test can state every setting. The policy itself (models, keys, limits)
is in the YAML file, not here.

The OpenTelemetry SDK reads its own further `OTEL_*` variables (headers, TLS, resource
attributes) when the exporter is built; tokenbooth reads only the two below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from policy.config import REDIS_PASSWORD_ENV, Config, config_from_text, read_config_text

CONFIG_ENV = "TOKENBOOTH_CONFIG"
DEBUG_ENV = "TOKENBOOTH_DEBUG"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_NAME_ENV = "OTEL_SERVICE_NAME"
# The key that signs budget alert webhooks (HMAC-SHA256); see policy.config.AlertSettings.
WEBHOOK_SECRET_ENV = "TOKENBOOTH_WEBHOOK_SECRET"  # noqa: S105 - a variable name
DEFAULT_SERVICE_NAME = "tokenbooth"
# HOST:PORT for the four listeners, replacing the config's (a command-line flag wins).
LISTEN_ENV = "TOKENBOOTH_LISTEN"
GRPC_LISTEN_ENV = "TOKENBOOTH_GRPC_LISTEN"
HTTP_LISTEN_ENV = "TOKENBOOTH_HTTP_LISTEN"
ADMIN_LISTEN_ENV = "TOKENBOOTH_ADMIN_LISTEN"
# The setting each of those variables fills.
# A bearer token of the admin API with role `admin` (beside the config's `admin.tokens`).
ADMIN_TOKEN_ENV = "TOKENBOOTH_ADMIN_TOKEN"  # noqa: S105 - a variable name
# Set (not "0"): `serve` traces allocations, dumped on SIGUSR1 (authz/runtime/memdebug.py).
TRACEMALLOC_ENV = "TOKENBOOTH_TRACEMALLOC"
PORT_ENV = {"listen": LISTEN_ENV, "grpc_listen": GRPC_LISTEN_ENV,
            "http_listen": HTTP_LISTEN_ENV, "admin_listen": ADMIN_LISTEN_ENV}


def where_set(path: str) -> str:
    """Every setting that may have put a listener where it is: the config's, the flag's
    and the variable's (operators tester: a port moved by TOKENBOOTH_HTTP_LISTEN was
    blamed on the config and a flag not given)."""
    name = path.rpartition(".")[2]
    env = PORT_ENV.get(name) if path != "admin.listen" else None
    return ", ".join((path, *((f"--{name.replace('_', '-')}", env) if env else ())))

@dataclass(frozen=True, slots=True)
class Settings:
    """Everything tokenbooth takes from its environment; the defaults are an empty one."""

    # The policy file when `--config` is not given.
    config: Path | None = None
    # Let an unexpected error's traceback through instead of one line.
    debug: bool = False
    # The password of a Redis `state` (kept out of the policy file, and out of repr()).
    redis_password: str | None = field(default=None, repr=False)
    # The budget alert webhook's signing key (likewise out of the file and of repr()).
    webhook_secret: str | None = field(default=None, repr=False)
    # Traces go by OTLP to this collector; none: no tracer at all.
    otlp_endpoint: str | None = None
    service_name: str = DEFAULT_SERVICE_NAME
    # Envoy's listener, the services' gRPC and HTTP ports, Envoy's admin (`up`, `serve`).
    listen: str | None = None
    grpc_listen: str | None = None
    http_listen: str | None = None
    admin_listen: str | None = None
    # The admin API's extra `admin` token (kept out of repr()).
    admin_token: str | None = field(default=None, repr=False)
    # Trace allocations in `serve`, dumping what grew on SIGUSR1 (a debugging aid).
    tracemalloc: bool = False
    # The variables backends' API keys are named by (`api_key_env`): the services read
    # one to ask a backend to count a cut request's prompt. Out of repr().
    backend_keys: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read the variables above; an empty value counts as unset."""
        return cls(
            config=Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None,
            debug=bool(env.get(DEBUG_ENV)),
            redis_password=env.get(REDIS_PASSWORD_ENV) or None,
            webhook_secret=env.get(WEBHOOK_SECRET_ENV) or None,
            otlp_endpoint=env.get(OTLP_ENDPOINT_ENV) or None,
            service_name=env.get(SERVICE_NAME_ENV) or DEFAULT_SERVICE_NAME,
            # As the CLI reads it: a Secret made `--from-file` ends in a line break, and
            # a token no client could send locked every caller out (admin review).
            admin_token=(env.get(ADMIN_TOKEN_ENV) or "").strip() or None,
            tracemalloc=env.get(TRACEMALLOC_ENV, "0") not in ("", "0"),
            backend_keys=dict(env),
            **{name: env.get(var) or None for name, var in PORT_ENV.items()},
        )

    def load_config(self, path: Path) -> Config:
        """The policy file at `path`, with these settings' Redis password applied."""
        return self.config_from_text(read_config_text(path), path)

    def config_from_text(self, text: str, path: Path) -> Config:
        """`load_config` of `text`, read from the file at `path`."""
        env = {REDIS_PASSWORD_ENV: self.redis_password} if self.redis_password else {}
        return config_from_text(text, path, env=env)
