"""A real PostgreSQL server for the multi-host tests, started once per test session (per worker).

initdb runs into a fresh directory under /tmp as a non-root user (PostgreSQL refuses to run as
root: as root we use the Debian ``postgres`` account through ``runuser``). The server listens on
a unix socket in that directory and on 127.0.0.1 at a free port, with trust authentication (the
directory is private to the test run). Every test gets its own database, so advisory locks and
tables never leak between tests. Tests skip with the reason when the server binaries are absent.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg (v3) is not installed: "
                              "pip install 'psycopg[binary]'")


def _pg_bin() -> Path | None:
    explicit = os.environ.get("HILFARM_PG_BIN")
    if explicit and (Path(explicit) / "initdb").exists():
        return Path(explicit)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A running test server: ``url(db)`` gives a URL, ``restart()`` is ``pg_ctl restart``."""

    bin: Path
    root: Path
    data: Path
    port: int
    prefix: list[str]

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def socket_url(self, dbname: str = "postgres") -> str:
        return f"postgresql:///{dbname}?host={self.root}&port={self.port}&user=postgres"

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=timeout)

    def start(self) -> None:
        options = (f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        self._ctl("-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """pg_ctl restart (fast mode): every connection is dropped, every lock is gone."""
        options = (f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 "
                   "-c max_connections=300 -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off")
        # -l again: without it the new server inherits our stdout pipe and run() never returns.
        self._ctl("-o", options, "-l", str(self.root / "server.log"), "-m", "fast", "-w",
                  "restart")

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql, or set "
                    "HILFARM_PG_BIN to the directory holding initdb and pg_ctl)")
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as non-root")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        prefix = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="hilfarm-pg-"))
    os.chmod(root, 0o755)
    if prefix:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    server = PgServer(bin_dir, root, data, _free_port(), prefix)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.new_database()

