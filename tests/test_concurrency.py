"""Concurrency and rate limits per workflow, on the run's store (SQLite, or
PostgreSQL with CRUZFLOW_TEST_STORE=postgres): at most N instances hold a
slot at once (per concurrency key), the rest wait queued in priority then
creation order, starts are spaced by a rate limit, and all of it holds
across a restart (and, on PostgreSQL, across two engines on one database)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cruzflow.server.config import ConfigError, load_config
from cruzflow.server.engine.errors import InvalidArgument
from cruzflow.server.engine.runtime import Engine, Limits, WorkflowSpec
from cruzflow.server.records import Gate, InstanceStatus
from cruzflow.server.store.base import Store
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import BOTH, ON_POSTGRES, Server, Stores, eventually, finished
from tests.workflows import Limited

GatedEngines = Callable[..., Awaitable[Engine]]
TRANSPORTS = BOTH


@pytest.fixture
async def gated(stores: Stores) -> AsyncIterator[GatedEngines]:
    """Engines hosting "limited" (tests.workflows.Limited) with the given limits,
    on store ``db`` (the same name: the same store); all stopped after."""
    Limited.reset()
    started: list[tuple[Engine, Store]] = []

    async def make(gate: Gate, db: str = "store.db", **limits: int) -> Engine:
        store = stores.open(db)
        await store.open()
        spec = WorkflowSpec("limited", "LIMITED", "tests.workflows:Limited", Limited, gate)
        engine = Engine(store, {"limited": spec}, None, Limits(**limits))
        await engine.start()
        started.append((engine, store))
        return engine

    yield make
    for gate in Limited.gates.values():
        gate.set()
    for engine, store in reversed(started):
        if not engine.stopping:
            await engine.shutdown(0.1)
            await store.close()
    Limited.reset()


async def _create(engine: Engine, n: int, params: Any = None, priority: int = 0) -> list[str]:
    ids = []
    for _ in range(n):
        instance_id, status = await engine.create(
            "limited", "", json.dumps(params), priority=priority
        )
        assert status is InstanceStatus.QUEUED  # stored waiting; let through in the commit
        ids.append(instance_id)
    return ids


async def _in_step(count: int) -> None:
    """Wait until ``count`` instances are in the step (and no more ever were)."""

    async def there() -> bool:
        assert len(Limited.running) <= count, Limited.running
        return len(Limited.running) == count

    await eventually(there)


async def _status(engine: Engine, instance_id: str) -> InstanceStatus:
    record, _ = await engine.get(instance_id)
    return record.status


async def test_limit_holds_and_the_rest_start_in_creation_order(gated: GatedEngines) -> None:
    engine = await gated(Gate(limit=2))
    ids = await _create(engine, 6)
    await _in_step(2)
    assert Limited.order == ids[:2]
    for instance_id in ids[2:]:
        assert await _status(engine, instance_id) is InstanceStatus.QUEUED
    for done, instance_id in enumerate(ids):
        Limited.let_go(instance_id)
        assert (await finished(engine, instance_id)).status is InstanceStatus.COMPLETE
        await _in_step(min(2, len(ids) - done - 1))
    assert Limited.order == ids
    assert Limited.most == 2
    record, _ = await engine.get(ids[0])
    assert record.concurrency_key == "" and record.priority == 0


async def test_higher_priority_goes_first_then_creation_order(gated: GatedEngines) -> None:
    engine = await gated(Gate(limit=1))
    first = await _create(engine, 1)
    low = await _create(engine, 2, priority=-1)
    normal = await _create(engine, 2)
    high = await _create(engine, 2, priority=5)
    await _in_step(1)
    for instance_id in [*first, *high, *normal, *low]:
        assert Limited.order[-1] == instance_id
        Limited.let_go(instance_id)
        await finished(engine, instance_id)
        await _in_step(1 if instance_id != low[-1] else 0)
    assert Limited.order == [*first, *high, *normal, *low]
    record, _ = await engine.get(high[0])
    assert record.priority == 5


async def test_limits_hold_per_concurrency_key(gated: GatedEngines) -> None:
    engine = await gated(Gate(limit=1, key_path=("user", "id")))
    a = await _create(engine, 3, {"user": {"id": "a"}})
    b = await _create(engine, 3, {"user": {"id": 7}})
    await _in_step(2)
    assert set(Limited.order) == {a[0], b[0]}
    # A key given with the create wins over the params'.
    c, _ = await engine.create("limited", "", '{"user": {"id": "a"}}', concurrency_key="c")
    await _in_step(3)
    record, _ = await engine.get(b[0])
    assert record.concurrency_key == "7"
    Limited.let_go(a[0])
    await finished(engine, a[0])
    await _in_step(3)
    assert Limited.order[-1] == a[1]
    for instance_id in [a[1], a[2], *b, c]:
        Limited.let_go(instance_id)
    for instance_id in [*a, *b, c]:
        assert (await finished(engine, instance_id)).status is InstanceStatus.COMPLETE
    assert Limited.most == 3


async def test_a_create_without_the_key_is_refused_and_stores_nothing(
    gated: GatedEngines,
) -> None:
    engine = await gated(Gate(limit=1, key_path=("user_id",)))
    for params in ["{}", '{"user_id": null}', '{"user_id": [1]}', "[]", '{"user_id": true}']:
        with pytest.raises(InvalidArgument) as caught:
            await engine.create("limited", "nope", params)
        assert "user_id" in str(caught.value)
    with pytest.raises(InvalidArgument, match="control character"):
        await engine.create("limited", "nope", "{}", concurrency_key="a\nb")
    counts = await engine.count_instances()
    assert sum(n for _, _, n in counts) == 0


async def test_a_key_for_a_workflow_without_keys_is_refused(gated: GatedEngines) -> None:
    engine = await gated(Gate(limit=1))
    with pytest.raises(InvalidArgument, match="one limit for all"):
        await engine.create("limited", "", "{}", concurrency_key="a")


async def test_rate_limit_spaces_the_starts(gated: GatedEngines) -> None:
    engine = await gated(Gate(starts=2, per_ms=300))
    ids = await _create(engine, 7)
    for instance_id in ids:
        Limited.let_go(instance_id)
    for instance_id in ids:
        assert (await finished(engine, instance_id)).status is InstanceStatus.COMPLETE
    starts = sorted(await _gated_at(engine, ids))
    # Never more than 2 starts within any 300 ms: the 3rd start after any
    # start comes at least 300 ms after it.
    assert all(later - earlier >= 300 for earlier, later in zip(starts, starts[2:], strict=False))
    assert len(starts) == 7


async def test_a_rate_limit_holds_the_rest_queued(gated: GatedEngines) -> None:
    engine = await gated(Gate(starts=2, per_ms=3_600_000))
    ids = await _create(engine, 5)
    await _in_step(2)
    Limited.let_go(ids[0])
    Limited.let_go(ids[1])
    await finished(engine, ids[1])
    await finished(engine, ids[0])
    for instance_id in ids[2:]:
        assert await _status(engine, instance_id) is InstanceStatus.QUEUED
    assert len(Limited.order) == 2


async def test_a_rate_limit_survives_a_restart(gated: GatedEngines) -> None:
    engine = await gated(Gate(starts=2, per_ms=400))
    ids = await _create(engine, 6)
    for instance_id in ids:
        Limited.let_go(instance_id)
    await finished(engine, ids[1])
    await engine.shutdown(0.1)
    await engine.store.close()
    # The next server finds the rest waiting, and keeps the spacing.
    engine = await gated(Gate(starts=2, per_ms=400))
    for instance_id in ids:
        assert (await finished(engine, instance_id)).status is InstanceStatus.COMPLETE
    starts = sorted(await _gated_at(engine, ids))
    assert all(later - earlier >= 400 for earlier, later in zip(starts, starts[2:], strict=False))


async def test_limits_survive_a_restart(gated: GatedEngines) -> None:
    engine = await gated(Gate(limit=2))
    ids = await _create(engine, 5)
    await _in_step(2)
    await engine.shutdown(0.1)
    await engine.store.close()
    Limited.running.clear()
    engine = await gated(Gate(limit=2))
    # The two that held a slot run again (their step was cut short); the
    # rest still wait.
    await _in_step(2)
    assert set(Limited.order[-2:]) == set(ids[:2])
    for instance_id in ids[2:]:
        assert await _status(engine, instance_id) is InstanceStatus.QUEUED
    for instance_id in ids:
        Limited.let_go(instance_id)
    for instance_id in ids:
        assert (await finished(engine, instance_id)).status is InstanceStatus.COMPLETE
    assert Limited.most == 2


async def test_a_stricter_limit_after_a_restart_is_kept(gated: GatedEngines) -> None:
    engine = await gated(Gate(limit=3))
    ids = await _create(engine, 5)
    await _in_step(3)
    await engine.shutdown(0.1)
    await engine.store.close()
    Limited.running.clear()
    Limited.most = 0
    engine = await gated(Gate(limit=1))
    # The three let through hold their slots until they finish; none more
    # starts until only one is left.
    await _in_step(3)
    for instance_id in ids[:3]:
        Limited.let_go(instance_id)
        await finished(engine, instance_id)
    await _in_step(1)
    assert Limited.order[-1] == ids[3]
    Limited.let_go(ids[3])
    Limited.let_go(ids[4])
    assert (await finished(engine, ids[4])).status is InstanceStatus.COMPLETE
    assert Limited.most == 3


async def test_pause_keeps_the_slot_and_terminate_frees_it(gated: GatedEngines) -> None:
    engine = await gated(Gate(limit=1))
    ids = await _create(engine, 3)
    await _in_step(1)
    # A queued one paused and resumed waits again, in its place.
    assert await engine.pause(ids[2]) is InstanceStatus.PAUSED
    assert await engine.pause(ids[0]) is InstanceStatus.WAITING_FOR_PAUSE
    Limited.let_go(ids[0])

    async def paused() -> bool:
        return await _status(engine, ids[0]) is InstanceStatus.PAUSED

    await eventually(paused)
    assert await _status(engine, ids[1]) is InstanceStatus.QUEUED  # the paused one holds it
    assert await engine.resume(ids[2]) is InstanceStatus.QUEUED
    assert await engine.terminate(ids[0]) is InstanceStatus.TERMINATED
    await _in_step(1)
    assert Limited.order[-1] == ids[1]
    Limited.let_go(ids[1])
    Limited.let_go(ids[2])
    for instance_id in ids[1:]:
        assert (await finished(engine, instance_id)).status is InstanceStatus.COMPLETE
    # Restarted once finished, it waits for a slot again.
    Limited.gates.pop(ids[1])
    await engine.restart(ids[1])
    await _in_step(1)
    Limited.let_go(ids[1])
    assert (await finished(engine, ids[1])).status is InstanceStatus.COMPLETE
    assert Limited.most == 1


@pytest.mark.skipif(not ON_POSTGRES, reason="two engines share one PostgreSQL database")
async def test_two_engines_together_keep_one_limit(gated: GatedEngines) -> None:
    a = await gated(Gate(limit=2, key_path=("k",)))
    b = await gated(Gate(limit=2, key_path=("k",)))
    ids = []
    for i in range(8):
        engine = a if i % 2 else b
        ids += await _create(engine, 1, {"k": "x"})
    await _in_step(2)
    for instance_id in ids:
        Limited.let_go(instance_id)
        await finished(a, instance_id)
    assert Limited.most == 2
    assert sorted(Limited.order) == sorted(ids)


def test_config_reads_the_limits(tmp_path: Path) -> None:
    path = tmp_path / "cruzflow.toml"
    path.write_text(
        """
