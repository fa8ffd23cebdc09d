"""Child processes, free ports and readiness polling, shared by `tokenbooth up` and the
tests. No module state: a `PortAllocator` remembers the ports it handed out."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import json
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from email.message import Message
from typing import IO, Any

_PR_SET_PDEATHSIG = 1


# Below Linux's ephemeral range (32768-60999), so that a port we pick now is not
# taken by some client socket before the server that needs it binds it.
_PORT_RANGE = (20000, 32000)


class PortAllocator:
    """Hands out ports outside the ephemeral range that were free a moment ago, never the
    same one twice: callers pick several before any of them binds. Share one instance
    among everything that picks ports for processes started together."""

    def __init__(self) -> None:
        self._handed_out: set[int] = set()
        self._rng = random.SystemRandom()

    def free_port(self, host: str = "127.0.0.1") -> int:
        for _ in range(200):
            port = self._rng.randrange(*_PORT_RANGE)
            if port not in self._handed_out and _bindable(host, port):
                self._handed_out.add(port)
                return port
        raise OSError("no free port found")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port now (None: it could). SO_REUSEADDR as
    servers set it: connections in TIME_WAIT do not count, another listener does."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as e:
        return f"cannot be resolved ({e.strerror or e})"
    problems = []
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return "is already in use"
                problems.append(f"cannot be listened on ({e.strerror or e})")
    return problems[0] if len(problems) == len(infos) else None


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM when the supervisor dies, even by SIGKILL.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
    stderr: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (Ctrl-C reaches only the supervisor). `env` is the
    child's whole environment; None: it inherits this process's. The child gets SIGTERM
    when the thread that started it ends (Linux's PR_SET_PDEATHSIG follows the thread, not
    the process): start children from a thread that outlives them, as `up` does."""
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    """SIGTERM every child, wait, then SIGKILL whatever is left."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def http_get(url: str, timeout: float = 1.0) -> tuple[int, Message, bytes] | None:
    """Status, headers and body of a GET (error statuses included); None: no answer, or
    one that is not HTTP (a port polled before its server listens may connect to itself
    and read its own request back: BadStatusLine)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - local URL
            return int(r.status), r.headers, r.read()
    except urllib.error.HTTPError as e:
        e.close()
        return e.code, e.headers, b""
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
        return None


def http_json(url: str, timeout: float = 2.0) -> Any:
    """A GET's JSON body; None when there is no answer or it is not JSON."""
    answer = http_get(url, timeout)
    try:
        return json.loads(answer[2]) if answer and answer[0] == 200 else None
    except ValueError:
        return None


def http_ok(url: str, timeout: float = 1.0) -> bool:
    answer = http_get(url, timeout)
    return answer is not None and 200 <= answer[0] < 300


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float = 30.0,
    alive: Sequence[subprocess.Popen[bytes]] = (),
) -> None:
    """Poll `check` until true; fail fast if a child we depend on exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for p in alive:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with status {p.returncode}")
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s")
