"""The admin API, hermetic: the aiohttp app over a real keyring in tmp (or a real
redis-server), every answer checked against /openapi.json with jsonschema."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from redis.exceptions import RedisError

from authz.runtime import admin as admin_module
from authz.runtime import admin_api
from authz.runtime.admin import SERVER_OPTIONS, make_admin_app
from authz.runtime.admin_api import AdminContext, Records
from authz.runtime.admin_auth import AdminTokens, Caller, CurrentAdminTokens, FailureLimiter
from authz.runtime.logs import JsonFormatter
from authz.runtime.snapshot import Runtime
from authz.state.keys.base import KeyAdmin
from authz.state.keys.keyring import KeyringStore
from authz.state.keys.redis_store import RedisKeyStore
from authz.state.limits.base import LimitStore
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.orgs import FileOrgStore, OrgLimitsCache, OrgStore, RedisOrgStore
from authz.state.usage.records import USAGE_FILE, USAGE_STREAM
from policy.admin_schema import UsageQuery
from policy.config import AdminToken, Config, KeyRecord, OrgLimits, parse_config
from policy.keys import fingerprint, new_secret
from tests.helpers import policy_dict, write_policy
from tests.redis_server import RedisServer

ADMIN, READER, ENV = "adm-secret-token-1", "read-secret-token-2", "env-secret-token-3"
TOKENS = (AdminToken(name="ops", sha256=fingerprint(ADMIN), role="admin"),
          AdminToken(name="viewer", sha256=fingerprint(READER), role="read"))
RECORDS: Records = [
    {"request_id": f"r{i}", "key_id": "k-main" if i % 2 else "k-metered",
     "org": "acme" if i < 4 else "beta", "model": "demo", "upstream_model": "tiny-llama",
     "backend": "b", "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
     "cost_usd": "0.0125", "status": 200, "stream": False, "estimated": False,
     "started_at": f"2026-01-0{i + 1}T00:00:00+00:00", "duration_ms": 3.0,
     "endpoint": "chat"} for i in range(6)]
for _i, _rec in enumerate(RECORDS[:5]):  # r5: written before the budget-period fields
    _rec.update(key_budget_period="month" if _i % 2 else "", org_budget_period="")
# As written: a record may be delivered twice (the readers keep one).
WRITTEN = [*RECORDS, RECORDS[1]]
NDJSON = "application/x-ndjson"


class Api:
    """A client that checks every answer against the OpenAPI document."""

    def __init__(self, client: TestClient[Any, Any], doc: dict[str, Any]) -> None:
        self.client, self.doc = client, doc

    async def __call__(self, method: str, path: str, token: str | None = ADMIN,
                       body: Any = None, raw: bytes | None = None
                       ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = raw if raw is not None else (None if body is None else orjson.dumps(body))
        resp = await self.client.request(method, path, headers=headers, data=data)
        out = orjson.loads(await resp.read())
        self.validate(method, path.partition("?")[0], resp.status, out)
        return resp.status, out

    async def lines(self, path: str, headers: dict[str, str] | None = None
                    ) -> tuple[int, list[dict[str, Any]]]:
        """A streamed answer: every line checked against the NDJSON schema."""
        resp = await self.client.get(path, headers={"Authorization": f"Bearer {ADMIN}",
                                                    **(headers or {})})
        assert resp.status == 200, await resp.text()
        assert resp.content_type == NDJSON and "content-length" not in resp.headers
        text = await resp.read()
        assert text.endswith(b"\n")
        out = [orjson.loads(line) for line in text.splitlines()]
        for line in out:
            self.validate("GET", path.partition("?")[0], 200, line, NDJSON)
        return resp.status, out

    def validate(self, method: str, path: str, status: int, body: Any,
                 content_type: str = "application/json") -> None:
        op = next(ops[method.lower()] for tpl, ops in self.doc["paths"].items()
                  if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", tpl), path))
        assert str(status) in op["responses"], f"{status} not documented for {method} {path}"
        self.check(op["responses"][str(status)]["content"][content_type]["schema"], body)

    def check(self, schema: dict[str, Any], body: Any) -> None:
        Draft202012Validator({**schema, "components": self.doc["components"]}).validate(body)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _stores(kind: str, data: Path, url: str) -> tuple[Any, LimitStore, OrgStore]:
    if kind == "memory":
        return KeyringStore(data, poll_s=0.05), MemoryLimitStore(), FileOrgStore(data)
    return RedisKeyStore(url), RedisLimitStore(url), RedisOrgStore(url)


@pytest.fixture(params=["memory", "redis"])
async def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AdminContext]:
    kind = request.param
    url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    if url:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(url)
        await r.flushall()
        for rec in WRITTEN:
            await r.xadd(USAGE_STREAM, {"data": orjson.dumps(rec)})
        await r.aclose()
    state = url or "memory"
    cfg = parse_config({**policy_dict("http://127.0.0.1:1"), "state": state,
                        "orgs": {"acme": {"rpm": 100}}}, base_dir=tmp_path)
    keys, limits, org_store = _stores(kind, cfg.data_dir, url)
    orgs = OrgLimitsCache(org_store, poll_s=0.05)
    for part in (keys, limits, orgs):
        await part.start()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    (cfg.data_dir / USAGE_FILE).write_bytes(
        b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in WRITTEN))
    yield AdminContext(lambda: cfg, keys, limits, orgs, AdminTokens(TOKENS, ENV))
    for part in (keys, limits, orgs):
        await part.close()


@pytest.fixture
async def api(ctx: AdminContext) -> AsyncIterator[Api]:
    server = TestServer(make_admin_app(ctx))
    await server.start_server(**SERVER_OPTIONS)  # as `serve` runs it (the client's does not)
    async with TestClient(server) as client:
        resp = await client.get("/openapi.json")
        yield Api(client, orjson.loads(await resp.read()))


# -- the document -----------------------------------------------------------------------


async def test_openapi_document_is_served_without_a_token(api: Api) -> None:
    assert api.doc["openapi"] == "3.1.0"
    for schema in api.doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    assert {"/v1/keys", "/v1/keys/{key_id}", "/v1/orgs/{org}", "/v1/usage"} <= set(
        api.doc["paths"])


# -- authentication and roles -----------------------------------------------------------


async def test_tokens_and_roles(api: Api) -> None:
    assert (await api("GET", "/v1/keys", token=None))[0] == 401
    status, body = await api("GET", "/v1/keys", token="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert (await api("GET", "/v1/keys", token=READER))[0] == 200
    status, body = await api("POST", "/v1/keys", token=READER, body={"org": "acme"})
    assert status == 403 and body["error"]["code"] == "insufficient_scope"
    assert (await api("PUT", "/v1/orgs/acme", token=READER, body={}))[0] == 403
    assert (await api("POST", "/v1/keys", token=ENV, body={"org": "acme"}))[0] == 201


async def test_failed_authentication_is_rate_limited(ctx: AdminContext, api: Api) -> None:
    ctx.limiter = FailureLimiter(allowed=3, window_s=60)
    for _ in range(3):
        assert (await api("GET", "/v1/keys", token="wrong"))[0] == 401
    resp = await api.client.get("/v1/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status == 429 and int(resp.headers["retry-after"]) >= 1
    body = orjson.loads(await resp.read())
    api.validate("GET", "/v1/keys", 429, body)
    # Typed as the gateway types its 429s (the SDKs' RateLimitError).
    assert (body["error"]["type"], body["error"]["code"]) == (
        "rate_limit_error", "rate_limit_exceeded")


async def test_a_request_without_a_token_is_no_guess(ctx: AdminContext, api: Api) -> None:
    """Requests with no credential counted toward the lockout: any web page open in an
    operator's browser (a cross-site GET needs no preflight) locked the admin API out
    for every caller at that address, the real token included."""
    ctx.limiter = FailureLimiter(allowed=3, window_s=60)
    for headers in ({}, {"Authorization": ""}, {"Authorization": "  "}) * 3:
        resp = await api.client.get("/v1/keys", headers=headers)
        assert resp.status == 401
    assert (await api("GET", "/v1/keys", token=ADMIN))[0] == 200


async def test_a_browsers_request_is_refused_before_it_counts(ctx: AdminContext,
                                                              api: Api) -> None:
    """A page on a name rebound to the admin API's address (DNS rebinding) is same-origin
    there: its junk tokens locked the operator out for the minute (admin review). What a
    browser sends is refused before authentication, and counts toward nothing."""
    ctx.limiter = FailureLimiter(allowed=3, window_s=60)
    for headers in ({"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors",
                     "Host": "rebind.attacker.example"}) * 5:
        resp = await api.client.get("/v1/keys", headers={
            **headers, "Authorization": "Bearer junk"})
        body = orjson.loads(await resp.read())
        assert resp.status == 403 and body["error"]["code"] == "browser_refused"
        resp = await api.client.get("/v1/keys", headers={
            **headers, "Authorization": f"Bearer {ADMIN}"})
        assert resp.status == 403
    assert (await api("GET", "/v1/keys", token=ADMIN))[0] == 200


def test_failure_limiter_window() -> None:
    now = [0.0]
    lim = FailureLimiter(allowed=2, window_s=10, clock=lambda: now[0], max_clients=2)
    lim.failed("a")
    lim.failed("a")
    assert lim.retry_after("a") == 10 and lim.retry_after("b") is None
    now[0] = 10.5
    assert lim.retry_after("a") is None
    for c in ("b", "c", "d"):
        lim.failed(c)
    assert len(lim._fails) == 2  # bounded


# -- keys -------------------------------------------------------------------------------


async def test_key_lifecycle(ctx: AdminContext, api: Api) -> None:
    status, created = await api("POST", "/v1/keys", body={
        "org": "acme", "name": "portal", "models": ["demo"], "rpm": 5, "budget_usd": "2.5"})
    assert status == 201 and created["key"].startswith("sk-tb-")
    key_id, secret = created["id"], created["key"]
    found = await ctx.keys.find(fingerprint(secret), secret)
    assert found is not None and found.rpm == 5
    status, got = await api("GET", f"/v1/keys/{key_id}")
    assert status == 200 and "key" not in got and got["prefix"] == secret[:10]
    status, upd = await api("PATCH", f"/v1/keys/{key_id}", body={"rpm": 9, "tpm": None,
                                                                 "models": []})
    assert status == 200 and upd["rpm"] == 9 and upd["models"] == []
    await _eventually(lambda: _rpm(ctx, secret), 9)
    status, spend = await api("GET", f"/v1/keys/{key_id}/spend")
    assert status == 200 and spend["spent_usd"] == "0" and spend["remaining_usd"] == "2.5"
    status, state = await api("GET", f"/v1/keys/{key_id}/state")
    assert status == 200 and state["key"]["requests"] == {"limit": 9, "remaining": 9,
                                                          "reset_s": 0.0}
    assert state["key"]["budget"]["remaining_usd"] == "2.5"
    assert state["org"]["requests"]["limit"] == 100  # the config's org acme
    assert (await api("GET", "/v1/keys/nope/state"))[0] == 404
    status, rev = await api("POST", f"/v1/keys/{key_id}/revoke")
    assert status == 200 and rev["status"] == "revoked"
    assert (await api("POST", "/v1/keys/nope/revoke"))[0] == 404
    assert (await api("GET", "/v1/keys/nope"))[0] == 404
    status, body = await api("PATCH", "/v1/keys/k-main", body={"rpm": 1})
    assert status == 409 and body["error"]["code"] == "key_in_config"


async def _rpm(ctx: AdminContext, secret: str) -> int | None:
    rec = await ctx.keys.find(fingerprint(secret), secret)
    return None if rec is None else rec.rpm


async def _eventually(probe: Any, want: object, within_s: float = 2.0) -> None:
    deadline = time.monotonic() + within_s
    while (got := await probe()) != want:
        assert time.monotonic() < deadline, f"still {got!r}, want {want!r}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("method", "path", "body", "param"), [
    ("POST", "/v1/keys", {"org": "acme", "colour": "red"}, "colour"),
    ("POST", "/v1/keys", {"org": "acme", "rpm": 0}, "rpm"),
    ("POST", "/v1/keys", {"org": "acme", "scopes": ["root"]}, "scopes.0"),
    # No scope: a key that could call nothing (`models: []` means every alias).
    ("POST", "/v1/keys", {"org": "acme", "scopes": []}, "scopes"),
    ("PATCH", "/v1/keys/k-x", {"scopes": []}, "scopes"),
    ("POST", "/v1/keys", {"org": "acme", "models": ["nope"]}, "models"),
    ("POST", "/v1/keys", {"name": "no org"}, "org"),
    ("PATCH", "/v1/keys/k-x", {"sha256": "0" * 64}, "sha256"),
    ("GET", "/v1/keys?limit=5000", None, "limit"),
    ("GET", "/v1/keys?colour=red", None, "colour"),
    ("GET", "/v1/usage?since=yesterday", None, "since"),
    # A number was read as Unix time: 20261207 as 1970-08-23 (admin retest).
    ("GET", "/v1/usage?since=20261207", None, "since"),
    ("PUT", "/v1/orgs/acme", {"rpm": -1}, "rpm"),
    # Past 2**53 nano-USD (or requests): more than the stores keep exact.
    ("PUT", "/v1/orgs/acme", {"budget_usd": "1e400"}, "budget_usd"),
    ("POST", "/v1/keys", {"org": "acme", "budget_usd": "9007199.254740992"}, "budget_usd"),
    ("POST", "/v1/keys", {"org": "acme", "budget_usd": "0.0000000015"}, "budget_usd"),
    ("POST", "/v1/keys", {"org": "acme", "tpm": 2**53}, "tpm"),
    # A time with no timezone (it was a 503 "retry", from the record made after).
    ("POST", "/v1/keys", {"org": "acme", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
    ("PATCH", "/v1/keys/k-x", {"expires_at": "2030-01-01T00:00:00"}, "expires_at"),
    # A number was read as Unix time, past 2e10 as milliseconds: the year 5138 meant,
    # 1973 set, the key expired at once (admin review).
    ("PATCH", "/v1/keys/k-x", {"expires_at": 99999999999}, "expires_at"),
    ("PATCH", "/v1/keys/k-x", {"expires_at": "0"}, "expires_at"),
    ("PATCH", "/v1/keys/k-x", {"expires_at": "1.0e11"}, "expires_at"),
    # An org that prints as another: a Cyrillic U+0435 in "demo" (admin review).
    ("POST", "/v1/keys", {"org": "d\u0435mo-org"}, "org"),
    # A new key already expired could never be used (an update may expire one at once).
    ("POST", "/v1/keys", {"org": "acme", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    # A count is a JSON integer: not a string, not true (it became 1).
    ("POST", "/v1/keys", {"org": "acme", "rpm": "5"}, "rpm"),
    ("POST", "/v1/keys", {"org": "acme", "rpm": True}, "rpm"),
    ("PUT", "/v1/orgs/acme", {"tpm": True}, "tpm"),
    # An org name no header can carry: every request of the key would fail.
    ("POST", "/v1/keys", {"org": "a\nb"}, "org"),
    ("POST", "/v1/keys", {"org": "a\u0000b"}, "org"),
    # A name `keys list` prints: no escape sequence to drive the reader's terminal.
    ("POST", "/v1/keys", {"org": "acme", "name": "a\u001b[2Jb"}, "name"),
    ("PATCH", "/v1/keys/k-x", {"name": "forged\nstatus: active"}, "name"),
    # The org of an org's limits is an org name as a key's is (it labels metrics too).
    ("PUT", "/v1/orgs/a%0Ab", {"rpm": 1}, "org"),
    ("PUT", "/v1/orgs/" + "o" * 129, {"rpm": 1}, "org"),
])
async def test_bad_input_names_the_field(api: Api, method: str, path: str, body: Any,
                                         param: str) -> None:
    status, out = await api(method, path, body=body)
    assert status == 400, out
    assert out["error"]["param"] == param and param in out["error"]["message"]


async def test_an_age_for_since_says_the_api_takes_a_time(api: Api) -> None:
    """`since=1m` said "Input should be a valid datetime or date, input is too short"."""
    status, out = await api("GET", "/v1/usage?since=90m")
    assert (status, out["error"]["param"]) == (400, "since")
    assert "RFC 3339" in out["error"]["message"] and "CLI" in out["error"]["message"]


@pytest.mark.parametrize(("method", "path", "body", "said"), [
    ("GET", "/v1/usage?since=garbage", None,
     "since: expected an RFC 3339 time with its zone, as in 2026-12-01T00:00:00Z (input "
     "is too short)"),
    ("GET", "/v1/usage?since=2026-13-01T00:00:00Z", None,
     "since: expected an RFC 3339 time with its zone, as in 2026-12-01T00:00:00Z (month "
     "value is outside expected range of 1-12)"),
    ("POST", "/v1/keys", {"org": "acme", "scopes": "inference"}, "scopes: expected an array"),
])
async def test_pydantics_words_are_said_in_jsons(api: Api, method: str, path: str,
                                                 body: Any, said: str) -> None:
    """Operators tester: "scopes: Input should be a valid tuple" (JSON has no tuples),
    "since: Input should be a valid datetime or date, input is too short"."""
    status, out = await api(method, path, body=body)
    assert (status, out["error"]["message"]) == (400, said)


async def test_body_must_be_a_json_object(api: Api) -> None:
    assert (await api("POST", "/v1/keys", raw=b"{nope"))[0] == 400
    assert (await api("POST", "/v1/keys", raw=b"[1]"))[0] == 400
    assert (await api("PATCH", "/v1/keys/k-x", body={}))[0] == 400


async def test_a_member_or_query_parameter_given_twice_is_refused(api: Api) -> None:
    """`{"org": "x", "org": "y"}` created a key for org y, and `limit=1&limit=2` took
    one silently: which one the caller meant is not the gateway's to guess."""
    status, out = await api("POST", "/v1/keys", raw=b'{"org": "x", "org": "y"}')
    assert status == 400 and out["error"]["param"] == "org", out
    status, out = await api("GET", "/v1/keys?limit=1&limit=2")
    assert status == 400 and out["error"]["param"] == "limit", out


