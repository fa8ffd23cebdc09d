"""`--admin-url`'s client against servers that are not the admin API: a redirect is
refused and the token goes nowhere else, a token with a line break is refused without
being shown, a stranger's 404 says so."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from authz.cli.main import main
from authz.cli.remote import AdminClient, RemoteError
from policy.admin_schema import ADMIN_API_HEADER

TOKEN = "adm-remote-test-token-7"
# The headers of the admin API's JSON answers.
ADMIN_JSON = {"content-type": "application/json", ADMIN_API_HEADER: "1"}


class _Server:
    """A plain HTTP server answering every request as `answer` says; the requests'
    Authorization headers are kept."""

    def __init__(self, answer: tuple[int, dict[str, str], bytes]) -> None:
        self.seen: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                outer.seen.append(self.headers.get("authorization"))
                status, headers, body = answer
                self.send_response(status)
                for k, v in {**headers, "content-length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def catcher() -> Iterator[_Server]:
    s = _Server((200, {"content-type": "application/json"},
                 b'{"object":"list","data":[],"has_more":false,"last_id":null}'))
    yield s
    s.stop()


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_is_refused_and_the_token_goes_nowhere_else(
        catcher: _Server, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    redirecting = _Server((code, {"location": f"{catcher.url}/stolen"}, b""))
    try:
        rc = main(["keys", "list", "--admin-url", redirecting.url],
                  env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        redirecting.stop()
    err = capsys.readouterr().err
    assert rc == 2
    assert catcher.seen == []  # the token never reached the other host
    assert err == (f"tokenbooth: error: {redirecting.url}: answered {code}, a redirect to "
                   f"{catcher.url}: not followed (it would carry the admin token there); "
                   "point --admin-url at the gateway's admin.listen\n")
    assert TOKEN not in err


@pytest.mark.parametrize("token", [f"{TOKEN}\r", f"{TOKEN}\r\n", f" {TOKEN}\n"])
def test_a_token_files_line_break_is_dropped(catcher: _Server, token: str) -> None:
    AdminClient(catcher.url, token).call("GET", "/v1/keys", fields=("data",))
    assert catcher.seen == [f"Bearer {TOKEN}"]


def test_a_blank_token_is_no_token() -> None:
    with pytest.raises(RemoteError, match="needs an admin token"):
        AdminClient("http://127.0.0.1:1", " \r\n")


@pytest.mark.parametrize("token", ["adm-a\rb", "adm a", "adm-\x00", "adm-é"])
def test_a_token_with_odd_characters_inside_is_refused_unseen(
        token: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RemoteError) as e:
        AdminClient("http://127.0.0.1:1", token)
    assert token not in str(e.value) and "adm" not in str(e.value)
    rc = main(["keys", "list", "--admin-url", "http://127.0.0.1:1"],
              env={"TOKENBOOTH_ADMIN_TOKEN": token})
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "adm" not in err


def test_a_stranger_answering_404_is_named_as_such(capsys: pytest.CaptureFixture[str]) -> None:
    stranger = _Server((404, {"content-type": "text/html"}, b"<h1>Not Found</h1>"))
    try:
        rc = main(["keys", "show", "key_x", "--admin-url", stranger.url],
                  env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        stranger.stop()
    assert rc == 2
    assert capsys.readouterr().err == (
        f"tokenbooth: error: {stranger.url}: 404 Not Found, not an answer of tokenbooth's "
        "admin API (is --admin-url the gateway's admin.listen?)\n")


def test_the_gateways_own_listener_is_named_as_such(
        capsys: pytest.CaptureFixture[str]) -> None:
    """CLI tester: `--admin-url` at the gateway's public port got its OpenAI-shaped 401,
    read as the admin API's refusal: "Incorrect API key provided" (exit 2), as if the
    admin token were wrong."""
    gateway = _Server((401, {"content-type": "application/json"},
                       b'{"error": {"message": "Incorrect API key provided.", '
                       b'"type": "invalid_request_error", "code": "invalid_api_key"}}'))
    try:
        rc = main(["keys", "list", "--admin-url", gateway.url],
                  env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        gateway.stop()
    assert rc == 2
    assert capsys.readouterr().err == (
        f"tokenbooth: error: {gateway.url}: 401 Unauthorized, not an answer of tokenbooth's "
        "admin API (is --admin-url the gateway's admin.listen?)\n")


@pytest.mark.parametrize("body", [b"{}", b"[]", b'{"data": 5, "has_more": false}'])
@pytest.mark.parametrize("command", [["keys", "list"], ["keys", "revoke", "key_x"],
                                     ["keys", "show", "key_x"],
                                     ["keys", "create", "--org", "o"]])
def test_a_stranger_answering_200_is_named_as_such(
        capsys: pytest.CaptureFixture[str], body: bytes, command: list[str]) -> None:
    """A 200 that is not the admin API's answer printed a missing field's name alone
    (`tokenbooth: error: 'data'`)."""
    stranger = _Server((200, {"content-type": "application/json"}, body))
    try:
        rc = main([*command, "--admin-url", stranger.url],
                  env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        stranger.stop()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "not an answer of tokenbooth's admin API" in err, err


def test_a_password_in_the_admin_url_is_refused_unseen(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["keys", "list", "--admin-url", "http://admin:Passw0rdInUrl@127.0.0.1:1"],
              env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    err = capsys.readouterr().err
    assert rc == 2 and "no user or password" in err and "Passw0rdInUrl" not in err, err


def test_no_proxy_sees_the_token(catcher: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """`http_proxy` covers loopback unless `no_proxy` names it: the token went to the
    proxy in clear (admin review). The admin API is called directly, whatever it says."""
    proxy = _Server((502, {}, b""))
    try:
        for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            monkeypatch.setenv(var, proxy.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        AdminClient(catcher.url, TOKEN).call("GET", "/v1/keys", fields=("data",))
    finally:
        proxy.stop()
    assert proxy.seen == [] and catcher.seen == [f"Bearer {TOKEN}"]


def test_plain_http_to_another_host_is_warned_of(capsys: pytest.CaptureFixture[str]) -> None:
    AdminClient("http://192.0.2.2:9092", TOKEN)
    err = capsys.readouterr().err
    assert "plain http to another host" in err and TOKEN not in err
    for quiet in ("http://127.0.0.1:9092", "http://localhost:9092", "http://[::1]:9092",
                  "https://admin.example.com", "http://[::ffff:127.0.0.1]:9092",
                  "http://0.0.0.0:9092"):
        AdminClient(quiet, TOKEN)
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize("url", ["http://127.0.0.1:9092/?token=SECRETQ",
                                 "http://127.0.0.1:9092#SECRETQ",
                                 "http://127.0.0.1:27184;SECRETQ",
                                 "http://127.0.0.1:99999", "http://127.0.0.1:0"])
def test_an_admin_url_with_a_query_or_a_bad_port_is_refused_unseen(url: str) -> None:
    with pytest.raises(RemoteError) as e:
        AdminClient(url, TOKEN)
    assert "SECRETQ" not in str(e.value) and "--admin-url" in str(e.value)


def test_a_server_that_pages_without_moving_on_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each answer said more and the same `last_id`: asked again forever (admin review)."""
    looping = _Server((200, {"content-type": "application/json"},
                       b'{"object":"list","data":[],"has_more":true,"last_id":"k-1"}'))
    try:
        with pytest.raises(RemoteError, match="does not move on"):
            AdminClient(looping.url, TOKEN).pages("/v1/keys", {})
    finally:
        looping.stop()
    assert len(looping.seen) == 2


