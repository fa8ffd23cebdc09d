"""ext_authz Check over a real gRPC socket with xds-protos messages."""

from __future__ import annotations

import json
import logging

import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.grpc_harness import Running
from tests.helpers import (
    EXPIRED_SECRET,
    LIMITED_SECRET,
    READ_ONLY_SECRET,
    REVOKED_SECRET,
    SECRET,
)


def check_request(method: str, path: str, headers: dict[str, str]) -> object:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = method
    http.path = path
    for k, v in headers.items():
        http.headers[k] = v
    return req


async def check(running: Running, method: str, path: str, **headers: str) -> object:
    stub = external_auth_pb2_grpc.AuthorizationStub(running.channel)
    hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
    return await stub.Check(check_request(method, path, hdrs))


def denial(resp: object) -> tuple[int, dict[str, object], dict[str, str]]:
    d = resp.denied_response  # type: ignore[attr-defined]
    headers = {h.header.key: h.header.value for h in d.headers}
    return d.status.code, json.loads(d.body), headers


async def test_valid_bearer_key_is_allowed_and_key_headers_removed(running: Running) -> None:
    resp = await check(running, "POST", "/v1/chat/completions",
                       authorization=f"Bearer {SECRET}", x_api_key="also-here")
    assert resp.status.code == 0  # type: ignore[attr-defined]
    ok = resp.ok_response  # type: ignore[attr-defined]
    set_headers = {h.header.key: h.header.value for h in ok.headers}
    assert set_headers == {"x-tokenbooth-org": "acme", "x-tokenbooth-key-id": "k-main"}
    assert set(ok.headers_to_remove) == {"authorization", "x-api-key"}
    md = resp.dynamic_metadata  # type: ignore[attr-defined]
    assert dict(md) == {"key_id": "k-main", "org": "acme", "models": [], "rpm": "",
                        "tpm": "", "max_concurrent": "", "budget_nano": "",
                        "budget_period": "month"}


async def test_x_api_key_is_accepted(running: Running) -> None:
    resp = await check(running, "GET", "/v1/models", x_api_key=SECRET)
    assert resp.status.code == 0  # type: ignore[attr-defined]


async def test_spoofed_internal_headers_are_removed(running: Running) -> None:
    resp = await check(
        running, "POST", "/v1/completions", authorization=f"Bearer {SECRET}",
        x_tokenbooth_org="evil", x_tokenbooth_cluster="backend_x", x_tokenbooth_whatever="1",
    )
    ok = resp.ok_response  # type: ignore[attr-defined]
    removed = set(ok.headers_to_remove)
    assert {"x-tokenbooth-cluster", "x-tokenbooth-whatever", "authorization"} <= removed
    # The trusted values overwrite the spoofed ones instead of being removed.
    set_headers = {h.header.key: h.header.value for h in ok.headers}
    assert set_headers["x-tokenbooth-org"] == "acme"
    assert all(h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD for h in ok.headers)


async def test_missing_unknown_revoked_expired_keys_get_distinct_401s(running: Running) -> None:
    cases = {
        None: "No API key provided",
        "sk-tb-nope": "Incorrect API key",
        REVOKED_SECRET: "revoked",
        EXPIRED_SECRET: "expired",
    }
    for secret, phrase in cases.items():
        headers = {"authorization": f"Bearer {secret}"} if secret else {}
        resp = await check(running, "POST", "/v1/chat/completions", **headers)
        status, body, hdrs = denial(resp)
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
        assert phrase in body["error"]["message"]
        assert hdrs["content-type"] == "application/json"
        # The secret never comes back in an error.
        if secret:
            assert secret not in json.dumps(body)


async def test_scope_is_checked_per_endpoint(running: Running) -> None:
    resp = await check(running, "GET", "/v1/models", authorization=f"Bearer {READ_ONLY_SECRET}")
    assert resp.status.code == 0  # type: ignore[attr-defined]
    resp = await check(running, "POST", "/v1/chat/completions",
                       authorization=f"Bearer {READ_ONLY_SECRET}")
    status, body, _ = denial(resp)
    assert (status, body["error"]["code"]) == (403, "insufficient_scope")


