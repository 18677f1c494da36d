"""CreateInstances (one transaction, all or nothing, every bad item named) and
the retention purge (finished instances past retention go with all their
rows; live and recent ones stay), through a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cruzflow.server.engine.errors import NotFound
from cruzflow.server.records import Batch, Lease, Refusal
from cruzflow.server.store.sqlite import SqliteStore
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import EngineFactory, Server, ServerFactory, eventually, sqlite_only

TIMEOUT = 20.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(TIMEOUT):
            await call
    return info.value


def new(workflow: str = "three-steps", instance_id: str = "", params: str = "{}") -> Any:
    return pb.CreateInstanceRequest(workflow=workflow, instance_id=instance_id, params_json=params)


async def create_many(server: Server, *requests: pb.CreateInstanceRequest) -> list[str]:
    response = await server.stub.CreateInstances(
        pb.CreateInstancesRequest(requests=requests), timeout=TIMEOUT
    )
    return [r.instance_id for r in response.instances]


async def exists(server: Server, instance_id: str) -> bool:
    try:
        await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id), timeout=TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == NOT_FOUND, exc
        return False
    return True


async def wait_final(server: Server, instance_id: str) -> pb.Instance:
    response = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=instance_id), timeout=TIMEOUT
    )
    return response.instance


def trace_commits(server: Server, monkeypatch: pytest.MonkeyPatch) -> list[Batch]:
    """Every batch the store applies from now on (the journal's one writer path)."""
    store = server.service.store
    applied: list[Batch] = []
    apply = store.apply

    async def traced(batch: Batch, lease: Lease) -> dict[str, Refusal]:
        refused = await apply(batch, lease)
        applied.append(batch)
        return refused

    monkeypatch.setattr(store, "apply", traced)
    return applied


def rows(server: Server, table: str, column: str, ids: list[str]) -> int:
    store = server.service.store
    assert isinstance(store, SqliteStore), "these tests read the SQLite file itself"
    conn = sqlite3.connect(store.path)
    try:
        marks = ", ".join("?" * len(ids))
        sql = f"SELECT count(*) FROM {table} WHERE {column} IN ({marks})"
        return int(conn.execute(sql, ids).fetchone()[0])
    finally:
        conn.close()


# ------------------------------------------------------------------ batches
async def test_a_batch_of_ten_commits_in_one_transaction(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied = trace_commits(server, monkeypatch)
    requests = [new(instance_id=f"batch-{n}" if n % 2 else "") for n in range(10)]
    response = await server.stub.CreateInstances(
        pb.CreateInstancesRequest(requests=requests), timeout=TIMEOUT
    )
    created = [r.instance_id for r in response.instances]
    assert len(created) == 10 and len(set(created)) == 10
    assert [c for n, c in enumerate(created) if n % 2] == [f"batch-{n}" for n in range(1, 10, 2)]
    assert all(r.status == pb.INSTANCE_STATUS_RUNNING for r in response.instances)
    inserts = [[r.id for r in b.new_instances] for b in applied if b.new_instances]
    assert inserts[0] == created  # all ten, in order, in the first commit after the call
    assert len(inserts) == 1
    for instance_id in created:
        assert (await wait_final(server, instance_id)).status == pb.INSTANCE_STATUS_COMPLETE


async def test_a_bad_batch_creates_nothing_and_names_every_bad_item(server: Server) -> None:
    await create_many(server, new(instance_id="taken"))
    requests = [new(instance_id=f"fresh-{n}") for n in range(10)]
    requests[3] = new(instance_id="fresh-3", params="{not json")
    requests[7] = new(instance_id="taken")
    error = await rpc_error(
        server.stub.CreateInstances(pb.CreateInstancesRequest(requests=requests))
    )
    assert error.code() == INVALID
    message = error.details() or ""
    assert message.startswith("requests[3].params_json: not valid JSON"), message
    assert "; requests[7].instance_id: an instance 'taken' exists already" in message, message
    assert message.count("requests[") == 2
    for n in range(10):
        assert not await exists(server, f"fresh-{n}")
    listed = await server.stub.ListInstances(pb.ListInstancesRequest())
    assert [i.instance_id for i in listed.instances] == ["taken"]


async def test_each_kind_of_refusal_gets_its_code(server: Server) -> None:
    await create_many(server, new(instance_id="a1"), new(instance_id="a2"))

    async def refused(*requests: pb.CreateInstanceRequest) -> tuple[grpc.StatusCode, str]:
        error = await rpc_error(
            server.stub.CreateInstances(pb.CreateInstancesRequest(requests=requests))
        )
        return error.code(), error.details() or ""

    code, message = await refused(new(), new(instance_id="a2"), new(instance_id="a1"))
    assert code == ALREADY_EXISTS
    assert message.startswith("requests[1].instance_id: an instance 'a2'"), message
    assert "; requests[2].instance_id: an instance 'a1'" in message
    code, message = await refused(new(instance_id="a1"), new("no-such-workflow"))
    assert code == NOT_FOUND
    assert "requests[0].instance_id" in message and "requests[1].workflow" in message, message
    code, message = await refused(new(instance_id="x"), new(), new(instance_id="x"))
    assert code == INVALID
    assert message.startswith("requests[2].instance_id: 'x' is also the id of requests[0]")
    code, message = await refused(new(instance_id="-bad"), new("no-such-workflow"))
    assert code == INVALID and message.count("requests[") == 2
    assert not await exists(server, "x")


async def test_batch_size_limits(make_server: ServerFactory) -> None:
    server = await make_server(limits={"max_batch_size": 5})
    error = await rpc_error(server.stub.CreateInstances(pb.CreateInstancesRequest()))
    assert error.code() == INVALID and "requests: empty" in (error.details() or "")
    error = await rpc_error(
        server.stub.CreateInstances(pb.CreateInstancesRequest(requests=[new()] * 6))
    )
    assert error.code() == INVALID
    assert "6 instances, over the limit of 5" in (error.details() or "")
    assert "limits.max_batch_size" in (error.details() or "")
    assert len(await create_many(server, *[new()] * 5)) == 5


# ---------------------------------------------------------------- retention
@sqlite_only  # counts the rows in the SQLite file itself
async def test_finished_instances_are_purged_with_all_their_rows(
    make_server: ServerFactory, gate: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Milliseconds: retention 1 s, a purge round every 20 ms, 2 per transaction.
    server = await make_server(limits={"retention": 1000, "purge_interval": 20, "purge_chunk": 2})
    applied = trace_commits(server, monkeypatch)
    engine = server.service.engine
    rounds = count_rounds(server, monkeypatch)
    done = await create_many(server, new(), new(), new("raises"), new("catches"))
    live, killed = await create_many(server, new("blocks"), new("blocks"))
    # An event kept for the instance, then it is terminated: an inbox row to purge.
    await server.stub.SendEvent(pb.SendEventRequest(instance_id=killed, type="go"))
    await server.stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id=killed))
    finished = [*done, killed]
    for instance_id in done:
        await wait_final(server, instance_id)
    assert rows(server, "inbox", "instance_id", [killed]) == 1
    assert rows(server, "steps", "instance_id", finished) > 0

    async def all_gone() -> bool:
        return not any([await exists(server, i) for i in finished])

    await eventually(all_gone, timeout=TIMEOUT)
    assert engine.purged == 5
    for table in ("steps", "events", "inbox"):
        assert rows(server, table, "instance_id", finished) == 0, table
    assert rows(server, "instances", "id", finished) == 0
    # Bounded chunks: no transaction purged more than purge_chunk instances.
    assert max(len(b.purge) for b in applied if b.purge) <= 2
    # The running instance is untouched, round after round.
    seen = len(rounds)

    async def three_more_rounds() -> bool:
        return len(rounds) >= seen + 3

    await eventually(three_more_rounds, timeout=TIMEOUT)
    assert await exists(server, live) and engine.purged == 5
    # Once it ends, its turn comes too.
    gate.set()
    assert (await wait_final(server, live)).status == pb.INSTANCE_STATUS_COMPLETE

    async def live_gone() -> bool:
        return not await exists(server, live)

    await eventually(live_gone, timeout=TIMEOUT)
    assert engine.purged == 6
    assert rows(server, "events", "instance_id", [live]) == 0


def count_rounds(server: Server, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per purge round from now on (each starts with this read)."""
    store = server.service.store
    calls: list[int] = []
    ended_before = store.ended_before

    async def counted(before: int, limit: int) -> list[str]:
        calls.append(before)
        return await ended_before(before, limit)

    monkeypatch.setattr(store, "ended_before", counted)
    return calls


async def test_recent_and_unfinished_instances_stay(make_server: ServerFactory, gate: Any) -> None:
    # A long retention and interval: the test runs the purge itself.
    server = await make_server(limits={"retention": '"1 hour"', "purge_interval": '"1 hour"'})
    engine = server.service.engine
    old = await create_many(server, new(), new("raises"))
    old_end = max([(await wait_final(server, i)).end_time.ToMilliseconds() for i in old])
    await asyncio.sleep(0.5)
    recent = await create_many(server, new())
    recent_end = (await wait_final(server, recent[0])).end_time.ToMilliseconds()
    running = await create_many(server, new("blocks"))
    assert recent_end - old_end >= 500
    assert await engine.purge_finished() == 0
    # Retention now reaches halfway between the old and the recent endings.
    midpoint = (old_end + recent_end) // 2
    engine.core.limits = dataclasses.replace(
        engine.limits, retention_s=(time.time() * 1000 - midpoint) / 1000
    )
    assert await engine.purge_finished() == 2
    assert [await exists(server, i) for i in old] == [False, False]
    assert await exists(server, recent[0]) and await exists(server, running[0])
    assert await engine.purge_finished() == 0
    gate.set()


async def _true(value: bool) -> bool:
    await asyncio.sleep(0.01)
    return value


async def test_a_control_call_waits_for_a_purge_then_finds_nothing(
    make_engine: EngineFactory,
) -> None:
    engine = await make_engine(retention_s=3600)
    instance_id, _ = await engine.create("three-steps", "gone")
    record, _ = await engine.wait(instance_id)
    assert record.status.finished and record.ended_at is not None
    await eventually(lambda: _true(instance_id not in engine.core.live))
    fenced = await engine.retention.fence_idle([instance_id])
    assert [i for i, _ in fenced] == [instance_id]
    restart = asyncio.create_task(engine.restart(instance_id))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not restart.done()  # held at the instance's lock
    try:
        assert await engine.journal.purge({instance_id: record.ended_at + 1}) == 1
    finally:
        engine.retention.unfence(fenced)
    with pytest.raises(NotFound):
        await restart
    assert engine.core.locks == {}
    assert await engine.store.read_events(instance_id, 0, 10) == []
    assert await engine.store.get_steps(instance_id) == []


async def test_a_purge_keeps_an_instance_that_ended_later(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    instance_id, _ = await engine.create("three-steps")
    record, _ = await engine.wait(instance_id)
    assert record.ended_at is not None
    assert await engine.journal.purge({instance_id: record.ended_at}) == 0
    assert len(await engine.store.read_events(instance_id, 0, 100)) == record.last_seq
    assert len(await engine.store.get_steps(instance_id)) == 3
    assert engine.purged == 0


def test_limits_section_reads_the_purge_keys(tmp_path: Path) -> None:
    from cruzflow.server.config import ConfigError, load_config
    from tests.procs import write_config

    path = write_config(tmp_path, {}, limits={"purge_interval": 5000, "purge_chunk": 7})
    limits = load_config(path).limits
    assert (limits.purge_interval_s, limits.purge_chunk) == (5.0, 7)
    path = write_config(tmp_path, {}, limits={"purge_interval": 0})
    with pytest.raises(ConfigError, match=r"limits\.purge_interval: .*more than 0"):
        load_config(path)
