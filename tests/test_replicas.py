"""Several servers on one PostgreSQL database, in one process: two real
engines, each with its own PostgresStore (its own pool, lease and LISTEN
connection) on one real database. What a second server changes for an
instance: who runs it, who may watch it, who may send it an event.

The processes-and-SIGKILL form is tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from cruzflow.server.engine.errors import FailedPrecondition
from cruzflow.server.engine.runtime import Engine, Limits
from cruzflow.server.records import EventKind, InstanceStatus, StepKind, StepStatus
from cruzflow.server.store.postgres import PostgresStore
from tests.conftest import eventually, finished, specs
from tests.postgres import PostgresServer, postgres_server, postgres_url  # noqa: F401
from tests.workflows import Blocks, Mends

Start = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start(postgres_url: str) -> AsyncIterator[Start]:  # noqa: F811
    """Start servers (engines) on the test's database; all stop at the end."""
    started: list[tuple[Engine, PostgresStore]] = []

    async def make(lease_period_s: float = 5.0, **limits: int) -> Engine:
        store = PostgresStore(postgres_url, lease_period_s=lease_period_s)
        await store.open()
        engine = Engine(store, specs(), None, Limits(**limits))
        await engine.start()
        await asyncio.wait_for(store.listening.wait(), 10)
        started.append((engine, store))
        return engine

    yield make
    for engine, store in reversed(started):
        if not engine.stopping:
            await engine.shutdown(0.1)
        await store.close()


async def _status(engine: Engine, instance_id: str) -> InstanceStatus:
    return (await engine.get(instance_id))[0].status


async def test_instances_a_full_server_cannot_run_go_to_the_other(start: Start) -> None:
    a = await start(max_running_instances=1)
    b = await start()
    Blocks.gate = asyncio.Event()
    try:
        first, status = await a.create("blocks", "first")
        assert status is InstanceStatus.RUNNING
        # A's one slot is taken: these are stored queued, and B takes them up.
        for i in range(3):
            _, status = await a.create("three-steps", f"spread-{i}")
            assert status is InstanceStatus.QUEUED
        for i in range(3):
            record = await finished(b, f"spread-{i}")
            assert record.status is InstanceStatus.COMPLETE
        assert "spread-0" not in a.core.live
        # Meanwhile A still runs the first.
        assert first in a.core.runs
    finally:
        Blocks.gate.set()
    assert (await finished(a, first)).status is InstanceStatus.COMPLETE


async def test_a_watch_on_one_server_sees_every_event_of_a_run_on_the_other(
    start: Start,
) -> None:
    a = await start()
    b = await start()
    Blocks.gate = asyncio.Event()
    instance_id, _ = await a.create("blocks", "watched")
    seen: list[int] = []

    async def follow() -> None:
        async for event in b.watch(instance_id):
            seen.append(event.seq)

    watcher = asyncio.create_task(follow())
    await eventually(lambda: _at_least(seen, 2))
    Blocks.gate.set()
    await asyncio.wait_for(watcher, 20)
    assert seen == list(range(1, len(seen) + 1))
    record, _ = await a.get(instance_id)
    assert seen[-1] == record.last_seq and record.status is InstanceStatus.COMPLETE
    # WaitInstance on the other server answers with the final status too.
    done, _ = await b.wait(instance_id, timeout=10)
    assert done.status is InstanceStatus.COMPLETE


async def test_a_watch_many_on_one_server_sees_every_event_of_runs_on_the_other(
    start: Start,
) -> None:
    """WatchInstances on B of instances A runs: B's hub is only nudged, and
    each nudged instance is read back from the store, once and in order."""
    a = await start()
    b = await start()
    Blocks.gate = asyncio.Event()
    ids = [(await a.create("blocks", f"many-{i}"))[0] for i in range(4)]
    seen: dict[str, list[int]] = {}

    async def follow() -> None:
        async for batch in b.watch_many([(i, 0) for i in ids]):
            for event in batch:
                seen.setdefault(event.instance_id, []).append(event.seq)

    watcher = asyncio.create_task(follow())
    await eventually(lambda: asyncio.sleep(0, all(len(seen.get(i, [])) >= 2 for i in ids)))
    Blocks.gate.set()
    await asyncio.wait_for(watcher, 20)
    for instance_id in ids:
        record, _ = await a.get(instance_id)
        assert record.status is InstanceStatus.COMPLETE
        assert seen[instance_id] == list(range(1, record.last_seq + 1))


async def test_an_event_sent_through_either_server_reaches_the_wait(start: Start) -> None:
    a = await start()
    b = await start()
    # Parked: unowned, so the server the event reaches wakes it.
    parked, _ = await a.create("approval", "parked", json.dumps({"timeout": 300}))
    await eventually(lambda: _is(a, parked, InstanceStatus.WAITING))
    await eventually(lambda: _not_in(a, parked))
    await b.send_event(parked, "approval", '"from b"')
    record = await finished(b, parked)
    assert json.loads(record.output) == {"approved": "from b", "type": "approval"}

    # Running on A (held in its first step): the event goes through B, stored
    # for A's run, which takes it when it reaches its wait.
    Blocks.gate = asyncio.Event()
    busy, _ = await a.create("blocks-then-waits", "busy")
    await eventually(lambda: _running_here(a, busy))
    await b.send_event(busy, "approval", '"through b"')
    assert busy not in b.core.live
    Blocks.gate.set()
    record = await finished(a, busy)
    assert json.loads(record.output) == {"approved": "through b", "type": "approval"}


