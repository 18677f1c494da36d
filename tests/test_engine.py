"""Engine semantics on a real SQLite file: steps, retries, replay, limits, group commit."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cruzflow.server.engine.errors import AlreadyExists, InvalidArgument, NotFound
from cruzflow.server.engine.runtime import Engine, Limits, WorkflowSpec
from cruzflow.server.records import (
    Batch,
    EventKind,
    InstanceRecord,
    InstanceStatus,
    InstanceUpdate,
    Lease,
    Refusal,
    StepRecord,
    StepStatus,
)
from cruzflow.server.store.sqlite import SqliteStore
from cruzflow.workflows import WorkflowEntrypoint, WorkflowEvent, WorkflowStep
from tests.conftest import EngineFactory, eventually, finished, specs, sqlite_only
from tests.workflows import Blocks, count, mark

# The lease of a test that writes to a store it opened itself (SQLite's never expires).
LEASE = Lease("test", 1)


async def test_three_steps_complete_with_output_and_event_log(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    instance_id, status = await engine.create("three-steps", "", '{"user": 7}')
    assert status is InstanceStatus.RUNNING
    record = await finished(engine, instance_id)
    assert record.status is InstanceStatus.COMPLETE
    assert json.loads(record.output) == {"sum": 6, "params": {"user": 7}}
    events = [e async for e in engine.watch(instance_id)]
    assert [e.seq for e in events] == list(range(1, 9))
    assert [e.kind for e in events] == [
        EventKind.STATUS_CHANGED,
        *[EventKind.STEP_STARTED, EventKind.STEP_SUCCEEDED] * 3,
        EventKind.STATUS_CHANGED,
    ]
    assert events[-1].data["status"] == InstanceStatus.COMPLETE
    _, steps = await engine.get(instance_id)
    assert [(s.name, s.index, s.status, s.attempts) for s in steps] == [
        ("one", 0, StepStatus.SUCCEEDED, 1),
        ("two", 1, StepStatus.SUCCEEDED, 1),
        ("three", 2, StepStatus.SUCCEEDED, 1),
    ]


async def test_same_name_is_a_new_step_each_time(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    instance_id, _ = await engine.create("repeats")
    record = await finished(engine, instance_id)
    assert json.loads(record.output) == [0, 10, 20]
    _, steps = await engine.get(instance_id)
    assert [(s.name, s.occurrence, s.index) for s in steps] == [
        ("poll", 1, 0),
        ("poll", 2, 1),
        ("poll", 3, 2),
    ]


async def test_retries_follow_backoff_and_record_every_attempt(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    instance_id, _ = await engine.create(
        "flaky", "", '{"failures": 3, "limit": 5, "backoff": "exponential"}'
    )
    record = await finished(engine, instance_id)
    assert record.status is InstanceStatus.COMPLETE
    assert json.loads(record.output) == 4
    failed = [e async for e in engine.watch(instance_id) if e.kind == EventKind.ATTEMPT_FAILED]
    assert [(e.data["att"], e.data["delay"]) for e in failed] == [(1, 1), (2, 2), (3, 4)]
    name, message, where = failed[0].data["err"]
    assert (name, message) == ("ConnectionError", "attempt 1 failed")
    # Where the step body raised, and not the engine's own frame that called it.
    assert where.startswith("Traceback (most recent call last):\n")
    assert 'in flaky\n    raise ConnectionError(f"attempt {ctx.attempt} failed")' in where
    assert where.endswith("ConnectionError: attempt 1 failed\n")
    assert "context.py" not in where


async def test_exhausted_retries_error_the_instance(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    instance_id, _ = await engine.create("flaky", "", '{"failures": 9, "limit": 2}')
    record = await finished(engine, instance_id)
    assert record.status is InstanceStatus.ERRORED
    assert (record.error_name, record.error_message) == ("ConnectionError", "attempt 3 failed")
    _, steps = await engine.get(instance_id)
    assert (steps[0].status, steps[0].attempts) == (StepStatus.FAILED, 3)


async def test_a_caught_step_failure_lets_the_workflow_go_on(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    record = await finished(engine, (await engine.create("catches"))[0])
    assert record.status is InstanceStatus.COMPLETE
    assert json.loads(record.output) == {"caught": "NonRetryableError", "message": "card declined"}


async def test_step_limit_errors_the_instance(make_engine: EngineFactory) -> None:
    engine = await make_engine(max_steps_per_instance=2)
    record = await finished(engine, (await engine.create("repeats"))[0])
    assert record.status is InstanceStatus.ERRORED
    assert record.error_name == "StepLimitError"
    assert "max_steps_per_instance" in record.error_message


async def test_running_bound_keeps_the_rest_queued_in_order(make_engine: EngineFactory) -> None:
    Blocks.gate = asyncio.Event()
    engine = await make_engine(max_running_instances=2)
    ids = [(await engine.create("blocks", f"b{i}"))[0] for i in range(5)]
    statuses = [(await engine.get(i))[0].status for i in ids]
    assert statuses == [InstanceStatus.RUNNING] * 2 + [InstanceStatus.QUEUED] * 3
    Blocks.gate.set()
    records = [await finished(engine, i) for i in ids]
    assert all(r.status is InstanceStatus.COMPLETE for r in records)
    # Each was set running in creation order (the scheduler's order; the
    # first steps of instances started together may begin in any order).
    started = []
    for i in ids:
        events = [e async for e in engine.watch(i)]
        running = [e for e in events if e.kind is EventKind.STATUS_CHANGED]
        started.append((running[-2].at, running[-2].seq, i))
        assert running[-2].data["status"] == InstanceStatus.RUNNING
    assert [i for _, _, i in sorted(started)] == ids


async def test_create_rejects_bad_input_and_stores_nothing(make_engine: EngineFactory) -> None:
    engine = await make_engine(max_payload_bytes=1024)
    with pytest.raises(NotFound, match="registered"):
        await engine.create("nope")
    for bad in ("{", "NaN", '{"a": Infinity}', "x" * 2000):
        with pytest.raises(InvalidArgument, match="params_json"):
            await engine.create("three-steps", "kept-out", bad)
    for bad_id in ("-x", "a b", "é", "x" * 101):
        with pytest.raises(InvalidArgument, match="instance_id"):
            await engine.create("three-steps", bad_id)
    with pytest.raises(NotFound):
        await engine.get("kept-out")
    await engine.create("three-steps", "taken", '{"first": true}')
    with pytest.raises(AlreadyExists):
        await engine.create("three-steps", "taken", '{"second": true}')
    record = await finished(engine, "taken")
    assert json.loads(record.params) == {"first": True}


async def test_concurrent_creates_of_one_id_make_one_instance(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    results = await asyncio.gather(
        *[engine.create("three-steps", "dup") for _ in range(20)], return_exceptions=True
    )
    assert sum(1 for r in results if isinstance(r, tuple)) == 1
    assert sum(1 for r in results if isinstance(r, AlreadyExists)) == 19


async def test_group_commit_shares_transactions_across_instances(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    n = 300

    async def one() -> None:
        await finished(engine, (await engine.create("three-steps"))[0])

    before = engine.journal.batches
    await asyncio.gather(*[one() for _ in range(n)])
    # One at a time this is 4 commits a workflow; together they must share.
    assert engine.journal.batches - before < n


async def test_one_workflow_alone_costs_one_batch_per_step_plus_create(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    before = engine.journal.batches
    await finished(engine, (await engine.create("three-steps"))[0])
    # create, step one, step two, step three together with the completion:
    # each batch is one transaction (and one round trip on PostgreSQL).
    assert engine.journal.batches - before == 4


@sqlite_only
async def test_one_workflow_alone_costs_one_sqlite_commit_per_step_plus_create(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine()
    statements: list[str] = []
    writer = engine.store._writer  # type: ignore[attr-defined]
    await writer.call(sqlite3.Connection.set_trace_callback, statements.append)
    calls = 0
    call = writer.call

    async def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await call(*args)

    writer.call = counted
    await finished(engine, (await engine.create("three-steps"))[0])
    del writer.call
    await writer.call(sqlite3.Connection.set_trace_callback, None)
    commits = sum(1 for s in statements if s == "COMMIT")
    # create, step one, step two, step three together with the completion.
    assert commits == 4
    # Each commit, with its statements, is one hop to the writer's thread.
    assert calls == 4
    # Each commit writes a few rows; none reads.
    assert not [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(statements) <= 4 * 6


class _Counted(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def body(name: str) -> str:
            mark(f"counted:{name}")
            return name

        out = [await step.do(n, lambda n=n: body(n)) for n in ("a", "b", "c")]
        return out


async def _engine(path: Path, cls: type[WorkflowEntrypoint[Any]], **limits: int) -> Engine:
    store = SqliteStore(path)
    await store.open()
    engine = Engine(store, {"w": WorkflowSpec("w", "W", "x:y", cls)}, None, Limits(**limits))
    return engine


async def _seed(path: Path, steps: list[StepRecord]) -> None:
    """Leave a store as a crashed server would: instance running, these steps recorded."""
    store = SqliteStore(path)
    await store.open()
    batch = Batch()
    batch.new_instances.append(InstanceRecord("i1", "w", InstanceStatus.RUNNING, b"null", 1, 1))
    for s in steps:
        batch.steps[(s.instance_id, s.index)] = s
    await store.apply(batch, LEASE)
    await store.close()


async def test_replay_returns_stored_results_without_running_them(
    tmp_path: Path, side_file: Path
) -> None:
    db = tmp_path / "s.db"
    await _seed(db, [StepRecord("i1", 0, "a", 1, StepStatus.SUCCEEDED, 1, 1, 2, b'"stored-a"')])
    engine = await _engine(db, _Counted)
    await engine.start()
    record = await finished(engine, "i1")
    assert json.loads(record.output) == ["stored-a", "b", "c"]
    assert count(str(side_file), "counted:a") == 0
    assert count(str(side_file), "counted:b") == 1
    await engine.shutdown(0.1)
    await engine.store.close()


async def test_interrupted_attempt_runs_again_as_the_next_attempt(
    tmp_path: Path, side_file: Path
) -> None:
    db = tmp_path / "s.db"
    await _seed(db, [StepRecord("i1", 0, "a", 1, StepStatus.RUNNING, 1, 1)])
    engine = await _engine(db, _Counted)
    await engine.start()
    record = await finished(engine, "i1")
    assert record.status is InstanceStatus.COMPLETE
    _, steps = await engine.get("i1")
    assert steps[0].attempts == 2
    interrupted = [e async for e in engine.watch("i1") if e.kind == EventKind.ATTEMPT_FAILED]
    assert interrupted[0].data["err"][0] == "StepInterruptedError"
    assert count(str(side_file), "counted:a") == 1
    await engine.shutdown(0.1)
    await engine.store.close()


class _NoRetries(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        return await step.do("charge", lambda: mark("charged"), retries={"limit": 0})


async def test_interrupted_last_attempt_is_not_run_again(tmp_path: Path, side_file: Path) -> None:
    # retries.limit = 0 means "never run this twice"; a crash must not override that.
    db = tmp_path / "s.db"
    await _seed(db, [StepRecord("i1", 0, "charge", 1, StepStatus.RUNNING, 1, 1)])
    engine = await _engine(db, _NoRetries)
    await engine.start()
    record = await finished(engine, "i1")
    assert record.status is InstanceStatus.ERRORED
    assert record.error_name == "StepInterruptedError"
    assert count(str(side_file), "charged") == 0
    await engine.shutdown(0.1)
    await engine.store.close()


async def test_replay_detects_changed_code(tmp_path: Path, side_file: Path) -> None:
    db = tmp_path / "s.db"
    await _seed(db, [StepRecord("i1", 0, "renamed", 1, StepStatus.SUCCEEDED, 1, 1, 2, b"1")])
    engine = await _engine(db, _Counted)
    await engine.start()
    record = await finished(engine, "i1")
    assert record.status is InstanceStatus.ERRORED
    assert record.error_name == "NonDeterminismError"
    assert "'a'" in record.error_message and "'renamed'" in record.error_message
    assert count(str(side_file), "counted:a") == 0
    await engine.shutdown(0.1)
    await engine.store.close()


async def test_pending_retry_waits_for_its_stored_time(tmp_path: Path, side_file: Path) -> None:
    import time

    db = tmp_path / "s.db"
    due = int(time.time() * 1000) + 300
    await _seed(
        db,
        [
            StepRecord(
                "i1", 0, "a", 1, StepStatus.RUNNING, 1, 1, None, None, "E", "m", next_attempt_at=due
            )
        ],
    )
    engine = await _engine(db, _Counted)
    await engine.start()
    await finished(engine, "i1")
    _, steps = await engine.get("i1")
    assert steps[0].attempts == 2
    assert steps[0].ended_at is not None and steps[0].ended_at >= due
    await engine.shutdown(0.1)
    await engine.store.close()


async def test_finished_instances_are_not_resumed(tmp_path: Path, side_file: Path) -> None:
    db = tmp_path / "s.db"
    await _seed(db, [])
    store = SqliteStore(db)
    await store.open()
    batch = Batch()
    batch.instance_updates["i1"] = InstanceUpdate("i1", InstanceStatus.COMPLETE, 2, b"1")
    await store.apply(batch, LEASE)
    await store.close()
    engine = await _engine(db, _Counted)
    await engine.start()
    assert not engine.core.runs and not engine.core.queue
    assert count(str(side_file), "counted:a") == 0
    assert (await engine.get("i1"))[0].status is InstanceStatus.COMPLETE
    await engine.shutdown(0.1)
    await engine.store.close()


async def test_env_bindings_reach_the_workflow(tmp_path: Path, make_engine: EngineFactory) -> None:
    from cruzflow.sdk.api import Env
    from cruzflow.server.bindings import SqliteDatabase

    env = Env({"GREETING": "hello", "DB": SqliteDatabase(tmp_path / "app.db")})
    engine = await make_engine(env=env)
    record = await finished(engine, (await engine.create("uses-env"))[0])
    assert json.loads(record.output) == {"greeting": "hello", "rows": 1}
    await env.aclose()


@sqlite_only  # an event of no instance: a shared store refuses it (FENCED)
async def test_journal_close_during_a_commit_returns(make_engine: EngineFactory) -> None:
    from cruzflow.server.records import EventRecord

    engine = await make_engine()
    journal = engine.journal
    durable = journal.append(EventRecord("x", 1, 0, EventKind.STATUS_CHANGED, {"status": 2}))
    await asyncio.sleep(0)  # the writer takes the batch and starts applying it
    assert not journal._batch
    async with asyncio.timeout(30):  # a hang guard, not a speed bound
        await journal.close()
    assert durable.done() and durable.exception() is None
    assert [e.seq for e in await engine.store.read_events("x", 0, 10)] == [1]
    engine.core.stopping = True  # the journal is closed; skip the fixture's shutdown
    await engine.store.close()


class FencingStore(SqliteStore):
    """The SQLite store, refusing the writes of the instances in ``fenced`` as a
    shared store refuses those another server has taken over (Refusal.FENCED)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fenced: set[str] = set()

    async def apply(self, batch: Batch, lease: Lease) -> dict[str, Refusal]:
        ours = {i for i in self.fenced if _touches(batch, i)}
        if not ours:
            return await super().apply(batch, lease)
        refused = await super().apply(batch.without(ours), lease)
        return {**refused, **dict.fromkeys(ours, Refusal.FENCED)}


