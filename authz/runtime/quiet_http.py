"""aiohttp servers (the admin API, the side port, the simulator) that answer a request they
cannot parse without quoting it.

aiohttp answers a malformed request (a folded header, CL with TE, a line past its limit)
with a plain-text 400 that quotes the bytes it could not read: an admin token in a folded
`authorization` header came back in clear, where a proxy or an APM tool logging answers
would keep it (security tester). Here the answer is an OpenAI-shaped JSON error naming
only the status; aiohttp still logs the error (authz/runtime/logs.py turns that line
into one warning without the bytes) and still closes the connection."""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from policy.errors import type_for


def error_body(status: int) -> bytes:
    """The JSON error for a status aiohttp answered itself."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    message = ("the request could not be parsed as HTTP" if status == 400
               else f"{status} {phrase}")
    code = _CODES.get(status) or phrase.lower().replace(" ", "_")
    return orjson.dumps({"error": {"message": message, "type": type_for(status),
                                   "param": None, "code": code}})


# The contract's codes where it names one (interface.md's error table).
_CODES = {400: "invalid_request", 413: "request_too_large"}


class _QuietHandler(RequestHandler):
    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None,
                     ) -> web.StreamResponse:
        super().handle_error(request, status, exc, None)  # logs; raises if already sent
        resp = web.Response(status=status, body=error_body(status),
                            content_type="application/json")
        resp.force_close()
        return resp


class _QuietServer(Server):
    def __call__(self) -> RequestHandler:
        return _QuietHandler(self, loop=self._loop, **self._kwargs)


class QuietAppRunner(web.AppRunner):
    """web.AppRunner whose own error answers quote nothing of the request."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _QuietServer  # the same server; only its handlers differ
        return server

