"""API keys: secrets, fingerprints, and the authentication decision.

A secret is never stored: only its SHA-256 fingerprint. Lookups hash first
and then index by the digest, so no comparison branches on secret bytes.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from policy.errors import ApiError, insufficient_scope, invalid_api_key
from policy.keyrecord import KEY_PREFIX, KeyRecord, redact_secrets
from policy.limits import Limits, usd_to_nano

NO_LIMITS = Limits()


def new_secret() -> str:
    """A fresh API key: `sk-tb-` + 32 bytes from the OS CSPRNG, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def fingerprint(secret: str) -> str:
    """The stored form of a key: lowercase hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for, once its key is accepted."""

    key_id: str
    org: str
    scopes: frozenset[str]
    models: frozenset[str]  # empty: every alias
    limits: Limits = NO_LIMITS

    def may_use(self, alias: str) -> bool:
        return not self.models or alias in self.models

    def require_scope(self, scope: str) -> None:
        if scope not in self.scopes:
            raise insufficient_scope(scope)


def limits_of(key: KeyRecord) -> Limits:
    return Limits(
        rpm=key.rpm,
        tpm=key.tpm,
        max_concurrent=key.max_concurrent,
        budget_nano=usd_to_nano(key.budget_usd) if key.budget_usd is not None else None,
        budget_period=key.budget_period,
    )


def principal_of(key: KeyRecord) -> Principal:
    return Principal(key.id, key.org, frozenset(key.scopes), frozenset(key.models),
                     limits_of(key))


def display_prefix(secret: str) -> str:
    """The non-secret part people see in listings: `sk-tb-` and four characters."""
    return secret[: len(KEY_PREFIX) + 4]


def no_key_message(key_id: str) -> str:
    """The answer to a key id that names no key; a secret given for an id says so, by
    its listed prefix only (the answer lands in terminals and CI logs)."""
    hint = (" (that is a key's secret, not its id: `keys list` shows each key's id beside "
            "its prefix)" if key_id.startswith(KEY_PREFIX) else "")
    return f"no key with id {redact_secrets(key_id)!r}{hint}"


def extract_secret(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a client sent: `Authorization: Bearer <key>` first, then `X-API-Key`."""
    if authorization:
        # Any whitespace after the scheme (RFC 9110 says one space; a tab was read as
        # no key at all, with a 401 saying none was sent).
        scheme, *token = authorization.split(None, 1)
        if scheme.lower() == "bearer" and token and token[0].strip():
            return token[0].strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


# The 401 for a request without a key (raised by authz/services/keyauth.py, which does
# the lookups; `check_record` decides on what they find).
NO_KEY = "No API key provided. Send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."


def check_record(key: KeyRecord | None, now: datetime) -> Principal:
    """The decision on a looked-up key: a Principal, or a 401 saying why not."""
    if key is None:
        raise invalid_api_key("Incorrect API key provided.")
    if key.status == "revoked":
        raise invalid_api_key("This API key has been revoked.")
    if key.expires_at is not None and now >= key.expires_at:
        raise invalid_api_key("This API key has expired.")
    return principal_of(key)


def index_keys(keys: list[KeyRecord]) -> dict[str, KeyRecord]:
    return {k.sha256: k for k in keys}


__all__ = [
    "KEY_PREFIX",
    "ApiError",
    "Principal",
    "check_record",
    "display_prefix",
    "extract_secret",
    "fingerprint",
    "index_keys",
    "new_secret",
    "redact_secrets",
]
