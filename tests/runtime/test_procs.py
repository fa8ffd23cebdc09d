"""authz/runtime/procs.py: free ports, child processes, readiness polling."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from authz.runtime.procs import PortAllocator, http_get, spawn, stop, wait_until


def test_an_allocator_never_hands_out_a_port_twice() -> None:
    ports = PortAllocator()
    picked = [ports.free_port() for _ in range(300)]
    assert len(set(picked)) == 300
    assert all(20000 <= p < 32000 for p in picked)  # below the ephemeral range
    # Another allocator remembers nothing of the first.
    assert 20000 <= PortAllocator().free_port() < 32000


def test_a_port_in_use_is_skipped() -> None:
    ports = PortAllocator()
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        for _ in range(200):
            assert ports.free_port() != port


def test_spawn_passes_the_given_environment_or_inherits() -> None:
    code = "import os; print(os.environ.get('TB_X', '-'), 'PATH' in os.environ)"
    p = spawn([sys.executable, "-c", code], env={"TB_X": "1"}, stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=30)
    assert out.decode().split() == ["1", "False"]  # the whole environment, nothing else
    p = spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=30)
    assert out.decode().split() == ["-", "True"]


def test_stop_terminates_and_wait_until_notices_a_dead_child() -> None:
    p = spawn([sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    stop([p], timeout=5)
    assert p.returncode is not None and time.monotonic() - t0 < 5
    with pytest.raises(RuntimeError, match="thing: a process exited"):
        wait_until(lambda: False, "thing", timeout=5, alive=[p])
    with pytest.raises(TimeoutError, match="thing: not ready after 0s"):
        wait_until(lambda: False, "thing", timeout=0.1)


def test_an_answer_that_is_not_http_is_no_answer() -> None:
    """A port polled before its server listens may connect to itself (an ephemeral
    port) and read its own request back: `up` died of the BadStatusLine (`internal
    error`); it is no answer yet, as a refused connection is."""
    import threading

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)

        def echo() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(conn.recv(65536))  # the request, back

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        assert http_get(f"http://127.0.0.1:{srv.getsockname()[1]}/readyz", 2.0) is None
        t.join(5)
