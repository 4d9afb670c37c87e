"""Ledger fixtures: a real PostgreSQL server for the session and one fresh database per test.

The server is initdb'd into a temporary directory and started with pg_ctl on a
unix socket there. PostgreSQL refuses to run as root, so under root it runs as
an unprivileged user (`postgres` when the package created it, otherwise a
`meterchain-test` system user created here). If it cannot start, the tests
fail with the reason; nothing is skipped.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest


@dataclass
class PostgresServer:
    bindir: Path
    datadir: Path
    sockdir: Path
    port: int
    run_as: str | None

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.sockdir}&port={self.port}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pytest.fail("PostgreSQL is not installed (no initdb); run `make setup`, which installs it")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "meterchain-test"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         "meterchain-test"],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.fail(f"cannot create user meterchain-test for PostgreSQL: {result.stderr.strip()}")
    return "meterchain-test"


def _run(cmd: list[str], run_as: str | None, what: str) -> None:
    if run_as is not None:
        cmd = ["runuser", "-u", run_as, "--", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"PostgreSQL {what} failed ({result.returncode}): {result.stderr[-2000:]}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    run_as = _unprivileged_user()
    # Not under pytest's tmp dir: that is private to root, and the server user must reach it.
    base = Path(tempfile.mkdtemp(prefix="mc-pg-"))
    datadir, sockdir = base / "data", base / "sock"
    sockdir.mkdir()
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        for path in (base, sockdir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bindir, datadir, sockdir, _free_port(), run_as)
    try:
        _run(
            [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust",
             "--no-sync", "-E", "UTF8", "--locale=C"],
            run_as, "initdb",
        )  # fmt: skip
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{sockdir}' -p {server.port} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        _run(
            [str(bindir / "pg_ctl"), "-D", str(datadir), "-o", options, "-l",
             str(base / "server.log"), "-w", "-t", "60", "start"],
            run_as, "start",
        )  # fmt: skip
        yield server
    finally:
        if datadir.exists():
            cmd = [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "-w", "stop"]
            if run_as is not None:
                cmd = ["runuser", "-u", run_as, "--", *cmd]
            subprocess.run(cmd, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A ledger target for `open_store`: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return str(request.getfixturevalue("postgres_url"))