def _touches(batch: Batch, instance_id: str) -> bool:
    return (
        any(e.instance_id == instance_id for e in batch.events)
        or instance_id in batch.instance_updates
        or any(k[0] == instance_id for k in batch.steps)
    )


async def test_a_fenced_instance_stops_alone_and_the_others_go_on(
    tmp_path: Path, side_file: Path
) -> None:
    store = FencingStore(tmp_path / "store.db")
    await store.open()
    engine = Engine(store, specs(), None, Limits())
    await engine.start()
    try:
        kept, _ = await engine.create("steps5", "kept", '{"ms": 20}')
        lost, _ = await engine.create("steps5", "lost", '{"ms": 20}')
        # After its first step is stored, another server "takes over" one of them.
        await eventually(lambda: _steps_of(engine, lost))
        store.fenced.add(lost)
        done = await finished(engine, kept)
        assert done.status is InstanceStatus.COMPLETE
        # The fenced run stopped at its next step boundary and left memory;
        # nothing it did after the takeover was stored.
        await eventually(lambda: _gone(engine, lost))
        record, steps = await engine.get(lost)
        assert record.status is InstanceStatus.RUNNING
        assert len(steps) < 5
        assert count(str(side_file), f"{lost}:s4") == 0
        # The server still serves: a new instance runs to its end.
        again, _ = await engine.create("steps5", "after", '{"ms": 1}')
        assert (await finished(engine, again)).status is InstanceStatus.COMPLETE
    finally:
        await engine.shutdown(0.1)
        await store.close()


