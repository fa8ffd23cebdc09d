"""Admin API authentication: bearer tokens checked by SHA-256 fingerprint, each with a
role, and a per-address limit on failed attempts."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from policy.admin_schema import Role
from policy.config import AdminToken, Config
from policy.keyrecord import KEY_PREFIX
from policy.keys import extract_secret, fingerprint

log = logging.getLogger("tokenbooth.admin")

# The name audit lines give the token of $TOKENBOOTH_ADMIN_TOKEN.
ENV_TOKEN_NAME = "env"  # noqa: S105 - a name, not a token
FAILURES_ALLOWED = 10
FAILURE_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Caller:
    name: str
    role: Role

    def may(self, needed: Role) -> bool:
        return needed == "read" or self.role == "admin"


class AdminTokens:
    """fingerprint -> the caller it authenticates; the secrets are never kept. A client's
    key is never an admin's token (admin retest): no `sk-tb-` secret authenticates, and
    the environment's token neither does when it is a config key's secret (`keys`), nor
    raises a config token of the same secret to `admin`."""

    def __init__(self, tokens: Iterable[AdminToken], env_token: str | None = None,
                 keys: Iterable[str] = ()) -> None:
        self._by_fp = {t.sha256: Caller(t.name, t.role) for t in tokens}
        self.env_refused = False
        if env_token:
            fp = fingerprint(env_token)
            self.env_refused = fp in set(keys) or fp in self._by_fp
            if not self.env_refused:
                self._by_fp[fp] = Caller(ENV_TOKEN_NAME, "admin")

    def __bool__(self) -> bool:
        return bool(self._by_fp)

    def caller(self, authorization: str | None) -> Caller | None:
        """Who an `Authorization: Bearer <token>` header is, or None."""
        token = extract_secret(authorization, None)
        if token is None or token.startswith(KEY_PREFIX):
            return None
        return self._by_fp.get(fingerprint(token))


class CurrentAdminTokens:
    """The admin tokens of the config in force: a reload that removes a token (a leaked
    one, say) revokes it at once, and one that adds a token lets it in."""

    def __init__(self, config: Callable[[], Config], env_token: str | None = None) -> None:
        self._config, self._env = config, env_token
        self._seen: Config | None = None
        self._tokens = AdminTokens((), env_token)

    def _now(self) -> AdminTokens:
        cfg = self._config()
        if cfg is not self._seen:
            self._seen, self._tokens = cfg, AdminTokens(cfg.admin.tokens, self._env,
                                                        (k.sha256 for k in cfg.keys))
            if self._tokens.env_refused:
                log.error("the admin token of $TOKENBOOTH_ADMIN_TOKEN is the secret of a key "
                          "or of an admin token in the config: not accepted as an admin "
                          "token until they differ")
        return self._tokens

    def __bool__(self) -> bool:
        return bool(self._now())

    def caller(self, authorization: str | None) -> Caller | None:
        return self._now().caller(authorization)


class FailureLimiter:
    """At most `allowed` failed authentications per client address in a sliding window;
    the table is bounded (oldest addresses dropped first)."""

    def __init__(self, allowed: int = FAILURES_ALLOWED, window_s: float = FAILURE_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000
                 ) -> None:
        self._allowed, self._window, self._clock = allowed, window_s, clock
        self._max = max_clients
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        q = self._fails.get(client, deque())
        cutoff = self._clock() - self._window
        while q and q[0] <= cutoff:
            q.popleft()
        return q

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None if it may now."""
        q = self._recent(client)
        if len(q) < self._allowed:
            return None
        return max(q[0] + self._window - self._clock(), 0.001)

    def failed(self, client: str) -> None:
        q = self._recent(client)
        q.append(self._clock())
        self._fails.pop(client, None)
        self._fails[client] = q  # newest last
        while len(self._fails) > self._max:
            self._fails.pop(next(iter(self._fails)))
