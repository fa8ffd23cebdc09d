"""The admin API's HTTP server (aiohttp): one generic handler reads the route table of
policy/admin_schema.py, authenticates, checks the role, validates the query and body
with the route's models, calls the endpoint (admin_api.py) and writes one audit line.
An endpoint may answer with lines written as they are produced (`Streamed`, NDJSON).

Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`, also for
an unknown path (404 not_found) or method (405 method_not_allowed, with `allow`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from authz.runtime.admin_api import ENDPOINTS, AdminContext, AdminError, Call, Streamed
from authz.runtime.admin_auth import Caller
from authz.runtime.quiet_http import QuietAppRunner
from authz.state.keys.base import StoreUnavailable
from authz.state.limits.base import LimitStoreUnavailable
from policy.admin_schema import ADMIN_API_HEADER, ROUTES, Route, openapi_document
from policy.keys import redact_secrets

log = logging.getLogger("tokenbooth.admin")
MAX_BODY = 64 << 10
# What a failing state store raises: a 503, or the last line of a streamed answer.
STORE_ERRORS = (StoreUnavailable, LimitStoreUnavailable, RedisError, OSError, ValueError)


_INTERNAL = AdminError(500, "The admin API failed to process this request.",
                      "internal_error", type="server_error")


def _unavailable() -> AdminError:
    return AdminError(503, "the state store did not answer; retry", "service_unavailable",
                      type="server_error", headers={"retry-after": "1"})


def _error_json(err: AdminError) -> bytes:
    return orjson.dumps({"error": {"message": err.message, "type": err.type,
                                   "param": err.param, "code": err.code}})


def error_response(err: AdminError) -> web.Response:
    return web.Response(status=err.status, body=_error_json(err),
                        content_type="application/json", headers=err.headers)


def _invalid(e: ValidationError, where: str) -> AdminError:
    """A 400 naming the first bad field."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        msg = f"unknown {where} field {param!r}"
    else:
        said = _JSON_WORDS.get(str(err["type"])) or str(err["msg"])
        if str(err["type"]).startswith(("datetime_", "date_")):  # pydantic's own words
            why = str(err["msg"]).partition(", ")[2]  # (month value is outside ...)
            said = f"expected an RFC 3339 time with its zone, as in {_TIME_EXAMPLE}" + (
                f" ({why})" if why else "")
        said = said.removeprefix("Value error, ")
        msg = f"{param}: {said}" if param else said
    return AdminError(400, msg, "invalid_request", param=param)


# pydantic's words for a JSON body or query (operators tester: "Input should be a valid
# tuple", "a valid datetime or date, input is too short"): JSON's names for them.
_JSON_WORDS = {"tuple_type": "expected an array", "list_type": "expected an array",
               "set_type": "expected an array", "frozen_set_type": "expected an array"}
_TIME_EXAMPLE = "2026-12-01T00:00:00Z"


# How the admin API's server runs (the tests' too). auto_decompress off: a body that
# claimed a coding it did not have failed in aiohttp's reader (a 500, its traceback in
# the log, before the token was checked); a coded body is refused (`_parse`: 415).
# How long the admin API and the side port keep a connection that has not sent a whole
# request, or sits idle between requests (aiohttp's default is an hour: a few thousand
# silent or trickling connections used up serve's open files, and /readyz, /metrics and
# new gRPC connections went unanswered; security tester). Envoy's listener has its own.
IDLE_S = 10.0
SERVER_OPTIONS: dict[str, Any] = {"access_log": None, "auto_decompress": False,
                                  "keepalive_timeout": IDLE_S}


async def _parse(route: Route, request: web.Request) -> tuple[BaseModel | None,
                                                             BaseModel | None]:
    query = None
    repeated = next((k for k in request.query if len(request.query.getall(k)) > 1), None)
    if repeated is not None:  # one would win silently: which is the caller's meaning?
        raise AdminError(400, f"the query parameter {repeated!r} is given more than once",
                         "invalid_request", param=repeated)
    try:
        if route.query is not None:
            query = route.query.model_validate(dict(request.query))
        elif request.query:
            raise AdminError(400, f"unknown query parameter {next(iter(request.query))!r}",
                             "invalid_request", param=next(iter(request.query)))
    except ValidationError as e:
        raise _invalid(e, "query") from None
    if route.body is None:
        if request.method != "GET":
            # Nothing to read: a field sent is unknown here, as on every other route.
            data = await _json_object(request, empty_ok=True)
            if data:
                field = next(iter(data))
                raise AdminError(400, f"unknown body field {field!r}", "invalid_request",
                                 param=field)
        return query, None
    data = await _json_object(request)
    try:
        return query, route.body.model_validate(data)
    except ValidationError as e:
        raise _invalid(e, "body") from None


