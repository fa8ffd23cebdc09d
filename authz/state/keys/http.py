"""Keys validated by an external HTTP service (the seeds' user-org-service protocol).

`POST {base_url}/v1/auth/validate-api-key` with `{"apiKeySecret": ...}`; the service
answers 200 with `{"valid": true, ...key...}` or `{"valid": false, "message": ...}`.

Answers are cached by fingerprint (never by secret, and the secret is kept nowhere):
- a fresh entry (younger than its TTL) is returned without any I/O;
- a positive entry younger than 2 x `positive_ttl_s` is returned at once while one
  background request refreshes it (stale-while-revalidate); older, the caller waits;
- negative entries (unknown keys) are never served stale.
Concurrent misses for one fingerprint share one request. When the service fails, keys
validated within `grace_s` keep working; anything else raises `StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiohttp
import orjson
from yarl import URL

from authz.state.keys.base import StoreUnavailable
from authz.state.keys.cache import AnswerCache, RemoteOptions
from authz.state.tasks import cancel_and_wait
from policy.keyrecord import SCOPES, KeyRecord

log = logging.getLogger("tokenbooth.keys")

PATH = "/v1/auth/validate-api-key"
# KeyRecord.models == () means "every alias", so a restricted key granted no model
# gets this placeholder instead: it matches no configured alias (fail closed).
NO_MODEL = "(none)"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_BODY = 1 << 20
_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


class _Failure(Exception):
    """The service gave no usable answer; the message is safe to log (no secret)."""


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None
    at: float  # clock() of the last successful validation
    failed: bool = False  # the last refresh failed: within grace, serve without waiting


class HttpValidationStore:
    """A read-only `KeyStore` backed by the validation service at `base_url`."""

    def __init__(self, base_url: str, options: RemoteOptions | None = None, *,
                 positive_ttl_s: float = 1.0, negative_ttl_s: float = 1.0) -> None:
        url = URL(base_url.rstrip("/") + PATH)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"validation service URL must be http(s)://host[:port]: {base_url!r}")
        if min(positive_ttl_s, negative_ttl_s) < 0:
            raise ValueError("TTLs must be >= 0")
        options = options or RemoteOptions(timeout_s=1.0)
        self._url = str(url)
        self.url = str(url.with_user(None))  # for messages: no credentials
        self._pos_ttl = positive_ttl_s
        self._neg_ttl = negative_ttl_s
        self._timeout_s = options.timeout_s
        self._grace = options.grace_s
        self._clock = options.clock
        # Unknown keys' answers apart: random keys cannot evict real ones.
        self._cache: AnswerCache[_Entry] = AnswerCache(options.max_entries)
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"HttpValidationStore({self.url!r})"

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )

    async def close(self) -> None:
        await cancel_and_wait(*self._inflight.values())
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def find(self, fingerprint: str, secret: str) -> KeyRecord | None:
        entry = self._cache.get(fingerprint)
        if entry is not None:
            age = self._clock() - entry.at
            record = entry.record
            if record is None:
                if age < self._neg_ttl:
                    return None
            elif age < self._pos_ttl:
                return record
            elif age < 2 * self._pos_ttl or (entry.failed and age < self._grace):
                self._request(fingerprint, secret)  # refresh in the background
                return record
        task = self._request(fingerprint, secret)
        try:
            # shield: a cancelled caller must not cancel the request others share
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise StoreUnavailable(f"key store for {self.url} was closed") from None
            raise

    def _request(self, fp: str, secret: str) -> asyncio.Task[KeyRecord | None]:
        """The in-flight validation for `fp`, started if there is none."""
        task = self._inflight.get(fp)
        if task is None:
            if self._session is None:
                raise RuntimeError("HttpValidationStore.start() was not awaited")
            task = asyncio.create_task(self._validate(fp, secret), name=f"validate-key-{fp[:8]}")
            self._inflight[fp] = task
            task.add_done_callback(partial(self._done, fp))
        return task

    def _done(self, fp: str, task: asyncio.Task[KeyRecord | None]) -> None:
        if self._inflight.get(fp) is task:
            del self._inflight[fp]
        if not task.cancelled():
            task.exception()  # background refreshes: mark the error as seen

    async def _validate(self, fp: str, secret: str) -> KeyRecord | None:
        try:
            record = await self._call(fp, secret)
        except _Failure as exc:
            entry = self._cache.get(fp)
            age = self._clock() - entry.at if entry is not None else math.inf
            if entry is not None and entry.record is not None and age < self._grace:
                log.warning(
                    "key validation via %s failed for key %s…: %s; within grace, "
                    "using the answer from %.0fs ago", self.url, fp[:8], exc, age,
                )
                entry.failed = True
                return entry.record
            log.warning("key validation via %s failed for key %s…: %s", self.url, fp[:8], exc)
            raise StoreUnavailable(f"key validation service {self.url} failed: {exc}") from None
        self._cache.put(fp, _Entry(record, self._clock()), found=record is not None)
        return record

    async def _call(self, fp: str, secret: str) -> KeyRecord | None:
        assert self._session is not None
        body = orjson.dumps({"apiKeySecret": secret})
        try:
            async with asyncio.timeout(self._timeout_s):
                for attempt in (1, 2):
                    try:
                        # No redirects: a 307/308 resends the body, the client's key,
                        # wherever it points (security review).
                        async with self._session.post(self._url, data=body, headers=_HEADERS,
                                                      allow_redirects=False) as r:
                            if r.status != 200:
                                raise _Failure(f"HTTP {r.status}" + (
                                    " (a redirect: not followed; set validation_url to "
                                    "where it points)" if 300 <= r.status < 400 else ""))
                            raw = await _read_capped(r)
                        break
                    except aiohttp.ServerDisconnectedError:
                        if attempt == 2:  # once more: a pooled connection may have gone stale
                            raise
        except TimeoutError:
            raise _Failure(f"no answer within {self._timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from None
        return _decode(raw, fp)


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        buf += chunk
        if len(buf) > _MAX_BODY:
            raise _Failure(f"answer larger than {_MAX_BODY} bytes")
    return bytes(buf)


def _decode(raw: bytes, fp: str) -> KeyRecord | None:
    """The service's answer as a KeyRecord (or None); `_Failure` for anything malformed."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Failure("answer is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("valid"), bool):
        raise _Failure("answer has no boolean 'valid'")
    if not doc["valid"]:
        message = doc.get("message")
        message = message.lower() if isinstance(message, str) else ""
        # The service names no key here; keep "revoked"/"expired" apart for the 401 text.
        if "revoked" in message:
            return KeyRecord(id="unknown", org="unknown", sha256=fp, scopes=(), status="revoked")
        if "expired" in message:
            return KeyRecord(id="unknown", org="unknown", sha256=fp, scopes=(), expires_at=_EPOCH)
        return None
    try:
        return _record(doc, fp)
    except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        raise _Failure("answer does not describe a usable key") from None


def _record(doc: dict[str, Any], fp: str) -> KeyRecord:
    key_id, org = doc.get("apiKeyId"), doc.get("organizationId")
    if not isinstance(key_id, str) or not isinstance(org, str):
        raise ValueError("apiKeyId and organizationId must be strings")
    scopes = _strings(doc.get("scopes"))
    models: tuple[str, ...] = ()
    if doc.get("modelAccessMode") not in (None, "auto_grant"):  # restricted (or unknown)
        models = _strings(doc.get("grantedModels")) or (NO_MODEL,)
    return KeyRecord(
        id=_BAD_ID_CHARS.sub("_", key_id)[:64] or "unknown",
        org=org,
        sha256=fp,
        scopes=tuple(s for s in scopes if s in SCOPES),
        models=models,
        status="active",
        expires_at=_time(doc.get("expiresAt")),
    )


def _strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(dict.fromkeys(value))


def _time(value: object) -> datetime | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expiresAt must be an RFC 3339 string")
    t = datetime.fromisoformat(value)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)