async def test_unknown_path_is_404_and_wrong_method_405(running: Running) -> None:
    status, body, _ = denial(
        await check(running, "POST", "/v1/nope", authorization=f"Bearer {SECRET}"))
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body, headers = denial(
        await check(running, "GET", "/v1/chat/completions", authorization=f"Bearer {SECRET}"))
    assert (status, body["error"]["type"]) == (405, "invalid_request_error")
    assert headers["allow"] == "POST"  # RFC 9110: a 405 lists what is allowed
    status, _, headers = denial(
        await check(running, "DELETE", "/v1/models/demo", authorization=f"Bearer {SECRET}"))
    assert (status, headers["allow"]) == (405, "GET, HEAD")


async def test_a_404_or_405_never_echoes_the_query(running: Running) -> None:
    """A client may put its key in the query (`?api-key=…`): the messages name the path
    alone (the SDKs put them in exception text, which applications log)."""
    for method, path, status in (("GET", "/v1/files", 404), ("DELETE", "/v1/models/demo", 405),
                                 ("PUT", "/v1/chat/completions", 405)):
        got, body, _ = denial(await check(running, method, f"{path}?api-key={SECRET}&x=1",
                                          authorization=f"Bearer {SECRET}"))
        assert got == status
        assert SECRET not in body["error"]["message"] and "?" not in body["error"]["message"]
        assert path in body["error"]["message"]


async def test_query_string_does_not_change_the_endpoint(running: Running) -> None:
    resp = await check(running, "GET", "/v1/models?x=1",
                       authorization=f"Bearer {LIMITED_SECRET}")
    assert resp.status.code == 0  # type: ignore[attr-defined]


async def test_a_compressed_request_body_is_a_415(running: Running) -> None:
    """The services read, bound and rewrite plain bodies: a gzipped one is refused, not
    parsed as garbage (a 400) or, labelled gzip but plain, forwarded still labelled."""
    for enc in ("gzip", "br", "GZIP", "identity, gzip"):
        status, body, _ = denial(await check(running, "POST", "/v1/chat/completions",
                                             authorization=f"Bearer {SECRET}",
                                             content_encoding=enc))
        assert (status, body["error"]["code"]) == (415, "unsupported_media_type")
        assert body["error"]["type"] == "invalid_request_error"
    for enc in ("identity", "", "identity, identity", " IDENTITY "):
        resp = await check(running, "POST", "/v1/chat/completions",
                           authorization=f"Bearer {SECRET}", content_encoding=enc)
        assert resp.status.code == 0  # type: ignore[attr-defined]
    # A GET has no body to read.
    resp = await check(running, "GET", "/v1/models", authorization=f"Bearer {SECRET}",
                       content_encoding="gzip")
    assert resp.status.code == 0  # type: ignore[attr-defined]


async def test_each_refusal_writes_a_log_line_without_the_secret(
        running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """Refused requests wrote no tokenbooth log line (only Envoy's access log had them):
    one line each, with the request id, who asked (when known) and the status and code;
    never the key, nor the message (it can quote what the client sent)."""
    caplog.set_level(logging.INFO, logger="tokenbooth.ext_authz")
    await check(running, "POST", "/v1/chat/completions", authorization="Bearer sk-tb-nope",
                x_request_id="r-unknown")
    await check(running, "POST", "/v1/chat/completions",
                authorization=f"Bearer {READ_ONLY_SECRET}", x_request_id="r-scope")
    await check(running, "POST", "/v1/chat/completions", authorization=f"Bearer {SECRET}",
                x_request_id="r-allowed")
    lines = [r for r in caplog.records if r.name == "tokenbooth.ext_authz"]
    assert [(r.getMessage(), r.request_id, r.status, r.code)  # type: ignore[attr-defined]
            for r in lines] == [
        ("request refused: 401 invalid_api_key", "r-unknown", 401, "invalid_api_key"),
        ("request refused: 403 insufficient_scope", "r-scope", 403, "insufficient_scope")]
    unknown, scope = lines
    assert (unknown.org, unknown.key_id) == ("", "")  # type: ignore[attr-defined]
    assert scope.key_id != ""  # type: ignore[attr-defined]
    text = caplog.text + "".join(str(vars(r)) for r in lines)
    assert "sk-tb-nope" not in text and READ_ONLY_SECRET not in text