async def _json_object(request: web.Request, empty_ok: bool = False) -> dict[str, Any]:
    """The body, a JSON object (`empty_ok`: no body at all reads as an empty one, where
    none is needed); AdminError 400/415 if not."""
    if request.headers.get("content-encoding", "").strip().lower() not in ("", "identity"):
        # Read as sent (the server does not decompress): as the gateway answers.
        raise AdminError(415, "a compressed request body is not accepted: send it "
                         "uncompressed", "unsupported_media_type")
    try:
        # Whole within IDLE_S, as the headers must be: a body trickled a byte a second
        # held the connection for as long as the caller liked (retest tester).
        raw = await asyncio.wait_for(request.read(), IDLE_S)
    except TimeoutError:
        raise AdminError(408, f"the request body did not arrive within {IDLE_S:g} s",
                         "request_timeout", headers={"connection": "close"}) from None
    if empty_ok and not raw.strip():
        return {}
    try:
        data = json_body(raw)
    except DuplicateMember as e:
        raise AdminError(400, f"the body names {e.args[0]!r} more than once",
                         "invalid_request", param=e.args[0]) from None
    except (ValueError, RecursionError):
        raise AdminError(400, "the body is not JSON", "invalid_request") from None
    if not isinstance(data, dict):
        raise AdminError(400, "the body must be a JSON object", "invalid_request")
    return data


