"""``make bench --store postgres``: a throw-away PostgreSQL cluster and what it costs.

The cluster comes from tests/pgcluster.py (``initdb`` into a folder under
/tmp, ``pg_ctl start`` on a free loopback port; as the ``postgres`` user when
run as root), with ``synchronous_commit`` on (PostgreSQL's default, and the
store sets it on every connection): a commit returns once its WAL is flushed.

What a phase costs the database is read at its two edges, from sources that
are exact at the moment they are read:

- CPU: the postmaster's own and its reaped children's (``/proc/PID/stat``
  utime, stime, cutime, cstime), plus every live child's (the backends,
  the WAL writer, the checkpointer...);
- commits: the WAL between the two edges, read back with ``pg_waldump``:
  its COMMIT and ABORT records (one per transaction that wrote; read-only
  transactions write none and flush nothing), and its heap INSERT, UPDATE
  and DELETE records per table, i.e. the rows each commit wrote;
- the WAL's bytes (``pg_current_wal_lsn()``).

``pg_stat_database.xact_commit`` is not used: PostgreSQL 15 and later count a
backend's transactions there only when it flushes its statistics, at most
once a second while busy and up to 10 s after it goes idle, so a phase of a
second or two cannot be cut cleanly from it (and waiting the 10 s lets the
servers' background claims and lease renewals in).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from tests.pgcluster import PostgresServer, Unavailable, start_cluster

# What the bench's cluster runs with, besides PostgreSQL's defaults (fsync on,
# synchronous_commit on, full_page_writes on, wal_sync_method fdatasync).
SETTINGS = (
    "max_connections=200",
    # Nothing runs but what the bench does: no vacuum or analyze of its own.
    "autovacuum=off",
    # The WAL of a phase stays on disk until pg_waldump has read it, even if
    # a checkpoint falls in the phase.
    "wal_keep_size=1GB",
)
# --pg-statements: every statement counted as it ends (some CPU on each).
STATEMENTS = "shared_preload_libraries=pg_stat_statements"
# The store's tables whose row writes are counted.
TABLES = ("instances", "steps", "events", "inbox", "servers")

_CLK_TCK = os.sysconf("SC_CLK_TCK")

_RMGR = re.compile(r"^rmgr: (\w+)\s")
_DESC = re.compile(r"desc: (\w+)( (\d+) tuples)?")
_REL = re.compile(r"blkref #0: rel \d+/(\d+)/(\d+)")
_ROW_WRITES = {"INSERT", "UPDATE", "HOT_UPDATE", "DELETE"}
_LABEL = 60  # characters of a statement that name it


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 on), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


@dataclass(frozen=True, slots=True)
class Edge:
    """The database at one edge of a phase."""

    lsn: str
    wal_bytes: int
    cpu_s: float


@dataclass(frozen=True, slots=True)
class Wal:
    """What the WAL between two edges holds."""

    commits: int
    aborts: int
    rows: dict[str, int]
    """Row writes (INSERT, UPDATE, DELETE) per table of the store."""
    read_ok: bool
    """Whether pg_waldump read up to the end edge without a complaint."""


class Postgres:
    """The bench's cluster, and what it has cost so far."""

    def __init__(self, *, statements: bool = False) -> None:
        self.statements = statements
        settings = (*SETTINGS, STATEMENTS) if statements else SETTINGS
        try:
            self.cluster: PostgresServer = start_cluster(settings, who="the bench")
        except Unavailable as exc:
            raise SystemExit(
                f"bench: --store postgres cannot start PostgreSQL here: {exc}"
            ) from None
        self.version = self.cluster.psql("SHOW server_version").strip()
        self._conn: asyncpg.Connection | None = None

    @property
    def started_in_s(self) -> float:
        return self.cluster.started_in

    def database(self, name: str) -> str:
        """A new empty database owned by the store's role; its URL."""
        return self.cluster.url(self.cluster.new_database(name))

    def close(self) -> None:
        self.cluster.close()

    # ---------------------------------------------------------- processes
    def processes(self) -> list[int]:
        """The postmaster and its children, now."""
        master = self.cluster.postmaster_pid()
        pids = [master]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields is not None and int(fields[1]) == master:
                    pids.append(int(entry.name))
        return pids

    def cpu_seconds(self) -> float:
        """User plus system CPU of the cluster so far: the postmaster, the
        children it has reaped, and its live children."""
        master, *children = self.processes()
        ticks = 0
        fields = _stat(master)
        if fields is not None:
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
        for pid in children:
            fields = _stat(pid)
            if fields is not None:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / _CLK_TCK

    # ---------------------------------------------------------------- edges
    async def _admin(self) -> asyncpg.Connection:
        # The superuser through the cluster's socket, on the "postgres"
        # database: it reads WAL positions and writes nothing.
        if self._conn is None or self._conn.is_closed():
            self._conn = await self.cluster.admin()
        return self._conn

    async def statements_reset(self) -> None:
        """--pg-statements: count from zero (at a phase's start)."""
        conn = await self._admin()
        await conn.execute("SELECT pg_stat_statements_reset()")

    async def statement_calls(self, database: str) -> dict[str, int]:
        """--pg-statements: the calls of each statement on ``database`` since the
        reset, by its first words."""
        conn = await self._admin()
        rows = await conn.fetch(
            "SELECT s.calls, s.query FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
            database,
        )
        calls: Counter[str] = Counter()
        for row in rows:
            calls[" ".join(str(row["query"]).split())[:_LABEL]] += int(row["calls"])
        return dict(calls.most_common())

    async def edge(self) -> Edge:
        conn = await self._admin()
        row = await conn.fetchrow(
            "SELECT pg_current_wal_lsn()::text AS lsn,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint AS bytes"
        )
        assert row is not None
        return Edge(lsn=row["lsn"], wal_bytes=row["bytes"], cpu_s=self.cpu_seconds())

    async def close_admin(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def relations(self, database: str) -> dict[tuple[int, int], str]:
        """(database oid, relfilenode) of each store table of ``database``: its name."""
        conn = await self.cluster.admin(database)
        try:
            db = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = $1", database)
            rows = await conn.fetch(
                "SELECT relfilenode, relname FROM pg_class"
                " WHERE relkind = 'r' AND relname = ANY($1::text[])",
                list(TABLES),
            )
        finally:
            await conn.close()
        return {(int(db), int(r["relfilenode"])): str(r["relname"]) for r in rows}

    def wal(self, start: Edge, end: Edge, relations: dict[tuple[int, int], str]) -> Wal:
        """The commits and row writes between two edges, read back by pg_waldump."""
        if end.wal_bytes <= start.wal_bytes:
            return Wal(0, 0, {}, True)
        c = self.cluster
        done = subprocess.run(
            [*c.run_as, str(c.bindir / "pg_waldump"), "-p", str(c.data / "pg_wal"),
             "-s", start.lsn, "-e", end.lsn, "-r", "Heap", "-r", "Heap2", "-r", "Transaction"],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        commits = aborts = 0
        rows: Counter[str] = Counter()
        for line in done.stdout.splitlines():
            rmgr = _RMGR.match(line)
            desc = _DESC.search(line)
            if rmgr is None or desc is None:
                continue
            kind = desc.group(1)
            if rmgr.group(1) == "Transaction":
                commits += kind == "COMMIT"
                aborts += kind == "ABORT"
                continue
            if kind in _ROW_WRITES or kind == "MULTI_INSERT":
                rel = _REL.search(line)
                table = relations.get((int(rel.group(1)), int(rel.group(2)))) if rel else None
                if table is not None:
                    rows[table] += int(desc.group(3)) if desc.group(3) else 1
        # It may stop at a record that crosses the end edge: all before it is read.
        read_ok = done.returncode == 0 or "end of WAL" in done.stderr
        return Wal(commits, aborts, dict(rows), read_ok)


def phase_figures(
    start: Edge, end: Edge, wal: Wal, fsyncs: int | None, done: int, wall: float
) -> dict[str, Any]:
    """The database's share of one phase, per workflow and per commit."""

    def per(value: float | None, count: float, scale: float = 1.0) -> float | None:
        return None if value is None or count <= 0 else round(value * scale / count, 3)

    cpu = end.cpu_s - start.cpu_s
    rows = {table: wal.rows.get(table, 0) for table in TABLES}
    return {
        "postgres_cpu_s": round(cpu, 3),
        "postgres_cpu_ms_per_wf": per(cpu, done, 1000),
        "postgres_cpu_util": per(cpu, wall),
        "pg_commits": wal.commits,
        "pg_aborts": wal.aborts,
        "pg_commits_per_wf": per(wal.commits, done),
        "pg_wf_per_commit": per(done, wal.commits),
        "pg_step_writes_per_commit": per(rows["steps"], wal.commits),
        "pg_instance_writes_per_commit": per(rows["instances"], wal.commits),
        "pg_event_writes_per_commit": per(rows["events"], wal.commits),
        "pg_row_writes": rows,
        "pg_wal_read_to_end": wal.read_ok,
        "pg_wal_bytes_per_wf": per(end.wal_bytes - start.wal_bytes, done),
        "pg_fsyncs": fsyncs,
        "pg_fsyncs_per_wf": per(fsyncs, done),
    }
