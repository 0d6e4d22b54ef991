"""A throwaway PostgreSQL cluster for tests: initdb into a temp dir, start on a free loopback port, delete at the end.

The binaries come from `BATCHYARD_PG_BIN` or /usr/lib/postgresql/15/bin (Debian's postgresql-15 package). initdb and
pg_ctl refuse to run as root, so as root they run as the `postgres` user (`runuser`) in a temp dir it owns. The
cluster trusts every local connection, listens on 127.0.0.1 only, keeps its unix socket in the temp dir, and runs
with fsync off: it is for tests and never survives them. Each test gets its own database (`create_database`), so
tests never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

PG_BIN = Path(os.environ.get("BATCHYARD_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or a cluster cannot be started on this machine."""


@dataclass
class PostgresCluster:
    root: Path
    port: int
    started_in: float  # seconds from initdb to accepting connections

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    async def create_database(self, template: str = "template0") -> str:
        """A new, empty database (a copy of `template`); returns its DSN."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()
        return self.dsn(name)

    async def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("/", 1)[1]
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def halt(self, mode: str = "fast") -> None:
        """Stop the server (an outage or the first half of a restart), keeping its data, port and socket dir:
        `fast` ends every session at once (clients see 57P01 admin_shutdown), `immediate` is a crash."""
        _run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"]))

    def resume(self) -> None:
        """Start a halted cluster again on the same port and data (its databases are still there)."""
        _run(_as_owner(_start_cmd(self.root, self.port)))

    def stop(self) -> None:
        """Stop at once (no checkpoint: the data is thrown away) and delete everything."""
        try:
            _stop(self.data_dir)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _as_owner(cmd: list[str]) -> list[str]:
    """initdb and pg_ctl refuse root: run them as `postgres` when we are root."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", SUPERUSER, "--", *cmd]


def _run(cmd: list[str], timeout: float = 60.0) -> None:
    try:
        subprocess.run(cmd, capture_output=True, check=True, timeout=timeout)
    except subprocess.CalledProcessError as e:
        out = (e.stdout + e.stderr).decode(errors="replace")[-3000:]
        raise PostgresUnavailable(f"{' '.join(cmd)} exited with {e.returncode}:\n{out}") from e
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PostgresUnavailable(f"{' '.join(cmd)} failed: {e}") from e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scratch_dir() -> str | None:
    """Where the cluster lives: a RAM disk when there is a roomy one (CREATE DATABASE takes ~15 ms there instead of
    ~300 ms on a plain disk, and startup halves), else the default temp dir. BATCHYARD_PG_TMP overrides."""
    if "BATCHYARD_PG_TMP" in os.environ:
        return os.environ["BATCHYARD_PG_TMP"]
    shm = "/dev/shm"
    try:
        if os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 1 << 30:
            return shm
    except OSError:
        pass
    return None


def _check_binaries() -> None:
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (PG_BIN / b).is_file()]
    if missing:
        raise PostgresUnavailable(
            f"no {', '.join(missing)} in {PG_BIN}: install PostgreSQL 15 (apt-get install postgresql-15) "
            "or point BATCHYARD_PG_BIN at its bin directory"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError as e:
            raise PostgresUnavailable(
                f"running as root and there is no `{SUPERUSER}` user to run initdb"
            ) from e
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root and there is no `runuser` to run initdb as postgres")


def _start_cmd(root: Path, port: int) -> list[str]:
    opts = " ".join(f"-c {k}={v}" for k, v in _SETTINGS.items())
    return [
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(root / "data"),
        "-l",
        str(root / "server.log"),
        "-w",
        "-t",
        "30",
        "-o",
        f"-p {port} -k {root} {opts}",
        "start",
    ]


def _stop(data: Path) -> None:
    _run(_as_owner([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]))


def start_postgres(attempts: int = 3) -> PostgresCluster:
    """initdb + start a cluster; raises PostgresUnavailable when that cannot be done here."""
    _check_binaries()
    t0 = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="batchyard-pg-", dir=_scratch_dir()))
    data = root / "data"
    try:
        if os.geteuid() == 0:
            owner = pwd.getpwnam(SUPERUSER)
            os.chown(root, owner.pw_uid, owner.pw_gid)
        initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8"]
        _run(_as_owner([*initdb, "--locale=C", "--no-sync"]))
        error = PostgresUnavailable("not started")
        for _ in range(attempts):
            port = _free_port()  # another process may bind it first: then the start fails and we try another
            try:
                _run(_as_owner(_start_cmd(root, port)))
            except PostgresUnavailable as e:
                error = e
                continue
            return PostgresCluster(root, port, time.monotonic() - t0)
        log = (root / "server.log").read_text(errors="replace")[-3000:]
        raise PostgresUnavailable(f"{error}\nserver log:\n{log}")
    except BaseException:
        if (data / "postmaster.pid").exists():  # a server that came up after pg_ctl gave up waiting
            with contextlib.suppress(PostgresUnavailable):
                _stop(data)
        shutil.rmtree(root, ignore_errors=True)
        raise
