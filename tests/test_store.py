"""The Store contract, written once and run on every backend; and its costs."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cruzflow.server.records import (
    Batch,
    EventKind,
    EventRecord,
    InstanceRecord,
    InstanceStatus,
    InstanceUpdate,
    Refusal,
    StepRecord,
    StepStatus,
)
from cruzflow.server.store.base import Store, StoreError
from cruzflow.server.store.sqlite import HOT_QUERIES, SqliteStore


@pytest.fixture(params=["sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    # PostgreSQL joins this list when its backend lands.
    backend = SqliteStore(tmp_path / "contract.db")
    await backend.open()
    yield backend
    await backend.close()


def _instance(i: str, status: InstanceStatus = InstanceStatus.RUNNING) -> InstanceRecord:
    return InstanceRecord(i, "wf", status, b'{"p":1}', 10, 10)


async def test_apply_then_read_back(store: Store) -> None:
    lease = await store.acquire("test")
    batch = Batch()
    batch.new_instances.append(_instance("a"))
    batch.steps[("a", 0)] = StepRecord("a", 0, "s", 1, StepStatus.RUNNING, 1, 11)
    batch.events += [
        EventRecord("a", 1, 10, EventKind.STATUS_CHANGED, {"status": 2}),
        EventRecord("a", 2, 11, EventKind.STEP_STARTED, {"name": "s", "att": 1}),
    ]
    await store.apply(batch, lease)
    record = await store.get_instance("a")
    assert record is not None
    assert (record.workflow, record.status, record.params, record.last_seq) == (
        "wf",
        InstanceStatus.RUNNING,
        b'{"p":1}',
        2,
    )
    assert await store.get_instance("b") is None
    events = await store.read_events("a", 0, 10)
    assert [(e.seq, e.kind, e.data) for e in events] == [
        (1, EventKind.STATUS_CHANGED, {"status": 2}),
        (2, EventKind.STEP_STARTED, {"name": "s", "att": 1}),
    ]
    assert [e.seq for e in await store.read_events("a", 1, 10)] == [2]
    assert [e.seq for e in await store.read_events("a", 0, 1)] == [1]


async def test_step_upsert_and_instance_update(store: Store) -> None:
    lease = await store.acquire("test")
    first = Batch()
    first.new_instances.append(_instance("a"))
    first.steps[("a", 0)] = StepRecord("a", 0, "s", 1, StepStatus.RUNNING, 1, 11)
    await store.apply(first, lease)
    second = Batch()
    second.steps[("a", 0)] = StepRecord(
        "a", 0, "s", 1, StepStatus.SUCCEEDED, 2, 11, 15, output=b'{"ok":true}'
    )
    second.instance_updates["a"] = InstanceUpdate(
        "a", InstanceStatus.ERRORED, 16, None, "E", "boom", 16
    )
    await store.apply(second, lease)
    steps = await store.get_steps("a")
    assert [(s.status, s.attempts, s.output, s.started_at) for s in steps] == [
        (StepStatus.SUCCEEDED, 2, b'{"ok":true}', 11)
    ]
    record = await store.get_instance("a")
    assert record is not None
    assert (record.status, record.error_name, record.error_message, record.ended_at) == (
        InstanceStatus.ERRORED,
        "E",
        "boom",
        16,
    )


async def test_a_failed_batch_applies_nothing(store: Store) -> None:
    lease = await store.acquire("test")
    ok = Batch()
    ok.new_instances.append(_instance("a"))
    ok.events.append(EventRecord("a", 1, 1, EventKind.STATUS_CHANGED, {"status": 2}))
    await store.apply(ok, lease)
    bad = Batch()
    bad.new_instances.append(_instance("b"))
    bad.events += [
        EventRecord("b", 1, 1, EventKind.STATUS_CHANGED, {"status": 2}),
        EventRecord("a", 1, 2, EventKind.STATUS_CHANGED, {"status": 6}),  # seq 1 is stored
    ]
    with pytest.raises(StoreError):
        await store.apply(bad, lease)
    assert await store.get_instance("b") is None
    assert await store.read_events("b", 0, 10) == []
    assert [e.data for e in await store.read_events("a", 0, 10)] == [{"status": 2}]


async def test_a_taken_id_is_refused_alone_and_the_rest_lands(store: Store) -> None:
    lease = await store.acquire("test")
    first = Batch()
    first.new_instances.append(_instance("a"))
    first.events.append(EventRecord("a", 1, 1, EventKind.STATUS_CHANGED, {"status": 2}))
    await store.apply(first, lease)
    second = Batch()
    again = InstanceRecord("a", "other-wf", InstanceStatus.RUNNING, b"{}", 20, 20)
    second.new_instances += [_instance("b"), again]
    second.events += [
        EventRecord("b", 1, 20, EventKind.STATUS_CHANGED, {"status": 2}),
        EventRecord("a", 1, 20, EventKind.STATUS_CHANGED, {"status": 2}),
    ]
    second.steps[("b", 0)] = StepRecord("b", 0, "s", 1, StepStatus.RUNNING, 1, 21)
    assert await store.apply(second, lease) == {"a": Refusal.CONFLICT}
    # The other instance's writes landed; the taken id's instance is untouched.
    b = await store.get_instance("b")
    assert b is not None and b.last_seq == 1
    assert [s.name for s in await store.get_steps("b")] == ["s"]
    a = await store.get_instance("a")
    assert a is not None and (a.workflow, a.created_at, a.last_seq) == ("wf", 10, 1)


async def test_unfinished_are_claimed_oldest_first(store: Store) -> None:
    lease = await store.acquire("test")
    batch = Batch()
    batch.new_instances += [
        _instance("x", InstanceStatus.QUEUED),
        _instance("y", InstanceStatus.COMPLETE),
        _instance("z", InstanceStatus.RUNNING),
    ]
    await store.apply(batch, lease)
    assert [r.id for r in await store.claim(lease, 100)] == ["x", "z"]


async def test_unfinished_counted_by_status(store: Store) -> None:
    lease = await store.acquire("test")
    batch = Batch()
    batch.new_instances += [
        _instance("q", InstanceStatus.QUEUED),
        _instance("w1", InstanceStatus.WAITING),
        _instance("w2", InstanceStatus.WAITING),
        _instance("p", InstanceStatus.PAUSED),
        _instance("done", InstanceStatus.COMPLETE),
        _instance("failed", InstanceStatus.ERRORED),
    ]
    await store.apply(batch, lease)
    assert await store.count_unfinished() == {
        InstanceStatus.QUEUED: 1,
        InstanceStatus.WAITING: 2,
        InstanceStatus.PAUSED: 1,
    }


async def test_trace_context_is_stored_with_the_instance(store: Store) -> None:
    lease = await store.acquire("test")
    batch = Batch()
    record = _instance("t")
    record.trace_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    batch.new_instances += [record, _instance("u")]
    await store.apply(batch, lease)
    stored = await store.get_instance("t")
    assert stored is not None and stored.trace_parent == record.trace_parent
    other = await store.get_instance("u")
    assert other is not None and other.trace_parent is None
    (claimed,) = [r for r in await store.claim(lease, 100) if r.id == "t"]
    assert claimed.trace_parent == record.trace_parent


async def test_second_server_on_one_file_is_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "one.db")
    await first.open()
    second = SqliteStore(tmp_path / "one.db")
    with pytest.raises(StoreError, match="another cruzflow server"):
        await second.open()
    await first.close()
    await second.open()  # the lock went with the first
    await second.close()


async def test_store_is_durable_wal_full(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "d.db")
    await store.open()
    writer = store._writer
    assert writer is not None
    async with writer.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone()) == ("wal",)
    async with writer.execute("PRAGMA synchronous") as cur:
        assert (await cur.fetchone()) == (2,)  # FULL
    await store.close()


def _plan(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[str]:
    return [r[-1] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()]


# Plan lines that only give a statement's shape: a merge of index ranges in
# order (listing by several statuses), a recursive CTE, a scalar subquery.
_SHAPES = (
    "SCALAR SUBQUERY",
    "MERGE (UNION ALL)",
    "LEFT",
    "RIGHT",
    "CO-ROUTINE",
    "SETUP",
    "RECURSIVE STEP",
)


async def test_hot_queries_use_indexes(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "p.db")
    for name, (sql, params) in HOT_QUERIES.items():
        for line in _plan(conn, sql, params):
            if line.startswith("SCAN"):
                # Only the partial index of runnable instances may be walked
                # (and the listing's bisection, its own few rows).
                assert "USING INDEX instances_runnable" in line or line in (
                    "SCAN CONSTANT ROW",
                    "SCAN bisect",
                ), (name, line)
            else:
                # No temp b-tree: a sort would read every match before the first row.
                assert line.startswith(("SEARCH", "CORRELATED SCALAR SUBQUERY", *_SHAPES)), (
                    name,
                    line,
                )
    conn.close()


def _vm_steps(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> int:
    counter = [0]

    def tick() -> int:
        counter[0] += 1
        return 0

    conn.set_progress_handler(tick, 1)
    conn.execute(sql, params).fetchall()
    conn.set_progress_handler(None, 1)
    return counter[0]


def _fill(path: Path, finished: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO instances (id, workflow, status, params, created_at, updated_at)"
        " VALUES (?, 'wf', 6, x'6e756c6c', 1, 1)",
        ((f"done-{i:07d}",) for i in range(finished)),
    )
    conn.executemany(
        "INSERT INTO events (instance_id, seq, at, kind, data) VALUES (?, ?, 1, 1, '{}')",
        ((f"done-{i:07d}", s) for i in range(finished) for s in (1, 2)),
    )
    conn.execute(
        "INSERT INTO instances (id, workflow, status, params, created_at, updated_at)"
        " VALUES ('live', 'wf', 2, x'6e756c6c', 1, 1)"
    )
    conn.execute("INSERT INTO events VALUES ('live', 1, 1, 1, '{}', NULL)")
    conn.commit()
    return conn


@pytest.mark.parametrize(
    "name", ["get_instance", "get_steps", "read_events", "unfinished", "count_unfinished"]
)
async def test_query_cost_stays_flat_with_history(tmp_path: Path, name: str) -> None:
    """Work done (SQLite VM steps) with 1,000 vs 100,000 stored instances."""
    costs = []
    for finished in (1_000, 100_000):
        path = tmp_path / f"h{finished}.db"
        store = SqliteStore(path)
        await store.open()
        await store.close()
        conn = _fill(path, finished)
        sql, _ = HOT_QUERIES[name]
        params: tuple[object, ...] = {
            "get_instance": ("live",),
            "get_steps": ("live",),
            "read_events": ("live", 0, 100),
            "unfinished": (),
            "count_unfinished": (),
        }[name]
        costs.append(_vm_steps(conn, sql, params))
        conn.close()
    small, large = costs
    # 100x the history may cost a b-tree level or two, never 100x the work.
    assert large <= small * 1.5 + 20, (name, costs)