[[workflows]]
binding = "LIMITED"
name = "limited"
class_name = "tests.workflows:Limited"
concurrency = 5
concurrency_key = "user.id"
rate_limit = { starts = 10, per = "1 minute" }

[[workflows]]
binding = "FREE"
name = "free"
class_name = "tests.workflows:Limited"
"""
    )
    config = load_config(path)
    assert config.workflows["limited"].gate == Gate(5, 10, 60_000, ("user", "id"))
    assert config.workflows["free"].gate is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('concurrency_key = "user_id"', "but no limit"),
        ("concurrency = 0", "concurrency"),
        ('concurrency = 1\nconcurrency_key = "a b"', "concurrency_key"),
        ('rate_limit = { starts = 1, per = "0 seconds" }', "rate_limit.per"),
        ("rate_limit = { starts = 1 }", "rate_limit.per"),
    ],
)
def test_config_refuses_bad_limits(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "cruzflow.toml"
    path.write_text(
        f"""
[[workflows]]
binding = "LIMITED"
name = "limited"
class_name = "tests.workflows:Limited"
{entry}
"""
    )
    with pytest.raises(ConfigError, match=message):
        load_config(path)


async def _gated_at(engine: Engine, ids: list[str]) -> list[int]:
    """When each instance was let through, as the store recorded it."""
    store: Any = engine.store
    if ON_POSTGRES:
        rows = await store._fetch("SELECT gated_at FROM instances WHERE id = ANY($1::text[])", ids)
    else:
        marks = ", ".join("?" * len(ids))
        rows = await store._fetch(f"SELECT gated_at FROM instances WHERE id IN ({marks})", ids)
    return [r[0] for r in rows]


async def test_the_api_carries_priority_and_refuses_a_key_without_limits(server: Server) -> None:
    created = await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="three-steps", params_json="{}", priority=-3)
    )
    status = await server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id=created.instance_id))
    assert status.instance.priority == -3
    assert status.instance.concurrency_key == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="three-steps", instance_id="k", concurrency_key="a")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no concurrency or rate limit" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.stub.GetStatus(pb.GetStatusRequest(instance_id="k"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # The batch call takes them too.
    batch = await server.stub.CreateInstances(
        pb.CreateInstancesRequest(
            requests=[pb.CreateInstanceRequest(workflow="three-steps", priority=9)]
        )
    )
    status = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=batch.instances[0].instance_id)
    )
    assert status.instance.priority == 9
