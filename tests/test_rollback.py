"""Rollbacks (saga): step.do(..., rollback=...) compensations, through the real
gRPC server on the run's store, and across an engine restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cruzflow.testing import WorkflowTestEnv
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import Server, eventually
from tests.workflows import Booking

S = pb.InstanceStatus


def _lines(side: Path, instance_id: str) -> list[str]:
    prefix = f"{instance_id}:undo:"
    if not side.exists():
        return []
    return [line.strip()[len(prefix):] for line in side.read_text().splitlines()
            if line.startswith(prefix)]  # fmt: skip


async def _create(server: Server, params: Any) -> str:
    created = await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="booking", params_json=json.dumps(params))
    )
    return created.instance_id


async def _wait(server: Server, instance_id: str) -> pb.Instance:
    reply = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=instance_id, include_steps=True), timeout=30
    )
    return reply.instance


def _steps(instance: pb.Instance) -> list[tuple[str, int, int]]:
    return [(s.name, s.kind, s.status) for s in sorted(instance.steps, key=lambda s: s.index)]


ROLLBACK, DO = pb.STEP_KIND_ROLLBACK, pb.STEP_KIND_DO
OK, FAILED = pb.STEP_STATUS_SUCCEEDED, pb.STEP_STATUS_FAILED


async def test_a_failure_runs_the_rollbacks_in_reverse_once_each(
    server: Server, side_file: Path
) -> None:
    instance_id = await _create(server, {"fail": True})
    done = await _wait(server, instance_id)
    # The instance ends with the step's error; the rollbacks of the two steps
    # that succeeded ran after it, the last started first, each once, given
    # the step's output and the error.
    assert done.status == S.INSTANCE_STATUS_ERRORED
    assert (done.error.name, done.error.message) == ("NonRetryableError", "no courier")
    assert _lines(side_file, instance_id) == [
        "charge:1:2:NonRetryableError",
        "reserve:1:1:NonRetryableError",
    ]
    assert _steps(done) == [
        ("reserve", DO, OK), ("charge", DO, OK), ("notify", DO, OK), ("ship", DO, FAILED),
        ("rollback:charge", ROLLBACK, OK), ("rollback:reserve", ROLLBACK, OK),
    ]  # fmt: skip
    # A run that completes rolls nothing back.
    fine = await _create(server, {})
    assert (await _wait(server, fine)).status == S.INSTANCE_STATUS_COMPLETE
    assert _lines(side_file, fine) == []


async def test_a_rollback_retries_and_one_that_fails_does_not_stop_the_others(
    server: Server, side_file: Path
) -> None:
    retried = await _create(server, {"fail": True, "undo_fails": {"charge": 1}})
    done = await _wait(server, retried)
    assert _lines(side_file, retried) == [
        "charge:1:2:NonRetryableError", "charge:2:2:NonRetryableError",
        "reserve:1:1:NonRetryableError",
    ]  # fmt: skip
    undo = {s.name: s for s in done.steps if s.kind == ROLLBACK}
    assert undo["rollback:charge"].attempts == 2 and undo["rollback:charge"].status == OK

    # Its three attempts all fail: the reserve's rollback still runs.
    broken = await _create(server, {"fail": True, "undo_fails": {"charge": 9}})
    done = await _wait(server, broken)
    assert done.status == S.INSTANCE_STATUS_ERRORED
    assert done.error.message == "no courier"
    assert [line.split(":")[0] for line in _lines(side_file, broken)] == [
        "charge", "charge", "charge", "reserve",
    ]  # fmt: skip
    undo = {s.name: s for s in done.steps if s.kind == ROLLBACK}
    assert undo["rollback:charge"].status == FAILED
    assert undo["rollback:charge"].error.message == "charge: undo failed"
    assert undo["rollback:reserve"].status == OK


async def test_terminate_with_rollback_runs_them_then_ends_terminated(
    server: Server, side_file: Path
) -> None:
    instance_id = await _create(server, {"wait": True})

    async def waiting() -> bool | None:
        got = await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))
        return got.instance.status == S.INSTANCE_STATUS_WAITING or None

    await eventually(waiting)
    reply = await server.stub.TerminateInstance(
        pb.TerminateInstanceRequest(instance_id=instance_id, rollback=True)
    )
    assert reply.status in (S.INSTANCE_STATUS_RUNNING, S.INSTANCE_STATUS_QUEUED)
    done = await _wait(server, instance_id)
    assert done.status == S.INSTANCE_STATUS_TERMINATED
    assert _lines(side_file, instance_id) == ["charge:1:2:Terminated", "reserve:1:1:Terminated"]
    steps = {s.name: s for s in done.steps}
    # The terminate itself is a row of the rollback, done once they ran.
    assert steps["terminate"].kind == ROLLBACK and steps["terminate"].status == OK
    assert steps["rollback:reserve"].status == OK
    assert "ship" not in steps
    # A plain terminate rolls nothing back.
    plain = await _create(server, {"wait": True})
    await eventually(lambda: _status_is(server, plain, S.INSTANCE_STATUS_WAITING))
    await server.stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id=plain))
    assert (await _wait(server, plain)).status == S.INSTANCE_STATUS_TERMINATED
    assert _lines(side_file, plain) == []


async def _status_is(server: Server, instance_id: str, status: int) -> bool | None:
    got = await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))
    return got.instance.status == status or None


async def test_a_rollback_cut_by_a_restart_goes_on_from_its_records(
    tmp_path: Path, side_file: Path
) -> None:
    """The engine stops while the charge's rollback is failing and waiting to
    retry: after the restart the failure replays, the finished rollback
    attempts are not repeated, and the rest run."""
    async with WorkflowTestEnv(Booking, directory=tmp_path, skip_retry_delays=False) as t:
        params = {"fail": True, "undo_fails": {"charge": 1}, "undo_delay": 1500}
        handle = await t.start(params, id="b-1")

        async def first_undo_failed() -> bool | None:
            return _lines(side_file, "b-1") == ["charge:1:2:NonRetryableError"] or None

        await eventually(first_undo_failed)
        await t.restart_engine()
        # The retry was pending across the restart, not yet run.
        assert _lines(side_file, "b-1") == ["charge:1:2:NonRetryableError"]
        run = await handle.result(timeout=30)
    assert run.status == "errored"
    assert _lines(side_file, "b-1") == [
        "charge:1:2:NonRetryableError", "charge:2:2:NonRetryableError",
        "reserve:1:1:NonRetryableError",
    ]  # fmt: skip
