"""The admin API on a running gateway: a key created over HTTP works with the openai SDK,
an rpm update is enforced within 2 s, its spend is readable, a revocation is a 401
within 2 s."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from policy.keys import fingerprint
from tests.e2e.conftest import Gateway, run_gateway
from tests.e2e.test_keys import works
from tests.e2e.test_keys_update import refused, within_2s
from tests.helpers import free_port

pytestmark = pytest.mark.e2e
TOKEN = "admin-e2e-token-0123456789"


@pytest.fixture(scope="module")
def admin_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    port = free_port()
    admin = {"listen": f"127.0.0.1:{port}",
             "tokens": [{"name": "e2e", "sha256": fingerprint(TOKEN), "role": "admin"}]}
    with run_gateway(Path(tmp_path_factory.mktemp("gateway-admin")), admin=admin) as gw:
        yield gw, f"http://127.0.0.1:{port}"


def call(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        base + path, method=method, headers={"Authorization": f"Bearer {TOKEN}",
                                             "Content-Type": "application/json"},
        data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_key_over_http_from_creation_to_revocation(admin_gateway: tuple[Gateway, str]
                                                   ) -> None:
    gw, base = admin_gateway
    status, created = call(base, "POST", "/v1/keys", {"org": "portal", "rpm": 1000,
                                                      "budget_usd": "5"})
    assert status == 201, created
    key_id, key = created["id"], created["key"]
    within_2s(lambda: works(gw, key), "a key created over HTTP was not usable")
    status, _ = call(base, "PATCH", f"/v1/keys/{key_id}", {"rpm": 1})
    assert status == 200
    within_2s(lambda: refused(gw, key, "rate_limit_exceeded"), "rpm 1 was not enforced")
    status, spend = call(base, "GET", f"/v1/keys/{key_id}/spend")
    assert status == 200 and Decimal(spend["spent_usd"]) > 0, spend
    # The state, from the live store: rpm 1 spent, the same budget.
    status, state = call(base, "GET", f"/v1/keys/{key_id}/state")
    assert status == 200, state
    assert state["key"]["requests"]["limit"] == 1
    assert state["key"]["requests"]["remaining"] == 0
    assert state["key"]["budget"]["spent_usd"] == spend["spent_usd"]
    assert Decimal(spend["remaining_usd"]) == 5 - Decimal(spend["spent_usd"]) - Decimal(
        spend["reserved_usd"])
    status, shown = call(base, "GET", f"/v1/keys/{key_id}")
    assert status == 200 and key not in json.dumps(shown)
    status, _ = call(base, "POST", f"/v1/keys/{key_id}/revoke")
    assert status == 200

    def refused_401() -> bool:
        try:
            gw.client(key).models.list()
        except openai.AuthenticationError:
            return True
        except openai.RateLimitError:
            return False
        return False

    within_2s(refused_401, "a revoked key was still accepted")
    status, page = call(base, "GET", f"/v1/usage?key={key_id}")
    assert status == 200 and page["totals"]["requests"] >= 1


def test_org_limits_set_over_http_are_enforced_within_2s(
        admin_gateway: tuple[Gateway, str]) -> None:
    """Org limits stored through the admin API replace the config's for that org on
    the request path (rpm 1: the second request is refused); DELETE restores them."""
    gw, base = admin_gateway
    status, created = call(base, "POST", "/v1/keys", {"org": "org-e2e"})
    assert status == 201, created
    key = created["key"]
    within_2s(lambda: works(gw, key), "a key created over HTTP was not usable")
    status, body = call(base, "PUT", "/v1/orgs/org-e2e", {"rpm": 1})
    assert status == 200, body
    within_2s(lambda: refused(gw, key, "rate_limit_exceeded"), "the org's rpm 1")
    status, body = call(base, "DELETE", "/v1/orgs/org-e2e")
    assert status == 200, body
    within_2s(lambda: not refused(gw, key, "rate_limit_exceeded"),
              "the org's stored limits were not dropped")


def test_the_cli_acts_on_a_remote_gateway_with_admin_url(
        admin_gateway: tuple[Gateway, str]) -> None:
    """`keys …` and `usage` with --admin-url: the same commands, no local state read
    (the config given does not exist)."""
    import os
    import subprocess
    import sys

    gw, base = admin_gateway
    env = {**os.environ, "TOKENBOOTH_ADMIN_TOKEN": TOKEN}

    def tb(*args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "authz.cli", *args, "--admin-url", base,
                            "--config", "/nonexistent/tokenbooth.yaml"],
                           capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout) if "--json" in args else r.stdout

    created = tb("keys", "create", "--org", "cli-remote", "--rpm", "100", "--json")
    key_id, key = created["id"], created["key"]
    within_2s(lambda: works(gw, key), "a key created with --admin-url was not usable")
    assert key_id in {r["id"] for r in tb("keys", "list", "--org", "cli-remote", "--json")}
    assert tb("keys", "update", key_id, "--rpm", "7", "--json")["rpm"] == 7
    shown = tb("keys", "show", key_id, "--json")
    # The same fields as the local `keys show --json` (the spend is in the state).
    assert shown["rpm"] == 7 and set(shown) == {*created} - {"key"} | {"source", "state"}
    # The limits' state, as the local `keys show` prints it, after one more request.
    assert works(gw, key)
    shown = tb("keys", "show", key_id, "--json")
    requests = shown["state"]["key"]["requests"]
    assert requests["limit"] == 7 and requests["remaining"] < 7, shown["state"]
    assert shown["state"]["org"] is None and shown["state"]["source"].startswith("memory ")
    text = tb("keys", "show", key_id)
    assert "state at " in text and "key requests: " in text and "of 7 per minute left" in text
    within_2s(lambda: tb("usage", "--key", key_id, "--json")["totals"]["requests"] >= 1,
              "the remote usage")
    assert "revoked key" in tb("keys", "revoke", key_id)