class DuplicateMember(ValueError):
    """A JSON object names a member twice (`{"org": "x", "org": "y"}`): its meaning is
    not the caller's to guess, as the config loader refuses duplicate keys."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateMember(k)
        out[k] = v
    return out


def json_body(raw: bytes) -> Any:
    """A request body's JSON, its numbers with a fraction or exponent as exact Decimals
    (a budget of 9007199.254740991 is not rounded through a float); NaN and Infinity
    refused; a member named twice refused (DuplicateMember). ValueError if not JSON."""
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    return json.loads(raw.decode() if raw else "null", parse_float=Decimal,
                      parse_constant=constant, object_pairs_hook=_unique)


# Headers every browser adds to the requests a page makes (and curl, the CLI, SDKs do
# not): the admin API is no browser's to call (it answers no CORS).
_BROWSER_HEADERS = ("Origin", "Sec-Fetch-Mode", "Sec-Fetch-Site", "Sec-Fetch-Dest")


# How long one line of a streamed answer may wait for its reader.
STREAM_WRITE_S = 30.0


def _authenticate(ctx: AdminContext, request: web.Request) -> Caller:
    if any(h in request.headers for h in _BROWSER_HEADERS):
        # Before the lockout's count: a page on a name rebound to this address (DNS
        # rebinding) sent junk tokens and locked the operator out (admin review).
        raise AdminError(403, "The admin API is not for browsers: call it from the CLI or "
                         "a server.", "browser_refused", type="authentication_error")
    client = request.remote or "?"
    wait = ctx.limiter.retry_after(client)
    if wait is not None:
        raise AdminError(429, "Too many failed authentications; retry later.",
                         "rate_limit_exceeded", headers={"retry-after": str(math.ceil(wait))})
    authorization = request.headers.get("Authorization")
    caller = ctx.tokens.caller(authorization)
    if caller is None:
        if authorization and authorization.strip():
            # Only a token tried counts toward the lockout: a request with none is no
            # guess, and any web page can make a browser send one (a cross-site GET
            # needs no preflight; an Authorization header does), which locked every
            # caller at that address out, the operator's CLI included.
            ctx.limiter.failed(client)
        raise AdminError(401, "Missing or unknown admin token (Authorization: Bearer).",
                         "invalid_api_key", type="authentication_error")
    return caller


async def _stream(request: web.Request, out: Streamed) -> web.StreamResponse:
    """Write `out` line by line. The first line is produced before the answer starts,
    so a failure then is an ordinary error answer; a later one ends the answer with an
    error line. A client that leaves stops the reading."""
    async with contextlib.aclosing(out.lines) as lines:
        line = await anext(lines, None)
        resp = web.StreamResponse(headers={"content-type": out.content_type})
        try:
            await resp.prepare(request)
            while line is not None:
                # A reader that stops reading is let go (its stream's place with it).
                await asyncio.wait_for(resp.write(line), STREAM_WRITE_S)
                try:
                    line = await anext(lines, None)
                except STORE_ERRORS as e:
                    log.warning("admin stream cut short: %s", type(e).__name__)
                    await asyncio.wait_for(resp.write(_error_json(_unavailable()) + b"\n"),
                                           STREAM_WRITE_S)
                    break
                except Exception:  # a bug: logged with its trace; the last line says so
                    log.exception("admin stream failed")
                    await asyncio.wait_for(resp.write(_error_json(_INTERNAL) + b"\n"),
                                           STREAM_WRITE_S)
                    break
            await asyncio.wait_for(resp.write_eof(), STREAM_WRITE_S)
        except ConnectionResetError:
            log.info("admin stream: the client left")
        except TimeoutError:
            log.info("admin stream: the client stopped reading; let go")
            if request.transport is not None:
                request.transport.close()
    return resp


def _handler(ctx: AdminContext, route: Route) -> Callable[[web.Request], Any]:
    endpoint = ENDPOINTS[route.name]

    async def handle(request: web.Request) -> web.StreamResponse:
        call = Call(params=dict(request.match_info),
                    accept=request.headers.get("Accept", ""))
        audit: dict[str, object] = {"admin": None, "action": route.name,
                                    "client": request.remote}
        try:
            caller = _authenticate(ctx, request)
            audit["admin"] = caller.name
            if not caller.may(route.role):
                raise AdminError(403, f"a {caller.role!r} token cannot call {route.name}",
                                 "insufficient_scope", type="permission_error")
            call.query, call.body = await _parse(route, request)
            out = await endpoint(ctx, call)
            resp: web.StreamResponse = (
                await _stream(request, out) if isinstance(out, Streamed) else
                web.Response(status=route.status, body=out.model_dump_json(),
                             content_type="application/json"))
        except AdminError as e:
            resp = error_response(e)
        except STORE_ERRORS as e:
            log.warning("admin call failed: %s", type(e).__name__)
            resp = error_response(_unavailable())
        audit.update(call.audit(), status=resp.status)
        log.info("admin call", extra=audit)
        return resp

    return handle


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own error answers (no such path, method, a body too large) and any
    unexpected failure as JSON."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as e:
        allow = ", ".join(sorted(e.allowed_methods))
        return error_response(AdminError(
            405, f"{request.method} is not allowed here; allowed: {allow}",
            "method_not_allowed", headers={"allow": allow}))
    except web.HTTPNotFound:
        return error_response(AdminError(404, "no such admin endpoint; see /openapi.json",
                                         "not_found"))
    except web.HTTPRequestEntityTooLarge:  # the gateway's code for the same
        return error_response(AdminError(413, f"the body is larger than {MAX_BODY} bytes",
                                         "request_too_large"))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = e.reason.lower().replace(" ", "_").replace("-", "_")
        return error_response(AdminError(e.status, e.reason, code))
    except Exception:  # a bug: logged with its trace; the caller still gets JSON
        log.exception("admin call failed", extra={"path": redact_secrets(request.path)})
        return error_response(_INTERNAL)


async def _mark(_: web.Request, response: web.StreamResponse) -> None:
    """Every answer says it is the admin API's: `--admin-url` pointed at the gateway's
    own listener took its OpenAI-shaped 401 for the admin API's and told the operator
    the token was wrong (CLI tester)."""
    response.headers[ADMIN_API_HEADER] = "1"


def _any_segment(path: str) -> str:
    """`{org}` as aiohttp reads it matches no brace, and org names may hold them
    (`a{b}`: its keys worked, its org endpoints were 404s): any character but `/`."""
    return re.sub(r"\{(\w+)\}", r"{\1:[^/]+}", path)


def make_admin_app(ctx: AdminContext, version: str = "0") -> web.Application:
    """The admin API over `ctx`; `/openapi.json` needs no token (it holds no data)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_json_errors])
    app.on_response_prepare.append(_mark)
    doc = orjson.dumps(openapi_document(version))

    async def openapi(_: web.Request) -> web.Response:
        return web.Response(body=doc, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
    for route in ROUTES:
        app.router.add_route(route.method, _any_segment(route.path), _handler(ctx, route))
    return app


async def start_admin(ctx: AdminContext, listen: tuple[str, int], version: str = "0"
                      ) -> tuple[web.AppRunner, int]:
    """Serve the admin API; the runner (to clean up) and the bound port."""
    runner = QuietAppRunner(make_admin_app(ctx, version), **SERVER_OPTIONS)
    await runner.setup()
    await web.TCPSite(runner, *listen).start()
    return runner, int(runner.addresses[0][1])
