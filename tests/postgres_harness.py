"""A real PostgreSQL server of the tests' own (Debian's `postgresql` package: initdb and
pg_ctl), in a temporary directory on a free port, that a test can stop and restart.

As root, the server runs as the `postgres` user (initdb refuses root): its directory is
made in /tmp and handed to that user. Trust authentication on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port

_PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _exe(name: str) -> str | None:
    return shutil.which(name) or next((str(d / name) for d in _PG_BIN_DIRS
                                       if (d / name).exists()), None)


class PostgresServer:
    def __init__(self) -> None:
        initdb, pg_ctl = _exe("initdb"), _exe("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("initdb/pg_ctl not found (apt-get install postgresql)")
        self.initdb, self.pg_ctl = initdb, pg_ctl
        self.dir = Path(tempfile.mkdtemp(prefix="tb-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres")
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user.pw_name, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.dir, timeout=180,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} {argv[1]} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
                  "-t", "120", "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session; a test that stops it starts it again."""
    if _exe("initdb") is None:
        why = "PostgreSQL is not installed (apt-get install postgresql): initdb absent"
        if os.environ.get("TOKENBOOTH_REQUIRE_POSTGRES") == "1":  # CI: never skip quietly
            pytest.fail(why)
        pytest.skip(why)
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def pg_db(postgres: PostgresServer) -> AsyncIterator[str]:
    """A fresh database of the session's server, for one test: its DSN."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield postgres.dsn.rsplit("/", 1)[0] + "/" + name