def test_a_servers_message_is_shown_printable(capsys: pytest.CaptureFixture[str]) -> None:
    evil = _Server((400, ADMIN_JSON,
                    b'{"error":{"message":"bad\\u001b]0;pwned\\u0007\\u001b[2J\\nforged"}}'))
    try:
        rc = main(["keys", "list", "--admin-url", evil.url],
                  env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        evil.stop()
    err = capsys.readouterr().err
    assert rc == 2 and "\x1b" not in err and "\x07" not in err
    assert err.count("\n") == 1 and "\\x1b]0;pwned" in err


def test_a_page_cycle_is_refused() -> None:
    """`last_id` alternating between two ids: asked forever (retest)."""
    n = {"i": 0}
    bodies = [b'{"object":"list","data":[],"has_more":true,"last_id":"k-a"}',
              b'{"object":"list","data":[],"has_more":true,"last_id":"k-b"}']
    servers = [_Server((200, {"content-type": "application/json"}, b)) for b in bodies]
    try:
        client = AdminClient(servers[0].url, TOKEN)
        real = client.call

        def alternate(*a: Any, **kw: Any) -> Any:
            n["i"] += 1
            client.base = servers[n["i"] % 2].url
            return real(*a, **kw)

        client.call = alternate  # type: ignore[method-assign]
        with pytest.raises(RemoteError, match="does not move on"):
            client.pages("/v1/keys", {})
    finally:
        for s in servers:
            s.stop()
    assert n["i"] == 3


def test_a_keys_secret_given_as_an_id_is_never_sent(catcher: _Server,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    secret = "sk-tb-" + "x" * 40
    for cmd in (["keys", "show", secret], ["keys", "revoke", secret],
                ["keys", "show", f" \t{secret}"],
                ["keys", "update", secret, "--rpm", "5"]):
        rc = main([*cmd, "--admin-url", catcher.url], env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
        err = capsys.readouterr().err
        assert rc == 2 and "a key's secret, not its id" in err and secret not in err
    assert catcher.seen == []


def test_every_field_of_an_answer_is_shown_printable(capsys: pytest.CaptureFixture[str]) -> None:
    """A remote answer's fields reached the terminal raw (retest: `keys list`'s id and
    status, `keys show`'s field names and state lines, `usage`'s columns)."""
    row = {"id": "k-1\x1b]0;pwned\x07", "org": "acme", "name": "", "prefix": "sk-tb-ab",
           "status": "active\n\x1b[2Jforged", "source": "store", "expires_at": None}
    evil = _Server((200, {"content-type": "application/json"}, orjson.dumps(
        {"object": "list", "data": [row], "has_more": False, "last_id": "k-1"})))
    try:
        rc = main(["keys", "list", "--admin-url", evil.url],
                  env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        evil.stop()
    out = capsys.readouterr().out
    assert rc == 0 and "\x1b" not in out and "\x07" not in out and out.count("\n") == 2


def test_an_answer_without_a_field_is_said_so(capsys: pytest.CaptureFixture[str]) -> None:
    """`keys list` of an answer whose rows lack `prefix` ended `tokenbooth: error:
    'prefix'` (admin retest)."""
    row = {"id": "k-1", "org": "acme", "name": "", "status": "active", "source": "store",
           "expires_at": None}
    odd = _Server((200, {"content-type": "application/json"}, orjson.dumps(
        {"object": "list", "data": [row], "has_more": False, "last_id": "k-1"})))
    try:
        rc = main(["keys", "list", "--admin-url", odd.url],
                  env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        odd.stop()
    err = capsys.readouterr().err
    assert rc == 1 and "without its 'prefix' field" in err


@pytest.mark.parametrize(("answer", "rc"), [
    ((429, ADMIN_JSON,
      b'{"error": {"message": "too many failed tokens", "code": "rate_limit_exceeded"}}'), 1),
    ((503, ADMIN_JSON, b'{"error": {"message": "busy", "code": "service_unavailable"}}'), 1),
    ((400, ADMIN_JSON, b'{"error": {"message": "bad field", "code": "invalid_request"}}'), 2)])
def test_a_failure_exits_1_a_refusal_of_what_was_asked_2(
        answer: tuple[int, dict[str, str], bytes], rc: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    """New-user tester: an admin API that could not be reached, or its lock-out, exited 2
    (bad input, by the README's exit codes), where a failure is 1."""
    server = _Server(answer)
    try:
        got = main(["keys", "list", "--admin-url", server.url],
                   env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN})
    finally:
        server.stop()
    assert got == rc and capsys.readouterr().err.count("\n") == 1
    closed = _Server(answer)
    closed.stop()  # nothing listens there now
    assert main(["keys", "list", "--admin-url", closed.url],
                env={"TOKENBOOTH_ADMIN_TOKEN": TOKEN}) == 1
