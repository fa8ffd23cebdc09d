"""Keys, cost arithmetic and weighted routing."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.config import Backend, Price, parse_config
from policy.errors import ApiError
from policy.keys import authenticate, extract_secret, fingerprint, index_keys, new_secret
from policy.routing import Router, WeightedPicker, all_backends, cluster_name
from policy.usage import Usage, cost_usd, usage_from_obj
from tests.helpers import EXPIRED_SECRET, SECRET, policy_dict

NOW = datetime(2026, 11, 23, tzinfo=UTC)
CFG = parse_config(policy_dict("http://127.0.0.1:8000"))


def test_secrets_are_random_urlsafe_and_fingerprints_are_sha256() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("sk-tb-") and len(a) >= 6 + 43
    assert set(a[6:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert fingerprint(a) == hashlib.sha256(a.encode()).hexdigest()


def test_extract_secret_prefers_bearer() -> None:
    assert extract_secret("Bearer  abc ", "zzz") == "abc"
    assert extract_secret("bearer abc", None) == "abc"
    assert extract_secret("Basic abc", "zzz") == "zzz"
    assert extract_secret(None, "  ") is None


def test_authenticate() -> None:
    idx = index_keys(CFG.keys)
    p = authenticate(SECRET, idx, NOW)
    assert (p.key_id, p.org) == ("k-main", "acme") and p.may_use("anything")
    with pytest.raises(ApiError, match="expired"):
        authenticate(EXPIRED_SECRET, idx, NOW)
    # Not yet expired at an earlier time.
    assert authenticate(EXPIRED_SECRET, idx, datetime(2019, 1, 1, tzinfo=UTC)).key_id


def test_cost_is_exact_decimal() -> None:
    price = Price(input=Decimal("0.1"), output=Decimal("0.3"))
    assert cost_usd(Usage(3, 7), price) == Decimal("0.0024")
    assert usage_from_obj({"prompt_tokens": 3, "completion_tokens": 4}) == Usage(3, 4)
    for bad in (None, {}, {"prompt_tokens": -1}, {"prompt_tokens": 1.5}, {"prompt_tokens": True}):
        assert usage_from_obj(bad) is None


@given(st.integers(0, 10**7), st.integers(0, 10**7))
def test_cost_is_additive(p: int, c: int) -> None:
    price = Price(input=Decimal("0.50"), output=Decimal("1.50"))
    assert cost_usd(Usage(p, c), price) == cost_usd(Usage(p, 0), price) + cost_usd(
        Usage(0, c), price)


def test_shared_backends_get_one_cluster() -> None:
    assert len(all_backends(CFG)) == 1
    assert cluster_name(Backend(url="https://vllm.svc.local:8443")) == (
        "backend_https_vllm_svc_local_8443")


def test_weighted_picker_follows_weights() -> None:
    b1, b2 = Backend(url="http://a:1", weight=1), Backend(url="http://b:1", weight=3)
    picker = WeightedPicker([b1, b2])
    picks = [picker.pick(lambda i=i: i / 1000) for i in range(1000)]
    assert picks.count(b2) == 750


def test_router_unknown_alias() -> None:
    r = Router(CFG, lambda: 0.5)
    assert r.route("nope") is None
    route = r.route("demo")
    assert route is not None and route.upstream_model == "tiny-llama"