async def _steps_of(engine: Engine, instance_id: str) -> int:
    return len((await engine.get(instance_id))[1])


async def _gone(engine: Engine, instance_id: str) -> bool:
    return instance_id not in engine.core.runs


@sqlite_only  # on a shared store another server may have moved it on: it is read
async def test_waiting_for_an_instance_held_here_reads_no_record(
    make_engine: EngineFactory, gate: asyncio.Event
) -> None:
    """WaitInstance's answer for an instance this server runs is its run's
    record completed by the final event: no store read per wait (W1's only
    one), and the same record a read afterwards gives."""
    engine = await make_engine()
    store = engine.store
    reads = 0
    get_instance = store.get_instance

    async def counted(instance_id: str) -> Any:
        nonlocal reads
        reads += 1
        return await get_instance(instance_id)

    store.get_instance = counted  # type: ignore[method-assign]
    # Each instance runs (held by the gate) until every wait has subscribed.
    ids = [(await engine.create("blocks", "", "{}"))[0] for _ in range(20)]
    waits = [asyncio.ensure_future(engine.wait(i, 30)) for i in ids]

    async def subscribed() -> bool:
        return engine.core.hub.count == len(ids)

    await eventually(subscribed)
    gate.set()
    waited = await asyncio.gather(*waits)
    assert reads == 0
    assert {r.status for r, _ in waited} == {InstanceStatus.COMPLETE}
    store.get_instance = get_instance  # type: ignore[method-assign]
    for instance_id, (record, _) in zip(ids, waited, strict=True):
        assert record == await store.get_instance(instance_id)
