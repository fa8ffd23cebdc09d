"""A minimal pipelined Redis client for the per-request path (limit admission and settlement).

redis-py's asyncio client costs ~90 µs of CPU per call and takes a pooled connection per
concurrent call; admission makes two calls per request. This one keeps one connection,
writes each command as it is issued (concurrent requests pipeline naturally), matches
replies in order with hiredis' parser, and bounds every call with a timer, not a task.

Errors: a Redis error reply raises `redis.exceptions.ResponseError`; a timeout, a refused
or a lost connection raises an `OSError` (and fails every call in flight on that
connection, whose replies can no longer be matched); the next call reconnects. A call
no connection could be made for raises `NotSent`: it never reached Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import NoScriptError, ResponseError

_Args = tuple[str | bytes | int, ...]


class NotSent(ConnectionError):
    """The call never reached Redis: no connection could be made (refused, a connect
    timeout, a refused AUTH), or Redis had stopped reading it (a protocol error before
    it); so nothing it would change did."""


class NotRun(ResponseError):
    """Redis refused the command before running it, so nothing it would change did: it
    needs AUTH (restarted with a password), is loading its data, busy with a script, a
    read-only replica, or refuses writes (a failed save, its primary down)."""


# The error codes Redis answers a command it did not run with (a script's own error,
# OOM or WRONGTYPE may come after some of its writes: not these).
_NOT_RUN = (b"NOAUTH", b"WRONGPASS", b"LOADING", b"BUSY", b"READONLY", b"MISCONF",
            b"MASTERDOWN")


# Redis closes the connection after this error and reads nothing more from it (an
# unauthenticated client's command of more than 10 arguments gets it).
_PROTOCOL_ERROR = "ERR Protocol error"


def _reply_error(msg: str) -> ResponseError:
    code = msg.split(" ", 1)[0].encode()
    return (NoScriptError(msg) if code == b"NOSCRIPT" else
            NotRun(msg) if code in _NOT_RUN or msg.startswith(_PROTOCOL_ERROR)
            else ResponseError(msg))


def _encode(args: _Args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.reader = hiredis.Reader()
        self.lost = False
        self.unread = False  # Redis said it reads nothing more (a protocol error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.pending:  # a reply nobody asked for: the stream is out of step
                self.fail(ConnectionError("redis: unexpected reply"))
                return
            fut = self.pending.popleft()
            if fut.done():  # timed out meanwhile (the connection is closing)
                continue
            if isinstance(reply, hiredis.ReplyError):
                self.unread |= str(reply).startswith(_PROTOCOL_ERROR)
                fut.set_exception(_reply_error(str(reply)))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail_pending(
            NotSent("redis: closed after a protocol error (the calls after it not run)")
            if self.unread else
            ConnectionError(f"redis: connection lost ({exc or 'closed'})"))

    def fail(self, exc: OSError) -> None:
        """Give up on this connection: its replies can no longer be matched to calls."""
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
        self._fail_pending(exc)

    def _fail_pending(self, exc: OSError) -> None:
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)


class RespClient:
    """One pipelined connection to the Redis named by a redis:// or rediss:// URL."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {parts.scheme}://…")
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._tls = parts.scheme == "rediss"
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        db = parts.path.lstrip("/")
        self._db = int(db) if db else 0
        self._timeout = timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._shas: dict[str, str] = {}  # script -> sha
        self._scripts: dict[str, str] = {}  # sha -> script

    async def execute(self, *args: str | bytes | int) -> Any:
        return await self._send(await self._connected(), args)

    async def _connected(self) -> _Protocol:
        """The live connection, or a new one; NotSent when none can be made."""
        proto = self._proto
        if proto is None or proto.lost:
            try:
                proto = await self._connect()
            except NotSent:
                raise
            except OSError as e:
                raise NotSent(f"redis: cannot connect ({type(e).__name__}: {e})") from e
        return proto

    def script_call(self, script: str, keys: list[str], args: list[str]) -> _Args:
        """The EVALSHA command for `script`, for `evalsha` or `batch`."""
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 - Redis' own script id
            self._scripts[sha] = script
        return ("EVALSHA", sha, len(keys), *keys, *args)

    async def evalsha(self, script: str, keys: list[str], args: list[str]) -> Any:
        """EVALSHA, loading the script once if Redis does not know it (after a restart)."""
        call = self.script_call(script, keys, args)
        try:
            return await self.execute(*call)
        except NoScriptError:
            return await self._load_and_run(call)

    async def batch(self, *calls: _Args) -> list[Any]:
        """Several commands in one write, one round trip: each one's reply, or the
        exception it raised, in order. A NOSCRIPT is run again alone after loading."""
        proto = await self._connected()
        out = list(await asyncio.gather(*self._send_many(proto, calls),
                                        return_exceptions=True))
        for i, reply in enumerate(out):
            if isinstance(reply, NoScriptError):
                try:
                    out[i] = await self._load_and_run(calls[i])
                except (ResponseError, OSError) as e:
                    out[i] = e
        return out

    async def _load_and_run(self, call: _Args) -> Any:
        await self.execute("SCRIPT", "LOAD", self._scripts[str(call[1])])
        return await self.execute(*call)

    async def aclose(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        self._proto = None

    def _send(self, proto: _Protocol, args: _Args) -> asyncio.Future[Any]:
        return self._send_many(proto, (args,))[0]

    def _send_many(self, proto: _Protocol, calls: tuple[_Args, ...]) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        assert proto.transport is not None
        proto.transport.write(b"".join(_encode(args) for args in calls))
        futs = []
        for _ in calls:
            fut: asyncio.Future[Any] = loop.create_future()
            proto.pending.append(fut)
            timer = loop.call_later(self._timeout, _expire, proto, fut, self._timeout)
            fut.add_done_callback(_cancel_timer(timer))
            futs.append(fut)
        return futs

    async def _connect(self) -> _Protocol:
        # Concurrent callers share one connection attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context() if self._tls else None
        transport, proto = await asyncio.wait_for(
            loop.create_connection(_Protocol, self._host, self._port, ssl=ctx,
                                   server_hostname=self._host if ctx else None),
            self._timeout)
        try:
            if self._password is not None:
                auth: _Args = (("AUTH", self._user, self._password) if self._user
                               else ("AUTH", self._password))
                await self._send(proto, auth)
            if self._db:
                await self._send(proto, ("SELECT", self._db))
        except ResponseError as e:
            # Refused (a wrong password, no such db): closed, not left open per call
            # (each call made a connection of its own, and Redis ran out of clients).
            transport.close()
            raise NotSent(f"redis: {e}") from None
        except BaseException:
            transport.close()
            raise
        self._proto = proto
        return proto


def _cancel_timer(timer: asyncio.TimerHandle) -> Callable[[asyncio.Future[Any]], None]:
    return lambda _fut: timer.cancel()


def _expire(proto: _Protocol, fut: asyncio.Future[Any], timeout_s: float) -> None:
    if not fut.done():
        proto.fail(TimeoutError(f"redis: no reply within {timeout_s:g}s"))
