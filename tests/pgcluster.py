"""A throw-away PostgreSQL cluster from the machine's binaries, without pytest.

``start_cluster()`` runs ``initdb`` into a new folder under /tmp and
``pg_ctl start`` on a free loopback port, with its socket in that folder;
``PostgresServer.close()`` stops it and deletes the folder. The binaries are
found under /usr/lib/postgresql/*/bin, through ``pg_config`` or on PATH
(``CRUZFLOW_PG_BINDIR`` names the folder); without them ``start_cluster``
raises ``Unavailable`` saying so.

PostgreSQL refuses to run as root: run as root, the cluster runs as the
``postgres`` user (``runuser``). It trusts local socket connections (the
admin helpers here, as ``postgres``) and asks TCP clients for a password:
stores connect as the role ``cruzflow`` with its password in the URL, as a
deployment does.

The tests' fixtures over it are in tests/postgres.py; ``make bench --store
postgres`` (bench/pg.py) starts one too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

ROLE = "cruzflow"
"""The role the stores connect as (a password, no superuser)."""

TEST_SETTINGS = (
    # Statement counts for the round-trip tests.
    "shared_preload_libraries=pg_stat_statements",
    "max_connections=200",
    # Nothing runs but what the tests do: no vacuum or analyze of their own,
    # which would cost CPU and count as transactions.
    "autovacuum=off",
)
"""The server settings the tests run with."""


def _bindir() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    named = os.environ.get("CRUZFLOW_PG_BINDIR")
    candidates = [Path(named)] if named else []
    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major, reverse=True)
    ]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _major(path: str) -> int:
    version = Path(path).parent.name
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    """A running throw-away cluster."""

    bindir: Path
    folder: Path
    port: int
    password: str
    run_as: list[str]
    """The command prefix that runs a binary as the cluster's owner."""
    databases: int = 0
    started_in: float = 0.0
    """Seconds from initdb to a server taking connections."""
    settings: tuple[str, ...] = TEST_SETTINGS
    """The server's settings (``name=value``), given as ``-c`` at each start."""
    log: Path = field(init=False)
    _maker: ThreadPoolExecutor = field(init=False)
    _spare: Future[str] | None = field(init=False, default=None)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.log = self.folder / "server.log"
        self._maker = ThreadPoolExecutor(1, thread_name_prefix="postgres-databases")

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str, *, password: str | None = None) -> str:
        """The URL a store connects by: TCP on loopback, as ``cruzflow``."""
        secret = self.password if password is None else password
        return f"postgresql://{ROLE}:{secret}@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed: {done.stdout}{done.stderr}\n{self._tail()}"
            )
        return done

    def _tail(self) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-20:])
        except OSError:
            return ""

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.folder}",
                "-c listen_addresses=127.0.0.1",
                *(f"-c {setting}" for setting in self.settings),
            ]
        )
        self._pg_ctl("-o", options, "-l", str(self.log), "-w", "-s", "start")

    def stop(self) -> None:
        # Not while the next test's database is being made.
        spare = self._spare
        if spare is not None:
            with contextlib.suppress(Exception):
                spare.result()
        self._pg_ctl("-m", "fast", "-w", "-s", "stop")

    def restart(self) -> None:
        """Stop and start again; the connections open at the time are cut."""
        self.stop()
        self.start()

    async def admin(self, database: str = "postgres") -> asyncpg.Connection:
        """A superuser connection through the cluster's socket (trust)."""
        return await asyncpg.connect(
            host=str(self.folder), port=self.port, user="postgres", database=database
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the superuser through the socket; its output (unaligned)."""
        done = subprocess.run(
            [*self.run_as, str(self.bindir / "psql"), "-h", str(self.folder), "-p",
             str(self.port), "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1",
             "-qAtc", sql],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def create_database(self) -> str:
        """A new empty database owned by ``cruzflow``; its name.

        Copying the template takes a good part of a second on a busy machine:
        the next one is made in the background while the test runs.
        """
        spare, self._spare = self._spare, None
        try:
            name = spare.result() if spare is not None else self._create()
        except RuntimeError:
            name = self._create()  # the server was stopped meanwhile: once more
        self._spare = self._maker.submit(self._create)
        return name

    def _create(self) -> str:
        with self._lock:
            self.databases += 1
            name = f"test_{self.databases}"
        return self.new_database(name)

    def new_database(self, name: str) -> str:
        """Create the empty database ``name`` owned by ``cruzflow`` now, with no
        spare made in the background; its name."""
        self.psql(f'CREATE DATABASE "{name}" OWNER {ROLE} TEMPLATE template0')
        return name

    def postmaster_pid(self) -> int:
        """The pid of the running server's postmaster, the parent of all its processes."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def close(self) -> None:
        """Stop the server at once and delete its folder."""
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(Exception):
                spare.result()
        self._maker.shutdown()
        self._pg_ctl("-m", "immediate", "-w", "-s", "stop", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _start(
    bindir: Path, folder: Path, run_as: list[str], settings: tuple[str, ...]
) -> PostgresServer:
    password = secrets.token_urlsafe(16)
    initdb = subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(folder / "data"),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "--no-instructions",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb failed: {initdb.stdout}{initdb.stderr}")
    for attempt in range(3):
        server = PostgresServer(bindir, folder, _free_port(), password, run_as, settings=settings)
        try:
            server.start()
        except RuntimeError:
            if attempt == 2:
                raise
            continue  # the port was taken meanwhile: another one
        break
    sql = f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}';"
    if any("pg_stat_statements" in setting for setting in settings):
        sql += " CREATE EXTENSION pg_stat_statements;"
    try:
        server.psql(sql)
    except RuntimeError:
        server.stop()
        raise
    return server


def _owner(who: str) -> tuple[list[str], int | None] | str:
    """How to run the server's binaries, and the uid that must own its folder;
    or why they cannot run here (``who`` runs as root, e.g. "the tests")."""
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        return f"{who} run as root and there is no 'postgres' user to run PostgreSQL as"
    runuser = shutil.which("runuser")
    if runuser is None:
        return f"{who} run as root and there is no runuser to run PostgreSQL as 'postgres'"
    return [runuser, "-u", "postgres", "--"], user.pw_uid


class Unavailable(Exception):
    """PostgreSQL cannot run here; the message says why and what would mend it."""


def start_cluster(
    settings: Sequence[str] = TEST_SETTINGS, *, who: str = "the tests"
) -> PostgresServer:
    """A new cluster, started and taking connections, with the role ``cruzflow``.

    ``settings`` are ``name=value`` server settings; ``who`` names what runs
    it, for the message of ``Unavailable``.
    """
    bindir = _bindir()
    if bindir is None:
        raise Unavailable(
            "no initdb and pg_ctl under /usr/lib/postgresql/*/bin, from pg_config or on PATH "
            "(install the PostgreSQL server, or set CRUZFLOW_PG_BINDIR)"
        )
    owner = _owner(who)
    if isinstance(owner, str):
        raise Unavailable(owner)
    run_as, uid = owner
    # Not under a private temporary folder (the cluster's owner may be another
    # user), and the socket's path must stay short (about 100 bytes at most).
    folder = Path(
        tempfile.mkdtemp(prefix="cruzflow-pg-", dir="/tmp" if Path("/tmp").is_dir() else None)
    )
    if uid is not None:
        os.chown(folder, uid, -1)
    started = time.monotonic()
    try:
        server = _start(bindir, folder, run_as, tuple(settings))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    server.started_in = time.monotonic() - started
    return server
