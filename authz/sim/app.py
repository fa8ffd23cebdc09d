"""The aiohttp application of the vLLM-compatible upstream simulator.

Routes (as vLLM's OpenAI server): ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``, the
pooling and tokenizer endpoints of ``pooling.ANSWERS`` (embeddings, rerank, score,
tokenize, detokenize), ``GET /metrics``; plus the test hooks ``GET``/``DELETE
/_sim/requests`` and the request headers ``x-sim-status``, ``x-sim-cut-after`` and
``x-sim-error-after`` (see ``Simulator.generate``). With ``api_key`` set, every ``/v1`` path wants
``Authorization: Bearer <key>``, else 401 ``{"error": "Unauthorized"}``, as vLLM's
``--api-key`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final, Literal

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from authz.runtime.logs import MalformedHttp
from authz.runtime.quiet_http import QuietAppRunner
from authz.sim import responses_api
from authz.sim.metrics import CONTENT_TYPE_LATEST, ModelMetrics, SimMetrics
from authz.sim.pooling import ANSWERS
from authz.sim.protocol import SimError, parse_body, parse_chat, parse_completion
from authz.sim.recorder import RequestLog
from authz.sim.responses import DONE_EVENT, response
from authz.sim.responses_api import parse_responses
from authz.sim.streaming import (
    SSE_CONTENT_TYPE,
    Pacing,
    drop_connection,
    stream_generation,
    stream_response,
)
from authz.sim.tokens import output_text

DEFAULT_MODEL: Final = "tiny-llama"
DEFAULT_MAX_MODEL_LEN: Final = 32768
# vLLM accepts large prompts; aiohttp's default limit is 1 MiB.
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
HEADER_BYTES: Final = 64 * 1024  # above the 60 KiB Envoy lets through

STATUS_HEADER: Final = "x-sim-status"
CUT_HEADER: Final = "x-sim-cut-after"
ERROR_HEADER: Final = "x-sim-error-after"  # a chat/completions stream fails after N
TPOT_HEADER: Final = "x-sim-tpot-ms"  # per-request time per output token
TTFT_HEADER: Final = "x-sim-ttft-ms"  # per-request time to the first token
# How often `up`'s simulator looks at the gateway's config for models (`--models-from`).
MODELS_LOOK_S = 1.0

Generation = Literal["chat", "completion", "responses"]
_PARSERS: Final = {"chat": parse_chat, "completion": parse_completion,
                   "responses": parse_responses}
# Paths served by a real route; anything else under another method is a 405, like FastAPI.
_KNOWN_PATHS: Final = frozenset(
    {
        "/health",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/_sim/requests",
        *ANSWERS,
    }
)
_NOT_FOUND: Final = orjson.dumps({"detail": "Not Found"})
_NOT_ALLOWED: Final = orjson.dumps({"detail": "Method Not Allowed"})
_UNAUTHORIZED: Final = orjson.dumps({"error": "Unauthorized"})

log = logging.getLogger(__name__)


class Simulator:
    """State and handlers of one simulator app."""

    def __init__(
        self,
        models: Sequence[str],
        ttft_ms: float,
        tpot_ms: float,
        default_max_tokens: int | None,
        max_model_len: int,
        models_from: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        if default_max_tokens is not None and default_max_tokens < 1:
            raise ValueError("default_max_tokens must be at least 1")
        if ttft_ms < 0 or tpot_ms < 0:
            raise ValueError("delays must not be negative")
        self.model_names = tuple(dict.fromkeys(models or (DEFAULT_MODEL,)))
        self.ttft_s = ttft_ms / 1000.0
        self.tpot_s = tpot_ms / 1000.0
        self.default_max_tokens = default_max_tokens
        self.max_model_len = max_model_len
        self.metrics = SimMetrics(self.model_names)
        self.models: dict[str, ModelMetrics] = self.metrics.by_model
        self.requests = RequestLog()
        self.models_from = models_from

    def _serve_new_models(self, payload: Any) -> None:
        """A model name not served yet: look again where the names come from (`up`'s
        simulator reads the gateway's config, where a reload may have added a model),
        and serve the new ones."""
        name = payload.get("model") if isinstance(payload, dict) else None
        if self.models_from is None or not isinstance(name, str) or name in self.models:
            return
        self.look_for_models()

    def look_for_models(self) -> None:
        """Serve the names `models_from` gives that are not served yet."""
        if self.models_from is None:
            return
        for new in self.models_from():
            if new not in self.models:
                self.models[new] = self.metrics.add(new)
                self.model_names = (*self.model_names, new)
                log.info("serving %s as well", new)

    def _record(self, request: web.Request, body: bytes) -> None:
        self.requests.add(request.method, request.path, request.query_string, request.headers, body)

    async def _body(self, request: web.Request) -> bytes:
        """The request body, recorded in the request log."""
        body = await request.read()
        self._record(request, body)
        return body

    # -- vLLM endpoints ----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        return web.Response()

    async def list_models(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        hooked = _status_hook(request)
        if hooked is not None:
            return _error_response(hooked)
        return _json(
            orjson.dumps(
                {"object": "list", "data": [self._model_card(name) for name in self.model_names]}
            )
        )

    def _model_card(self, name: str) -> dict[str, Any]:
        created = int(time.time())
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": "modelperm-" + os.urandom(16).hex(),
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, "completion")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, "responses")

    async def generate(self, request: web.Request, kind: Generation) -> web.StreamResponse:
        """Answer a (chat) completion or Responses API request.

        ``x-sim-status: NNN`` (400-599) answers that status with a vLLM error body instead;
        ``x-sim-cut-after: N`` drops the connection after N token events of a stream
        (and, for an answer that is not streamed, before it, whatever N);
        ``x-sim-error-after: N`` ends a chat or completions stream after N token events
        with vLLM's mid-stream error event and ``[DONE]`` (generation failed);
        ``x-sim-tpot-ms: N`` sets this request's time per output token.
        """
        body = await self._body(request)
        payload: Any = None
        try:
            _raise_status_hook(request)
            cut_after = _int_hook(request, CUT_HEADER)
            error_after = _int_hook(request, ERROR_HEADER)
            tpot_ms = _int_hook(request, TPOT_HEADER)
            tpot_s = self.tpot_s if tpot_ms is None else tpot_ms / 1000.0
            ttft_ms = _int_hook(request, TTFT_HEADER)
            ttft_s = self.ttft_s if ttft_ms is None else ttft_ms / 1000.0
            payload = parse_body(body)
            self._serve_new_models(payload)
            gen = _PARSERS[kind](payload, self.models, self.default_max_tokens,
                                 self.max_model_len)
        except SimError as err:
            if err.in_stream and isinstance(payload, dict) and payload.get("stream") is True:
                return await _refused_in_stream(request, err)
            return _error_response(err)

        metrics = self.models[gen.model]
        # vLLM runs each of `n` sequences as a request of its own, its prompt read (and
        # counted) by each, where usage counts it once (tests/vllm: the audit's rule).
        metrics.prompt_tokens.inc(gen.prompt_tokens * gen.n)
        metrics.running.inc()
        pace = Pacing(ttft_s, tpot_s, cut_after, error_after)
        try:
            if gen.stream:
                if kind == "responses":
                    return await stream_response(request, payload, gen, metrics, pace)
                return await stream_generation(request, gen, kind, metrics, pace)
            n = gen.max_tokens
            delay = ttft_s + tpot_s * (n - 1)
            if delay > 0:
                await asyncio.sleep(delay)
            if cut_after is not None:  # a backend that dies before it answers
                drop_connection(request)
                return web.Response()
            metrics.generation_tokens.inc(gen.completion_tokens)
            if kind == "responses":
                r = responses_api.ResponseBody(payload, gen)
                return _json(orjson.dumps(r.response(output_text(n))))
            return _json(response(kind, gen.model, gen.choice_lengths, gen.prompt_tokens,
                                  gen.completion_tokens))
        finally:
            metrics.running.dec()

    async def pooled(self, request: web.Request) -> web.Response:
        """Embeddings, rerank, score, tokenize, detokenize (``pooling.ANSWERS``)."""
        body = await self._body(request)
        try:
            _raise_status_hook(request)
            payload = parse_body(body)
            self._serve_new_models(payload)
            out, model, tokens = ANSWERS[request.path](payload, self.models,
                                                       self.max_model_len)
        except SimError as err:
            return _error_response(err)
        self.models[model].prompt_tokens.inc(tokens)
        return _json(out)

    async def prometheus(self, request: web.Request) -> web.Response:
        self._record(request, b"")
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    # -- test hooks --------------------------------------------------------------------

    async def get_requests(self, request: web.Request) -> web.Response:
        return _json(orjson.dumps(self.requests.snapshot()))

    async def delete_requests(self, request: web.Request) -> web.Response:
        self.requests.clear()
        return web.Response(status=204)

    async def fallback(self, request: web.Request) -> web.Response:
        self._record(request, await request.read())
        if request.path in _KNOWN_PATHS:
            return _json(_NOT_ALLOWED, status=405)
        return _json(_NOT_FOUND, status=404)


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


async def _refused_in_stream(request: web.Request, err: SimError) -> web.StreamResponse:
    """vLLM 0.32's answer to a stream it refuses once begun: 200, the error, [DONE]."""
    resp = web.StreamResponse(headers={"Content-Type": SSE_CONTENT_TYPE})
    await resp.prepare(request)
    await resp.write(b"data: " + err.body() + b"\n\n" + DONE_EVENT)
    await resp.write_eof()
    return resp


def _error_response(err: SimError) -> web.Response:
    return _json(err.body(), status=err.status)


def _header_int(request: web.Request, header: str) -> tuple[str, int] | None:
    """A test hook header: (its text, its integer value or -1 when not an integer)."""
    raw = request.headers.get(header)
    if raw is None:
        return None
    try:
        return raw, int(raw)
    except ValueError:
        return raw, -1


def _status_hook(request: web.Request) -> SimError | None:
    hook = _header_int(request, STATUS_HEADER)
    if hook is None:
        return None
    raw, status = hook
    if not 400 <= status <= 599:
        return SimError(400, f"{STATUS_HEADER} must be an HTTP error status (400-599), got {raw!r}")
    return SimError(status, f"Simulated error ({STATUS_HEADER}: {status}).")


def _raise_status_hook(request: web.Request) -> None:
    hooked = _status_hook(request)
    if hooked is not None:
        raise hooked


def _int_hook(request: web.Request, header: str) -> int | None:
    """A non-negative integer test hook header (`x-sim-cut-after`, `x-sim-tpot-ms`)."""
    hook = _header_int(request, header)
    if hook is None:
        return None
    raw, value = hook
    if value < 0:
        raise SimError(400, f"{header} must be a non-negative integer, got {raw!r}")
    return value


SIMULATOR_KEY: Final = web.AppKey("tokenbooth_simulator", Simulator)


def require_key(api_key: str) -> Middleware:
    """vLLM's --api-key: `/v1` paths need `Authorization: Bearer <key>` (compared in
    constant time); the rest (/health, /metrics, the test hooks) stay open."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _json(_UNAUTHORIZED, status=401)
        return await handler(request)

    return check


def make_app(
    models: Sequence[str],
    ttft_ms: float = 0.0,
    tpot_ms: float = 0.0,
    default_max_tokens: int | None = None,
    *,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    api_key: str | None = None,
    models_from: Callable[[], Sequence[str]] | None = None,
) -> web.Application:
    """Build the simulator app serving ``models`` (``["tiny-llama"]`` when empty).

    ``max_model_len`` is the context length (vLLM's ``--max-model-len``); a chat request
    without ``max_tokens`` generates ``default_max_tokens`` (vLLM's generation-config
    default) or, when None, up to the context length, as vLLM does.
    ``app[SIMULATOR_KEY]`` is the ``Simulator`` (metrics, request log) for in-process tests.
    ``api_key``: required on ``/v1`` paths (see ``require_key``).
    ``models_from``: where more model names may come from, asked when a request names a
    model not served (see ``Simulator._serve_new_models``).
    """
    sim = Simulator(models, ttft_ms, tpot_ms, default_max_tokens, max_model_len,
                    models_from)
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[require_key(api_key)] if api_key else [])
    app[SIMULATOR_KEY] = sim
    if models_from is not None:
        app.cleanup_ctx.append(_watching_models)
    router = app.router
    router.add_get("/health", sim.health)
    router.add_get("/v1/models", sim.list_models)
    router.add_post("/v1/chat/completions", sim.chat_completions)
    router.add_post("/v1/completions", sim.completions)
    router.add_post("/v1/responses", sim.responses)
    for path in ANSWERS:
        router.add_post(path, sim.pooled)
    router.add_get("/metrics", sim.prometheus)
    router.add_get("/_sim/requests", sim.get_requests)
    router.add_delete("/_sim/requests", sim.delete_requests)
    router.add_route("*", "/{tail:.*}", sim.fallback)
    return app


async def _watching_models(app: web.Application) -> AsyncIterator[None]:
    """Look where model names come from every `MODELS_LOOK_S`, as the gateway's services
    look at their config: a model a reload added is served while the file is valid.
    Looked at only when a request named it, it was not served if the file had been
    broken since (the services keep their last good config: reload tester)."""
    sim = app[SIMULATOR_KEY]

    async def watch() -> None:
        while True:
            await asyncio.sleep(MODELS_LOOK_S)
            sim.look_for_models()

    task = asyncio.create_task(watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_sim(
    host: str,
    port: int,
    models: Sequence[str],
    ttft_ms: float = 0.0,
    tpot_ms: float = 0.0,
    *,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    default_max_tokens: int | None = None,
    api_key: str | None = None,
    models_from: Callable[[], Sequence[str]] | None = None,
) -> None:
    """Serve the simulator on ``host:port`` until cancelled, then clean up the runner."""
    app = make_app(models, ttft_ms, tpot_ms, default_max_tokens, max_model_len=max_model_len,
                   api_key=api_key, models_from=models_from)
    # No access log: the simulator serves benchmark load. Header lines as long as Envoy
    # passes on (60 KiB): aiohttp's 8 KiB refused a client's long header with a 400 and
    # a traceback in `up`'s log (security tester).
    # Bodies as sent, as vLLM reads them (a gzip body that did not inflate was a 500
    # with a traceback: retest).
    runner = QuietAppRunner(app, access_log=None, handle_signals=False,
                            max_line_size=HEADER_BYTES, max_field_size=HEADER_BYTES,
                            auto_decompress=False)
    logging.getLogger("aiohttp.server").addFilter(MalformedHttp())  # one line, no bytes
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        names = ", ".join(app[SIMULATOR_KEY].model_names)
        log.info("tokenbooth sim listening on http://%s:%d serving %s", host, port, names)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()