async def test_a_server_that_stops_hands_its_runs_over_at_once(start: Start) -> None:
    a = await start(lease_period_s=30.0)
    b = await start(lease_period_s=30.0)
    Blocks.gate = asyncio.Event()
    instance_id, _ = await a.create("blocks", "handed-over")
    # Its step has begun (its start is stored): A's attempt holds at the gate.
    await eventually(lambda: _has_steps(a, instance_id))
    # A stops before its step ends: the attempt is cut, its lease released.
    await a.shutdown(0.05)
    Blocks.gate.set()
    # B takes it up well before A's lease (30 s) would have expired.
    record = await asyncio.wait_for(finished(b, instance_id), 10)
    assert record.status is InstanceStatus.COMPLETE
    events = [e async for e in b.watch(instance_id)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    started = [e for e in events if e.kind is EventKind.STEP_STARTED]
    assert [e.data["att"] for e in started] == [1, 2]


async def test_a_lost_lease_stops_the_runs_it_held(start: Start) -> None:
    a = await start(lease_period_s=0.6)
    b = await start(lease_period_s=0.6)
    Blocks.gate = asyncio.Event()
    instance_id, _ = await a.create("blocks", "fenced")
    await eventually(lambda: _has_steps(a, instance_id))
    # A's lease lapses (its renewals stop, as in a server paused past it): B
    # takes the instance over, and A's late writes are refused.
    assert a._lease_keeper is not None
    a._lease_keeper.cancel()
    await eventually(lambda: _running_here(b, instance_id), timeout=10)
    Blocks.gate.set()
    record = await finished(b, instance_id)
    assert record.status is InstanceStatus.COMPLETE
    events = [e async for e in b.watch(instance_id)]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # A's run stopped at its next boundary, having written nothing more.
    await eventually(lambda: _not_in(a, instance_id))


def _at_least(items: list[Any], n: int) -> Awaitable[bool]:
    return _value(len(items) >= n)


async def _value(value: bool) -> bool:
    return value


async def _is(engine: Engine, instance_id: str, status: InstanceStatus) -> bool:
    return await _status(engine, instance_id) is status


async def _not_in(engine: Engine, instance_id: str) -> bool:
    return instance_id not in engine.core.live


async def _running_here(engine: Engine, instance_id: str) -> bool:
    return instance_id in engine.core.runs


async def _has_steps(engine: Engine, instance_id: str) -> bool:
    return bool((await engine.get(instance_id))[1])


async def test_controls_through_either_server_reach_the_server_that_runs_it(
    start: Start,
) -> None:
    a = await start()
    b = await start()
    Blocks.gate = asyncio.Event()
    try:
        instance_id, _ = await a.create("blocks", "steered")
        await eventually(lambda: _has_steps(a, instance_id))
        # B does not run it: each call is recorded for A, which does it and answers.
        assert await b.pause(instance_id) is InstanceStatus.WAITING_FOR_PAUSE
        assert await _status(a, instance_id) is InstanceStatus.WAITING_FOR_PAUSE
        assert await b.resume(instance_id) is InstanceStatus.RUNNING
        assert instance_id in a.core.runs and instance_id not in b.core.live
        # A refusal there is the same refusal here.
        with pytest.raises(FailedPrecondition, match="is running; only paused instances"):
            await b.resume(instance_id)
        assert await b.restart(instance_id) is InstanceStatus.RUNNING
        await eventually(lambda: _has_steps(a, instance_id))
        assert await b.terminate(instance_id) is InstanceStatus.TERMINATED
    finally:
        Blocks.gate.set()
    record, _ = await a.get(instance_id)
    assert record.status is InstanceStatus.TERMINATED
    events = [e async for e in a.watch(instance_id)]
    statuses = [e.data["status"] for e in events if e.kind is EventKind.STATUS_CHANGED]
    assert statuses == [
        InstanceStatus.RUNNING,
        InstanceStatus.WAITING_FOR_PAUSE,
        InstanceStatus.RUNNING,
        InstanceStatus.RUNNING,  # the restart
        InstanceStatus.TERMINATED,
    ]


async def test_a_call_for_a_server_that_died_is_given_up_and_done_elsewhere(
    start: Start,
) -> None:
    a = await start(lease_period_s=0.6)
    b = await start(lease_period_s=0.6)
    Blocks.gate = asyncio.Event()
    try:
        instance_id, _ = await a.create("blocks", "orphaned")
        await eventually(lambda: _has_steps(a, instance_id))
        # A stops answering anything (its listener and its lease renewals are
        # gone, as in a server that died); B's call is recorded for A, given
        # up once A's lease has expired, and done by B itself.
        for task in [*a._background, a._lease_keeper]:
            if task is not None:
                task.cancel()
        a.scheduler.serve_commands = None
        assert await b.terminate(instance_id) is InstanceStatus.TERMINATED
    finally:
        Blocks.gate.set()
    assert await _status(b, instance_id) is InstanceStatus.TERMINATED


async def test_children_on_one_server_wake_their_parent_on_the_other(start: Start) -> None:
    """A parent on A whose children B runs (A has one slot): each child's end,
    committed by B, wakes the parent wherever it is; terminating the parent
    through B ends the children A or B runs."""
    a = await start(max_running_instances=1)
    b = await start()
    parent_id, _ = await a.create("parent", "parent-ab", json.dumps({"children": 4}))
    record = await finished(b, parent_id)
    assert record.status is InstanceStatus.COMPLETE, record
    assert json.loads(record.output or b"null")["sum"] == 60
    kids, _ = await b.list_instances(parent_id=parent_id)
    assert len(kids) == 4 and all(k.status is InstanceStatus.COMPLETE for k in kids)

    waiting, _ = await a.create(
        "parent", "parent-waits", json.dumps({"children": 3, "kid": {"wait": True}})
    )

    async def all_waiting() -> list[Any] | None:
        kids, _ = await a.list_instances(parent_id=waiting)
        ready = [k for k in kids if k.status is InstanceStatus.WAITING]
        return kids if len(ready) == 3 else None

    kids = await eventually(all_waiting)
    await b.terminate(waiting)
    for kid in kids:
        assert await _status(a, kid.id) is InstanceStatus.TERMINATED


async def test_a_terminate_with_rollback_through_the_other_server(start: Start) -> None:
    """B asks A, which runs the instance, to terminate it with rollback: A does
    it (the call goes through the command path), the instance runs to its
    first unfinished step, and ends terminated with its terminate row done."""
    a = await start()
    b = await start()
    Blocks.gate = asyncio.Event()
    try:
        instance_id, _ = await a.create("blocks", "rolled")
        await eventually(lambda: _has_steps(a, instance_id))
        assert await b.terminate(instance_id, rollback=True) is InstanceStatus.RUNNING
        record = await finished(a, instance_id)
    finally:
        Blocks.gate.set()
    assert record.status is InstanceStatus.TERMINATED
    _, steps = await b.get(instance_id)
    marker = [s for s in steps if s.name == "terminate"]
    assert [(s.kind, s.status) for s in marker] == [(StepKind.ROLLBACK, StepStatus.SUCCEEDED)]
    # The step the terminate cut short never ran to its end.
    assert [s.status for s in steps if s.name != "terminate"] == [StepStatus.RUNNING]


async def test_a_restart_from_a_step_asked_of_the_other_server_is_done_by_its_holder(
    start: Start,
) -> None:
    a = await start()
    b = await start()
    Mends.calls, Mends.failing, Mends.hold = {}, False, asyncio.Event()
    try:
        instance_id, _ = await a.create("mends", "mend-1")
        await eventually(lambda: _running_here(a, instance_id))
        await eventually(lambda: _charging())
        before = await a.get(instance_id)
        # Held running by A: a repair asked of B is refused there (through the
        # command path), and changes nothing.
        with pytest.raises(FailedPrecondition, match="pause it first"):
            await b.repair(instance_id, "charge", output='{"charged": 1}', reason="x")
        assert await a.get(instance_id) == before
        # A restart from a step goes to A, which does it; the audit says who asked.
        status, audit = await b.restart_audited(
            instance_id, "charge", reason="over again", actor="ops", peer="b"
        )
        assert status in (InstanceStatus.RUNNING, InstanceStatus.QUEUED)
        assert audit is not None and (audit["actor"], audit["why"]) == ("ops", "over again")
        assert instance_id not in b.core.live
        Mends.hold.set()
        record = await finished(b, instance_id)
        assert record.status is InstanceStatus.COMPLETE
        assert Mends.calls == {"fetch": 1, "charge": 2, "ship": 1}
        (entry,) = await b.repairs(await b.core.record(instance_id))
        assert entry.kind is EventKind.REPAIRED and entry.data["name"] == "charge"
    finally:
        Mends.hold.set()
        Mends.hold = None


async def test_an_errored_instance_is_repaired_through_either_server(start: Start) -> None:
    a = await start()
    b = await start()
    Mends.calls, Mends.failing, Mends.hold = {}, True, None
    instance_id, _ = await a.create("mends", "mend-2")
    assert (await finished(a, instance_id)).status is InstanceStatus.ERRORED
    await b.repair(instance_id, "charge", output='{"charged": 3}', reason="by hand")
    record = await finished(a, instance_id)
    assert record.status is InstanceStatus.COMPLETE
    assert json.loads(record.output) == {"shipped": {"charged": 3}}
    assert Mends.calls == {"fetch": 1, "charge": 1, "ship": 1}


async def _charging() -> bool:
    return Mends.calls.get("charge") == 1
