"""policy/keys.py: secrets, fingerprints, where a client's key is read from, and the
decision on a looked-up key."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from policy.config import parse_config
from policy.errors import ApiError
from policy.keyrecord import KeyRecord
from policy.keys import (
    check_record,
    display_prefix,
    extract_secret,
    fingerprint,
    index_keys,
    new_secret,
    principal_of,
)
from policy.limits import NANO_PER_USD
from tests.helpers import EXPIRED_SECRET, SECRET, policy_dict

NOW = datetime(2026, 11, 23, tzinfo=UTC)
CFG = parse_config(policy_dict("http://127.0.0.1:8000"))
FP = "a" * 64


def test_secrets_are_random_urlsafe_and_fingerprints_are_sha256() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("sk-tb-") and len(a) == 6 + 43  # 32 bytes, base64url
    assert set(a[6:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert fingerprint(a) == hashlib.sha256(a.encode()).hexdigest()
    assert fingerprint("abc") == ("ba7816bf8f01cfea414140de5dae2223"
                                  "b00361a396177a9cb410ff61f20015ad")


def test_display_prefix_is_the_key_prefix_and_four_characters() -> None:
    assert display_prefix("sk-tb-abcdefghijkl") == "sk-tb-abcd"
    assert display_prefix("sk-tb-ab") == "sk-tb-ab"


def test_extract_secret_prefers_bearer() -> None:
    assert extract_secret("Bearer  abc ", "zzz") == "abc"
    assert extract_secret("bearer abc", None) == "abc"
    assert extract_secret("Bearer\tabc", None) == "abc"  # a tab after the scheme
    assert extract_secret("Basic abc", "zzz") == "zzz"
    assert extract_secret("Bearer ", " k ") == "k"
    assert extract_secret(None, "  ") is None
    assert extract_secret(None, None) is None


def test_check_record_accepts_a_key_from_the_index() -> None:
    idx = index_keys(CFG.keys)
    assert set(idx) == {k.sha256 for k in CFG.keys}
    p = check_record(idx.get(fingerprint(SECRET)), NOW)
    assert (p.key_id, p.org) == ("k-main", "acme")
    assert p.scopes == frozenset({"inference:read", "inference:write"})
    assert p.models == frozenset() and p.may_use("anything")


@pytest.mark.parametrize(("record", "message"), [
    (None, "Incorrect API key provided."),
    (KeyRecord(id="k", org="o", sha256=FP, status="revoked"), "This API key has been revoked."),
    (KeyRecord(id="k", org="o", sha256=FP, expires_at=NOW), "This API key has expired."),
])
def test_check_record_refuses_with_a_401_saying_why(record: KeyRecord | None,
                                                    message: str) -> None:
    with pytest.raises(ApiError) as err:
        check_record(record, NOW)
    assert (err.value.status, err.value.code, err.value.message) == (
        401, "invalid_api_key", message)


def test_expiry_is_checked_against_the_given_time() -> None:
    rec = index_keys(CFG.keys)[fingerprint(EXPIRED_SECRET)]
    with pytest.raises(ApiError, match="expired"):
        check_record(rec, NOW)
    assert rec.expires_at is not None
    assert check_record(rec, rec.expires_at - timedelta(microseconds=1)).key_id == "k-expired"


def test_principal_carries_the_keys_scopes_models_and_limits() -> None:
    rec = KeyRecord(id="k", org="o", sha256=FP, scopes=("inference:read",), models=("demo",),
                    rpm=10, tpm=1000, max_concurrent=2, budget_usd=Decimal("2.5"),
                    budget_period="day")
    p = principal_of(rec)
    assert p.may_use("demo") and not p.may_use("other")
    p.require_scope("inference:read")
    with pytest.raises(ApiError) as err:
        p.require_scope("inference:write")
    assert (err.value.status, err.value.code) == (403, "insufficient_scope")
    lim = p.limits
    assert (lim.rpm, lim.tpm, lim.max_concurrent, lim.budget_period) == (10, 1000, 2, "day")
    assert lim.budget_nano == 2_500_000_000 == int(Decimal("2.5") * NANO_PER_USD)
    assert principal_of(KeyRecord(id="k", org="o", sha256=FP)).limits.budget_nano is None
