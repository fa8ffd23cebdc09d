"""Shared test helpers: a policy file with known keys."""

from __future__ import annotations

from pathlib import Path

import yaml

from authz.runtime.procs import PortAllocator
from policy.keys import fingerprint

SECRET = "sk-tb-test-0123456789abcdefghijklmnopqrstuvwxyz"
READ_ONLY_SECRET = "sk-tb-test-readonly-0123456789abcdefghijklmnop"
LIMITED_SECRET = "sk-tb-test-limited-0123456789abcdefghijklmnopq"
REVOKED_SECRET = "sk-tb-test-revoked-0123456789abcdefghijklmnopq"
EXPIRED_SECRET = "sk-tb-test-expired-0123456789abcdefghijklmnopq"
METERED_SECRET = "sk-tb-test-metered-0123456789abcdefghijklmnopq"


def policy_dict(backend: str, **extra: object) -> dict[str, object]:
    d: dict[str, object] = {
        "listen": "127.0.0.1:8080",
        "data_dir": "data",
        "models": {
            "demo": {
                "upstream_model": "tiny-llama",
                "backends": [{"url": backend}],
                "price_per_1k_tokens": {"input": "0.50", "output": "1.50"},
                "max_tokens": 256,
            },
            "other": {
                "upstream_model": "tiny-llama-2",
                "backends": [{"url": backend}],
                "max_tokens": 64,
            },
        },
        "keys": [
            {"id": "k-main", "org": "acme", "sha256": fingerprint(SECRET)},
            {"id": "k-read", "org": "acme", "sha256": fingerprint(READ_ONLY_SECRET),
             "scopes": ["inference:read"]},
            {"id": "k-limited", "org": "beta", "sha256": fingerprint(LIMITED_SECRET),
             "models": ["demo"]},
            {"id": "k-revoked", "org": "acme", "sha256": fingerprint(REVOKED_SECRET),
             "status": "revoked"},
            {"id": "k-expired", "org": "acme", "sha256": fingerprint(EXPIRED_SECRET),
             "expires_at": "2020-01-01T00:00:00Z"},
            {"id": "k-metered", "org": "acme", "sha256": fingerprint(METERED_SECRET),
             "tpm": 1000, "max_concurrent": 1, "budget_usd": "10", "budget_period": "total"},
        ],
    }
    d.update(extra)
    return d


def write_policy(directory: Path, backend: str, **extra: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenbooth.yaml"
    path.write_text(yaml.safe_dump(policy_dict(backend, **extra), sort_keys=False))
    return path


# One allocator for the whole test session: ports picked for processes started together
# never repeat, even before any of them binds.
PORTS = PortAllocator()


def free_port() -> int:
    return PORTS.free_port()
