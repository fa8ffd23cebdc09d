"""Configuration C's key check: LiteLLM's `custom_auth` hook, loaded by LiteLLM's proxy.

It runs inside LiteLLM's own venv (`bench/.venv-litellm`), never in tokenbooth's: the
bench copies this file next to the LiteLLM config it writes. LiteLLM's virtual keys need
its PostgreSQL schema through Prisma, whose engine binaries cannot be downloaded on this
machine (see bench/README.md); this hook gives LiteLLM the same kind of key tokenbooth
checks: a SHA-256 fingerprint, with RPM, TPM and a budget that LiteLLM then enforces
itself (`custom_auth_run_common_checks`), counting in Redis.
"""

from __future__ import annotations

import hashlib
import os

from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth

_SHA256 = os.environ["BENCH_KEY_SHA256"]
_RPM = int(os.environ["BENCH_KEY_RPM"])
_TPM = int(os.environ["BENCH_KEY_TPM"])
_BUDGET = float(os.environ["BENCH_KEY_BUDGET_USD"])


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """The key's limits, or an error (LiteLLM answers 401)."""
    if hashlib.sha256(api_key.encode()).hexdigest() != _SHA256:
        raise Exception("Invalid API key")
    return UserAPIKeyAuth(api_key=_SHA256, token=_SHA256, key_alias="bench",
                          rpm_limit=_RPM, tpm_limit=_TPM, max_budget=_BUDGET)
