"""Child workflows (step.child) through the real gRPC server, on the run's
store: created once, waited for parked, linked both ways, and ended with
their parent by its policy."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import Server, eventually
from tests.workflows import count

S = pb.InstanceStatus


async def _create(server: Server, params: Any, instance_id: str = "") -> str:
    created = await server.stub.CreateInstance(
        pb.CreateInstanceRequest(
            workflow="parent", instance_id=instance_id, params_json=json.dumps(params)
        )
    )
    return created.instance_id


async def _get(server: Server, instance_id: str) -> pb.Instance:
    return (await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))).instance


async def _wait(server: Server, instance_id: str) -> pb.Instance:
    reply = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=instance_id, include_steps=True), timeout=30
    )
    return reply.instance


async def _children(server: Server, parent_id: str, **kw: Any) -> list[pb.Instance]:
    reply = await server.stub.ListInstances(
        pb.ListInstancesRequest(parent_id=parent_id, page_size=1000, **kw)
    )
    return list(reply.instances)


async def _until(server: Server, instance_id: str, status: int) -> pb.Instance:
    async def check() -> pb.Instance | None:
        instance = await _get(server, instance_id)
        return instance if instance.status == status else None

    found: pb.Instance = await eventually(check)
    return found


async def _all_waiting(server: Server, parent_id: str, n: int) -> list[pb.Instance]:
    async def check() -> list[pb.Instance] | None:
        kids = await _children(server, parent_id)
        waiting = [k for k in kids if k.status == S.INSTANCE_STATUS_WAITING]
        return kids if len(waiting) == n else None

    kids: list[pb.Instance] = await eventually(check)
    return kids


async def test_children_run_once_and_are_linked_both_ways(server: Server, side_file: Any) -> None:
    parent_id = await _create(server, {"children": 3, "tag": "a", "kid": {"ms": 20}})
    done = await _wait(server, parent_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done.error
    assert json.loads(done.output_json) == {
        "kids": [{"n": i, "v": 10 * i} for i in range(3)],
        "sum": 30,
    }
    child_steps = [s for s in done.steps if s.kind == pb.STEP_KIND_CHILD]
    assert [s.name for s in child_steps] == ["kid-0", "kid-1", "kid-2"]
    assert all(s.status == pb.STEP_STATUS_SUCCEEDED for s in child_steps)
    assert all(s.event_type == "" for s in child_steps)
    kids = await _children(server, parent_id)
    # Linked both ways: each child step names its child, each child its parent.
    assert {k.instance_id for k in kids} == {s.child_instance_id for s in child_steps}
    assert len(kids) == 3
    for step in child_steps:
        kid = await _get(server, step.child_instance_id)
        assert kid.parent_id == parent_id
        assert kid.workflow == "kid"
        assert json.loads(step.output_json) == json.loads(kid.output_json)
        assert kid.instance_id.startswith(parent_id)
    # Each child's work ran once.
    assert [count(str(side_file), f"a:kid-{i}:done") for i in range(3)] == [1, 1, 1]
    # An instance created through the API has no parent; others' children are not listed.
    assert done.parent_id == ""
    other = await _create(server, {"children": 1, "tag": "b"})
    await _wait(server, other)
    assert len(await _children(server, parent_id)) == 3
    assert len(await _children(server, other)) == 1


async def test_a_parent_waits_parked_and_wakes_when_its_child_ends(server: Server) -> None:
    parent_id = await _create(server, {"children": 2, "tag": "w", "kid": {"wait": True}})
    kids = await _all_waiting(server, parent_id, 2)
    parent = await _until(server, parent_id, S.INSTANCE_STATUS_WAITING)
    # Waiting for its children holds no coroutine and no handle.
    engine = server.service.engine
    await eventually(lambda: _now(parent_id not in engine.core.live))
    running = [s for s in parent.steps if s.status == pb.STEP_STATUS_RUNNING]
    assert {s.child_instance_id for s in running} == {k.instance_id for k in kids}
    for kid in kids:
        await server.stub.SendEvent(pb.SendEventRequest(instance_id=kid.instance_id, type="go"))
    done = await _wait(server, parent_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    assert json.loads(done.output_json)["sum"] == 10
    # The child's ends were taken: no wake-up of them is left in the inbox.
    for kid in kids:
        assert (
            await server.service.store.take_events(
                parent_id, f"cruzflow:child:{kid.instance_id}", 10
            )
            == []
        )


async def _now(value: bool) -> bool | None:
    return value or None


async def test_a_failed_child_fails_the_parents_step(server: Server) -> None:
    caught = await _create(server, {"children": 1, "catch": True, "kid": {"fail": True}})
    done = await _wait(server, caught)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    out = json.loads(done.output_json)
    kid = (await _children(server, caught))[0]
    assert out["caught"] == kid.instance_id
    assert kid.status == S.INSTANCE_STATUS_ERRORED
    assert "errored: NonRetryableError: kid 0 gives up" in out["message"]
    # Uncaught, the parent errors with the child's story.
    uncaught = await _create(server, {"children": 1, "kid": {"fail": True}})
    done = await _wait(server, uncaught)
    assert done.status == S.INSTANCE_STATUS_ERRORED
    assert done.error.name == "ChildWorkflowError"
    assert "kid 0 gives up" in done.error.message
    step = next(s for s in done.steps if s.kind == pb.STEP_KIND_CHILD)
    assert step.status == pb.STEP_STATUS_FAILED


async def test_terminating_a_parent_terminates_its_children_unless_abandoned(
    server: Server,
) -> None:
    owned = await _create(server, {"children": 2, "kid": {"wait": True}})
    left = await _create(server, {"children": 2, "kid": {"wait": True}, "parent_close": "abandon"})
    owned_kids = await _all_waiting(server, owned, 2)
    left_kids = await _all_waiting(server, left, 2)
    for parent_id in (owned, left):
        reply = await server.stub.TerminateInstance(
            pb.TerminateInstanceRequest(instance_id=parent_id)
        )
        assert reply.status == S.INSTANCE_STATUS_TERMINATED
    for kid in owned_kids:
        assert (await _get(server, kid.instance_id)).status == S.INSTANCE_STATUS_TERMINATED
    for kid in left_kids:
        assert (await _get(server, kid.instance_id)).status == S.INSTANCE_STATUS_WAITING
    # An abandoned child runs on to its end; its parent stays terminated.
    await server.stub.SendEvent(
        pb.SendEventRequest(instance_id=left_kids[0].instance_id, type="go")
    )
    assert (await _wait(server, left_kids[0].instance_id)).status == S.INSTANCE_STATUS_COMPLETE
    assert (await _get(server, left)).status == S.INSTANCE_STATUS_TERMINATED


async def test_a_restarted_parent_starts_new_children(server: Server) -> None:
    parent_id = await _create(server, {"children": 2, "kid": {"wait": True}})
    first = {k.instance_id for k in await _all_waiting(server, parent_id, 2)}
    await server.stub.RestartInstance(pb.RestartInstanceRequest(instance_id=parent_id))

    async def second_run() -> list[pb.Instance] | None:
        kids = await _children(server, parent_id)
        new = [k for k in kids if k.instance_id not in first]
        waiting = [k for k in new if k.status == S.INSTANCE_STATUS_WAITING]
        return new if len(waiting) == 2 else None

    new = await eventually(second_run)
    assert len(await _children(server, parent_id)) == 4
    # The first run's children were ended with it.
    for kid_id in first:
        assert (await _get(server, kid_id)).status == S.INSTANCE_STATUS_TERMINATED
    for kid in new:
        await server.stub.SendEvent(pb.SendEventRequest(instance_id=kid.instance_id, type="go"))
    assert (await _wait(server, parent_id)).status == S.INSTANCE_STATUS_COMPLETE


async def test_a_given_child_id_is_used_once(server: Server) -> None:
    first = await _create(server, {"children": 1, "ids": {"0": "the-kid"}})
    done = await _wait(server, first)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    assert (await _get(server, "the-kid")).parent_id == first
    # Another parent asking for the same id errors, naming it; the child is untouched.
    second = await _create(server, {"children": 1, "ids": {"0": "the-kid"}})
    done = await _wait(server, second)
    assert done.status == S.INSTANCE_STATUS_ERRORED
    assert "the-kid" in done.error.message and "exists already" in done.error.message
    assert (await _get(server, "the-kid")).parent_id == first


async def test_bad_child_calls_and_filters_get_clear_errors(server: Server) -> None:
    unknown = await _create(server, {"children": 1, "workflow": "nope"})
    done = await _wait(server, unknown)
    assert done.status == S.INSTANCE_STATUS_ERRORED
    assert done.error.name == "ValueError"
    assert "step.child('kid-0')" in done.error.message and "'nope'" in done.error.message
    assert await _children(server, unknown) == []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _children(server, "not an id!")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("parent_id: ")
    # The engine's own event types cannot be sent.
    waiting = await _create(server, {"children": 1, "kid": {"wait": True}})
    await _until(server, waiting, S.INSTANCE_STATUS_WAITING)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.SendEvent(
            pb.SendEventRequest(instance_id=waiting, type="cruzflow:child:x")
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await _get(server, waiting)).status == S.INSTANCE_STATUS_WAITING


async def test_children_that_end_at_once_wake_their_parent(server: Server) -> None:
    """Eight children that end as soon as they start: their ends race the
    parent's branches on their way to wait; none is lost."""
    for _ in range(5):
        parent_id = await _create(server, {"children": 8})
        done = await _wait(server, parent_id)
        assert done.status == S.INSTANCE_STATUS_COMPLETE, done
        assert json.loads(done.output_json)["sum"] == 280


async def test_a_parent_of_many_children_reads_each_childs_record_about_once(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each child's end wakes the parent, whose waiting branches learn from one
    read of its inbox which children ended: the children's records are read
    about once each, not once per branch per wake-up (N² for N children)."""
    n = 20
    parent_id = await _create(server, {"children": n, "kid": {"wait": True}})
    kids = await _all_waiting(server, parent_id, n)
    store = server.service.store
    real = store.get_instance
    reads: list[str] = []

    async def counted(instance_id: str) -> Any:
        if instance_id.startswith(f"{parent_id}-"):
            reads.append(instance_id)
        return await real(instance_id)

    monkeypatch.setattr(store, "get_instance", counted)
    for kid in kids:
        await server.stub.SendEvent(pb.SendEventRequest(instance_id=kid.instance_id, type="go"))
    done = await _wait(server, parent_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    assert json.loads(done.output_json)["sum"] == 10 * sum(range(n))
    # Each child's record read once when its end is recorded, maybe again by
    # a replay that raced it: far from the n * n / 2 = 200 of a read per wait.
    assert len(reads) <= 2 * n, len(reads)
    assert set(reads) == {k.instance_id for k in kids}
