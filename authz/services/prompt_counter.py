"""Asks the backend that served a cut stream how many tokens its prompt was: vLLM's
`POST /tokenize` (policy/prompt_count.py says what to send). One HTTP session per
process, a short deadline, and any failure (the backend died, refused, took too long,
answered something else) is None: the record then charges the prompt's bound."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from policy.config import Config
from policy.prompt_count import TOKENIZE_PATH, counted

log = logging.getLogger("tokenbooth.ext_proc")

TIMEOUT_S = 2.0
# A /tokenize answer lists every token id: ~7 bytes a token, so this covers prompts of
# over a million tokens.
MAX_ANSWER_BYTES = 8 << 20


def backend_headers(cfg: Config, url: str, environ: Mapping[str, str]
                    ) -> dict[str, str] | None:
    """What a request to the backend at `url` carries besides its body: its API key when
    the config names one (Envoy sends it on inference requests), read as Envoy reads it
    (`environ`: the process's environment). None when the key is named but cannot be
    read here."""
    for model in cfg.models.values():
        for backend in model.backends:
            if backend.url != url or backend.credential is None:
                continue
            source, where = backend.credential
            try:
                key = (environ.get(where) if source == "env"
                       else Path(where).read_text().strip())
            except OSError:
                return None
            return {"authorization": f"Bearer {key}"} if key else None
    return {}


class PromptCounter:
    def __init__(self, timeout_s: float = TIMEOUT_S) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def count(self, url: str, body: dict[str, Any], headers: dict[str, str]
                    ) -> int | None:
        """The backend's count of this prompt, or None."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                    url + TOKENIZE_PATH, data=orjson.dumps(body),
                    headers={"content-type": "application/json",
                             "accept-encoding": "identity", **headers}) as r:
                if r.status != 200:
                    return None
                raw = await r.content.read(MAX_ANSWER_BYTES + 1)
                if len(raw) > MAX_ANSWER_BYTES:
                    return None
                return counted(orjson.loads(raw))
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            log.info("the backend did not count a cut stream's prompt (%s): its bound is "
                     "charged",
                     type(e).__name__, extra={"backend": url})
            return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
