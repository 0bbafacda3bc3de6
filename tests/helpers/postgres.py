"""A throwaway PostgreSQL server for tests (Debian's ``postgresql`` package, version 15).

The cluster lives in a temp dir, listens on 127.0.0.1 and a Unix socket in that dir only, trusts
every local connection as user ``postgres`` and runs with fsync off (only a machine crash could
lose data) but with ``synchronous_commit`` on, as a production server: a commit is written to
the WAL before it returns, so ``pause()``'s hard stop loses no committed transaction. As root
(``initdb`` refuses to run as root) the dir is handed to the ``postgres`` system user and the
binaries run through ``runuser -u postgres --``.

``pause()`` / ``resume()`` take the server down and bring it back on the same port with the same
data, for fault-injection tests; ``stop()`` also removes the data.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.ports import free_port, port_open
from tests.helpers.services import ServiceUnavailable

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def find_pg_bin() -> Path:
    """Directory with initdb/pg_ctl/psql: ``$VCG_PG_BIN``, else /usr/lib/postgresql/15/bin, else
    the newest /usr/lib/postgresql/*/bin. Raises ServiceUnavailable if there is none."""
    env = os.environ.get("VCG_PG_BIN")
    if env:
        candidates = [env]  # explicit: no fallback
    else:
        versions = glob.glob("/usr/lib/postgresql/*/bin")
        versions.sort(key=lambda p: int(re.sub(r"\D", "", Path(p).parent.name) or 0), reverse=True)
        candidates = ["/usr/lib/postgresql/15/bin", *versions]
    for cand in candidates:
        if (Path(cand) / "initdb").is_file() and (Path(cand) / "pg_ctl").is_file():
            return Path(cand)
    raise ServiceUnavailable(
        "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb); "
        "install them with scripts/bootstrap-system.sh (apt-get install postgresql) "
        "or point VCG_PG_BIN at a directory holding initdb and pg_ctl"
    )


class PostgresServer:
    """A PostgreSQL cluster in a temp dir on 127.0.0.1:port, superuser ``postgres``, trust auth."""

    host = "127.0.0.1"
    user = "postgres"

    def __init__(self, port: int | None = None, *, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_pg_bin()
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.dir: Path | None = None
        self.started_in: float | None = None  # seconds the last start() took

    # -- paths and commands ------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.dir is not None, "server was never started"
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "server was never started"
        return self.dir / "postgres.log"

    def _as_owner(self, *argv: str | Path) -> list[str]:
        cmd = [str(a) for a in argv]
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _run(self, *argv: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self._as_owner(*argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{Path(str(argv[0])).name} failed (rc={proc.returncode}):\n"
                f"{proc.stdout}{proc.stderr}{self.log_tail()}"
            )
        return proc

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""
        return "\n--- postgres log ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- lifecycle -----------------------------------------------------------------------------

    def _init_cluster(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vcg-pg-"))
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise ServiceUnavailable(
                    "running as root but there is no 'postgres' user to run initdb as "
                    "(Debian's postgresql package creates it)"
                ) from exc
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run(
            self.bin_dir / "initdb",
            "-D", self.data_dir, "-A", "trust", "-U", self.user, "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip

    def is_running(self) -> bool:
        if self.dir is None or not self.data_dir.exists():
            return False
        proc = subprocess.run(
            self._as_owner(self.bin_dir / "pg_ctl", "-D", self.data_dir, "status"),
            capture_output=True,
            check=False,
        )
        return proc.returncode == 0

    def start(self, timeout: float = 30) -> PostgresServer:
        """Start the server (initialising a new cluster the first time) and wait until it
        accepts connections. On a second call after ``pause()`` the same data and port are used."""
        t0 = time.monotonic()
        if self.dir is None:
            self._init_cluster()
        if self.is_running():
            return self
        for attempt in range(3):
            options = (
                f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} "
                "-c fsync=off -c full_page_writes=off "
                "-c max_connections=200"
            )
            try:
                self._run(
                    self.bin_dir / "pg_ctl", "-D", self.data_dir, "-l", self.log_path,
                    "-o", options, "-w", "-t", str(int(timeout)), "start",
                    timeout=timeout + 10,
                )  # fmt: skip
                break
            except RuntimeError:
                # The free port may have been taken in the meantime: pick another one.
                if self._fixed_port or attempt == 2 or not port_open(self.port):
                    raise
                self.port = free_port()
        self._wait_ready(timeout)
        self.started_in = time.monotonic() - t0
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        isready = self.bin_dir / "pg_isready"
        while True:
            proc = subprocess.run(
                [str(isready), "-h", self.host, "-p", str(self.port), "-U", self.user, "-q"],
                capture_output=True,
                check=False,
            )
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres did not accept connections{self.log_tail()}")
            time.sleep(0.05)

    def pause(self) -> None:
        """Kill the server (``pg_ctl stop -m immediate``) but keep its data dir and port:
        ``resume()`` brings it back after crash recovery. For fault-injection tests."""
        if self.is_running():
            self._run(self.bin_dir / "pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "stop")

    def resume(self, timeout: float = 30) -> PostgresServer:
        """Start a paused server again on the same port with the same data."""
        return self.start(timeout)

    def stop(self) -> None:
        """Stop the server and delete its data dir."""
        if self.dir is None:
            return
        try:
            self.pause()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL (asyncpg driver) of a database on this server."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{dbname}"

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq / plain asyncpg DSN of a database on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL with psql (autocommit, stops at the first error); returns unaligned output."""
        psql = self.bin_dir / "psql"
        proc = subprocess.run(
            [
                str(psql), "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", dbname,
                "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed (rc={proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, name: str) -> str:
        """Create an empty database and return its asyncpg SQLAlchemy URL."""
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, terminating any connections still open to it."""
        if not _DB_NAME.match(name):
            raise ValueError(f"invalid database name {name!r}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
