"""The Store contract, written once and run on every backend; and its costs."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cruzflow.server.records import (
    ABANDONED,
    Batch,
    Command,
    EventKind,
    EventRecord,
    InboxEvent,
    InstanceQuery,
    InstanceRecord,
    InstanceStatus,
    InstanceUpdate,
    Lease,
    Refusal,
    StepRecord,
    StepStatus,
)
from cruzflow.server.store.base import Store, StoreError
from cruzflow.server.store.postgres import PostgresStore
from cruzflow.server.store.sqlite import HOT_QUERIES, SqliteStore, _count_query

# The session's PostgreSQL server (tests/postgres.py).
pytest_plugins = ["tests.postgres"]


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "postgres":
        backend = PostgresStore(request.getfixturevalue("postgres_url"))
    else:
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


async def test_claim_takes_runnable_ones_oldest_first_and_not_twice(store: Store) -> None:
    first = await store.acquire("first")
    batch = Batch()
    batch.new_instances += [
        _instance("x", InstanceStatus.QUEUED),
        _instance("y", InstanceStatus.COMPLETE),
        _instance("z", InstanceStatus.RUNNING),
        _instance("w", InstanceStatus.WAITING),
        _instance("p", InstanceStatus.PAUSED),
        _instance("v", InstanceStatus.WAITING_FOR_PAUSE),
        _instance("q", InstanceStatus.QUEUED),
    ]
    await store.apply(batch, first)
    # The first server stops: the next one takes over what was runnable, once.
    await store.release(first)
    second = await store.acquire("second")
    claimed = await store.claim(second, 2)
    claimed += await store.claim(second, 100)
    assert [r.id for r in claimed] == ["x", "z", "v", "q"]
    assert [r.status for r in claimed] == [
        InstanceStatus.QUEUED,
        InstanceStatus.RUNNING,
        InstanceStatus.WAITING_FOR_PAUSE,
        InstanceStatus.QUEUED,
    ]
    assert await store.claim(second, 100) == []


async def test_claimed_and_claimed_one_records_carry_their_last_seq(store: Store) -> None:
    first = await store.acquire("first")
    batch = Batch()
    batch.new_instances += [_instance("a"), _instance("b", InstanceStatus.WAITING)]
    batch.events += [
        EventRecord("a", 1, 10, EventKind.STATUS_CHANGED, {"status": 2}),
        EventRecord("a", 2, 11, EventKind.STEP_STARTED, {"name": "s", "att": 1}),
        EventRecord("b", 1, 10, EventKind.STATUS_CHANGED, {"status": 4}),
    ]
    await store.apply(batch, first)
    await store.release(first)
    second = await store.acquire("second")
    (a,) = await store.claim(second, 10)
    assert (a.id, a.last_seq) == ("a", 2)
    b = await store.claim_one(second, "b")
    assert b is not None and (b.id, b.status, b.last_seq) == ("b", InstanceStatus.WAITING, 1)
    assert await store.claim_one(second, "nobody") is None
    # An instance this lease holds already is its own.
    again = await store.claim_one(second, "a")
    assert again is not None and again.id == "a"


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
    await store.release(lease)
    (claimed,) = [r for r in await store.claim(await store.acquire("next"), 100) if r.id == "t"]
    assert claimed.trace_parent == record.trace_parent


async def test_inbox_events_are_taken_oldest_first_until_consumed(store: Store) -> None:
    lease = await store.acquire("test")
    first = Batch()
    first.new_instances.append(_instance("a", InstanceStatus.WAITING))
    first.inbox += [
        InboxEvent("a", "approval", b'{"n":1}', 20, trace_parent="00-aa-bb-01"),
        InboxEvent("a", "other", b'{"n":2}', 21),
        InboxEvent("a", "approval", b'{"n":3}', 22),
    ]
    await store.apply(first, lease)
    taken = await store.take_events("a", "approval", 10)
    assert [(e.payload, e.at, e.trace_parent) for e in taken] == [
        (b'{"n":1}', 20, "00-aa-bb-01"),
        (b'{"n":3}', 22, None),
    ]
    assert taken[0].id < taken[1].id
    assert [e.payload for e in await store.take_events("a", "approval", 1)] == [b'{"n":1}']
    # The instance takes the first: it is claimed (now running) and consumes it.
    assert await store.claim_one(lease, "a") is not None
    second = Batch()
    second.instance_updates["a"] = InstanceUpdate("a", InstanceStatus.RUNNING, 23)
    second.consumed[taken[0].id] = ("a", 0)
    assert await store.apply(second, lease) == {}
    assert [e.payload for e in await store.take_events("a", "approval", 10)] == [b'{"n":3}']
    assert [e.payload for e in await store.take_events("a", "other", 10)] == [b'{"n":2}']


async def test_due_wakes_soonest_first(store: Store) -> None:
    lease = await store.acquire("test")
    batch = Batch()
    for name, wake_at in (("late", 300), ("soon", 100), ("later", 500), ("mid", 200)):
        record = _instance(name, InstanceStatus.WAITING)
        record.wake_at = wake_at
        batch.new_instances.append(record)
    batch.new_instances.append(_instance("nowake", InstanceStatus.WAITING))
    await store.apply(batch, lease)
    assert await store.due_wakes(350, 10) == [("soon", 100), ("mid", 200), ("late", 300)]
    assert await store.due_wakes(350, 2) == [("soon", 100), ("mid", 200)]
    assert await store.due_wakes(50, 10) == []


async def test_a_restart_clears_the_steps_before_the_batch_lands(store: Store) -> None:
    lease = await store.acquire("test")
    first = Batch()
    first.new_instances.append(_instance("a"))
    first.steps[("a", 0)] = StepRecord("a", 0, "s", 1, StepStatus.SUCCEEDED, 1, 11, 12)
    first.steps[("a", 1)] = StepRecord("a", 1, "t", 1, StepStatus.SUCCEEDED, 1, 13, 14)
    await store.apply(first, lease)
    again = Batch()
    again.cleared_steps.add("a")
    again.instance_updates["a"] = InstanceUpdate("a", InstanceStatus.RUNNING, 20, run_started_at=20)
    again.steps[("a", 0)] = StepRecord("a", 0, "s", 1, StepStatus.RUNNING, 1, 21)
    assert await store.apply(again, lease) == {}
    assert [(s.index, s.status) for s in await store.get_steps("a")] == [(0, StepStatus.RUNNING)]
    record = await store.get_instance("a")
    assert record is not None and record.run_started_at == 20


_STATUSES = (InstanceStatus.COMPLETE, InstanceStatus.RUNNING, InstanceStatus.QUEUED)


async def _twelve(store: Store) -> Lease:
    """i00 to i11, created at 1000 to 1011: workflow "even" or "odd", status
    complete, running, queued in turn, lookup key "key" on i03, i07, i08;
    stored under the lease returned."""
    lease = await store.acquire("test")
    batch = Batch()
    for n in range(12):
        record = InstanceRecord(
            f"i{n:02d}", "even" if n % 2 == 0 else "odd", _STATUSES[n % 3], b"{}", 1000 + n, 1000
        )
        record.lookup_key = "key" if n in (3, 7, 8) else None
        batch.new_instances.append(record)
    await store.apply(batch, lease)
    return lease


def _listed(rows: list[tuple[int, InstanceRecord]]) -> list[str]:
    return [r.id for _, r in rows]


async def test_listing_newest_first_by_pages_and_filters(store: Store) -> None:
    await _twelve(store)
    everything = await store.list_instances(InstanceQuery(), 100)
    assert _listed(everything) == [f"i{n:02d}" for n in reversed(range(12))]
    # Keyset pages: each starts below the last position of the one before.
    page = await store.list_instances(InstanceQuery(), 5)
    assert _listed(page) == ["i11", "i10", "i09", "i08", "i07"]
    page = await store.list_instances(InstanceQuery(older_than=page[-1][0]), 5)
    assert _listed(page) == ["i06", "i05", "i04", "i03", "i02"]
    page = await store.list_instances(InstanceQuery(older_than=page[-1][0]), 5)
    assert _listed(page) == ["i01", "i00"]
    assert _listed(await store.list_instances(InstanceQuery(workflow="odd"), 3)) == [
        "i11",
        "i09",
        "i07",
    ]
    running_or_queued = InstanceQuery(statuses=(InstanceStatus.RUNNING, InstanceStatus.QUEUED))
    assert _listed(await store.list_instances(running_or_queued, 4)) == [
        "i11",
        "i10",
        "i08",
        "i07",
    ]
    done_even = InstanceQuery(workflow="even", statuses=(InstanceStatus.COMPLETE,))
    assert _listed(await store.list_instances(done_even, 10)) == ["i06", "i00"]
    queued_odd = InstanceQuery(workflow="odd", statuses=(InstanceStatus.QUEUED,))
    assert _listed(await store.list_instances(queued_odd, 10)) == ["i11", "i05"]
    keyed = InstanceQuery(lookup_key="key")
    assert _listed(await store.list_instances(keyed, 10)) == ["i08", "i07", "i03"]
    keyed_odd = InstanceQuery(lookup_key="key", workflow="odd", statuses=(InstanceStatus.RUNNING,))
    assert _listed(await store.list_instances(keyed_odd, 10)) == ["i07"]
    window = InstanceQuery(created_min=1003, created_max=1006)
    assert _listed(await store.list_instances(window, 10)) == ["i05", "i04", "i03"]
    assert await store.list_instances(InstanceQuery(created_min=5000), 10) == []
    record = everything[0][1]
    assert (record.workflow, record.created_at, record.last_seq) == ("odd", 1011, 0)


async def test_counts_per_workflow_and_status_with_the_listing_filters(store: Store) -> None:
    assert await store.count_instances(InstanceQuery()) == []
    lease = await _twelve(store)

    async def counts(**filters: Any) -> list[tuple[str, InstanceStatus, int]]:
        return sorted(await store.count_instances(InstanceQuery(**filters)))

    complete, running, queued = _STATUSES
    # The store's order is its own; sorted, by workflow then status number.
    assert await counts() == [
        ("even", queued, 2),
        ("even", running, 2),
        ("even", complete, 2),
        ("odd", queued, 2),
        ("odd", running, 2),
        ("odd", complete, 2),
    ]
    assert await counts(workflow="odd") == [
        ("odd", queued, 2),
        ("odd", running, 2),
        ("odd", complete, 2),
    ]
    assert await counts(lookup_key="key") == [
        ("even", queued, 1),
        ("odd", running, 1),
        ("odd", complete, 1),
    ]
    assert await counts(lookup_key="key", workflow="odd") == [
        ("odd", running, 1),
        ("odd", complete, 1),
    ]
    # [1003, 1006): i03, i04, i05.
    window = {"created_min": 1003, "created_max": 1006}
    assert await counts(**window) == [
        ("even", running, 1),
        ("odd", queued, 1),
        ("odd", complete, 1),
    ]
    assert await counts(workflow="even", **window) == [("even", running, 1)]
    assert await counts(created_min=1010) == [("even", running, 1), ("odd", queued, 1)]
    assert await counts(created_max=1001) == [("even", complete, 1)]
    assert await counts(created_min=5000) == []
    assert await counts(workflow="none") == []
    # A status change moves the instance from one count to the other.
    update = Batch()
    update.instance_updates["i04"] = InstanceUpdate(
        "i04", InstanceStatus.ERRORED, 2000, ended_at=2000
    )
    assert await store.apply(update, lease) == {}
    assert await counts(workflow="even", **window) == [("even", InstanceStatus.ERRORED, 1)]


async def test_retention_purges_only_what_still_ended_before(store: Store) -> None:
    lease = await store.acquire("test")
    batch = Batch()
    for name, ended_at in (("old", 100), ("older", 50), ("recent", 900)):
        record = _instance(name, InstanceStatus.COMPLETE)
        record.ended_at = ended_at
        batch.new_instances.append(record)
        batch.events.append(EventRecord(name, 1, ended_at, EventKind.STATUS_CHANGED, {"status": 6}))
        batch.steps[(name, 0)] = StepRecord(name, 0, "s", 1, StepStatus.SUCCEEDED, 1, 1, 2)
        batch.inbox.append(InboxEvent(name, "t", b"{}", 1))
    batch.new_instances.append(_instance("live"))
    await store.apply(batch, lease)
    assert await store.ended_before(500, 10) == ["older", "old"]
    assert await store.ended_before(500, 1) == ["older"]
    purge = Batch()
    purge.purge = {"older": 500, "old": 500, "recent": 500, "live": 500}
    # "old" is restarted in the same batch: it no longer ended, and stays.
    await store.claim_one(lease, "old")
    purge.instance_updates["old"] = InstanceUpdate("old", InstanceStatus.QUEUED, 200)
    assert await store.apply(purge, lease) == {}
    assert purge.purged == 1
    assert await store.get_instance("older") is None
    assert await store.get_steps("older") == []
    assert await store.read_events("older", 0, 10) == []
    assert await store.take_events("older", "t", 10) == []
    for kept in ("old", "recent", "live"):
        assert await store.get_instance(kept) is not None, kept
    assert await store.ended_before(500, 10) == []


async def test_leases_of_a_store_and_its_page_token_key(store: Store) -> None:
    lease = await store.acquire("test")
    assert lease.owner == "test"
    assert await store.renew(lease)
    assert store.lease_period_s is None or store.lease_period_s > 0
    key = store.page_token_key()
    assert len(key) == 32
    await store.release(lease)


async def test_a_command_is_taken_once_answered_or_given_up(store: Store) -> None:
    first = Command("c1", "i", "pause", 10)
    second = Command("c2", "i", "terminate", 20)
    other = Command("c3", "j", "resume", 5)
    for command in (second, first, other):
        await store.send_command(command)
    assert [c.id for c in await store.pending_commands("i")] == ["c1", "c2"]
    assert await store.command_outcome("c1") is None
    # The holder takes it: nobody else can, its asker included.
    assert await store.take_command("c1", "server-a") is True
    assert await store.take_command("c1", "server-b") is False
    assert await store.take_command("c1", ABANDONED) is False
    assert await store.command_outcome("c1") is None  # being done
    assert [c.id for c in await store.pending_commands("i")] == ["c2"]
    await store.answer_command("c1", "status:5")
    assert await store.command_outcome("c1") == "status:5"
    # An asker gives up a command nobody took: then nobody can take it.
    assert await store.take_command("c2", ABANDONED) is True
    assert await store.command_outcome("c2") == ABANDONED
    assert await store.take_command("c2", "server-a") is False
    assert await store.pending_commands("i") == []
    assert [c.kind for c in await store.pending_commands("j")] == ["resume"]


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

    def pragma(conn: sqlite3.Connection, name: str) -> object:
        return conn.execute(f"PRAGMA {name}").fetchone()

    assert await writer.call(pragma, "journal_mode") == ("wal",)
    assert await writer.call(pragma, "synchronous") == (2,)  # FULL
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
    "COMPOUND QUERY",
    "LEFT-MOST SUBQUERY",
    "UNION ALL",
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
                assert (
                    "USING INDEX instances_runnable" in line
                    or line in ("SCAN CONSTANT ROW", "SCAN bisect")
                    # The rows a limited subquery gave (read_events_many's arms).
                    or line.startswith("SCAN (subquery-")
                ), (name, line)
            else:
                # No temp b-tree: a sort would read every match before the first row.
                assert line.startswith(("SEARCH", "CORRELATED SCALAR SUBQUERY", *_SHAPES)), (
                    name,
                    line,
                )
    conn.close()


async def test_counts_read_an_index_never_every_row(tmp_path: Path) -> None:
    """CountInstances on SQLite: without a time filter, only the covering index
    of workflow and status (a table scan of 100,000 instances took 60 ms, the
    index 4 ms); with a lookup key, its index; with times, a rowid range."""
    store = SqliteStore(tmp_path / "p.db")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "p.db")
    covering = "USING COVERING INDEX instances_by_workflow_status"
    for query, expected in (
        (InstanceQuery(), [f"SCAN instances {covering}"]),
        (InstanceQuery(workflow="w"), [f"SEARCH instances {covering} (workflow=?)"]),
    ):
        assert _plan(conn, *_count_query(query, 0, 10)) == expected, query
    keyed = _plan(conn, *_count_query(InstanceQuery(lookup_key="k", workflow="w"), 0, 10))
    assert keyed[0].startswith("SEARCH instances USING INDEX instances_by_lookup"), keyed
    for query in (InstanceQuery(created_min=1), InstanceQuery(workflow="w", created_max=1)):
        timed = _plan(conn, *_count_query(query, 0, 10))
        assert timed[0].startswith("SEARCH instances USING INTEGER PRIMARY KEY"), timed
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
