"""RepairInstance and RestartInstance from a step, through the real server:
a repaired step's result is what the next step gets, a retried one runs
again, a restart from a step keeps the results before it; each is audited
(GetStatus' repairs, WatchInstance's ``repaired``); and a refused call
leaves the instance's history as it was."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from cruzflow.client import Client, EventKind, FailedPrecondition, InvalidArgument, SyncClient
from cruzflow.server import cli
from cruzflow.server.engine.errors import FailedPrecondition as ServiceFailedPrecondition
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import BOTH, EngineFactory, Server, ServerFactory, eventually, finished
from tests.workflows import Blocks, Mends

TRANSPORTS = BOTH
"""Every test here runs over gRPC and over HTTP/JSON (Connect)."""

S = pb.InstanceStatus
A = pb.RepairAction


@pytest.fixture(autouse=True)
def mends() -> Iterator[None]:
    Mends.calls = {}
    Mends.failing = True
    Mends.hold = None
    yield
    if Mends.hold is not None:
        Mends.hold.set()


async def _status(server: Server, instance_id: str) -> pb.Instance:
    return (await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))).instance


async def _events(server: Server, instance_id: str, after: int = 0) -> list[Any]:
    stream = server.stub.WatchInstance(
        pb.WatchInstanceRequest(instance_id=instance_id, after_sequence=after), timeout=30
    )
    return [event async for event in stream]


async def _final(server: Server, instance_id: str) -> pb.Instance:
    reply = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=instance_id, include_steps=True), timeout=30
    )
    return reply.instance


async def _errored(server: Server, instance_id: str = "order-1") -> str:
    await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="mends", instance_id=instance_id)
    )
    instance = await _final(server, instance_id)
    assert instance.status == S.INSTANCE_STATUS_ERRORED
    assert [s.name for s in instance.steps] == ["fetch", "nap", "charge"]
    return instance_id


async def _history(server: Server, instance_id: str) -> tuple[bytes, list[bytes]]:
    """The instance's status and its whole event log, to compare."""
    status = await _status(server, instance_id)
    events = await _events(server, instance_id) if status.status in (
        S.INSTANCE_STATUS_COMPLETE, S.INSTANCE_STATUS_ERRORED, S.INSTANCE_STATUS_TERMINATED
    ) else []  # fmt: skip
    return status.SerializeToString(deterministic=True), [
        e.SerializeToString(deterministic=True) for e in events
    ]


async def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


def _repair(instance_id: str, step: str = "charge", **fields: Any) -> pb.RepairInstanceRequest:
    fields.setdefault("reason", "ticket 42")
    return pb.RepairInstanceRequest(instance_id=instance_id, step=step, **fields)


