"""The embedded checkpoint store: one SQLite file in WAL mode, fsynced on commit.

One writer connection applies each group-committed batch in one
``BEGIN IMMEDIATE`` transaction with one ``executemany`` per kind of row. It
lives on a thread of its own, where the whole batch (every statement and the
commit) runs as one call: a batch costs the event loop one await however many
rows it carries. Reads go through a second connection (aiosqlite), which WAL
lets run beside the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from cruzflow.server.records import (
    ABANDONED,
    UNFINISHED,
    UNGATED,
    Batch,
    Command,
    EventRecord,
    InboxEvent,
    InstanceQuery,
    InstanceRecord,
    InstanceStatus,
    Lease,
    Notice,
    Refusal,
    ScheduleOrigin,
    ScheduleRecord,
    StepRecord,
)
from cruzflow.server.store.base import READ_BATCH, StoreError
from cruzflow.server.store.rows import event_of, inbox_of, instance_of, schedule_of, step_of

log = logging.getLogger("cruzflow.store")

# Each entry moves the schema one version up; never edit a released one.
MIGRATIONS: list[str] = [
    f"""
    CREATE TABLE instances (
        pk INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        workflow TEXT NOT NULL,
        status INTEGER NOT NULL,
        params BLOB NOT NULL,
        output BLOB,
        error_name TEXT,
        error_message TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        ended_at INTEGER
    );
    -- Only unfinished instances are in this index: recovery reads what is
    -- live, never the history.
    CREATE INDEX instances_unfinished ON instances (pk)
        WHERE status IN ({", ".join(str(int(s)) for s in UNFINISHED)});
    CREATE TABLE steps (
        instance_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        occurrence INTEGER NOT NULL,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        ended_at INTEGER,
        output BLOB,
        error_name TEXT,
        error_message TEXT,
        next_attempt_at INTEGER,
        PRIMARY KEY (instance_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        instance_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        data TEXT NOT NULL,
        payload BLOB,
        PRIMARY KEY (instance_id, seq)
    ) WITHOUT ROWID;
    """,
    """
    ALTER TABLE instances ADD COLUMN lookup_key TEXT;
    -- When a WAITING instance resumes by itself (sleep end, event timeout).
    ALTER TABLE instances ADD COLUMN wake_at INTEGER;
    ALTER TABLE steps ADD COLUMN kind INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE steps ADD COLUMN event_type TEXT;
    CREATE INDEX instances_waking ON instances (wake_at) WHERE wake_at IS NOT NULL;
    -- What a starting server resumes (queued, running, pausing): not the
    -- waiting or paused ones, however many there are.
    CREATE INDEX instances_runnable ON instances (pk) WHERE status IN (1, 2, 5);
    -- Listing, newest first (pk order is creation order), by each filter.
    CREATE INDEX instances_by_workflow ON instances (workflow, pk);
    CREATE INDEX instances_by_status ON instances (status, pk);
    CREATE INDEX instances_by_lookup ON instances (lookup_key, pk) WHERE lookup_key IS NOT NULL;
    -- Retention: finished instances by when they ended.
    CREATE INDEX instances_ended ON instances (ended_at) WHERE ended_at IS NOT NULL;
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        instance_id TEXT NOT NULL,
        type TEXT NOT NULL,
        payload BLOB NOT NULL,
        at INTEGER NOT NULL,
        consumed_by INTEGER
    );
    CREATE INDEX inbox_pending ON inbox (instance_id, type, id) WHERE consumed_by IS NULL;
    CREATE INDEX inbox_by_instance ON inbox (instance_id);
    """,
    """
    -- The trace context of the call that created the instance, so every run's
    -- spans join the creator's trace, also after restarts and long sleeps.
    ALTER TABLE instances ADD COLUMN trace_parent TEXT;
    """,
    """
    -- Values the server keeps about the store itself, such as the secret
    -- that signs page tokens (made by SqliteStore.open on first start).
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID;
    """,
    """
    -- Where an error was raised (bounded), beside its name and message.
    ALTER TABLE instances ADD COLUMN error_traceback TEXT;
    ALTER TABLE steps ADD COLUMN error_traceback TEXT;
    -- When the current run began (the creation, or the last restart).
    ALTER TABLE instances ADD COLUMN run_started_at INTEGER;
    -- The sender's trace context, for the link from the wait that takes it.
    ALTER TABLE inbox ADD COLUMN trace_parent TEXT;
    """,
    """
    -- Control calls for an instance another server runs (a store several
    -- servers share; kept here so every store fills one protocol).
    CREATE TABLE commands (
        id TEXT PRIMARY KEY,
        instance_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        at INTEGER NOT NULL,
        taken_by TEXT,
        outcome TEXT
    ) WITHOUT ROWID;
    CREATE INDEX commands_pending ON commands (instance_id, at) WHERE taken_by IS NULL;
    """,
    """
    -- CountInstances reads this index alone, never a row: a table scan of
    -- 100,000 instances took 60 ms, this index 4 ms (and make bench's W1,
    -- whose status updates write it, kept its pace).
    CREATE INDEX instances_by_workflow_status ON instances (workflow, status);
    """,
    """
    -- Child workflows: the instance whose step.child started this one, and
    -- whether it is left running when that parent is terminated or restarted.
    ALTER TABLE instances ADD COLUMN parent_id TEXT;
    ALTER TABLE instances ADD COLUMN abandon INTEGER NOT NULL DEFAULT 0;
    -- ListInstances by parent, newest first; a parent's terminate finds its children.
    CREATE INDEX instances_by_parent ON instances (parent_id, pk) WHERE parent_id IS NOT NULL;
    -- A child's end, told to its parent in the child's last commit, makes a
    -- waiting parent due in that commit: a server killed before it wakes the
    -- parent wakes it through the wake index when it starts again.
    CREATE TRIGGER inbox_child_ended AFTER INSERT ON inbox
    WHEN NEW.type LIKE 'cruzflow:child:%'
    BEGIN
        UPDATE instances SET wake_at = NEW.at
        WHERE id = NEW.instance_id AND status = 4 AND wake_at > NEW.at;
    END;
    """,
    """
    -- Concurrency and rate limits of a workflow ([[workflows]] concurrency,
    -- concurrency_key, rate_limit): the key whose slots an instance takes, and
    -- gate NULL (no limit), 0 (waiting for a slot) or 1 (let through at
    -- gated_at: it holds its slot until it finishes).
    ALTER TABLE instances ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE instances ADD COLUMN concurrency_key TEXT;
    ALTER TABLE instances ADD COLUMN gate INTEGER;
    ALTER TABLE instances ADD COLUMN gated_at INTEGER;
    -- Who goes next: higher priority first, then creation order.
    CREATE INDEX instances_gate_waiting
        ON instances (workflow, concurrency_key, priority DESC, pk) WHERE gate = 0;
    -- Who holds a slot: counted, never a history scan.
    CREATE INDEX instances_gate_holding
        ON instances (workflow, concurrency_key) WHERE gate = 1 AND status NOT IN (6, 7, 8);
    -- Starts within a rate limit's window.
    CREATE INDEX instances_gate_starts
        ON instances (workflow, concurrency_key, gated_at) WHERE gate = 1;
    """,
    """
    -- Cron schedules (engine/schedules.py); cursor_at: every due time up to
    -- it is done with (fired, or passed over).
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY,
        workflow TEXT NOT NULL,
        cron TEXT NOT NULL,
        timezone TEXT NOT NULL,
        params BLOB NOT NULL,
        catch_up INTEGER NOT NULL,
        paused INTEGER NOT NULL,
        origin INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        cursor_at INTEGER NOT NULL,
        last_due_at INTEGER,
        last_instance_id TEXT
    ) WITHOUT ROWID;
    -- The schedule that created an instance, and ListInstances by it.
    ALTER TABLE instances ADD COLUMN schedule_id TEXT;
    CREATE INDEX instances_by_schedule ON instances (schedule_id, pk)
        WHERE schedule_id IS NOT NULL;
    """,
    """
    -- The audited changes of an instance's steps (RepairInstance, a restart
    -- from a step): few rows, so GetStatus finds whether an instance has any
    -- with one probe of a small index, and reads them only then.
    CREATE INDEX events_audit ON events (instance_id, seq) WHERE kind = 6;
    """,
]

_INSERT_INSTANCE = (
    "INSERT INTO instances (id, workflow, status, params, output, error_name, error_message,"
    " created_at, updated_at, ended_at, lookup_key, wake_at, trace_parent, error_traceback,"
    " run_started_at, parent_id, abandon, priority, concurrency_key, gate)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_INSTANCE = (
    "UPDATE instances SET status = ?, output = ?, error_name = ?, error_message = ?,"
    " updated_at = ?, ended_at = ?, wake_at = ?, error_traceback = ?,"
    " run_started_at = COALESCE(?, run_started_at) WHERE id = ?"
)
_CLEAR_STEPS = "DELETE FROM steps WHERE instance_id = ?"
_INSERT_INBOX = (
    "INSERT INTO inbox (instance_id, type, payload, at, trace_parent) VALUES (?, ?, ?, ?, ?)"
)
_CONSUME_INBOX = "UPDATE inbox SET consumed_by = ? WHERE id = ?"
_TAKE_INBOX = (
    "SELECT id, instance_id, type, payload, at, trace_parent FROM inbox INDEXED BY inbox_pending"
    " WHERE instance_id = ? AND type = ? AND consumed_by IS NULL ORDER BY id LIMIT ?"
)
# A range of the pending index: the types from ``prefix`` to the first string
# past every one that starts with it (BINARY collation: code point order).
_PENDING_TYPES = (
    "SELECT type FROM inbox INDEXED BY inbox_pending"
    " WHERE instance_id = ? AND type >= ? AND type < ? AND consumed_by IS NULL"
)
_DUE_WAKES = (
    "SELECT id, wake_at FROM instances INDEXED BY instances_waking"
    " WHERE wake_at IS NOT NULL AND wake_at <= ? ORDER BY wake_at LIMIT ?"
)
_UPSERT_STEP = (
    "INSERT INTO steps (instance_id, idx, name, occurrence, status, attempts, started_at,"
    " ended_at, output, error_name, error_message, next_attempt_at, kind, event_type,"
    " error_traceback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (instance_id, idx) DO UPDATE SET status = excluded.status,"
    " attempts = excluded.attempts, ended_at = excluded.ended_at, output = excluded.output,"
    " error_name = excluded.error_name, error_message = excluded.error_message,"
    " next_attempt_at = excluded.next_attempt_at, error_traceback = excluded.error_traceback"
)
_INSERT_EVENT = (
    "INSERT INTO events (instance_id, seq, at, kind, data, payload) VALUES (?, ?, ?, ?, ?, ?)"
)
_INSTANCE_COLUMNS = (
    "i.id, i.workflow, i.status, i.params, i.created_at, i.updated_at, i.output,"
    " i.error_name, i.error_message, i.ended_at, i.lookup_key, i.wake_at, i.trace_parent,"
    " i.error_traceback, i.run_started_at,"
    " COALESCE((SELECT e.seq FROM events e WHERE e.instance_id = i.id"
    " ORDER BY e.seq DESC LIMIT 1), 0), i.parent_id, i.abandon, i.priority, i.concurrency_key,"
    " i.gate, i.schedule_id"
)
# Written after the insert, in its transaction, only for the instances a
# schedule created: the insert of every other instance stays as it was.
_SET_SCHEDULE = "UPDATE instances SET schedule_id = ? WHERE id = ?"
_SCHEDULE_COLUMNS = (
    "id, workflow, cron, timezone, params, catch_up, paused, origin, created_at, updated_at,"
    " cursor_at, last_due_at, last_instance_id"
)
_GET_INSTANCE = (
    f"SELECT {_INSTANCE_COLUMNS}, EXISTS (SELECT 1 FROM events e INDEXED BY events_audit"
    " WHERE e.instance_id = i.id AND e.kind = 6) FROM instances i WHERE i.id = ?"
)
# The audit entries (EventKind.REPAIRED), newest first (reversed by the caller).
_READ_AUDIT = (
    "SELECT instance_id, seq, at, kind, data, payload FROM events INDEXED BY events_audit"
    " WHERE instance_id = ? AND kind = 6 ORDER BY seq DESC LIMIT ?"
)
# Walks only the unfinished part of the status index, however long the history.
_COUNT_UNFINISHED = (
    "SELECT status, count(*) FROM instances INDEXED BY instances_by_status"
    f" WHERE status IN ({', '.join(str(int(s)) for s in UNFINISHED)}) GROUP BY status"
)
# Waiting instances come back through the wake index, paused ones on resume.
_RUNNABLE = (InstanceStatus.QUEUED, InstanceStatus.RUNNING, InstanceStatus.WAITING_FOR_PAUSE)
_UNFINISHED = (
    f"SELECT {_INSTANCE_COLUMNS} FROM instances i INDEXED BY instances_runnable"
    f" WHERE i.status IN ({', '.join(str(int(s)) for s in _RUNNABLE)}) ORDER BY i.pk"
)
_GET_STEPS = (
    "SELECT instance_id, idx, name, occurrence, status, attempts, started_at, ended_at, output,"
    " error_name, error_message, next_attempt_at, kind, event_type, error_traceback"
    " FROM steps WHERE instance_id = ? ORDER BY idx"
)
_READ_EVENTS = (
    "SELECT instance_id, seq, at, kind, data, payload FROM events"
    " WHERE instance_id = ? AND seq > ? ORDER BY seq LIMIT ?"
)


def _get_instances(count: int) -> str:
    """``_GET_INSTANCE`` for ``count`` ids at once."""
    return _GET_INSTANCE.replace("WHERE i.id = ?", f"WHERE i.id IN ({', '.join('?' * count)})")


def _read_events_many(count: int) -> str:
    """``_READ_EVENTS`` for ``count`` instances in one statement: a range of the
    events' primary key each (a join and one ORDER BY would sort every event
    of them all, however long their histories, to give the first few)."""
    one = f"SELECT * FROM ({_READ_EVENTS})"
    return " UNION ALL ".join([one] * count)


# ---- listing: newest first, keyset-paginated on pk (creation order).
_FAR = 2**63 - 1
_LIST_COLUMNS = f"i.pk, {_INSTANCE_COLUMNS}"
# The first position from which instances were created at or after ?1 (ms): a
# bisection over the primary key, ~log2(rows) point lookups in one statement.
# It holds because pk order is creation order and created_at follows it as
# long as the clock does not step back; the page query still filters on
# created_at itself, and the bounds get _CLOCK_SLACK_MS of room for a clock
# that steps back a little.
_CREATED_FROM = "(SELECT created_at FROM instances WHERE pk >= (lo + hi) / 2 ORDER BY pk LIMIT 1)"
_POSITION_AT = (
    "WITH RECURSIVE bisect(lo, hi) AS ("
    " SELECT 0, (SELECT COALESCE(max(pk), 0) FROM instances) + 1"
    " UNION ALL"
    f" SELECT CASE WHEN COALESCE({_CREATED_FROM} >= ?1, 1) THEN lo ELSE (lo + hi) / 2 + 1 END,"
    f" CASE WHEN COALESCE({_CREATED_FROM} >= ?1, 1) THEN (lo + hi) / 2 ELSE hi END"
    " FROM bisect WHERE lo < hi"
    ") SELECT min(hi) FROM bisect"
)
_CLOCK_SLACK_MS = 10_000
_UNBOUNDED = 2**31

# ---- concurrency gates (see _open_gates)
_GATE_HOLD = "UPDATE instances SET gate = 0 WHERE id = ? AND gate IS NOT NULL"
_GATE_WAITING_KEYS = (
    "SELECT DISTINCT workflow, concurrency_key FROM instances INDEXED BY instances_gate_waiting"
    " WHERE gate = 0 AND status = 1"
)
_GATE_HOLDERS = (
    "SELECT count(*) FROM instances INDEXED BY instances_gate_holding"
    " WHERE workflow = ? AND concurrency_key = ? AND gate = 1 AND status NOT IN (6, 7, 8)"
)
_GATE_STARTS = (
    "SELECT gated_at FROM instances INDEXED BY instances_gate_starts"
    " WHERE workflow = ? AND concurrency_key = ? AND gate = 1 AND gated_at > ?"
    " ORDER BY gated_at DESC LIMIT ?"
)
_GATE_LET_THROUGH = (
    "UPDATE instances SET gate = 1, gated_at = ?4 WHERE pk IN ("
    "SELECT pk FROM instances INDEXED BY instances_gate_waiting"
    " WHERE workflow = ?1 AND concurrency_key = ?2 AND gate = 0 AND status = 1"
    " ORDER BY priority DESC, pk LIMIT ?3) RETURNING id"
)
_GATE_ANY_WAITING = (
    "SELECT 1 FROM instances INDEXED BY instances_gate_waiting"
    " WHERE workflow = ? AND concurrency_key = ? AND gate = 0 AND status = 1 LIMIT 1"
)
_LIVE = frozenset(int(s) for s in UNFINISHED)


def _page_query(
    query: InstanceQuery, low: int, high: int, limit: int
) -> tuple[str, tuple[Any, ...]]:
    """The page statement for ``query`` over positions [low, high).

    Each shape walks one index backwards from ``high``, so a page costs the
    rows it passes over, never an offset: lookup key first (the narrowest),
    then the status index when the statuses asked for are live ones (few,
    however long the history), else the workflow index, else the primary key.
    With several statuses, one index range per status merges in pk order.
    """
    bounds = " AND i.pk >= ? AND i.pk < ? AND i.created_at >= ? AND i.created_at < ?"
    bound_args = (
        low,
        high,
        -_FAR if query.created_min is None else query.created_min,
        _FAR if query.created_max is None else query.created_max,
    )
    statuses = sorted({int(s) for s in query.statuses})
    status_in = f" AND i.status IN ({', '.join('?' * len(statuses))})" if statuses else ""
    by_workflow = " AND i.workflow = ?" if query.workflow is not None else ""
    workflow_args: tuple[Any, ...] = (query.workflow,) if query.workflow is not None else ()
    tail = " ORDER BY 1 DESC LIMIT ?"
    select = f"SELECT {_LIST_COLUMNS} FROM instances i"
    by_parent = " AND i.parent_id = ?" if query.parent_id is not None else ""
    parent_args: tuple[Any, ...] = (query.parent_id,) if query.parent_id is not None else ()
    by_schedule = " AND i.schedule_id = ?" if query.schedule_id is not None else ""
    schedule_args: tuple[Any, ...] = (query.schedule_id,) if query.schedule_id is not None else ()
    if query.lookup_key is not None:
        sql = (
            f"{select} INDEXED BY instances_by_lookup WHERE i.lookup_key = ?"
            f"{by_parent}{by_schedule}{by_workflow}{status_in}{bounds}{tail}"
        )
        return sql, (
            query.lookup_key, *parent_args, *schedule_args, *workflow_args, *statuses,
            *bound_args, limit,
        )  # fmt: skip
    if query.schedule_id is not None:
        sql = (
            f"{select} INDEXED BY instances_by_schedule WHERE i.schedule_id = ?"
            f"{by_parent}{by_workflow}{status_in}{bounds}{tail}"
        )
        return sql, (
            query.schedule_id, *parent_args, *workflow_args, *statuses, *bound_args, limit,
        )  # fmt: skip
    if query.parent_id is not None:
        sql = (
            f"{select} INDEXED BY instances_by_parent WHERE i.parent_id = ?"
            f"{by_workflow}{status_in}{bounds}{tail}"
        )
        return sql, (query.parent_id, *workflow_args, *statuses, *bound_args, limit)
    if statuses and (query.workflow is None or all(s in _LIVE for s in statuses)):
        arm = f"{select} INDEXED BY instances_by_status WHERE i.status = ?{by_workflow}{bounds}"
        args: list[Any] = []
        for status in statuses:
            args += [status, *workflow_args, *bound_args]
        return " UNION ALL ".join([arm] * len(statuses)) + tail, (*args, limit)
    if query.workflow is not None:
        sql = f"{select} INDEXED BY instances_by_workflow WHERE i.workflow = ?{status_in}{bounds}{tail}"
        return sql, (query.workflow, *statuses, *bound_args, limit)
    return f"{select} WHERE 1{bounds}{tail}", (*bound_args, limit)


def _count_query(query: InstanceQuery, low: int, high: int) -> tuple[str, tuple[Any, ...]]:
    """The count statement for ``query`` over positions [low, high) (used
    only with a time filter). A lookup key walks its index (its few rows);
    a time filter, the rows of its positions' range; else only the covering
    index of workflow and status is read, never a row."""
    where: list[str] = []
    args: list[Any] = []
    timed = query.created_min is not None or query.created_max is not None
    index = " NOT INDEXED" if timed else " INDEXED BY instances_by_workflow_status"
    if query.lookup_key is not None:
        index = " INDEXED BY instances_by_lookup"
        where.append("lookup_key = ?")
        args.append(query.lookup_key)
    if query.workflow is not None:
        where.append("workflow = ?")
        args.append(query.workflow)
    if timed:
        where.append("pk >= ? AND pk < ? AND created_at >= ? AND created_at < ?")
        args += [
            low,
            high,
            -_FAR if query.created_min is None else query.created_min,
            _FAR if query.created_max is None else query.created_max,
        ]
    sql = (
        f"SELECT workflow, status, count(*) FROM instances{index}"
        f" WHERE {' AND '.join(where) or '1'} GROUP BY workflow, status"
    )
    return sql, tuple(args)


# ---- retention
_ENDED_BEFORE = (
    "SELECT id FROM instances INDEXED BY instances_ended"
    " WHERE ended_at IS NOT NULL AND ended_at < ? ORDER BY ended_at LIMIT ?"
)
# Each row is (instance id, ended-before time): an instance that no longer
# qualifies (restarted, or ended later) keeps every row.
_STILL_ENDED = "EXISTS (SELECT 1 FROM instances WHERE id = ?1 AND ended_at < ?2)"
_PURGE_CHILDREN = tuple(
    f"DELETE FROM {table} WHERE instance_id = ?1 AND {_STILL_ENDED}"
    for table in ("steps", "events", "inbox")
)
_PURGE_INSTANCE = "DELETE FROM instances WHERE id = ? AND ended_at < ?"

# The statements on the hot path, for the query-plan test.
HOT_QUERIES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "get_instance": (_GET_INSTANCE, ("x",)),
    "get_steps": (_GET_STEPS, ("x",)),
    "read_events": (_READ_EVENTS, ("x", 0, 10)),
    "get_instances": (_get_instances(2), ("x", "y")),
    "read_events_many": (_read_events_many(2), ("x", 0, 10, "y", 3, 10)),
    "read_audit": (_READ_AUDIT, ("x", 10)),
    "update_instance": (_UPDATE_INSTANCE, (1, None, None, None, 0, None, None, None, None, "x")),
    "upsert_step": (
        _UPSERT_STEP,
        ("x", 0, "n", 1, 1, 1, 0, None, None, None, None, None, 1, None, None),
    ),
    "clear_steps": (_CLEAR_STEPS, ("x",)),
    "take_inbox": (_TAKE_INBOX, ("x", "t", 1)),
    "consume_inbox": (_CONSUME_INBOX, (1, 1)),
    "due_wakes": (_DUE_WAKES, (0, 10)),
    "pending_types": (_PENDING_TYPES, ("x", "p:", "p;")),
    "count_unfinished": (_COUNT_UNFINISHED, ()),
    "unfinished": (_UNFINISHED, ()),
    "list_all": _page_query(InstanceQuery(), 0, 10, 10),
    "list_by_workflow": _page_query(
        InstanceQuery(workflow="w", statuses=(InstanceStatus.COMPLETE,), created_min=1), 0, 10, 10
    ),
    "list_by_statuses": _page_query(
        InstanceQuery(statuses=(InstanceStatus.RUNNING, InstanceStatus.COMPLETE)), 0, 10, 10
    ),
    "list_by_live_statuses_of_workflow": _page_query(
        InstanceQuery(workflow="w", statuses=(InstanceStatus.QUEUED, InstanceStatus.RUNNING)),
        0,
        10,
        10,
    ),
    "list_by_lookup": _page_query(
        InstanceQuery(workflow="w", lookup_key="k", statuses=(InstanceStatus.RUNNING,)), 0, 10, 10
    ),
    "list_by_parent": _page_query(
        InstanceQuery(parent_id="p", statuses=(InstanceStatus.COMPLETE,)), 0, 10, 10
    ),
    "list_by_schedule": _page_query(InstanceQuery(schedule_id="s"), 0, 10, 10),
    "position_at": (_POSITION_AT, (0,)),
    "ended_before": (_ENDED_BEFORE, (0, 10)),
    **{
        f"purge_{table}": (sql, ("x", 0))
        for table, sql in zip(("steps", "events", "inbox"), _PURGE_CHILDREN, strict=True)
    },
    "purge_instance": (_PURGE_INSTANCE, ("x", 0)),
}


# The faults a write can hit that leave nothing applied and may pass: the
# journal holds the batch and tries it again. Keyed by SQLite's primary result
# code (the low byte of an extended one); the advice says what mends it.
_TRANSIENT: dict[int, tuple[str, str]] = {
    sqlite3.SQLITE_FULL: ("disk full", "free space on the disk that holds {folder}"),
    sqlite3.SQLITE_BUSY: (
        "database locked",
        "another process holds a lock on {path}; end its transaction or stop it (only this "
        "server may write the store)",
    ),
    sqlite3.SQLITE_LOCKED: (
        "database locked",
        "another connection holds a lock on {path}; end its transaction",
    ),
    sqlite3.SQLITE_READONLY: (
        "read-only",
        "make {path}, its -wal and -shm files and {folder} writable again (permissions, "
        "immutable flag, read-only mount)",
    ),
    sqlite3.SQLITE_IOERR: ("I/O error", "check the disk and the file system that hold {path}"),
    sqlite3.SQLITE_CANTOPEN: (
        "cannot open the store's files",
        "check that {folder} and the store's files exist and are writable",
    ),
    sqlite3.SQLITE_PROTOCOL: ("database locked", "another process is using {path}; stop it"),
    sqlite3.SQLITE_NOMEM: ("out of memory", "free memory on this machine"),
}
# After these the connections may be stuck read-only: SQLite opens a file it
# cannot write read-only and never upgrades it, and the connections of one
# process share that read-only state (the -shm mapping) until all are closed.
_REOPEN = frozenset({sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN})


T = TypeVar("T")


class _Writer:
    """The writer connection, on a thread of its own. ``call`` runs a function
    of the connection there: a batch's statements and its commit in one hop
    from the event loop and back. aiosqlite's connection makes each statement
    a hop of its own; a checkpoint of three writes and a commit measured
    0.33-0.40 ms that way against 0.16 ms in one call (an fsync is about 0.1)."""

    def __init__(self, pool: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._pool = pool
        self._conn = conn

    @classmethod
    async def open(cls, path: Path, synchronous: str) -> _Writer:
        pool = ThreadPoolExecutor(1, thread_name_prefix="cruzflow-sqlite-writer")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level="IMMEDIATE")
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(pool, connect)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        return cls(pool, conn)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(connection, *args)`` on the writer's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, self._conn, *args)

    async def close(self) -> None:
        try:
            await self.call(sqlite3.Connection.close)
        finally:
            self._pool.shutdown(wait=False)


class SqliteStore:
    """The ``Store`` on one SQLite file. One server process owns the file."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._writer: _Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        # Signs page tokens; read (or made) by open.
        self._page_token_key: bytes | None = None
        # The last write failed in a way that needs new connections: this fault.
        self._reconnect_after: StoreError | None = None
        # Set while both connections are being replaced: reads wait for it.
        self._reconnected: asyncio.Event | None = None
        # Whether claim() has handed over the runnable instances.
        self._claimed = False

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._writer = await self._connect_writer()
            try:
                await self._writer.call(self._migrate)
            except sqlite3.Error as exc:
                raise self._fault("cannot migrate the store", exc) from exc
            self._page_token_key = await self._secret("page_token_key")
            self._reader = await self._connect()
        except BaseException:
            await self.close()
            raise

    async def open_read_only(self) -> None:
        """Open for reads only (``cruzflow check --store``), beside a server
        that may be running on the file: no lock taken, nothing migrated or
        written. Only ``get_instance``, ``get_steps`` and ``list_instances``."""
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no such store file; check the path")
        try:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            self._reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            await self._reader.execute("PRAGMA busy_timeout = 5000")
            async with self._reader.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            await self.close()
            raise self._fault("cannot open the store", exc) from exc
        version = row[0] if row else 0
        if version != len(MIGRATIONS):
            await self.close()
            raise StoreError(
                f"{self.path}: schema version {version}, where this cruzflow reads version "
                f"{len(MIGRATIONS)}; check against the server that runs it instead"
            )
        self._page_token_key = bytes(32)  # no page token is handed out

    def _take_lock(self) -> None:
        # Two servers on one file would both resume the same instances and run
        # their steps twice. The lock dies with the process, SIGKILL included.
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"{self.path}: another cruzflow server is using this store; stop it, or give "
                f"this one another [store] path"
            ) from None
        self._lock_fd = fd

    async def _connect_writer(self) -> _Writer:
        try:
            return await _Writer.open(self.path, self._synchronous)
        except sqlite3.Error as exc:
            raise self._fault("cannot open the store", exc) from exc

    async def _connect(self) -> aiosqlite.Connection:
        """A reader connection (autocommit: each read sees the latest commit)."""
        conn: aiosqlite.Connection | None = None
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            await conn.execute("PRAGMA busy_timeout = 5000")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    await conn.close()
            raise self._fault("cannot open the store", exc) from exc
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """On the writer's thread."""
        row = conn.execute("PRAGMA user_version").fetchone()
        version = row[0] if row else 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this server knows "
                f"({len(MIGRATIONS)}); run a newer cruzflow"
            )
        for number in range(version, len(MIGRATIONS)):
            conn.executescript(
                f"BEGIN IMMEDIATE; {MIGRATIONS[number]}; PRAGMA user_version = {number + 1}; COMMIT;"
            )
            log.info("store %s migrated to schema version %d", self.path, number + 1)

    async def _secret(self, name: str) -> bytes:
        """The 32 random bytes stored under ``name``, made on first use. Run
        before any batch: the writer connection holds no transaction yet."""

        def read_or_make(conn: sqlite3.Connection) -> bytes:
            select = "SELECT value FROM meta WHERE key = ?"
            rows = conn.execute(select, (name,)).fetchall()
            if not rows:
                # Written once only: a store that is read-only or locked at a
                # later start still opens, serves reads and recovers by itself.
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    (name, secrets.token_bytes(32)),
                )
                conn.commit()
                rows = conn.execute(select, (name,)).fetchall()
            return bytes(rows[0][0])

        assert self._writer is not None
        try:
            return await self._writer.call(read_or_make)
        except sqlite3.Error as exc:
            raise self._fault(f"cannot read or make the store's {name}", exc) from exc

    def page_token_key(self) -> bytes:
        assert self._page_token_key is not None, "store is not open"
        return self._page_token_key

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- write
    async def apply(self, batch: Batch, lease: Lease) -> dict[str, Refusal]:
        # One server per file (the lock file): the lease is always this
        # server's, so no write is fenced.
        writer = await self._writable()
        plan = _plan(batch)
        try:
            return await writer.call(_apply, batch, plan)
        except sqlite3.Error as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: sqlite3.Error) -> StoreError:
        """The StoreError for a failed write (``_apply`` rolled it back: nothing
        of the batch stays applied, so retrying the same batch is safe)."""
        fault = self._fault("commit failed", exc)
        code = getattr(exc, "sqlite_errorcode", 0)
        if (code & 0xFF) in _REOPEN or fault.cause == "read-only":
            self._reconnect_after = fault
        return fault

    async def _writable(self) -> _Writer:
        """The writer connection; after a read-only fault, new connections once the
        files can be written again (until then the same fault, without churn)."""
        fault = self._reconnect_after
        if fault is not None:
            if self._refused_write() is not None:
                raise StoreError(str(fault), cause=fault.cause, transient=True)
            await self._reconnect()
            self._reconnect_after = None
        conn = self._writer
        assert conn is not None, "store is not open"
        return conn

    async def _reconnect(self) -> None:
        """Close both connections, then open both again; reads wait meanwhile."""
        ready = self._reconnected = asyncio.Event()
        try:
            for conn in (self._reader, self._writer):
                if conn is not None:
                    # aiosqlite runs the reads already queued on it first.
                    with contextlib.suppress(sqlite3.Error):
                        await conn.close()
            self._reader = self._writer = None
            # A failure here is a transient StoreError too: the journal tries again,
            # and reads fail with it until then.
            self._writer = await self._connect_writer()
            self._reader = await self._connect()
        finally:
            self._reconnected = None
            ready.set()

    def _fault(self, what: str, exc: sqlite3.Error) -> StoreError:
        """A StoreError naming the cause of ``exc`` and what mends it."""
        code = getattr(exc, "sqlite_errorcode", None)
        known = _TRANSIENT.get(code & 0xFF) if code is not None else None
        if known is None:
            return StoreError(f"{self.path}: {what}: {exc}")
        cause, advice = known
        refused = None
        if cause in ("I/O error", "read-only", "cannot open the store's files"):
            # SQLite reports a write refused by the kernel (an immutable file, a
            # read-only mount) as an I/O error: ask the files themselves.
            refused = self._refused_write()
            if refused is not None:
                cause, advice = _TRANSIENT[sqlite3.SQLITE_READONLY]
        advice = advice.format(path=self.path, folder=self.path.parent)
        if refused is not None:
            advice = f"{refused}; {advice}"
        return StoreError(
            f"{self.path}: {what}: {cause} ({exc}); {advice}", cause=cause, transient=True
        )

    def _refused_write(self) -> str | None:
        """Why the store's files cannot be opened for writing, or None if they can."""
        for suffix in ("", "-wal", "-shm"):
            target = self.path.with_name(self.path.name + suffix)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_APPEND)
            except FileNotFoundError:
                continue
            except OSError as exc:
                return f"{target.name} cannot be opened for writing: {exc.strerror}"
            os.close(fd)
        return None

    # ----------------------------------------------------------------- read
    async def _fetch(self, sql: str, args: Any = ()) -> list[Any]:
        ready = self._reconnected
        if ready is not None:
            await ready.wait()
        reader = self._reader
        if reader is None:
            raise StoreError(
                f"{self.path}: the store's connections could not be reopened; retry later",
                cause="cannot open the store's files",
                transient=True,
            )
        return list(await reader.execute_fetchall(sql, args))

    # Every read is one execute_fetchall: a cursor left open across awaits
    # would hold its WAL snapshot while other reads share the connection, and
    # they would all see an old state.
    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        rows = await self._fetch(_GET_INSTANCE, (instance_id,))
        if not rows:
            return None
        record = instance_of(rows[0][:-1])
        record.audited = bool(rows[0][-1])
        return record

    async def get_instances(self, instance_ids: Sequence[str]) -> dict[str, InstanceRecord]:
        assert len(instance_ids) <= READ_BATCH
        if not instance_ids:
            return {}
        rows = await self._fetch(_get_instances(len(instance_ids)), tuple(instance_ids))
        found = {}
        for row in rows:
            record = instance_of(row[:-1])
            record.audited = bool(row[-1])
            found[record.id] = record
        return found

    async def read_events_many(
        self, cursors: Sequence[tuple[str, int]], limit_each: int
    ) -> list[EventRecord]:
        assert len(cursors) <= READ_BATCH
        if not cursors:
            return []
        args: list[Any] = []
        for instance_id, after_seq in cursors:
            args += (instance_id, after_seq, limit_each)
        rows = await self._fetch(_read_events_many(len(cursors)), tuple(args))
        # In cursor order, each instance's by sequence (a compound select has
        # no order of its own without an ORDER BY, and this one needs none).
        position = {instance_id: i for i, (instance_id, _) in enumerate(cursors)}
        events = [event_of(r) for r in rows]
        events.sort(key=lambda e: (position[e.instance_id], e.seq))
        return events

    async def read_audit(self, instance_id: str, limit: int) -> list[EventRecord]:
        rows = await self._fetch(_READ_AUDIT, (instance_id, limit))
        return [event_of(r) for r in reversed(rows)]

    async def count_unfinished(self) -> dict[InstanceStatus, int]:
        rows = await self._fetch(_COUNT_UNFINISHED, ())
        return {InstanceStatus(r[0]): r[1] for r in rows}

    async def get_steps(self, instance_id: str) -> list[StepRecord]:
        rows = await self._fetch(_GET_STEPS, (instance_id,))
        return [step_of(r) for r in rows]

    async def read_events(self, instance_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        rows = await self._fetch(_READ_EVENTS, (instance_id, after_seq, limit))
        return [event_of(r) for r in rows]

    async def take_events(self, instance_id: str, type: str, limit: int) -> list[InboxEvent]:
        rows = await self._fetch(_TAKE_INBOX, (instance_id, type, limit))
        return [inbox_of(r) for r in rows]

    async def pending_types(self, instance_id: str, prefix: str) -> list[str]:
        past = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        rows = await self._fetch(_PENDING_TYPES, (instance_id, prefix, past))
        return [r[0] for r in rows]

    async def due_wakes(self, before: int, limit: int) -> list[tuple[str, int]]:
        rows = await self._fetch(_DUE_WAKES, (before, limit))
        return [(r[0], r[1]) for r in rows]

    # ------------------------------------------------------------ ownership
    # The lock file taken by open() makes this process the store's only
    # server: its lease never expires and is never fenced, and nothing is
    # committed by another server to be told of.
    @property
    def lease_period_s(self) -> float | None:
        return None

    async def acquire(self, owner: str) -> Lease:
        assert self._lock_fd is not None, "store is not open"
        return Lease(owner, 1)

    async def renew(self, lease: Lease) -> bool:
        return True

    async def release(self, lease: Lease) -> None:
        return None

    async def claim(self, lease: Lease, limit: int) -> list[InstanceRecord]:
        # Every runnable instance, once: every later one was created by this server.
        if self._claimed:
            return []
        self._claimed = True
        rows = await self._fetch(_UNFINISHED)
        return [instance_of(r) for r in rows]

    async def claim_one(self, lease: Lease, instance_id: str) -> InstanceRecord | None:
        return await self.get_instance(instance_id)

    def subscribe(self, listener: Callable[[list[Notice]], None]) -> None:
        return None

    # -------------------------------------------------------------- commands
    # Single statements in autocommit on the reader connection: never inside
    # a batch's transaction on the writer's. One server per file never asks
    # another, so these serve the contract more than the server.
    async def _command_write(self, sql: str, args: tuple[Any, ...]) -> int:
        reader = self._reader
        assert reader is not None, "store is not open"
        try:
            cursor = await reader.execute(sql, args)
            count = cursor.rowcount
            await cursor.close()
            return count
        except sqlite3.Error as exc:
            raise self._fault("cannot write a command", exc) from exc

    async def send_command(self, command: Command) -> None:
        await self._command_write(
            "INSERT INTO commands (id, instance_id, kind, at) VALUES (?, ?, ?, ?)",
            (command.id, command.instance_id, command.kind, command.at),
        )

    async def pending_commands(self, instance_id: str) -> list[Command]:
        rows = await self._fetch(
            "SELECT id, instance_id, kind, at FROM commands INDEXED BY commands_pending"
            " WHERE instance_id = ? AND taken_by IS NULL ORDER BY at",
            (instance_id,),
        )
        return [Command(r[0], r[1], r[2], r[3]) for r in rows]

    async def take_command(self, command_id: str, taker: str) -> bool:
        outcome = ABANDONED if taker == ABANDONED else None
        changed = await self._command_write(
            "UPDATE commands SET taken_by = ?, outcome = ? WHERE id = ? AND taken_by IS NULL",
            (taker, outcome, command_id),
        )
        return changed == 1

    async def answer_command(self, command_id: str, outcome: str) -> None:
        await self._command_write(
            "UPDATE commands SET outcome = ? WHERE id = ?", (outcome, command_id)
        )

    async def command_outcome(self, command_id: str) -> str | None:
        rows = await self._fetch("SELECT outcome FROM commands WHERE id = ?", (command_id,))
        return rows[0][0] if rows else None

    async def list_instances(
        self, query: InstanceQuery, limit: int
    ) -> list[tuple[int, InstanceRecord]]:
        low, high = await self._positions(
            query, _FAR if query.older_than is None else query.older_than
        )
        if low >= high:
            return []
        sql, args = _page_query(query, low, high, limit)
        rows = await self._fetch(sql, args)
        return [(r[0], instance_of(r[1:])) for r in rows]

    async def count_instances(self, query: InstanceQuery) -> list[tuple[str, InstanceStatus, int]]:
        low, high = await self._positions(query, _FAR)
        if low >= high:
            return []
        rows = await self._fetch(*_count_query(query, low, high))
        return [(r[0], InstanceStatus(r[1]), r[2]) for r in rows]

    async def _positions(self, query: InstanceQuery, high: int) -> tuple[int, int]:
        """The positions [low, high) that may hold instances of ``query``'s
        creation times, at most ``high``."""
        low = 0
        if query.created_min is not None:
            low = await self._position_at(query.created_min - _CLOCK_SLACK_MS)
        if query.created_max is not None:
            high = min(high, await self._position_at(query.created_max + _CLOCK_SLACK_MS))
        return low, high

    async def _position_at(self, at: int) -> int:
        rows = await self._fetch(_POSITION_AT, (at,))
        return int(rows[0][0])

    async def ended_before(self, before: int, limit: int) -> list[str]:
        rows = await self._fetch(_ENDED_BEFORE, (before, limit))
        return [r[0] for r in rows]

    # ------------------------------------------------------------ schedules
    # Single statements in autocommit on the reader connection, as commands:
    # a schedule changes seldom, and never inside a batch's transaction.
    async def put_schedule(self, schedule: ScheduleRecord, *, replace: bool = False) -> bool:
        s = schedule
        values = (
            s.id, s.workflow, s.cron, s.timezone, s.params, int(s.catch_up), int(s.paused),
            int(s.origin), s.created_at, s.updated_at, s.cursor_at, s.last_due_at,
            s.last_instance_id,
        )  # fmt: skip
        conflict = (
            " ON CONFLICT (id) DO UPDATE SET workflow = excluded.workflow,"
            " cron = excluded.cron, timezone = excluded.timezone, params = excluded.params,"
            " catch_up = excluded.catch_up, origin = excluded.origin,"
            " updated_at = excluded.updated_at"
            if replace
            else " ON CONFLICT (id) DO NOTHING"
        )
        changed = await self._command_write(
            f"INSERT INTO schedules ({_SCHEDULE_COLUMNS}) VALUES"
            f" (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?){conflict}",
            values,
        )
        return changed == 1

    async def drop_config_schedules(self, keep: list[str]) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM schedules WHERE origin = ?", (int(ScheduleOrigin.CONFIG),)
        )
        gone = [r[0] for r in rows if r[0] not in keep]
        for schedule_id in gone:
            await self._command_write(
                "DELETE FROM schedules WHERE id = ? AND origin = ?",
                (schedule_id, int(ScheduleOrigin.CONFIG)),
            )
        return gone

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        rows = await self._fetch(
            f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE id = ?", (schedule_id,)
        )
        return schedule_of(rows[0]) if rows else None

    async def list_schedules(
        self, workflow: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        by_workflow = " AND workflow = ?" if workflow is not None else ""
        args: tuple[Any, ...] = (after, workflow, limit) if workflow is not None else (after, limit)
        rows = await self._fetch(
            f"SELECT {_SCHEDULE_COLUMNS} FROM schedules WHERE id > ?{by_workflow}"
            " ORDER BY id LIMIT ?",
            args,
        )
        return [schedule_of(r) for r in rows]

    async def pause_schedule(self, schedule_id: str, paused: bool, at: int) -> bool:
        # Resuming moves the cursor to now: what passed while paused is not caught up.
        changed = await self._command_write(
            "UPDATE schedules SET paused = ?, updated_at = ?,"
            " cursor_at = CASE WHEN ? THEN cursor_at ELSE max(cursor_at, ?) END WHERE id = ?",
            (int(paused), at, int(paused), at, schedule_id),
        )
        return changed == 1

    async def delete_schedule(self, schedule_id: str) -> bool:
        changed = await self._command_write("DELETE FROM schedules WHERE id = ?", (schedule_id,))
        return changed == 1

    async def mark_schedule(
        self, schedule_id: str, cursor_at: int, instance_id: str | None = None
    ) -> None:
        await self._command_write(
            "UPDATE schedules SET cursor_at = max(cursor_at, ?1),"
            " last_due_at = CASE WHEN ?2 IS NOT NULL AND ?1 > COALESCE(last_due_at, -1)"
            " THEN ?1 ELSE last_due_at END,"
            " last_instance_id = CASE WHEN ?2 IS NOT NULL AND ?1 > COALESCE(last_due_at, -1)"
            " THEN ?2 ELSE last_instance_id END WHERE id = ?3",
            (cursor_at, instance_id, schedule_id),
        )


# ------------------------------------------------- the writer thread
def _apply(conn: sqlite3.Connection, batch: Batch, plan: Plan) -> dict[str, Refusal]:
    """Every write of ``batch`` in one transaction, committed; on the writer's
    thread. Ids are reserved by the engine before a create; a taken one is
    still told apart here, so that it is refused alone and the rest of the
    batch lands. On an error the transaction is rolled back, then it is raised."""
    try:
        try:
            _write(conn, batch, plan)
            return {}
        except sqlite3.IntegrityError:
            conn.rollback()
            taken = _taken(conn, batch) if batch.new_instances else set()
            if not taken:
                raise
        rest = batch.without(taken)
        _write(conn, rest, _plan(rest))
        batch.purged = rest.purged
        batch.promoted, batch.gate_retry = rest.promoted, rest.gate_retry
        return dict.fromkeys(taken, Refusal.CONFLICT)
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            conn.rollback()
        raise


def _taken(conn: sqlite3.Connection, batch: Batch) -> set[str]:
    """The ids of the batch's new instances that are stored already."""
    ids = [r.id for r in batch.new_instances]
    taken: set[str] = set()
    for at in range(0, len(ids), 500):
        chunk = ids[at : at + 500]
        rows = conn.execute(
            f"SELECT id FROM instances WHERE id IN ({', '.join('?' * len(chunk))})", chunk
        ).fetchall()
        taken.update(row[0] for row in rows)
    return taken


def _fetchall(conn: sqlite3.Connection, sql: str, args: Any = ()) -> list[Any]:
    return conn.execute(sql, args).fetchall()


Plan = list[tuple[str, list[tuple[Any, ...]]]]
"""A batch's row writes: each statement with its rows, in order."""


def _plan(batch: Batch) -> Plan:
    """The rows of ``batch`` as statements, but its purges and gates. Made on
    the event loop: building them is the Python work of a commit, and on the
    writer's thread it would hold the GIL against the loop (sqlite3 lets go of
    it while it runs a statement)."""
    plan: Plan = []
    if batch.new_instances:
        plan.append((
            _INSERT_INSTANCE,
            [
                (r.id, r.workflow, int(r.status), r.params, r.output, r.error_name,
                 r.error_message, r.created_at, r.updated_at, r.ended_at,
                 r.lookup_key, r.wake_at, r.trace_parent, r.error_traceback,
                 r.run_started_at, r.parent_id, r.abandon, r.priority, r.concurrency_key,
                 r.gate)
                for r in batch.new_instances
            ],
        ))  # fmt: skip
        scheduled = [(r.schedule_id, r.id) for r in batch.new_instances if r.schedule_id]
        if scheduled:
            plan.append((_SET_SCHEDULE, scheduled))
    if batch.instance_updates:
        plan.append((
            _UPDATE_INSTANCE,
            [
                (int(u.status), u.output, u.error_name, u.error_message, u.updated_at,
                 u.ended_at, u.wake_at, u.error_traceback, u.run_started_at, u.id)
                for u in batch.instance_updates.values()
            ],
        ))  # fmt: skip
    if batch.cleared_steps:
        plan.append((_CLEAR_STEPS, [(i,) for i in batch.cleared_steps]))
    if batch.steps:
        plan.append((
            _UPSERT_STEP,
            [
                (s.instance_id, s.index, s.name, s.occurrence, int(s.status), s.attempts,
                 s.started_at, s.ended_at, s.output, s.error_name, s.error_message,
                 s.next_attempt_at, int(s.kind), s.event_type, s.error_traceback)
                for s in batch.steps.values()
            ],
        ))  # fmt: skip
    if batch.events:
        dumps = json.dumps
        plan.append((
            _INSERT_EVENT,
            [
                (e.instance_id, e.seq, e.at, int(e.kind),
                 dumps(e.data, separators=(",", ":")), e.payload)
                for e in batch.events
            ],
        ))  # fmt: skip
    if batch.inbox:
        plan.append(
            (
                _INSERT_INBOX,
                [(e.instance_id, e.type, e.payload, e.at, e.trace_parent) for e in batch.inbox],
            )
        )
    if batch.consumed:
        plan.append(
            (_CONSUME_INBOX, [(step, event) for event, (_, step) in batch.consumed.items()])
        )
    return plan


def _write(conn: sqlite3.Connection, batch: Batch, plan: Plan) -> None:
    """Every write of ``batch`` in one transaction, committed; ``plan`` is
    ``_plan(batch)``."""
    # isolation_level IMMEDIATE: the first statement opens BEGIN IMMEDIATE.
    for sql, rows in plan:
        conn.executemany(sql, rows)
    purged = 0
    if batch.purge:
        # Last, so a write of this batch that revived an instance keeps it.
        targets = list(batch.purge.items())
        for sql in _PURGE_CHILDREN:
            conn.executemany(sql, targets)
        purged = (conn.executemany(_PURGE_INSTANCE, targets)).rowcount
    if batch.gate_hold:
        conn.executemany(_GATE_HOLD, [(i,) for i in batch.gate_hold])
    promoted: list[str] = []
    retry: list[tuple[str, str, int]] = []
    if batch.gate_ids or batch.gate_keys or batch.gate_sweep:
        promoted, retry = _open_gates(conn, batch)
    conn.commit()
    batch.purged = purged
    batch.promoted, batch.gate_retry = promoted, retry


def _open_gates(
    conn: sqlite3.Connection, batch: Batch
) -> tuple[list[str], list[tuple[str, str, int]]]:
    """Let through as many instances waiting for a slot of each key the batch
    names as its limits allow, in its transaction (this file has one
    writer, so nothing else counts meanwhile). Returns the instances let
    through, and the keys a rate limit holds back with when to look again."""
    keys: set[tuple[str, str]] = set(batch.gate_keys)
    ids = list(batch.gate_ids)
    for at in range(0, len(ids), 500):
        chunk = ids[at : at + 500]
        rows = _fetchall(
            conn,
            "SELECT DISTINCT workflow, concurrency_key FROM instances"
            f" WHERE id IN ({', '.join('?' * len(chunk))}) AND gate IS NOT NULL",
            chunk,
        )
        keys.update((r[0], r[1]) for r in rows)
    if batch.gate_sweep:
        rows = _fetchall(conn, _GATE_WAITING_KEYS)
        keys.update((r[0], r[1]) for r in rows)
    now = int(time.time() * 1000)
    promoted: list[str] = []
    retry: list[tuple[str, str, int]] = []
    for workflow, key in sorted(keys):
        gate = batch.gates.get(workflow, UNGATED)
        free = _UNBOUNDED
        if gate.limit is not None:
            counted = _fetchall(conn, _GATE_HOLDERS, (workflow, key))
            holders = next(iter(counted))[0]
            free = gate.limit - holders
        starts: list[Any] = []
        if gate.starts is not None:
            starts = list(
                _fetchall(conn, _GATE_STARTS, (workflow, key, now - gate.per_ms, gate.starts))
            )
            free = min(free, gate.starts - len(starts))
        if free > 0:
            rows = list(_fetchall(conn, _GATE_LET_THROUGH, (workflow, key, free, now)))
            promoted.extend(r[0] for r in rows)
            starts[:0] = [(now,)] * len(rows)
        if gate.starts is not None and len(starts) >= gate.starts:
            waiting = _fetchall(conn, _GATE_ANY_WAITING, (workflow, key))
            if waiting:
                # The window frees a start once its oldest start in the
                # window leaves it.
                retry.append((workflow, key, starts[gate.starts - 1][0] + gate.per_ms + 1))
    return promoted, retry