async def test_a_body_that_trickles_is_cut_off(api: Api, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """Retest tester: with a valid token, a body sent a byte a second held its connection
    for as long as it took (the 10 s close covered only the headers): a 408 now."""
    monkeypatch.setattr(admin_module, "IDLE_S", 0.3)

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"org": '
        await asyncio.sleep(5)
        yield b'"acme"}'

    resp = await api.client.post("/v1/keys", data=trickle(),
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    body = orjson.loads(await resp.read())
    assert (resp.status, body["error"]["code"]) == (408, "request_timeout")
    api.validate("POST", "/v1/keys", 408, body)


async def test_a_compressed_body_is_refused_not_a_traceback(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    """A body whose Content-Encoding is not `identity` (a real gzip one, or one that only
    says so) is a 415, as at the gateway; it was decompressed by aiohttp, and a bad one
    was a 500 with aiohttp's traceback logged (before the token was even checked)."""
    import gzip

    good = gzip.compress(orjson.dumps({"name": "x", "org": "acme"}))
    for data, coding in ((good, "gzip"), (b"not gzip", "gzip"), (b"x", "deflate"),
                         (b"x", "br")):
        for token in (ADMIN, None):
            headers = {"content-encoding": coding,
                       **({"Authorization": f"Bearer {token}"} if token else {})}
            resp = await api.client.post("/v1/keys", data=data, headers=headers)
            out = orjson.loads(await resp.read())
            want = 415 if token else 401
            assert resp.status == want, (coding, token, out)
            api.validate("POST", "/v1/keys", resp.status, out)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    for coding in ("", "identity", "Identity "):  # no coding at all
        resp = await api.client.post("/v1/keys", data=b"[1]", headers={
            "content-encoding": coding, "Authorization": f"Bearer {ADMIN}"})
        assert resp.status == 400, coding


async def test_list_filters_and_pages(api: Api) -> None:
    for org in ("acme", "acme", "beta", "acme", "beta"):
        assert (await api("POST", "/v1/keys", body={"org": org}))[0] == 201
    seen: list[str] = []
    after = ""
    while True:
        status, page = await api("GET", f"/v1/keys?org=acme&limit=2{after}")
        assert status == 200 and len(page["data"]) <= 2
        seen += [k["id"] for k in page["data"]]
        if not page["has_more"]:
            break
        after = f"&after={page['last_id']}"
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    # 3 created + the config's acme keys (k-main, k-read, k-revoked, k-expired, k-metered)
    assert len(seen) == 8
    status, page = await api("GET", "/v1/keys?status=revoked")
    assert [k["id"] for k in page["data"]] == ["k-revoked"]


class _ValidationOnly:
    """A key store tokenbooth cannot write (as the HTTP validation service)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        return None


async def test_validation_service_refuses_key_writes(ctx: AdminContext, api: Api) -> None:
    ctx.keys = _ValidationOnly()
    cfg = ctx.config()
    ks = cfg.key_store.model_copy(update={"validation_url": "https://svc:S3CRETpw@auth:1/v"})
    ctx.config = lambda: cfg.model_copy(update={"key_store": ks})
    status, body = await api("POST", "/v1/keys", body={"org": "acme"})
    assert status == 409 and body["error"]["code"] == "keys_read_only"
    assert "https://auth:1/" in body["error"]["message"]
    assert "S3CRET" not in body["error"]["message"]  # the service's user:password
    assert (await api("POST", "/v1/keys/k-x/revoke"))[0] == 409
    assert (await api("GET", "/v1/keys"))[0] == 200  # the config's keys


# -- orgs, spend, usage -----------------------------------------------------------------


async def test_a_budget_as_a_json_number_is_kept_exactly(api: Api) -> None:
    """A JSON number is read as a decimal, not through a float (which rounded
    9007199.254740991 to 9007199.25474099); -0.0 is 0; NaN is not a number."""
    status, org = await api("PUT", "/v1/orgs/acme", raw=b'{"budget_usd": 9007199.254740991}')
    assert (status, org["limits"]["budget_usd"]) == (200, "9007199.254740991"), org
    status, org = await api("PUT", "/v1/orgs/acme", raw=b'{"budget_usd": -0.0}')
    assert (status, org["limits"]["budget_usd"]) == (200, "0.0"), org
    status, out = await api("PUT", "/v1/orgs/acme", raw=b'{"budget_usd": NaN}')
    assert status == 400, out


async def test_org_limits_are_stored_and_seen_by_every_replica(ctx: AdminContext,
                                                               api: Api) -> None:
    cfg = ctx.config()
    status, org = await api("GET", "/v1/orgs/acme")
    assert status == 200 and org["source"] == "config" and org["limits"]["rpm"] == 100
    assert (await api("GET", "/v1/orgs/zeta"))[1]["source"] == "none"
    # Another replica on the same state.
    other = OrgLimitsCache(RedisOrgStore(cfg.state) if cfg.state_is_redis
                           else FileOrgStore(cfg.data_dir))
    await other.refresh()
    status, org = await api("PUT", "/v1/orgs/acme", body={"rpm": 7, "budget_usd": "3",
                                                          "budget_period": "day"})
    assert status == 200 and org["source"] == "store" and org["limits"]["rpm"] == 7
    assert ctx.orgs.org_limits(cfg, "acme") is not None
    await other.refresh()
    limits = other.org_limits(cfg, "acme")
    assert limits is not None and limits.rpm == 7
    status, spend = await api("GET", "/v1/orgs/acme/spend")
    assert status == 200 and spend["budget_period"] == "day" and spend["remaining_usd"] == "3"
    status, org = await api("DELETE", "/v1/orgs/acme")
    assert org["source"] == "config"
    await other.refresh()
    assert other.org_limits(cfg, "acme") == cfg.orgs["acme"]
    await other.store.close()


async def test_an_org_name_with_braces_reaches_its_endpoints(api: Api) -> None:
    """aiohttp's `{org}` matched no brace: `a{b}`'s keys worked, its org endpoints were
    404s."""
    status, _ = await api("POST", "/v1/keys", body={"org": "a{b}"})
    assert status == 201
    status, org = await api("PUT", "/v1/orgs/a%7Bb%7D", body={"rpm": 5})
    assert (status, org["org"], org["limits"]["rpm"]) == (200, "a{b}", 5)
    assert (await api("GET", "/v1/orgs/a%7Bb%7D/spend"))[0] == 200
    assert (await api("DELETE", "/v1/orgs/a%7Bb%7D"))[0] == 200


async def test_a_new_org_that_reads_as_another_is_refused(api: Api) -> None:
    """A zero-width space or a trailing blank made a second org, with its own budget,
    that printed as the first: refused for new keys and new org limits, with the
    character named; the org's other endpoints still reach a name stored before."""
    status, err = await api("POST", "/v1/keys", body={"org": "acme\u200b"})
    assert (status, err["error"]["param"]) == (400, "org")
    assert "U+200B" in err["error"]["message"]
    status, err = await api("PUT", "/v1/orgs/acme%20", body={"rpm": 5})
    assert (status, err["error"]["param"]) == (400, "org")
    assert "whitespace" in err["error"]["message"]
    assert (await api("GET", "/v1/orgs/acme%20"))[0] == 200
    # Full-width letters beside an org that exists (the config's acme): its twin.
    status, err = await api("POST", "/v1/keys", body={"org": "\uff41\uff43\uff4d\uff45"})
    assert (status, err["error"]["param"]) == (400, "org")
    assert "reads as the org 'acme'" in err["error"]["message"]
    assert (await api("POST", "/v1/keys", body={"org": "\uff5a\uff5a"}))[0] == 201  # no twin
    # A name no key can have is a 400 on every org route, as on PUT (GET said 200).
    for method, path in (("GET", "/v1/orgs/%00"), ("DELETE", "/v1/orgs/%00"),
                         ("GET", "/v1/orgs/%00/spend"), ("GET", "/v1/orgs/" + "x" * 129)):
        status, err = await api(method, path)
        assert (status, err["error"]["param"]) == (400, "org"), (method, path)


async def test_a_secret_given_as_an_org_is_refused_unechoed(api: Api) -> None:
    """A key's secret given where an org belongs was stored whole (in orgs.json, and
    upstream as x-tokenbooth-org with every record of the org's keys) and echoed back;
    an unknown `after` echoed it too. Refused, and shown by its listed prefix only."""
    secret = new_secret()
    for method, path, body in (("PUT", f"/v1/orgs/{secret}", {"rpm": 5}),
                               ("POST", "/v1/keys", {"org": secret})):
        status, err = await api(method, path, body=body)
        assert (status, err["error"]["param"]) == (400, "org"), (method, err)
        assert "key's secret" in err["error"]["message"]
        text = orjson.dumps(err).decode()
        assert secret not in text and secret[:10] + "…" in text
    status, err = await api("GET", f"/v1/usage?after={secret}")
    assert status == 400 and secret not in orjson.dumps(err).decode(), err
    # Security tester: GET of such an org answered 200 echoing it whole; and a key's
    # name took a secret, kept in clear and listed.
    for method, path in (("GET", f"/v1/orgs/{secret}"), ("GET", f"/v1/orgs/{secret}/spend"),
                         ("DELETE", f"/v1/orgs/{secret}")):
        status, err = await api(method, path)
        assert (status, err["error"]["param"]) == (400, "org"), (method, path, err)
        assert secret not in orjson.dumps(err).decode()
    status, created = await api("POST", "/v1/keys", body={"org": "acme"})
    assert status == 201
    for method, path, body in (("POST", "/v1/keys", {"org": "acme", "name": f"ci {secret}"}),
                               ("PATCH", f"/v1/keys/{created['id']}", {"name": secret})):
        status, err = await api(method, path, body=body)
        assert (status, err["error"]["param"]) == (400, "name"), (method, err)
        assert "key's secret" in err["error"]["message"]
        assert secret not in orjson.dumps(err).decode()


async def test_an_org_stored_before_the_name_rule_keeps_working(
    ctx: AdminContext, api: Api,
) -> None:
    """An org whose name the rule now refuses, but which exists (a key of it written by
    an earlier release, or its limits stored): new keys and limits for it are still
    accepted, where an org not known yet is refused."""
    old = KeyRecord(id="key_0ld", org="acme ", sha256="0" * 64, prefix="sk-tb-0ld",
                    created_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert isinstance(ctx.keys, KeyAdmin)
    await ctx.keys.create(old)
    status, created = await api("POST", "/v1/keys", body={"org": "acme "})
    assert (status, created["org"]) == (201, "acme ")
    status, org = await api("PUT", "/v1/orgs/acme%20", body={"rpm": 7})
    assert (status, org["limits"]["rpm"]) == (200, 7)
    # Stored limits alone make the org known too.
    await ctx.orgs.put("beta\u200b", OrgLimits(rpm=3))
    assert (await api("POST", "/v1/keys", body={"org": "beta\u200b"}))[0] == 201
    status, err = await api("POST", "/v1/keys", body={"org": "gamma "})
    assert (status, err["error"]["param"]) == (400, "org")


async def test_a_route_without_a_body_refuses_fields(api: Api) -> None:
    """As every route refuses unknown fields: revoke reads none, so any is unknown; no
    body, or an empty object, is what it takes."""
    _, created = await api("POST", "/v1/keys", body={"org": "acme"})
    path = f"/v1/keys/{created['id']}/revoke"
    status, err = await api("POST", path, body={"reason": "leaked"})
    assert (status, err["error"]["param"]) == (400, "reason")
    assert "unknown body field" in err["error"]["message"]
    assert (await api("POST", path, raw=b"[1]"))[0] == 400
    assert (await api("GET", f"/v1/keys/{created['id']}"))[1]["status"] == "active"
    assert (await api("POST", path, body={}))[1]["status"] == "revoked"
    assert (await api("POST", path))[0] == 200
    assert (await api("DELETE", "/v1/orgs/acme", raw=b" "))[0] == 200


async def test_usage_filters_groups_and_pages(api: Api) -> None:
    status, page = await api("GET", "/v1/usage?org=acme&limit=3")
    assert status == 200 and [r["request_id"] for r in page["data"]] == ["r0", "r1", "r2"]
    assert page["has_more"] and page["totals"]["requests"] == 4
    assert [r["key_budget_period"] for r in page["data"]] == ["", "month", ""]
    assert page["data"][0]["org_budget_period"] == ""
    status, page = await api("GET", f"/v1/usage?org=acme&limit=3&after={page['last_id']}")
    assert [r["request_id"] for r in page["data"]] == ["r3"] and not page["has_more"]
    # A cursor that names no record is an error, not an empty page that reads as the end.
    status, out = await api("GET", "/v1/usage?org=acme&limit=3&after=r-nope")
    assert (status, out["error"]["param"]) == (400, "after"), out
    status, out = await api("GET", "/v1/usage?org=beta&after=r0")  # r0 is acme's
    assert status == 400, out
    status, page = await api("GET", "/v1/usage?key=k-main&since=2026-01-03T00:00:00Z"
                                    "&group_by=org")
    assert [r["request_id"] for r in page["data"]] == ["r3", "r5"]
    assert page["totals"]["cost_usd"] == "0.025"
    assert [(g["group"], g["requests"]) for g in page["groups"]] == [("acme", 1), ("beta", 1)]


async def test_every_call_is_audited_without_secrets(api: Api,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tokenbooth.admin")
    _, created = await api("POST", "/v1/keys", body={"org": "acme"})
    await api("GET", "/v1/keys", token="wrong")
    await api("POST", f"/v1/keys/{created['id']}/revoke", token=READER)
    # A leaked key revoked by its secret, not its id: a 404 saying so, and the audit line
    # names the secret by its listed prefix only.
    status, err = await api("POST", f"/v1/keys/{created['key']}/revoke")
    assert status == 404 and "a key's secret, not its id" in err["error"]["message"]
    assert created["key"] not in err["error"]["message"]
    await api("GET", f"/v1/orgs/{created['key']}")
    lines = [orjson.loads(JsonFormatter().format(r)) for r in caplog.records
             if r.name == "tokenbooth.admin"]
    listed = created["key"][:10] + "…"
    assert [(x["admin"], x["action"], x.get("key_id") or x.get("org"), x["status"])
            for x in lines] == [
        ("ops", "create_key", created["id"], 201), (None, "list_keys", None, 401),
        ("viewer", "revoke_key", created["id"], 403), ("ops", "revoke_key", listed, 404),
        ("ops", "get_org", listed, 400)]  # (a secret given as an org: refused)
    text = caplog.text + repr(lines)
    for secret in (created["key"], ADMIN, READER):
        assert secret not in text


# -- the CLI's client (--admin-url) -----------------------------------------------------


async def test_remote_client_does_what_the_commands_do(api: Api) -> None:
    from authz.cli import remote

    base = str(api.client.make_url("")).rstrip("/")
    client = remote.AdminClient(base, ADMIN)

    def run() -> None:
        created = remote.create_key(client, {"org": "acme", "rpm": 3, "models": ["demo"]})
        assert created["key"].startswith("sk-tb-")
        assert created["id"] in {k["id"] for k in remote.list_keys(client, "acme")}
        upd = remote.update_key(client, created["id"], {"rpm": None, "budget_usd": 1})
        assert upd["rpm"] is None and upd["budget_usd"] == "1"
        assert remote.show_key(client, created["id"])["rpm"] is None
        assert remote.revoke_key(client, created["id"])["status"] == "revoked"
        with pytest.raises(LookupError, match="no key"):
            remote.show_key(client, "nope")
        with pytest.raises(remote.RemoteError, match="403"):
            remote.revoke_key(remote.AdminClient(base, READER), "k-x")
        out = remote.usage(client, "acme", None, None)
        assert len(out["records"]) == 4 and out["totals"]["requests"] == 4

    await asyncio.to_thread(run)


# -- streamed usage ---------------------------------------------------------------------


async def test_usage_streamed_one_record_a_line(api: Api) -> None:
    """From the real readers (the JSON-lines file; the Redis stream): the same records
    and totals as the paged answer, deduplicated, the totals last."""
    _, paged = await api("GET", "/v1/usage?org=acme&group_by=org")
    for path, headers in (("/v1/usage?org=acme&group_by=org&stream=true", None),
                          ("/v1/usage?org=acme&group_by=org", {"Accept": NDJSON})):
        _, lines = await api.lines(path, headers)
        *records, end = lines
        assert [r["request_id"] for r in records] == ["r0", "r1", "r2", "r3"]
        assert records == paged["data"]
        assert end == {"object": "usage.totals", "totals": paged["totals"],
                       "groups": paged["groups"]}
    _, lines = await api.lines("/v1/usage?stream=true&key=k-main&since=2026-01-03T00:00:00Z")
    assert [r.get("request_id") for r in lines] == ["r3", "r5", None]
    assert lines[-1]["totals"]["cost_usd"] == "0.025" and lines[-1]["groups"] is None


@pytest.mark.parametrize("param", ["limit", "after"])
async def test_streamed_usage_has_no_paging(api: Api, param: str) -> None:
    status, out = await api("GET", f"/v1/usage?stream=true&{param}=5")
    assert status == 400 and out["error"]["param"] == param


def _source(*parts: Any) -> Any:
    """A usage_stream: records, awaitables to wait on, exceptions to raise."""
    async def records(_: Config) -> AsyncIterator[dict[str, Any]]:
        for part in parts:
            if isinstance(part, Exception):
                raise part
            if isinstance(part, dict):
                yield part
            else:
                await part
    return records


async def test_streamed_usage_waits_its_turn(ctx: AdminContext, api: Api) -> None:
    """Six streams at once held the event loop (ext_authz's and ext_proc's answers
    with it) half a second at a time: a stream takes a place of the streams' own, and
    turns the loop between batches of records (admin review). Streams that hold every
    place (readers that stopped reading, retest) leave the pages theirs."""
    ctx.usage_stream = _source(*[{**RECORDS[0], "request_id": f"r{i}"} for i in range(450)])
    taken = [await ctx.streams.acquire() for _ in range(2)]
    task = asyncio.create_task(api.lines("/v1/usage?stream=true"))
    await asyncio.sleep(0.3)
    assert not task.done()  # waiting for a place
    status, _ = await api("GET", "/v1/usage?limit=1")
    assert status == 200  # a page is not
    for _ in taken:
        ctx.streams.release()
    _, lines = await asyncio.wait_for(task, 10)
    assert len(lines) == 451


async def test_streamed_usage_deduplicates_as_it_goes(ctx: AdminContext, api: Api) -> None:
    lost = {**RECORDS[2], "request_id": "r9", "status": "lost", "cost_usd": "1"}
    late = {**RECORDS[2], "request_id": "r9"}
    never = {**RECORDS[3], "request_id": "r8", "status": "lost"}
    damaged = {"request_id": "r7", "org": "acme"}
    ctx.usage_stream = _source(RECORDS[0], lost, never, RECORDS[0], damaged, late)
    _, lines = await api.lines("/v1/usage?stream=true")
    assert [(r.get("request_id"), r.get("status")) for r in lines] == [
        ("r0", 200), ("r9", 200), ("r8", "lost"), (None, None)]
    assert lines[-1]["totals"]["requests"] == 3
    assert lines[-1]["totals"]["cost_usd"] == "0.0375"


async def test_streamed_usage_starts_before_every_record_is_read(ctx: AdminContext,
                                                                 api: Api) -> None:
    gate = asyncio.Event()
    ctx.usage_stream = _source(RECORDS[0], gate.wait(), *RECORDS[1:])
    resp = await api.client.get("/v1/usage?stream=true",
                                headers={"Authorization": f"Bearer {ADMIN}"})
    first = await asyncio.wait_for(resp.content.readline(), 5)
    assert orjson.loads(first)["request_id"] == "r0"  # the rest is not read yet
    gate.set()
    rest = (await resp.read()).splitlines()
    assert len(rest) == len(RECORDS)  # r1..r5 and the totals


async def test_streamed_usage_when_the_store_fails(ctx: AdminContext, api: Api) -> None:
    ctx.usage_stream = _source(RedisError("down"))
    status, out = await api("GET", "/v1/usage?stream=true")  # before the answer: a 503
    assert status == 503 and out["error"]["code"] == "service_unavailable"
    resp = await api.client.get("/v1/usage?stream=true",
                                headers={"Authorization": f"Bearer {ADMIN}"})
    assert (resp.status, resp.headers.get("retry-after")) == (503, "1")  # SDKs wait it
    ctx.usage_stream = _source(RECORDS[0], RedisError("down"))
    _, lines = await api.lines("/v1/usage?stream=true")  # after: the last line says so
    assert lines[0]["request_id"] == "r0"
    assert lines[-1]["error"]["code"] == "service_unavailable" and len(lines) == 2
    if ctx.config().state_is_redis:  # a page reads the same stream, from a worker thread
        status, out = await api("GET", "/v1/usage")
        assert (status, out["error"]["code"]) == (503, "service_unavailable")


# -- unknown paths and methods ----------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "status", "code", "allow"), [
    ("GET", "/v1/nope", 404, "not_found", None),
    ("GET", "/", 404, "not_found", None),
    ("DELETE", "/v1/keys", 405, "method_not_allowed", "GET, POST"),
    ("POST", "/v1/usage", 405, "method_not_allowed", "GET"),
    ("PUT", "/v1/keys/k-x", 405, "method_not_allowed", "GET, PATCH"),
])
async def test_unknown_paths_and_methods_answer_json(api: Api, method: str, path: str,
                                                     status: int, code: str,
                                                     allow: str | None) -> None:
    resp = await api.client.request(method, path,
                                    headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status == status and resp.content_type == "application/json"
    body = orjson.loads(await resp.read())
    api.check({"$ref": "#/components/schemas/ErrorBody"}, body)
    assert body["error"]["code"] == code
    assert resp.headers.get("allow") == allow


async def test_a_body_too_large_answers_json(api: Api) -> None:
    resp = await api.client.post("/v1/keys", data=b"x" * (128 << 10),
                                 headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status == 413 and resp.content_type == "application/json"
    assert orjson.loads(await resp.read())["error"]["code"] == "request_too_large"


async def test_a_usage_page_is_computed_off_the_event_loop(
    ctx: AdminContext, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Validating and summing every record is seconds of CPU for a large file: it runs in
    a worker thread, so the loop (and every ext_proc answer on it) is not held up."""
    threads: list[threading.Thread] = []
    real = admin_api._page

    def page(records: Records, q: UsageQuery) -> Any:
        threads.append(threading.current_thread())
        return real(records, q)

    monkeypatch.setattr(admin_api, "_page", page)
    out = await admin_api.usage(ctx, admin_api.Call(params={}, query=UsageQuery()))
    assert out.totals.requests == len(RECORDS)  # type: ignore[union-attr]
    assert threads and threads[0] is not threading.main_thread()


def test_the_tokens_in_force_follow_the_config(tmp_path: Path) -> None:
    """A reload that removes a token (a leaked one) revokes it at once; one that adds a
    token lets it in. The environment's token stays."""
    path = write_policy(tmp_path, "http://127.0.0.1:8000",
                        admin={"tokens": [t.model_dump() for t in TOKENS]})
    rt = Runtime.from_file(path)
    tokens = CurrentAdminTokens(lambda: rt.snapshot.config, ENV)
    assert tokens.caller(f"Bearer {ADMIN}") == Caller("ops", "admin")
    assert tokens.caller(f"Bearer {READER}") == Caller("viewer", "read")
    data = yaml.safe_load(path.read_text())
    data["admin"]["tokens"] = [TOKENS[1].model_dump()]
    path.write_text(yaml.safe_dump(data))
    rt._stamp = ()  # as if the file had moved on
    assert rt.reload_if_changed()
    assert tokens.caller(f"Bearer {ADMIN}") is None
    assert tokens.caller(f"Bearer {READER}") == Caller("viewer", "read")
    assert tokens.caller(f"Bearer {ENV}") == Caller("env", "admin")


def test_a_clients_key_is_never_an_admins_token(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Admin retest: a keyring key's secret configured as an admin token (only config
    keys were compared), a reload adding a config key whose secret is the environment's
    token, and the environment's token raising a config `read` token of the same secret
    to `admin`: each authenticated as an admin."""
    stored_key = "sk-tb-" + "k" * 43  # what `keys create` makes
    path = write_policy(tmp_path, "http://127.0.0.1:8000", admin={"tokens": [
        *[t.model_dump() for t in TOKENS],
        {"name": "portal", "sha256": fingerprint(stored_key), "role": "admin"}]})
    rt = Runtime.from_file(path)
    tokens = CurrentAdminTokens(lambda: rt.snapshot.config, ENV)
    assert tokens.caller(f"Bearer {stored_key}") is None
    assert tokens.caller(f"Bearer {ENV}") == Caller("env", "admin")
    data = yaml.safe_load(path.read_text())
    data["keys"].append({"id": "k-env", "org": "acme", "sha256": fingerprint(ENV)})
    path.write_text(yaml.safe_dump(data))
    rt._stamp = ()
    assert rt.reload_if_changed()
    assert tokens.caller(f"Bearer {ENV}") is None
    assert "not accepted as an admin token" in caplog.text
    same = AdminTokens(TOKENS, READER)  # the env token is the viewer's secret
    assert same.caller(f"Bearer {READER}") == Caller("viewer", "read") and same.env_refused


async def test_the_orgs_in_force_are_the_stored_over_the_configs(tmp_path: Path) -> None:
    cfg = parse_config(policy_dict("http://127.0.0.1:8000", orgs={
        "acme": {"budget_usd": "5"}, "beta": {"rpm": 3}}))
    cache = OrgLimitsCache(FileOrgStore(tmp_path))
    await cache.put("acme", parse_config(policy_dict(
        "http://127.0.0.1:8000", orgs={"x": {"budget_usd": "9"}})).orgs["x"])
    try:
        got = cache.in_force(cfg)
        assert (got["acme"].budget_usd, got["beta"].rpm) == (9, 3)
    finally:
        await cache.close()


async def test_a_usage_page_holds_the_page_not_every_record(ctx: AdminContext) -> None:
    """The embedded log or the Redis stream (a week of records by default) is read once
    per page, keeping only the page: a page over 50,000 records stays far below what
    holding them takes (~4 KiB each)."""
    cfg = ctx.config()
    base = RECORDS[0]
    bulk = [orjson.dumps({**base, "request_id": f"bulk-{i}", "org": "bulk"})
            for i in range(50_000)]
    if cfg.state_is_redis:
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(cfg.state)
        async with r.pipeline(transaction=False) as pipe:
            for data in bulk:
                pipe.xadd(USAGE_STREAM, {"data": data})
            await pipe.execute()
        await r.aclose()
    else:
        with (cfg.data_dir / USAGE_FILE).open("ab") as f:
            f.write(b"".join(line + b"\n" for line in bulk))
    del bulk
    tracemalloc.start()
    try:
        out = await admin_api.usage(ctx, admin_api.Call(
            params={}, query=UsageQuery(org="bulk", limit=5, after="bulk-9")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(out, admin_api.UsagePage)
    assert [r.request_id for r in out.data] == [f"bulk-{i}" for i in range(10, 15)]
    assert out.has_more and out.totals.requests == 50_000
    assert out.totals.cost_usd == format((Decimal(base["cost_usd"]) * 50_000).normalize(), "f")
    assert peak < 32 << 20, f"peak {peak >> 20} MiB"


@pytest.mark.parametrize("cost", ["abc", "NaN", "Infinity", "", "1E+999999999"])
async def test_a_damaged_cost_is_skipped_not_a_500(ctx: AdminContext, api: Api,
                                                   cost: str) -> None:
    """A record whose cost_usd is not a number (a hand-edited log) is left out, as any
    damaged record, in pages and streams alike (it was an unhandled error: a bare 500)."""
    damaged = {**RECORDS[0], "request_id": "r-damaged", "cost_usd": cost}
    cfg = ctx.config()
    with (cfg.data_dir / USAGE_FILE).open("ab") as f:
        f.write(orjson.dumps(damaged, option=orjson.OPT_APPEND_NEWLINE))
    if cfg.state_is_redis:
        ctx.usage = _with(damaged)
        ctx.usage_stream = _source(*RECORDS, damaged)
    status, page = await api("GET", "/v1/usage?limit=1000")
    assert status == 200, page
    assert "r-damaged" not in {r["request_id"] for r in page["data"]}
    want = (Decimal("0.0125") * len(RECORDS)).normalize()
    assert page["totals"]["cost_usd"] == format(want, "f")
    _, lines = await api.lines("/v1/usage?stream=true")
    assert "r-damaged" not in {x.get("request_id") for x in lines}
    assert lines[-1]["totals"] == page["totals"]


def _with(extra: dict[str, Any]) -> Any:
    async def usage(_: Config) -> Records:
        return [*RECORDS, extra]
    return usage


async def test_an_unexpected_failure_is_an_openai_shaped_500(
        ctx: AdminContext, api: Api, caplog: pytest.LogCaptureFixture) -> None:
    """A failure no endpoint expects (a bug) is a JSON 500 with its trace in the log,
    not aiohttp's text/plain one; in a streamed answer, its last line says so."""
    async def broken(_: Config) -> Records:
        raise RuntimeError("boom")

    ctx.usage = broken
    status, out = await api("GET", "/v1/usage")
    assert (status, out["error"]["code"], out["error"]["type"]) == (
        500, "internal_error", "server_error")
    assert "boom" not in out["error"]["message"]
    assert any(r.levelname == "ERROR" and r.exc_info for r in caplog.records)
    ctx.usage_stream = _source(RECORDS[0], RuntimeError("boom"))
    _, lines = await api.lines("/v1/usage?stream=true")
    assert lines[0]["request_id"] == RECORDS[0]["request_id"]
    assert lines[-1]["error"]["code"] == "internal_error"
