"""`GET /health` through the real Envoy: 200 with no key, answered by Envoy itself."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from tests.e2e.conftest import Gateway

pytestmark = pytest.mark.e2e


def get(url: str, headers: dict[str, str]) -> tuple[int, str | None, bytes]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers["server"], r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["server"], e.read()


def test_health_answers_200_without_a_key(gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-tb-not-a-key"}):
        assert get(f"{gateway.base_url}/health", headers) == (200, "envoy", b"")
    # Any other path still needs a key.
    status, _, _ = get(f"{gateway.base_url}/v1/models", {})
    assert status == 401