async def test_a_repaired_result_is_what_the_next_step_gets(server: Server) -> None:
    instance_id = await _errored(server)
    reply = await server.stub.RepairInstance(
        _repair(instance_id, output_json='{"charged": 99}', reason="charged by hand, ticket 42")
    )
    assert reply.status in (S.INSTANCE_STATUS_RUNNING, S.INSTANCE_STATUS_QUEUED)
    entry = reply.repair
    assert (entry.actor, entry.reason, entry.action) == (
        "anonymous", "charged by hand, ticket 42", A.REPAIR_ACTION_SET_OUTPUT,
    )  # fmt: skip
    assert (entry.step.name, entry.step.occurrence, entry.step.index) == ("charge", 1, 2)
    assert json.loads(entry.output_json) == {"charged": 99}
    assert entry.peer  # the caller's address
    done = await _final(server, instance_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done.error
    assert json.loads(done.output_json) == {"shipped": {"charged": 99}}
    assert not done.HasField("error")
    # Nothing recorded ran again; the repaired step was not run at all.
    assert Mends.calls == {"fetch": 1, "charge": 1, "ship": 1}
    charge = done.steps[2]
    assert charge.status == pb.STEP_STATUS_SUCCEEDED and not charge.HasField("error")
    # Audited: in GetStatus and in the event log, as the reply said.
    status = await _status(server, instance_id)
    assert list(status.repairs) == [entry]
    repaired = [e for e in await _events(server, instance_id) if e.HasField("repaired")]
    assert [e.repaired for e in repaired] == [entry]
    assert repaired[0].time == entry.time


async def test_a_retried_step_runs_again_with_its_full_retries(server: Server) -> None:
    instance_id = await _errored(server)
    Mends.failing = False
    reply = await server.stub.RepairInstance(_repair(instance_id, retry=True, reason="card fixed"))
    assert reply.repair.action == A.REPAIR_ACTION_RETRY and not reply.repair.output_json
    done = await _final(server, instance_id)
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    assert json.loads(done.output_json) == {"shipped": {"charged": 7}}
    assert Mends.calls == {"fetch": 1, "charge": 2, "ship": 1}
    assert done.steps[2].attempts == 1  # a fresh step, not a fifth attempt
    assert [r.reason for r in (await _status(server, instance_id)).repairs] == ["card fixed"]


async def test_a_paused_instance_is_repaired_and_goes_on(server: Server) -> None:
    Mends.failing = False
    Mends.hold = asyncio.Event()
    await server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="mends", instance_id="p-1"))
    await eventually(lambda: _ran(server, "charge"))
    paused = await server.stub.PauseInstance(pb.PauseInstanceRequest(instance_id="p-1"))
    assert paused.status == S.INSTANCE_STATUS_WAITING_FOR_PAUSE
    # Pausing: the charge step is still running.
    details = await _refused(
        server.stub.RepairInstance(_repair("p-1", output_json="1")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "waitingForPause" in details
    Mends.hold.set()
    await eventually(lambda: _is(server, "p-1", S.INSTANCE_STATUS_PAUSED))
    assert [s.name for s in (await _status(server, "p-1")).steps] == ["fetch", "nap", "charge"]
    await server.stub.RepairInstance(_repair("p-1", output_json='{"charged": 1}'))
    done = await _final(server, "p-1")
    # Charge's recorded result was replaced before ship ran: ship got the new one.
    assert json.loads(done.output_json) == {"shipped": {"charged": 1}}
    assert Mends.calls == {"fetch": 1, "charge": 1, "ship": 1}


async def _ran(server: Server, name: str) -> bool:
    return Mends.calls.get(name, 0) > 0


async def _is(server: Server, instance_id: str, status: int) -> bool:
    return (await _status(server, instance_id)).status == status


async def test_refused_repairs_leave_the_history_unchanged(make_server: ServerFactory) -> None:
    server = await make_server(limits={"max_payload_bytes": 1024})
    instance_id = await _errored(server)
    before = await _history(server, instance_id)
    big = json.dumps({"x": "y" * 2000})
    code = grpc.StatusCode
    for request, wanted, words in (
        (_repair(instance_id, "refund", output_json="1"), code.NOT_FOUND,
         "has no step 'refund'; its steps are 'fetch', 'nap', 'charge'"),
        (_repair(instance_id, occurrence=2, output_json="1"), code.NOT_FOUND,
         "no step 'charge' (occurrence 2)"),
        (_repair(instance_id, output_json="{oops"), code.INVALID_ARGUMENT, "output_json"),
        (_repair(instance_id, output_json=big), code.INVALID_ARGUMENT, "max_payload_bytes"),
        (_repair(instance_id, output_json="1", retry=True), code.INVALID_ARGUMENT, "not both"),
        (_repair(instance_id), code.INVALID_ARGUMENT, "give one"),
        (_repair(instance_id, output_json="1", reason=""), code.INVALID_ARGUMENT, "reason"),
        (_repair(instance_id, "", output_json="1"), code.INVALID_ARGUMENT, "step: required"),
        (_repair(instance_id, "nap", output_json="1"), code.INVALID_ARGUMENT, "is a sleep"),
        (_repair(instance_id, "fetch", retry=True), code.FAILED_PRECONDITION, "succeeded"),
        (_repair("no-such", output_json="1"), code.NOT_FOUND, "no-such"),
    ):  # fmt: skip
        details = await _refused(server.stub.RepairInstance(request), wanted)
        assert words in details, details
        assert await _history(server, instance_id) == before, request
    # A complete instance: its results are final.
    Mends.failing = False
    await _errored_or_complete(server, "done-1")
    done_before = await _history(server, "done-1")
    details = await _refused(
        server.stub.RepairInstance(_repair("done-1", output_json="1")),
        code.FAILED_PRECONDITION,
    )
    assert "is complete" in details and "from_step" in details
    assert await _history(server, "done-1") == done_before
    assert Mends.calls["charge"] == 2  # the errored one's and done-1's: nothing else ran


async def _errored_or_complete(server: Server, instance_id: str) -> pb.Instance:
    await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="mends", instance_id=instance_id)
    )
    return await _final(server, instance_id)


