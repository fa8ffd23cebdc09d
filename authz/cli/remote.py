"""`--admin-url URL`: the keys and usage commands acting on a remote gateway through its
admin API (token from $TOKENBOOTH_ADMIN_TOKEN). Each function returns what the local
command prints (the same dictionaries), so the output is the same."""

from __future__ import annotations

import http.client
import ipaddress
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from authz.runtime.cells import printable
from authz.runtime.settings import ADMIN_TOKEN_ENV, Settings
from policy.admin_schema import ADMIN_API_HEADER
from policy.config import redacted
from policy.keyrecord import KEY_PREFIX

TIMEOUT_S = 30.0
PAGE = 1000


class RemoteError(ValueError):
    """The admin API refused a call or could not be reached: one line. `exit_code`: 2
    for what was asked (a bad flag or field, a refused token), 1 for a failure (no
    answer, a server error, a lock-out: the README's exit codes)."""

    exit_code = 2


class RemoteFailure(RemoteError):
    """The call was not answered as asked: unreachable, cut short, a 5xx or a 429
    lock-out (another server answering is the URL's fault: a RemoteError)."""

    exit_code = 1


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is refused, never followed: urllib would send the admin token along,
    to another host or over plain http too."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> None:
        where = urllib.parse.urlsplit(newurl)
        raise RemoteError(
            f"{_origin(req.full_url)}: answered {code}, a redirect to "
            f"{where.scheme}://{where.netloc}: not followed (it would carry the admin "
            "token there); point --admin-url at the gateway's admin.listen")


# No proxy from the environment either (`http_proxy` covers loopback unless `no_proxy`
# names it): the admin token would go to the proxy in clear (admin review).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)
# What a server's error message may take of a terminal line.
_MESSAGE_CHARS = 500


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class AdminClient:
    def __init__(self, url: str, token: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RemoteError(f"--admin-url: expected http(s)://host:port, got "
                              f"{redacted(url)!r}")
        if "@" in parts.netloc:  # never echoed: what precedes @ may be a password
            raise RemoteError(f"--admin-url: no user or password in the URL (the admin "
                              f"token comes from ${ADMIN_TOKEN_ENV}), got "
                              f"{redacted(url)!r}")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            # (never echoed either: a `?token=` would be)
            raise RemoteError(f"--admin-url: no query or fragment in the URL (the admin "
                              f"token comes from ${ADMIN_TOKEN_ENV})")
        try:
            port = parts.port
        except ValueError:
            port = -1
        if port in (-1, 0) or not parts.hostname:
            raise RemoteError(f"--admin-url: expected http(s)://host[:port], the port a "
                              f"number from 1 to 65535 (host "
                              f"{printable(parts.hostname or '')!r})")
        token = token.strip()  # a token file's line break (\r\n) included
        if not token:
            raise RemoteError(f"--admin-url needs an admin token in ${ADMIN_TOKEN_ENV}")
        if token.startswith(KEY_PREFIX):  # never sent: no key is an admin token
            raise RemoteError(f"${ADMIN_TOKEN_ENV} holds an API key's secret, not an admin "
                              "token")
        if not token.isascii() or not token.isprintable() or " " in token:
            # Never the token itself in the message: it lands in terminals and CI logs.
            raise RemoteError(f"${ADMIN_TOKEN_ENV}: the token has a space, control or "
                              "non-ASCII character inside it; set the token alone")
        self.base, self._token = url.rstrip("/"), token
        if parts.scheme == "http" and not _loopback(parts.hostname):
            print(f"tokenbooth: warning: --admin-url {self.base} is plain http to another "
                  "host: the admin token crosses the network in clear (use https, or "
                  "kubectl port-forward to 127.0.0.1)", file=sys.stderr)

    @classmethod
    def from_settings(cls, url: str, settings: Settings) -> AdminClient:
        if not settings.admin_token:
            raise RemoteError(f"--admin-url needs an admin token in ${ADMIN_TOKEN_ENV}")
        return cls(url, settings.admin_token)

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None,
             query: Mapping[str, object] | None = None, fields: tuple[str, ...] = ("id",),
             ) -> Any:
        """One call; the decoded answer, or RemoteError / LookupError (404) in one line.
        `fields`: what the admin API's answer holds; an object without them came from
        some other server (a 200 `{}`), said in one line, not as a missing field's name."""
        answer = self._exchange(method, path, body, query, lambda r: orjson.loads(r.read()))
        if not isinstance(answer, dict) or any(f not in answer for f in fields):
            raise RemoteError(f"{self.base}: not an answer of tokenbooth's admin API (is "
                              "--admin-url the gateway's admin.listen?)")
        return answer

    def lines(self, path: str, query: Mapping[str, object]) -> list[Any]:
        """A streamed (NDJSON) answer: every line, decoded."""
        return list(self._exchange("GET", path, None, query,
                                   lambda r: [orjson.loads(line) for line in r
                                              if line.strip()]))

    def _exchange(self, method: str, path: str, body: Mapping[str, Any] | None,
                  query: Mapping[str, object] | None, read: Callable[[Any], Any]) -> Any:
        q = {k: str(v) for k, v in (query or {}).items() if v is not None}
        url = self.base + path + ("?" + urllib.parse.urlencode(q) if q else "")
        req = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
            url, method=method, data=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {self._token}",
                     "Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=TIMEOUT_S) as r:
                # Another server's text, shown in a terminal by every command: printable
                # (an escape sequence in a field drove it, a newline forged a line).
                return _printable(read(r))
        except orjson.JSONDecodeError:
            raise RemoteFailure(f"{self.base}: the answer was cut short or is not JSON") from None
        except urllib.error.HTTPError as e:
            message = _message(e.read())
            if not message or e.headers.get(ADMIN_API_HEADER) is None:
                # Not an admin API's error: some other server answered (the gateway's own
                # listener answers OpenAI-shaped errors: its 401 read as a wrong token).
                raise RemoteError(
                    f"{self.base}: {e.code} {printable(str(e.reason))[:200]}, not an answer "
                    "of tokenbooth's admin API (is --admin-url the gateway's admin.listen?)"
                ) from None
            if e.code == 404:
                raise LookupError(message) from None
            kind = RemoteFailure if e.code == 429 or e.code >= 500 else RemoteError
            raise kind(f"{self.base}: {e.code}: {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise RemoteFailure(f"{self.base}: cannot reach the admin API: "
                              f"{printable(str(getattr(e, 'reason', e)))}") from None

    def pages(self, path: str, query: Mapping[str, object]) -> list[dict[str, Any]]:
        """Every item of a paged list, page by page."""
        out: list[dict[str, Any]] = []
        after: str | None = None
        seen: set[str] = set()
        while True:
            page = self.call("GET", path, query={**query, "limit": PAGE, "after": after},
                             fields=("data", "has_more"))
            if not isinstance(page["data"], list):
                raise RemoteError(f"{self.base}: not an answer of tokenbooth's admin API")
            out += page["data"]
            if not page["has_more"]:
                return out
            last = page.get("last_id")
            if not isinstance(last, str) or not last or last in seen:
                # (a page that says more without moving on, or back: asked forever)
                raise RemoteFailure(f"{self.base}: a page that does not move on; not an "
                                  "answer of tokenbooth's admin API")
            seen.add(last)
            after = last


