"""The instance lifecycle through the real gRPC server: sleep, events, controls."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import pytest

from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import Server, eventually

S = pb.InstanceStatus


async def _create(server: Server, workflow: str, params: Any = None, **kw: Any) -> str:
    created = await server.stub.CreateInstance(
        pb.CreateInstanceRequest(
            workflow=workflow, params_json=json.dumps(params) if params is not None else "", **kw
        )
    )
    return created.instance_id


async def _status(server: Server, instance_id: str) -> pb.Instance:
    return (await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))).instance


async def _until(server: Server, instance_id: str, status: int) -> pb.Instance:
    async def check() -> pb.Instance | None:
        instance = await _status(server, instance_id)
        return instance if instance.status == status else None

    result: pb.Instance = await eventually(check)
    return result


async def _wait(server: Server, instance_id: str) -> pb.Instance:
    reply = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=instance_id, include_steps=True), timeout=30
    )
    return reply.instance


async def _events(server: Server, instance_id: str) -> list[pb.WatchInstanceResponse]:
    stream = server.stub.WatchInstance(pb.WatchInstanceRequest(instance_id=instance_id), timeout=30)
    return [event async for event in stream]


async def _statuses(server: Server, instance_id: str) -> list[int]:
    """The statuses the instance went through, from its event log."""
    events = await _events(server, instance_id)
    return [e.status_changed.status for e in events if e.HasField("status_changed")]


async def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


# ------------------------------------------------------------------ sleep
async def test_sleep_waits_out_of_memory_and_wakes_on_time(server: Server) -> None:
    started = time.time()
    instance_id = await _create(server, "naps", {"ms": 400})
    waiting = await _until(server, instance_id, S.INSTANCE_STATUS_WAITING)
    wake = waiting.wake_time.ToMilliseconds()
    assert wake >= int(started * 1000) + 400
    # Waiting holds no coroutine and no in-memory handle.
    engine = server.service.engine
    await eventually(lambda: _async(instance_id not in engine.core.live))
    assert instance_id not in engine.core.runs
    done = await _wait(server, instance_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    assert json.loads(done.output_json) == "after"
    nap = done.steps[1]
    assert (nap.name, nap.kind, nap.status) == (
        "nap",
        pb.STEP_KIND_SLEEP,
        pb.STEP_STATUS_SUCCEEDED,
    )
    assert nap.end_time.ToMilliseconds() >= wake
    assert not done.HasField("wake_time")
    statuses = await _statuses(server, instance_id)
    assert statuses == [
        S.INSTANCE_STATUS_RUNNING,
        S.INSTANCE_STATUS_WAITING,
        S.INSTANCE_STATUS_RUNNING,
        S.INSTANCE_STATUS_COMPLETE,
    ]


async def _async(value: Any) -> Any:
    return value


async def test_sleep_longer_than_the_limit_errors_clearly(make_server: Any) -> None:
    server = await make_server(limits={"max_sleep": '"1 hours"'})
    instance_id = await _create(server, "naps", {"ms": 2 * 3600 * 1000})
    done = await _wait(server, instance_id)
    assert done.status == S.INSTANCE_STATUS_ERRORED
    assert done.error.name == "ValueError"
    assert "limits.max_sleep" in done.error.message


# ----------------------------------------------------------------- events
async def test_event_sent_before_the_wait_is_kept_for_it(server: Server, gate: Any) -> None:
    instance_id = await _create(server, "blocks-then-waits")
    await server.stub.SendEvent(
        pb.SendEventRequest(instance_id=instance_id, type="approval", payload_json='{"by": "ada"}')
    )
    gate.set()
    done = await _wait(server, instance_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    assert json.loads(done.output_json) == {"approved": {"by": "ada"}, "type": "approval"}


async def test_event_wakes_a_waiting_instance_once(server: Server) -> None:
    instance_id = await _create(server, "approval")
    await _until(server, instance_id, S.INSTANCE_STATUS_WAITING)
    # Paused, so that the first event cannot end it before the second is sent.
    await server.stub.PauseInstance(pb.PauseInstanceRequest(instance_id=instance_id))
    for n in (1, 2):
        await server.stub.SendEvent(
            pb.SendEventRequest(instance_id=instance_id, type="approval", payload_json=str(n))
        )
    await server.stub.ResumeInstance(pb.ResumeInstanceRequest(instance_id=instance_id))
    done = await _wait(server, instance_id)
    assert json.loads(done.output_json) == {"approved": 1, "type": "approval"}
    wait = done.steps[1]
    assert (wait.kind, wait.event_type) == (pb.STEP_KIND_WAIT_FOR_EVENT, "approval")
    assert json.loads(wait.output_json)["payload"] == 1
    # The second event was not taken: it is still in the inbox.
    store = server.service.store
    left = await store.take_events(instance_id, "approval", 10)
    assert [json.loads(e.payload) for e in left] == [2]


async def test_an_event_to_a_parked_instance_goes_on_with_no_write_refused(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """One server: nothing it writes may be refused as another server's. (On a
    shared store, a write that parks an instance frees it; the event's
    server takes it again before writing, or the instance would sleep on
    until its timeout.)"""
    instance_id = await _create(server, "approval", {"timeout": 300})
    await _until(server, instance_id, S.INSTANCE_STATUS_WAITING)
    await eventually(lambda: _async(instance_id not in server.service.engine.core.live))
    before = server.service.engine.journal.batches
    await server.stub.SendEvent(
        pb.SendEventRequest(instance_id=instance_id, type="approval", payload_json='"go"')
    )
    done = await _wait(server, instance_id)
    assert json.loads(done.output_json) == {"approved": "go", "type": "approval"}
    assert not [r for r in caplog.records if "refused the writes" in r.getMessage()]
    # The event and the instance's going on, its wait's result, its last step
    # with the completion: three commits, none lost to a refusal.
    assert server.service.engine.journal.batches - before == 3


async def test_events_of_another_type_do_not_satisfy_the_wait(server: Server) -> None:
    instance_id = await _create(server, "approval", {"timeout": 300})
    await server.stub.SendEvent(
        pb.SendEventRequest(instance_id=instance_id, type="rejection", payload_json="{}")
    )
    done = await _wait(server, instance_id)
    assert json.loads(done.output_json) == {"timed_out": "EventTimeoutError"}
    assert done.steps[1].status == pb.STEP_STATUS_FAILED


async def test_send_event_refusals(server: Server) -> None:
    stub = server.stub
    details = await _refused(
        stub.SendEvent(pb.SendEventRequest(instance_id="nobody", type="t")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "nobody" in details
    finished = await _create(server, "three-steps")
    await _wait(server, finished)
    details = await _refused(
        stub.SendEvent(pb.SendEventRequest(instance_id=finished, type="t")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "complete" in details
    waiting = await _create(server, "approval")
    for request, field in [
        (pb.SendEventRequest(instance_id=waiting, type=""), "type"),
        (pb.SendEventRequest(instance_id=waiting, type="x" * 101), "type"),
        (pb.SendEventRequest(instance_id=waiting, type="t", payload_json="{nope"), "payload_json"),
    ]:
        details = await _refused(stub.SendEvent(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert details.startswith(f"{field}: ")
    # Nothing reached the inbox.
    assert await server.service.store.take_events(waiting, "t", 10) == []


# --------------------------------------------------------------- controls
async def test_pause_takes_effect_at_the_next_step_and_resume_goes_on(
    server: Server, side_file: Any
) -> None:
    from tests.workflows import count

    instance_id = await _create(server, "steps5", {"ms": 150})
    await eventually(lambda: _async(count(str(side_file), f"{instance_id}:s1") == 1))
    reply = await server.stub.PauseInstance(pb.PauseInstanceRequest(instance_id=instance_id))
    assert reply.status == S.INSTANCE_STATUS_WAITING_FOR_PAUSE
    paused = await _until(server, instance_id, S.INSTANCE_STATUS_PAUSED)
    # The running step finished; the next one did not start.
    assert [s.status for s in paused.steps] == [pb.STEP_STATUS_SUCCEEDED] * 2
    assert count(str(side_file), f"{instance_id}:s2") == 0
    assert instance_id not in server.service.engine.core.live
    details = await _refused(
        server.stub.PauseInstance(pb.PauseInstanceRequest(instance_id=instance_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "is paused" in details
    resumed = await server.stub.ResumeInstance(pb.ResumeInstanceRequest(instance_id=instance_id))
    assert resumed.status == S.INSTANCE_STATUS_RUNNING
    done = await _wait(server, instance_id)
    assert json.loads(done.output_json) == [0, 1, 2, 3, 4]
    assert [count(str(side_file), f"{instance_id}:s{i}") for i in range(5)] == [1] * 5
    statuses = await _statuses(server, instance_id)
    assert statuses == [
        S.INSTANCE_STATUS_RUNNING,
        S.INSTANCE_STATUS_WAITING_FOR_PAUSE,
        S.INSTANCE_STATUS_PAUSED,
        S.INSTANCE_STATUS_RUNNING,
        S.INSTANCE_STATUS_COMPLETE,
    ]


async def test_pause_a_sleeping_instance_and_resume_it(server: Server) -> None:
    instance_id = await _create(server, "naps", {"ms": 200})
    await _until(server, instance_id, S.INSTANCE_STATUS_WAITING)
    reply = await server.stub.PauseInstance(pb.PauseInstanceRequest(instance_id=instance_id))
    assert reply.status == S.INSTANCE_STATUS_PAUSED
    await asyncio.sleep(0.4)  # past the wake time: a paused instance must not wake
    assert (await _status(server, instance_id)).status == S.INSTANCE_STATUS_PAUSED
    await server.stub.ResumeInstance(pb.ResumeInstanceRequest(instance_id=instance_id))
    assert (await _wait(server, instance_id)).status == S.INSTANCE_STATUS_COMPLETE


async def test_terminate_cancels_the_attempt_in_flight(server: Server, gate: Any) -> None:
    instance_id = await _create(server, "blocks")
    await eventually(lambda: _async(instance_id in server.service.engine.core.runs))
    reply = await server.stub.TerminateInstance(
        pb.TerminateInstanceRequest(instance_id=instance_id)
    )
    assert reply.status == S.INSTANCE_STATUS_TERMINATED
    gate.set()
    instance = await _status(server, instance_id)
    assert instance.status == S.INSTANCE_STATUS_TERMINATED
    assert instance.HasField("end_time")
    assert instance.steps[0].status == pb.STEP_STATUS_RUNNING  # cut short, never finished
    details = await _refused(
        server.stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id=instance_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "is terminated" in details
    details = await _refused(
        server.stub.ResumeInstance(pb.ResumeInstanceRequest(instance_id=instance_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "only paused instances" in details


async def test_terminate_a_queued_and_a_waiting_instance(make_server: Any, gate: Any) -> None:
    server = await make_server(limits={"max_running_instances": 1})
    running = await _create(server, "blocks")
    queued = await _create(server, "three-steps")
    assert (await _status(server, queued)).status == S.INSTANCE_STATUS_QUEUED
    await server.stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id=queued))
    gate.set()
    await _wait(server, running)
    assert (await _status(server, queued)).status == S.INSTANCE_STATUS_TERMINATED
    assert (await _status(server, queued)).steps == []
    sleeper = await _create(server, "naps", {"ms": 300})
    await _until(server, sleeper, S.INSTANCE_STATUS_WAITING)
    await server.stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id=sleeper))
    await asyncio.sleep(0.5)  # past its wake time: it must stay terminated
    assert (await _status(server, sleeper)).status == S.INSTANCE_STATUS_TERMINATED


async def test_restart_runs_again_from_scratch(server: Server, side_file: Any) -> None:
    from tests.workflows import count

    instance_id = await _create(server, "steps5", {"ms": 1})
    first = await _wait(server, instance_id)
    assert first.status == S.INSTANCE_STATUS_COMPLETE
    reply = await server.stub.RestartInstance(pb.RestartInstanceRequest(instance_id=instance_id))
    assert reply.status == S.INSTANCE_STATUS_RUNNING
    second = await _wait(server, instance_id)
    assert second.status == S.INSTANCE_STATUS_COMPLETE
    assert json.loads(second.output_json) == [0, 1, 2, 3, 4]
    assert [count(str(side_file), f"{instance_id}:s{i}") for i in range(5)] == [2] * 5
    assert len(second.steps) == 5
    assert second.steps[0].start_time.ToMilliseconds() >= first.end_time.ToMilliseconds()
    # The run's start moved to the restart; the creation stays.
    assert first.start_time == first.create_time
    assert second.create_time == first.create_time
    assert second.start_time.ToMilliseconds() >= first.end_time.ToMilliseconds()
    assert second.end_time.ToMilliseconds() >= second.start_time.ToMilliseconds()
    events = await _events(server, instance_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].status_changed.status == S.INSTANCE_STATUS_COMPLETE
    assert sum(1 for e in events if e.status_changed.status == S.INSTANCE_STATUS_COMPLETE) == 2


async def test_restart_a_running_instance(server: Server, gate: Any) -> None:
    instance_id = await _create(server, "blocks")
    await eventually(lambda: _async(instance_id in server.service.engine.core.runs))
    await server.stub.RestartInstance(pb.RestartInstanceRequest(instance_id=instance_id))
    gate.set()
    done = await _wait(server, instance_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    assert [(s.name, s.attempts) for s in done.steps] == [("wait", 1)]


async def test_controls_refuse_bad_ids(server: Server) -> None:
    stub = server.stub
    for call in (
        stub.PauseInstance(pb.PauseInstanceRequest(instance_id="")),
        stub.ResumeInstance(pb.ResumeInstanceRequest(instance_id="-bad")),
        stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id="a b")),
        stub.RestartInstance(pb.RestartInstanceRequest(instance_id="")),
    ):
        await _refused(call, grpc.StatusCode.INVALID_ARGUMENT)
    for call in (
        stub.PauseInstance(pb.PauseInstanceRequest(instance_id="missing")),
        stub.RestartInstance(pb.RestartInstanceRequest(instance_id="missing")),
    ):
        await _refused(call, grpc.StatusCode.NOT_FOUND)


async def test_many_sleepers_hold_no_memory_handles(server: Server) -> None:
    ids = [await _create(server, "naps", {"ms": 60_000}) for _ in range(50)]
    engine = server.service.engine

    async def all_parked() -> bool:
        statuses = [(await _status(server, i)).status for i in ids]
        return all(s == S.INSTANCE_STATUS_WAITING for s in statuses) and not any(
            i in engine.core.live for i in ids
        )

    await eventually(all_parked)
    assert not engine.core.runs


async def test_wait_instance_equals_the_stored_status_for_each_ending(server: Server) -> None:
    for workflow, params in (("raises", None), ("three-steps", {"x": 1}), ("approval", None)):
        instance_id = await _create(server, workflow, params)
        if workflow == "approval":
            await _until(server, instance_id, S.INSTANCE_STATUS_WAITING)
            waiting = asyncio.ensure_future(_wait(server, instance_id))
            await server.stub.TerminateInstance(
                pb.TerminateInstanceRequest(instance_id=instance_id)
            )
            final = await waiting
        else:
            final = await _wait(server, instance_id)
        assert final == await _status(server, instance_id), workflow


async def test_pause_and_resume_right_after_create_lose_nothing(server: Server) -> None:
    """A pause that lands while the run is on its way to park for an event (its
    inbox read in flight) is kept: the instance ends paused, not waiting, and
    the resume and the event finish it. Raced many times on purpose."""
    stub = server.stub
    for round in range(40):
        instance_id = await _create(server, "approval", {"timeout": 300})
        paused = await stub.PauseInstance(pb.PauseInstanceRequest(instance_id=instance_id))
        assert paused.status in (S.INSTANCE_STATUS_WAITING_FOR_PAUSE, S.INSTANCE_STATUS_PAUSED)
        await _until(server, instance_id, S.INSTANCE_STATUS_PAUSED)
        resumed = await stub.ResumeInstance(pb.ResumeInstanceRequest(instance_id=instance_id))
        assert resumed.status == S.INSTANCE_STATUS_RUNNING, round
        await stub.SendEvent(
            pb.SendEventRequest(instance_id=instance_id, type="approval", payload_json=str(round))
        )
        done = await _wait(server, instance_id)
        assert json.loads(done.output_json) == {"approved": round, "type": "approval"}
        statuses = await _statuses(server, instance_id)
        # Paused exactly once; a pending pause is followed by the pause itself,
        # never by the wait that raced it.
        assert statuses.count(S.INSTANCE_STATUS_PAUSED) == 1, statuses
        for at, status in enumerate(statuses):
            if status == S.INSTANCE_STATUS_WAITING_FOR_PAUSE:
                assert statuses[at + 1] == S.INSTANCE_STATUS_PAUSED, statuses


async def test_parallel_waits_park_the_run_once_all_wait(server: Server) -> None:
    """Branches that wait (two event waits, a sleep) park the instance only
    when none runs any more: out of memory while all wait, woken by each
    event, and done once all three are. Events in both orders."""
    engine = server.service.engine
    for first, second in (("a", "b"), ("b", "a")):
        created = await server.stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="waits-together", params_json='{"ms": 300}')
        )
        instance_id = created.instance_id

        async def parked(instance_id: str = instance_id) -> bool | None:
            reply = await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))
            waiting = reply.instance.status == pb.INSTANCE_STATUS_WAITING
            return (waiting and instance_id not in engine.core.live) or None

        await eventually(parked)
        for kind in (first, second):
            await server.stub.SendEvent(
                pb.SendEventRequest(instance_id=instance_id, type=kind, payload_json=f'"{kind}!"')
            )
        reply = await server.stub.WaitInstance(
            pb.WaitInstanceRequest(instance_id=instance_id), timeout=30
        )
        assert reply.instance.status == pb.INSTANCE_STATUS_COMPLETE, reply.instance
        assert json.loads(reply.instance.output_json) == {"a": "a!", "b": "b!", "nap": "rested"}