async def test_a_running_instance_is_not_repaired(server: Server) -> None:
    Blocks.gate = asyncio.Event()
    try:
        await server.stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="blocks", instance_id="busy-1")
        )
        await eventually(lambda: _is(server, "busy-1", S.INSTANCE_STATUS_RUNNING))
        before = await _status(server, "busy-1")
        details = await _refused(
            server.stub.RepairInstance(_repair("busy-1", "wait", output_json='"done"')),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "is running" in details and "pause it first" in details
        after = await _status(server, "busy-1")
        assert after.last_sequence == before.last_sequence and not after.repairs
    finally:
        Blocks.gate.set()
    done = await _final(server, "busy-1")
    assert json.loads(done.output_json) == "released"


async def test_a_restart_from_a_step_keeps_the_results_before_it(server: Server) -> None:
    Mends.failing = False
    first = await _errored_or_complete(server, "again-1")
    assert first.status == S.INSTANCE_STATUS_COMPLETE
    fetched = first.steps[0]
    refused = await _refused(
        server.stub.RestartInstance(
            pb.RestartInstanceRequest(instance_id="again-1", from_step="refund")
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "its steps are 'fetch', 'nap', 'charge', 'ship'" in refused
    assert (await _status(server, "again-1")).last_sequence == first.last_sequence
    reply = await server.stub.RestartInstance(
        pb.RestartInstanceRequest(instance_id="again-1", from_step="charge", reason="recharge")
    )
    assert reply.status in (S.INSTANCE_STATUS_RUNNING, S.INSTANCE_STATUS_QUEUED)
    done = await _final(server, "again-1")
    assert done.status == S.INSTANCE_STATUS_COMPLETE
    # fetch and nap were replayed (their bodies not called again), charge and ship ran again.
    assert Mends.calls == {"fetch": 1, "charge": 2, "ship": 2}
    assert done.steps[0] == fetched
    assert done.steps[2].start_time.ToMilliseconds() > first.steps[2].start_time.ToMilliseconds()
    (entry,) = (await _status(server, "again-1")).repairs
    assert (entry.action, entry.reason, entry.actor, entry.step.name, entry.step.index) == (
        A.REPAIR_ACTION_RESTART, "recharge", "anonymous", "charge", 2,
    )  # fmt: skip
    # A plain restart is not audited, and clears everything.
    await server.stub.RestartInstance(pb.RestartInstanceRequest(instance_id="again-1"))
    await _final(server, "again-1")
    assert Mends.calls == {"fetch": 2, "charge": 3, "ship": 3}
    assert len((await _status(server, "again-1")).repairs) == 1


# ---------------------------------------------------------- CLI and client
def _cli(server: Server, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["--address", server.address, *argv])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.grpc_only
async def test_the_cli_repairs_and_restarts_from_a_step(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    instance_id = await _errored(server)
    code, out = await asyncio.to_thread(
        _cli, server, capsys, "repair", instance_id, "--step", "charge", "--output", "{oops",
        "--reason", "x",
    )  # fmt: skip
    assert code == 2 and "--output is not valid JSON" in out
    code, out = await asyncio.to_thread(
        _cli, server, capsys, "repair", instance_id, "--step", "charge",
        "--output", '{"charged": 5}', "--reason", "paid at the desk",
    )  # fmt: skip
    assert code == 0, out
    assert f"{instance_id}: step 'charge' repaired by anonymous" in out
    done = await _final(server, instance_id)
    assert json.loads(done.output_json) == {"shipped": {"charged": 5}}
    Mends.failing = False
    code, out = await asyncio.to_thread(
        _cli, server, capsys, "restart", instance_id, "--from-step", "charge",
        "--reason", "charge for real",
    )  # fmt: skip
    assert code == 0 and "restarted from step 'charge'" in out, out
    done = await _final(server, instance_id)
    assert json.loads(done.output_json) == {"shipped": {"charged": 7}}
    assert Mends.calls == {"fetch": 1, "charge": 2, "ship": 2}
    reasons = [r.reason for r in (await _status(server, instance_id)).repairs]
    assert reasons == ["paid at the desk", "charge for real"]
    # status and watch show the audit: what was done, by whom, and why.
    code, out = await asyncio.to_thread(_cli, server, capsys, "status", instance_id)
    assert code == 0, out
    assert (
        'set the output of \'charge\' to {"charged": 5} (by anonymous): "paid at the desk"' in out
    )
    assert "restart from 'charge' (by anonymous): \"charge for real\"" in out
    code, out = await asyncio.to_thread(_cli, server, capsys, "watch", instance_id)
    assert code == 0, out
    repaired = [line for line in out.splitlines() if "repaired:" in line]
    assert len(repaired) == 2 and '(by anonymous): "paid at the desk"' in repaired[0]
    code, out = await asyncio.to_thread(_cli, server, capsys, "--json", "status", instance_id)
    assert [r["reason"] for r in json.loads(out)["repairs"]] == reasons


@pytest.mark.grpc_only
async def test_the_python_client_repairs_and_restarts(server: Server) -> None:
    instance_id = await _errored(server)
    async with Client(server.address) as client:
        handle = client.instance(instance_id)
        with pytest.raises(InvalidArgument, match="not both"):
            await handle.repair("charge", output=1, retry=True, reason="x")
        entry = await handle.repair("charge", output=None, reason="nothing to charge")
        assert (entry.action, entry.actor, entry.output) == ("set_output", "anonymous", None)
        assert entry.step is not None and entry.step.name == "charge"
        assert (await handle.result()) == {"shipped": None}
        status = await handle.status()
        assert status.repairs == (entry,)
        events = [e async for e in handle.watch()]
        assert [e.repair for e in events if e.kind is EventKind.REPAIRED] == [entry]
        Mends.failing = False
        await handle.restart(from_step="charge", reason="again")
        assert (await handle.result()) == {"shipped": {"charged": 7}}
    await asyncio.to_thread(_sync_part, server.address, instance_id)


def _sync_part(address: str, instance_id: str) -> None:
    """The sync client (its own loop, in a thread: the server runs on the test's)."""
    with SyncClient(address) as sync:
        handle = sync.instance(instance_id)
        with pytest.raises(FailedPrecondition, match="is complete"):
            handle.repair("charge", retry=True, reason="x")
        handle.restart(from_step="ship", reason="ship again")
        assert [r.action for r in handle.status().repairs] == [
            "set_output", "restart", "restart",
        ]  # fmt: skip


async def test_a_call_this_server_does_not_know_is_refused_not_taken_for_a_restart(
    make_engine: EngineFactory,
) -> None:
    """A command recorded by a newer server (another replica on a shared store)
    with a kind this one does not know is refused: before, any unknown kind
    was done as a restart, which would rerun every finished step."""
    engine = await make_engine()
    instance_id, _ = await engine.create("three-steps", "", "{}")
    before = await finished(engine, instance_id)
    _, steps = await engine.get(instance_id)
    with pytest.raises(ServiceFailedPrecondition, match="does not know the 'mend-v9' call"):
        async with engine.controls.hold(instance_id) as run:
            await engine.controls._do('mend-v9:{"step": "one"}', run)
    after, steps_after = await engine.get(instance_id)
    assert (after.status, after.output, after.run_started_at) == (
        before.status, before.output, before.run_started_at,
    )  # fmt: skip
    assert steps_after == steps
