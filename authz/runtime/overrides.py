"""Command-line overrides applied on top of the policy file (`--listen`, `--upstream`)."""

from __future__ import annotations

from dataclasses import dataclass

from policy.config import Backend, Config, parse_hostport


@dataclass(frozen=True)
class Overrides:
    listen: str | None = None
    # Send every model to this one backend (the simulator, or a real vLLM).
    upstream: str | None = None

    def apply(self, cfg: Config) -> Config:
        update: dict[str, object] = {}
        if self.listen:
            parse_hostport(self.listen)
            update["listen"] = self.listen
        if self.upstream:
            backend = Backend(url=self.upstream)
            update["models"] = {
                alias: m.model_copy(update={"backends": [backend]})
                for alias, m in cfg.models.items()
            }
        return cfg.model_copy(update=update) if update else cfg
