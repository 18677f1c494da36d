"""The typed async client against a real in-process server: every method, the
domain types it returns and the typed errors it raises."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from cruzflow.client import (
    CallerInfo,
    Client,
    CruzflowError,
    DeadlineExceeded,
    ErrorInfo,
    EventKind,
    FailedPrecondition,
    InstanceAlreadyExists,
    InstanceNotFound,
    InstanceStatus,
    InvalidArgument,
    NewInstance,
    NotFound,
    PayloadSizes,
    ResourceExhausted,
    ResultTimeout,
    StepKind,
    StepStatus,
    WatchEvent,
    WorkflowFailed,
    WorkflowNotFound,
    WorkflowTerminated,
)
from tests.conftest import Server, ServerFactory, eventually

TIMEOUT = 30.0


async def step_running(client: Client, instance_id: str, name: str) -> bool:
    info = await client.instance(instance_id).status()
    return any(s.name == name and s.status is StepStatus.RUNNING for s in info.steps)


async def collect(client: Client, instance_id: str, after: int = 0) -> list[WatchEvent]:
    async with asyncio.timeout(TIMEOUT):
        return [event async for event in client.instance(instance_id).watch(after)]


# ---------------------------------------------------------------- create, status


async def test_create_then_result_and_status(client: Client) -> None:
    binding = client.workflow("three-steps")
    assert binding.name == "three-steps"
    before = datetime.now(UTC) - timedelta(seconds=5)
    handle = await binding.create({"user": "ada", "n": 1.5}, id="order-1", lookup_key="user:ada")
    assert handle.id == "order-1"

    assert await handle.result(timeout=TIMEOUT) == {"sum": 6, "params": {"user": "ada", "n": 1.5}}

    info = await handle.status()
    assert info.id == "order-1"
    assert info.workflow == "three-steps"
    assert info.status is InstanceStatus.COMPLETE
    assert info.status.value == "complete"  # the service's own word
    assert info.status.finished
    assert info.params == {"user": "ada", "n": 1.5}
    assert info.output == {"sum": 6, "params": {"user": "ada", "n": 1.5}}
    assert info.error is None
    assert info.lookup_key == "user:ada"
    assert info.wake_time is None
    assert info.trace_id is None  # the server does not trace
    assert info.create_time is not None and info.create_time.tzinfo is not None
    assert info.create_time >= before
    assert info.update_time is not None and info.end_time is not None
    assert info.create_time <= info.end_time
    assert info.last_sequence == 8  # running, 3 x (started, succeeded), complete
    assert [(s.name, s.occurrence, s.index) for s in info.steps] == [
        ("one", 1, 0),
        ("two", 1, 1),
        ("three", 1, 2),
    ]
    for n, step in enumerate(info.steps, start=1):
        assert step.kind is StepKind.DO
        assert step.status is StepStatus.SUCCEEDED
        assert step.attempts == 1
        assert step.output == {"n": n}
        assert step.error is None
        assert step.start_time is not None and step.end_time is not None
        assert step.event_type is None
        assert step.output_bytes == len(f'{{"n":{n}}}')
    # Sizes of the stored JSON, against the server's default limit of 1 MiB.
    assert info.payloads == PayloadSizes(
        params_bytes=len('{"user":"ada","n":1.5}'),
        output_bytes=len('{"sum":6,"params":{"user":"ada","n":1.5}}'),
        largest_step_bytes=len('{"n":1}'),
        total_bytes=22 + 41 + 3 * 7,
        limit_bytes=1024 * 1024,
    )
    assert info.payloads.fullest == 41 / (1024 * 1024)


async def test_create_without_params_or_id(client: Client) -> None:
    handle = await client.workflow("three-steps").create()
    assert len(handle.id) == 32  # the server's generated id
    assert (await handle.result(timeout=TIMEOUT))["params"] is None
    assert (await handle.status()).params is None


async def test_get_finds_an_instance_of_its_workflow_only(client: Client) -> None:
    created = await client.workflow("three-steps").create(id="got")
    found = await client.workflow("three-steps").get("got")
    assert found.id == created.id
    with pytest.raises(InstanceNotFound) as other:
        await client.workflow("sleepy").get("got")
    assert "three-steps" in str(other.value)
    with pytest.raises(InstanceNotFound) as missing:
        await client.workflow("three-steps").get("nobody")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.instance_id == "nobody"


async def test_if_exists_error_or_return(client: Client) -> None:
    binding = client.workflow("three-steps")
    first = await binding.create({"v": 1}, id="dup")
    with pytest.raises(InstanceAlreadyExists) as taken:
        await binding.create({"v": 1}, id="dup")
    assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert "exists already" in taken.value.details
    assert taken.value.instance_id == "dup"

    # "return" hands back the existing instance, whatever params were given now.
    again = await binding.create({"v": 2}, id="dup", if_exists="return")
    assert again.id == first.id
    assert (await again.status()).params == {"v": 1}

    # ... but only one of this workflow.
    with pytest.raises(InstanceAlreadyExists):
        await client.workflow("sleepy").create(id="dup", if_exists="return")


async def test_bad_input_is_refused_before_any_call(client: Client) -> None:
    binding = client.workflow("three-steps")
    with pytest.raises(InvalidArgument) as not_json:
        await binding.create({"when": datetime.now(UTC)})
    assert not_json.value.code is None
    assert isinstance(not_json.value, ValueError)
    assert "params: not JSON" in str(not_json.value)
    with pytest.raises(InvalidArgument, match="params: not JSON"):
        await binding.create({"x": float("nan")})
    with pytest.raises(InvalidArgument, match="if_exists"):
        await binding.create(id="a", if_exists="replace")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="id: must be a non-empty string"):
        await binding.create(id="")
    with pytest.raises(InvalidArgument, match="workflow"):
        client.workflow("")
    with pytest.raises(InvalidArgument, match="instance_id"):
        client.instance("")
    with pytest.raises(InvalidArgument, match="timeout"):
        await client.instance("x").status(timeout=-1)
    with pytest.raises(InvalidArgument, match="after_sequence"):
        await anext(client.instance("x").watch(-1))
    with pytest.raises(InvalidArgument, match="timeout"):
        await client.instance("x").result(timeout=-0.5)
    with pytest.raises(InvalidArgument, match="type"):
        await client.instance("x").send_event("", {})
    with pytest.raises(InvalidArgument, match="no time zone"):
        await client.list_instances_page(create_time_min=datetime(2026, 1, 1))
    with pytest.raises(InvalidArgument, match="not a status"):
        await client.list_instances_page(status="done")
    with pytest.raises(InvalidArgument, match="target"):
        Client("")
    with pytest.raises(InvalidArgument, match="metadata"):
        Client(metadata=[("only-a-key",)])  # type: ignore[list-item]


# ----------------------------------------------------------------- error tree


async def test_unknown_workflow_is_workflow_not_found(client: Client) -> None:
    with pytest.raises(WorkflowNotFound) as one:
        await client.workflow("no-such-workflow").create({})
    assert isinstance(one.value, NotFound) and isinstance(one.value, LookupError)
    assert not isinstance(one.value, InstanceNotFound)
    assert one.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-workflow" in one.value.details
    assert "three-steps" in one.value.details  # the server lists what it hosts
    with pytest.raises(WorkflowNotFound) as batch:
        await client.workflow("no-such-workflow").create_batch([{"id": "b1"}])
    assert "requests[0].workflow" in batch.value.details


async def test_unknown_instance_is_instance_not_found(client: Client) -> None:
    missing = client.instance("missing")
    for call in (
        missing.status(),
        missing.result(timeout=1),
        missing.pause(),
        missing.resume(),
        missing.terminate(),
        missing.restart(),
        missing.send_event("approval", {}),
    ):
        with pytest.raises(InstanceNotFound) as raised:
            await call
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert raised.value.instance_id == "missing"
    with pytest.raises(InstanceNotFound):
        await anext(missing.watch())


async def test_server_side_invalid_arguments(client: Client) -> None:
    with pytest.raises(InvalidArgument) as bad_id:
        await client.workflow("three-steps").create(id="-leading-dash")
    assert bad_id.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance_id" in bad_id.value.details
    with pytest.raises(InvalidArgument, match="page_size"):
        await client.list_instances_page(page_size=5000)
    with pytest.raises(InvalidArgument, match="page_token"):
        await client.list_instances_page(page_token="not-a-token")
    done = await client.workflow("three-steps").create(id="finished")
    await done.result(timeout=TIMEOUT)
    last = (await done.status()).last_sequence
    with pytest.raises(InvalidArgument, match="past the newest event"):
        await anext(done.watch(last + 5))
    waiting = await client.workflow("approval").create(id="long-type")
    with pytest.raises(InvalidArgument, match="type"):
        await waiting.send_event("t" * 101, None)


async def test_failed_precondition_on_finished_instances(client: Client) -> None:
    handle = await client.workflow("three-steps").create(id="over")
    await handle.result(timeout=TIMEOUT)
    for call in (handle.pause(), handle.resume(), handle.terminate(), handle.send_event("x")):
        with pytest.raises(FailedPrecondition) as raised:
            await call
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "complete" in raised.value.details


async def test_message_over_the_servers_limit_is_resource_exhausted(
    make_server: ServerFactory,
) -> None:
    server = await make_server(limits={"max_payload_bytes": 1024})
    async with Client(server.address) as client:
        with pytest.raises(ResourceExhausted) as raised:
            await client.workflow("three-steps").create({"blob": "x" * 200_000})
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_watch_timeout_is_deadline_exceeded(client: Client, gate: asyncio.Event) -> None:
    held = await client.workflow("blocks").create(id="held")
    seen: list[int] = []
    with pytest.raises(DeadlineExceeded) as raised:
        async for event in held.watch(timeout=0.3):
            seen.append(event.sequence)
    assert seen == [1, 2]  # running, step started; then nothing until the gate opens
    assert isinstance(raised.value, TimeoutError)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_closed_client_refuses_calls(server: Server, gate: asyncio.Event) -> None:
    client = Client(server.address)
    await client.list_workflows()
    handle = await client.workflow("blocks").create(id="watched-at-close")
    seen: list[int] = []

    async def follow() -> None:
        async for event in handle.watch():
            seen.append(event.sequence)

    watcher = asyncio.create_task(follow())
    waiter = asyncio.create_task(handle.result())
    await eventually(lambda: asyncio.sleep(0, len(seen) >= 2), TIMEOUT)
    await client.close()
    # The stream and the long-poll are cancelled with the channel, and not reopened.
    for task in (watcher, waiter):
        with pytest.raises(CruzflowError) as cut:
            await asyncio.wait_for(task, TIMEOUT)
        assert cut.value.code == grpc.StatusCode.CANCELLED
        assert "closed" in cut.value.details
    await client.close()
    await client.close()
    with pytest.raises(RuntimeError, match="closed"):
        await client.list_workflows()


# ------------------------------------------------------------------- outcomes


async def test_result_raises_the_workflows_error(client: Client) -> None:
    with pytest.raises(WorkflowFailed) as in_step:
        await (await client.workflow("raises").create()).result(timeout=TIMEOUT)
    assert in_step.value.error_name == "ValueError"
    assert in_step.value.error_message == "bad input row 7"
    assert in_step.value.code is None
    assert isinstance(in_step.value, CruzflowError)
    where = in_step.value.error_traceback
    assert where is not None and where.endswith("ValueError: bad input row 7\n")

    outside = await client.workflow("raises-outside").create(id="outside")
    with pytest.raises(WorkflowFailed) as raised:
        await outside.result(timeout=TIMEOUT)
    assert raised.value.error_name == "KeyError"
    assert raised.value.instance_id == "outside"
    info = await outside.wait()
    assert info.status is InstanceStatus.ERRORED
    assert info.error == ErrorInfo("KeyError", "'missing-key'")
    assert info.error is not None and info.error.traceback is not None
    assert 'raise KeyError("missing-key")' in info.error.traceback
    assert info.output is None
    assert info.start_time == info.create_time


async def test_result_times_out_then_the_instance_goes_on(
    client: Client, gate: asyncio.Event
) -> None:
    handle = await client.workflow("blocks").create(id="slowpoke")
    with pytest.raises(ResultTimeout) as waited:
        await handle.result(timeout=0.2)
    assert isinstance(waited.value, TimeoutError)
    assert waited.value.status is InstanceStatus.RUNNING
    assert waited.value.instance_id == "slowpoke"
    with pytest.raises(ResultTimeout):
        await handle.wait(timeout=0)
    gate.set()
    assert await handle.result(timeout=TIMEOUT) == "released"


async def test_run_creates_and_returns_the_result_in_one_call(
    client: Client, gate: asyncio.Event
) -> None:
    assert await client.workflow("three-steps").run({"r": 1}, id="ran", lookup_key="lk") == {
        "sum": 6,
        "params": {"r": 1},
    }
    info = await client.instance("ran").status()
    assert (info.status, info.lookup_key) == (InstanceStatus.COMPLETE, "lk")
    with pytest.raises(WorkflowFailed) as failed:
        await client.workflow("raises").run(timeout=TIMEOUT)
    assert (failed.value.error_name, failed.value.error_message) == (
        "ValueError",
        "bad input row 7",
    )
    with pytest.raises(ResultTimeout) as waited:
        await client.workflow("blocks").run(id="run-slow", timeout=0.2)
    assert (waited.value.instance_id, waited.value.status) == ("run-slow", InstanceStatus.RUNNING)
    gate.set()
    assert await client.instance("run-slow").result(timeout=TIMEOUT) == "released"
    with pytest.raises(InvalidArgument, match="timeout"):
        await client.workflow("three-steps").run(timeout=-1)
    with pytest.raises(WorkflowNotFound):
        await client.workflow("no-such").run()


async def test_terminate_then_result_raises_terminated(client: Client, gate: asyncio.Event) -> None:
    handle = await client.workflow("blocks").create(id="doomed")
    await eventually(lambda: step_running(client, "doomed", "wait"), TIMEOUT)
    waiter = asyncio.create_task(handle.result())
    assert await handle.terminate() is InstanceStatus.TERMINATED
    with pytest.raises(WorkflowTerminated) as raised:
        await asyncio.wait_for(waiter, TIMEOUT)
    assert raised.value.instance_id == "doomed"
    with pytest.raises(FailedPrecondition, match="terminated"):
        await handle.terminate()
    assert (await handle.status()).status is InstanceStatus.TERMINATED


async def test_pause_send_event_resume(client: Client, gate: asyncio.Event) -> None:
    handle = await client.workflow("blocks-then-waits").create(id="pausable")
    await eventually(lambda: step_running(client, "pausable", "hold"), TIMEOUT)

    assert await handle.pause() is InstanceStatus.WAITING_FOR_PAUSE
    assert await handle.resume() is InstanceStatus.RUNNING
    assert await handle.pause() is InstanceStatus.WAITING_FOR_PAUSE
    gate.set()  # the step ends; the instance stops at the boundary

    async def paused() -> bool:
        return (await handle.status()).status is InstanceStatus.PAUSED

    await eventually(paused, TIMEOUT)
    with pytest.raises(FailedPrecondition, match="paused"):
        await handle.pause()
    await handle.send_event("approval", {"by": "ada"})  # kept while paused
    assert await handle.resume() in (InstanceStatus.RUNNING, InstanceStatus.QUEUED)
    assert await handle.result(timeout=TIMEOUT) == {"approved": {"by": "ada"}, "type": "approval"}
    with pytest.raises(FailedPrecondition):
        await handle.resume()


async def test_send_event_wakes_a_waiting_instance(client: Client) -> None:
    handle = await client.workflow("approval").create(id="needs-ok")

    async def waiting() -> bool:
        info = await handle.status()
        return info.status is InstanceStatus.WAITING and info.wake_time is not None

    await eventually(waiting, TIMEOUT)
    wait_step = (await handle.status()).steps[-1]
    assert wait_step.kind is StepKind.WAIT_FOR_EVENT
    assert wait_step.event_type == "approval"
    assert wait_step.next_attempt_time is not None
    await handle.send_event("approval", [1, "two", None])
    assert await handle.result(timeout=TIMEOUT) == {
        "approved": [1, "two", None],
        "type": "approval",
    }


async def test_restart_runs_again_and_the_log_goes_on(client: Client) -> None:
    handle = await client.workflow("three-steps").create({"r": 1}, id="again")
    await handle.result(timeout=TIMEOUT)
    first = (await handle.status()).last_sequence
    assert await handle.restart() in (InstanceStatus.RUNNING, InstanceStatus.QUEUED)
    assert await handle.result(timeout=TIMEOUT) == {"sum": 6, "params": {"r": 1}}
    events = await collect(client, "again", after=first)
    assert [e.sequence for e in events] == list(range(first + 1, first + 9))
    assert events[-1].is_final and events[-1].output == {"sum": 6, "params": {"r": 1}}


# ---------------------------------------------------------------------- watch


async def test_watch_streams_every_event_once_in_order(client: Client) -> None:
    handle = await client.workflow("three-steps").create({"w": True}, id="watched")
    events = await collect(client, handle.id)
    assert [e.sequence for e in events] == list(range(1, 9))
    assert all(e.instance_id == "watched" and e.time is not None for e in events)
    kinds = [e.kind for e in events]
    assert kinds == [
        EventKind.STATUS_CHANGED,
        *[EventKind.STEP_STARTED, EventKind.STEP_SUCCEEDED] * 3,
        EventKind.STATUS_CHANGED,
    ]
    assert events[0].status is InstanceStatus.RUNNING and not events[0].is_final
    started, succeeded = events[1], events[2]
    assert started.step is not None and started.step.name == "one"
    assert started.step.kind is StepKind.DO and started.attempt == 1
    assert succeeded.output == {"n": 1} and succeeded.step == started.step
    last = events[-1]
    assert last.is_final and last.status is InstanceStatus.COMPLETE
    assert last.output == {"sum": 6, "params": {"w": True}}

    # Resuming after a sequence gives exactly the rest; after the last, nothing.
    assert await collect(client, handle.id, after=5) == events[5:]
    assert await collect(client, handle.id, after=8) == []


async def test_watch_reports_failed_attempts_and_failed_steps(client: Client) -> None:
    flaky = await client.workflow("flaky").create({"failures": 1}, id="flaky-1")
    events = await collect(client, flaky.id)
    failed = [e for e in events if e.kind is EventKind.ATTEMPT_FAILED]
    assert len(failed) == 1
    assert failed[0].error == ErrorInfo("ConnectionError", "attempt 1 failed")
    assert failed[0].attempt == 1
    assert failed[0].retry_delay == timedelta(milliseconds=1)  # a bare number is ms
    assert failed[0].next_attempt_time is not None
    assert events[-1].output == 2

    raises = await client.workflow("raises").create(id="raises-1")
    events = await collect(client, raises.id)
    lost = [e for e in events if e.kind is EventKind.STEP_FAILED]
    assert len(lost) == 1 and lost[0].step is not None and lost[0].step.name == "boom"
    assert lost[0].error == ErrorInfo("ValueError", "bad input row 7")
    assert events[-1].is_final and events[-1].status is InstanceStatus.ERRORED
    assert events[-1].error == ErrorInfo("ValueError", "bad input row 7")


async def test_watch_can_be_left_early(client: Client, gate: asyncio.Event) -> None:
    handle = await client.workflow("blocks").create(id="left")
    async with contextlib.aclosing(handle.watch()) as events:
        async for event in events:
            assert event.sequence == 1
            break
    gate.set()
    assert await handle.result(timeout=TIMEOUT) == "released"


# -------------------------------------------------------------- batch, listing


async def test_create_batch(client: Client) -> None:
    handles = await client.workflow("three-steps").create_batch(
        [
            NewInstance({"i": 0}, id="batch-0", lookup_key="batch"),
            {"params": {"i": 1}, "id": "batch-1"},
            {"params": {"i": 2}},
            NewInstance(),
        ]
    )
    assert [h.id for h in handles[:2]] == ["batch-0", "batch-1"]
    assert len(handles) == 4 and len({h.id for h in handles}) == 4
    results = [await h.result(timeout=TIMEOUT) for h in handles]
    assert [r["params"] for r in results] == [{"i": 0}, {"i": 1}, {"i": 2}, None]
    assert (await handles[0].status()).lookup_key == "batch"


async def test_create_batch_is_all_or_nothing(client: Client) -> None:
    binding = client.workflow("three-steps")
    await binding.create(id="taken")
    with pytest.raises(InstanceAlreadyExists) as taken:
        await binding.create_batch([{"id": "fresh"}, {"id": "taken"}])
    assert "requests[1].instance_id" in taken.value.details
    with pytest.raises(InstanceNotFound):
        await client.instance("fresh").status()
    with pytest.raises(InvalidArgument) as bad:
        await binding.create_batch([{"id": "ok"}, {"id": "-bad"}, {"id": "ok"}])
    assert "requests[1].instance_id" in bad.value.details
    assert "requests[2].instance_id" in bad.value.details
    with pytest.raises(InvalidArgument, match="requests: empty"):
        await binding.create_batch([])
    with pytest.raises(InvalidArgument, match=r"items\[0\]: unknown key\(s\) 'param'"):
        await binding.create_batch([{"param": 1}])
    with pytest.raises(InvalidArgument, match=r"items\[1\]\.params: not JSON"):
        await binding.create_batch([{}, {"params": {1, 2}}])
    with pytest.raises(InvalidArgument, match=r"items\[0\]: expected a NewInstance"):
        await binding.create_batch(["just-an-id"])  # type: ignore[list-item]


async def test_list_instances_follows_pages(client: Client) -> None:
    binding = client.workflow("three-steps")
    ids = [f"listed-{i}" for i in range(7)]
    for instance_id in ids:
        await binding.create({"id": instance_id}, id=instance_id, lookup_key="listing")
    await client.workflow("sleepy").create({"seconds": 0}, id="other", lookup_key="listing")

    page = await client.list_instances_page(
        lookup_key="listing", workflow="three-steps", page_size=3
    )
    assert [i.id for i in page.instances] == ids[::-1][:3]  # newest first
    assert page.next_page_token
    assert all(i.steps == () for i in page.instances)

    listed = [
        i.id
        async for i in client.list_instances(
            lookup_key="listing", workflow="three-steps", page_size=3
        )
    ]
    assert listed == ids[::-1]
    everything = [i.id async for i in client.list_instances(lookup_key="listing")]
    assert set(everything) == {*ids, "other"}

    for instance_id in ids:
        await client.instance(instance_id).result(timeout=TIMEOUT)
    complete = [
        i
        async for i in client.list_instances(
            workflow="three-steps", status=InstanceStatus.COMPLETE, lookup_key="listing"
        )
    ]
    assert {i.id for i in complete} == set(ids)
    assert all(i.status is InstanceStatus.COMPLETE and i.output for i in complete)
    by_word = [i.id async for i in client.list_instances(status=["queued", "paused"])]
    assert by_word == []
    future = datetime.now(UTC) + timedelta(days=1)
    assert [i async for i in client.list_instances(create_time_min=future)] == []
    recent = [
        i.id
        async for i in client.list_instances(
            lookup_key="listing", create_time_max=future, page_size=1000
        )
    ]
    assert set(recent) == {*ids, "other"}


async def test_list_workflows(client: Client) -> None:
    workflows = {w.name: w for w in await client.list_workflows()}
    assert workflows["three-steps"].binding == "THREE_STEPS"
    assert workflows["three-steps"].class_name == "tests.workflows:ThreeSteps"
    assert "approval" in workflows


async def test_count_instances_per_workflow_and_status(client: Client) -> None:
    empty = await client.count_instances()
    assert (empty.counts, empty.total) == ((), 0)
    for n in range(3):
        await client.workflow("three-steps").create(id=f"counted-{n}", lookup_key="counting")
    failing = await client.workflow("raises").create(lookup_key="counting")
    waiting = await client.workflow("approval").create()
    for n in range(3):
        await client.instance(f"counted-{n}").result(timeout=TIMEOUT)
    with pytest.raises(WorkflowFailed):
        await failing.result(timeout=TIMEOUT)
    await eventually(
        lambda: _status_is(client, waiting.id, InstanceStatus.WAITING), timeout=TIMEOUT
    )

    counts = await client.count_instances()
    assert [(c.workflow, c.status, c.count) for c in counts.counts] == [
        ("approval", InstanceStatus.WAITING, 1),
        ("raises", InstanceStatus.ERRORED, 1),
        ("three-steps", InstanceStatus.COMPLETE, 3),
    ]
    assert counts.total == 5
    assert counts.of(status="errored") == 1
    assert counts.of("three-steps") == 3
    assert counts.of("three-steps", InstanceStatus.ERRORED) == 0
    keyed = await client.count_instances(lookup_key="counting", workflow="three-steps")
    assert keyed.total == 3 and keyed.of(status=InstanceStatus.COMPLETE) == 3
    future = datetime.now(UTC) + timedelta(days=1)
    assert (await client.count_instances(create_time_min=future)).total == 0
    assert (await client.count_instances(create_time_max=future)).total == 5
    with pytest.raises(InvalidArgument, match="create_time_min"):
        await client.count_instances(create_time_min=future, create_time_max=future)
    with pytest.raises(InvalidArgument, match="aware"):
        await client.count_instances(create_time_min=datetime(2026, 1, 1))


async def _status_is(client: Client, instance_id: str, status: InstanceStatus) -> bool:
    return (await client.instance(instance_id).status()).status is status


async def test_caller_of_a_server_without_tokens(client: Client) -> None:
    caller = await client.caller()
    assert caller == CallerInfo(auth_required=False, token_name=None, read_only=False, workflows=())