def _printable(value: Any) -> Any:
    """`value` with every string in it (keys too) printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [_printable(v) for v in value]
    if isinstance(value, dict):
        return {printable(str(k)): _printable(v) for k, v in value.items()}
    return value


def _message(raw: bytes) -> str:
    """The admin API's error message, shown printable (a server's escape sequences would
    drive the reader's terminal, a newline forge a line), and cut short."""
    try:
        text = str(orjson.loads(raw)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ""
    shown = printable(text)
    return shown if len(shown) <= _MESSAGE_CHARS else shown[:_MESSAGE_CHARS] + "…"


def _loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified  # (0.0.0.0 reaches this host)


def _jsonable(changes: Mapping[str, Any]) -> dict[str, Any]:
    return orjson.loads(orjson.dumps(dict(changes), default=str))  # type: ignore[no-any-return]


# -- what the commands call -------------------------------------------------------------


def create_key(client: AdminClient, fields: Mapping[str, Any]) -> dict[str, Any]:
    """`keys create`: the new key's record with its secret (`key`), shown once."""
    created: dict[str, Any] = client.call("POST", "/v1/keys", _jsonable(fields),
                                          fields=("id", "key", "org"))
    return created


def list_keys(client: AdminClient, org: str | None) -> list[dict[str, Any]]:
    """`keys list`: the config's keys and the store's, as `_all_keys` gives them."""
    return client.pages("/v1/keys", {"org": org})


def show_key(client: AdminClient, key_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = client.call("GET", f"/v1/keys/{_seg(key_id)}")
    return shown


def update_key(client: AdminClient, key_id: str, changes: Mapping[str, Any]
               ) -> dict[str, Any]:
    """`keys update`: `changes` as `_changes` builds them (None removes a limit)."""
    new: dict[str, Any] = client.call("PATCH", f"/v1/keys/{_seg(key_id)}",
                                      _jsonable(changes))
    return new


def key_state(client: AdminClient, key_id: str) -> dict[str, Any]:
    """`keys show`: the key's and its org's budget and limits now."""
    state: dict[str, Any] = client.call("GET", f"/v1/keys/{_seg(key_id)}/state",
                                        fields=("at", "source", "key", "org"))
    return state


def revoke_key(client: AdminClient, key_id: str) -> dict[str, Any]:
    revoked: dict[str, Any] = client.call("POST", f"/v1/keys/{_seg(key_id)}/revoke")
    return revoked


def usage(client: AdminClient, org: str | None, key: str | None, since: str | None
          ) -> dict[str, Any]:
    """`tokenbooth usage`: {"records": [...], "totals": {...}}, in one streamed answer
    (one snapshot: pages asked one after another could miss records that exporters
    commit out of order between them)."""
    lines = client.lines("/v1/usage", {"org": org, "key": key, "since": since,
                                       "stream": "true"})
    if not lines or not isinstance(lines[-1], dict) or lines[-1].get("object") != "usage.totals":
        raise RemoteFailure(f"{client.base}: the usage answer ended before its totals")
    return {"records": lines[:-1], "totals": lines[-1]["totals"]}


def _seg(value: str) -> str:
    if value.strip().startswith(KEY_PREFIX):
        # A key's secret where its id belongs: never sent (it would be in the URL, and in
        # every proxy's and server's access log on the way).
        raise RemoteError("that is a key's secret, not its id: give the id (`keys list` "
                          "shows each key's id and the prefix of its secret)")
    return urllib.parse.quote(value, safe="")
