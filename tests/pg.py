"""A throw-away PostgreSQL cluster for tests, and the pytest fixtures that share it.

Fixtures:
- `postgres_cluster` (session): the running PostgresCluster.
- `postgres_dsn` (session): DSN of the cluster's `postgres` database, e.g.
  `postgresql://postgres@127.0.0.1:54321/postgres`.
- `postgres_db` (function): DSN of a fresh, empty database for one test.

The cluster lives in a temp dir: initdb/pg_ctl from Debian's /usr/lib/postgresql/*/bin
(or PATH), run as the `postgres` OS user when we are root (PostgreSQL refuses to run as
root), listening on a free loopback port and a unix socket inside the temp dir, trust
auth for loopback and the socket only, durability off (it is thrown away). Without the
binaries the fixtures skip, except under CI (env CI set), where they fail: CI must test
the real thing. `.ci/install-postgres.sh` installs them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_SUPERUSER = "postgres"
_SETTINGS = {
    # Throw-away data: trade durability for speed.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


def find_pg_bindir() -> Path | None:
    """Newest /usr/lib/postgresql/<v>/bin holding initdb and pg_ctl, else PATH's."""
    candidates = []
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        version = bindir.parent.name
        if version.isdigit() and (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            candidates.append((int(version), bindir))
    if candidates:
        return max(candidates)[1]
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """initdb + pg_ctl start in a temp dir; stop() kills it and removes the dir."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="meshid-pg-"))
        self.data = self.base / "data"
        self.sockets = self.base / "sock"
        self.log = self.base / "postgres.log"
        self.port = 0
        self._running = False
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(_SUPERUSER)
            except KeyError:
                raise RuntimeError(
                    "running as root but there is no 'postgres' OS user to run PostgreSQL"
                ) from None
            self._run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self._owner = (pw.pw_uid, pw.pw_gid)
        else:
            self._owner = (os.getuid(), os.getgid())

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self.sockets.mkdir()
        for path in (self.base, self.sockets):
            os.chown(path, *self._owner)
        self._pg(
            "initdb",
            "-D", str(self.data),
            "-U", _SUPERUSER,
            "-A", "trust",
            "-E", "UTF8",
            "--no-locale",
            "--no-sync",
        )  # fmt: skip
        # Replace initdb's pg_hba.conf: trust, but only on the socket and IPv4 loopback.
        hba = self.data / "pg_hba.conf"
        hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        os.chown(hba, *self._owner)
        for attempt in range(3):
            self.port = _free_port()  # another process may take it before we do: retry
            self._write_settings()
            try:
                self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            self._running = True
            atexit.register(self.stop)  # a crashed test run must not leave a server behind
            return

    def _write_settings(self) -> None:
        settings = dict(
            _SETTINGS,
            listen_addresses="'127.0.0.1'",
            port=str(self.port),
            unix_socket_directories=f"'{self.sockets}'",
        )
        conf = self.data / "meshid-test.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        os.chown(conf, *self._owner)
        main = self.data / "postgresql.conf"
        if "meshid-test.conf" not in main.read_text():
            with main.open("a") as f:
                f.write("\ninclude 'meshid-test.conf'\n")

    def stop(self) -> None:
        if self._running:
            self._running = False
            with contextlib.suppress(RuntimeError):
                self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its DSN."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-d", self.dsn(database), "-c", sql],
            capture_output=True,
            text=True,
            env=_clean_env(),
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def _pg(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            cwd=self.base,  # root's cwd may be unreadable for the postgres user
            env=_clean_env(),
            check=False,
            **self._run_as,
        )
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{log}")


def _clean_env() -> dict[str, str]:
    # PGHOST, PGPORT, PGDATA... from the caller's shell would point the tools elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    bindir = find_pg_bindir()
    if bindir is None:
        message = "PostgreSQL server binaries not found (run .ci/install-postgres.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.dsn()


@pytest.fixture
def postgres_db(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.create_database()
