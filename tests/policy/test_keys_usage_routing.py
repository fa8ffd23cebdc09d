"""Keys, cost arithmetic and weighted routing."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.config import Price, parse_config
from policy.errors import ApiError
from policy.keys import authenticate, extract_secret, fingerprint, index_keys, new_secret
from policy.routing import Router, backend_from_host_metadata, model_cluster_name
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


def test_one_cluster_per_alias_and_backend_urls() -> None:
    r = Router(CFG)
    demo, other = r.route("demo"), r.route("other")
    assert demo is not None and other is not None and r.route("nope") is None
    assert demo.cluster != other.cluster and demo.upstream_model == "tiny-llama"
    assert demo.cluster == model_cluster_name("demo")
    assert model_cluster_name("Llama 3.1/70B").startswith("model_llama_3_1_70b_")
    assert model_cluster_name("a/b") != model_cluster_name("a_b")


def test_backend_url_from_envoys_rendering_of_endpoint_metadata() -> None:
    # As Envoy 1.40 sends the `xds.upstream_host_metadata` attribute.
    text = ('filter_metadata { key: "tokenbooth" value { fields { key: "backend" value '
            '{ string_value: "http://vllm-a.svc:8000" } } } }')
    assert backend_from_host_metadata(text) == "http://vllm-a.svc:8000"
    assert backend_from_host_metadata("") == ""
    assert backend_from_host_metadata('filter_metadata { key: "other" }') == ""
