"""The gRPC API through a real server: CreateInstance, GetStatus, WatchInstance,
ListWorkflows, CountInstances, the instances' trace ids and the health
service, with the error statuses and messages a caller gets for bad input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cruzflow.client import Client
from cruzflow.server.app import Service
from cruzflow.server.config import load_config
from cruzflow.server.records import InstanceQuery
from cruzflow.server.telemetry import Providers
from cruzflow.server.transport import convert
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.workflows import StepFailedError, WorkflowEntrypoint, WorkflowEvent, WorkflowStep
from tests import workflows as wf
from tests.conftest import ALL_WORKFLOWS, BOTH, Server, ServerFactory, eventually
from tests.procs import write_config
from tests.workflows import Blocks

TRANSPORTS = (*BOTH, "http2")
"""Every test here runs over gRPC and over HTTP/JSON (Connect) on HTTP/1.1 and
on HTTP/2, unless grpc_only."""

RUNNING = pb.INSTANCE_STATUS_RUNNING
QUEUED = pb.INSTANCE_STATUS_QUEUED
COMPLETE = pb.INSTANCE_STATUS_COMPLETE
ERRORED = pb.INSTANCE_STATUS_ERRORED
STEP_RUNNING = pb.STEP_STATUS_RUNNING
SUCCEEDED = pb.STEP_STATUS_SUCCEEDED
FAILED = pb.STEP_STATUS_FAILED

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS

TIMEOUT = 20.0


# ---------------------------------------------------------------- helpers
async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Await a unary call that must fail; return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(TIMEOUT):
            await call
    return info.value


async def watch(server: Server, instance_id: str, after: int = 0) -> list[pb.WatchInstanceResponse]:
    """The whole watch stream of an instance from ``after``, until it ends."""
    request = pb.WatchInstanceRequest(instance_id=instance_id, after_sequence=after)
    async with asyncio.timeout(TIMEOUT):
        return [event async for event in server.stub.WatchInstance(request)]


async def watch_error(server: Server, instance_id: str, after: int = 0) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await watch(server, instance_id, after)
    return info.value


async def create(
    server: Server, workflow: str, params: str = "", instance_id: str = ""
) -> pb.CreateInstanceResponse:
    return await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow=workflow, params_json=params, instance_id=instance_id),
        timeout=TIMEOUT,
    )


async def status(server: Server, instance_id: str) -> pb.Instance:
    response = await server.stub.GetStatus(
        pb.GetStatusRequest(instance_id=instance_id), timeout=TIMEOUT
    )
    return response.instance


async def run(
    server: Server, workflow: str, params: str = "", instance_id: str = ""
) -> pb.Instance:
    async with asyncio.timeout(TIMEOUT):
        return await server.run(workflow, params, instance_id)


def kinds(events: list[pb.WatchInstanceResponse]) -> list[str]:
    """Each event as a short string: "status:RUNNING", "step_started:one#1", ..."""
    out = []
    for event in events:
        kind = event.WhichOneof("event")
        assert kind is not None
        if kind == "status_changed":
            out.append(f"status:{pb.InstanceStatus.Name(event.status_changed.status)[16:]}")
        else:
            detail = getattr(event, kind)
            out.append(f"{kind}:{detail.step.name}#{detail.attempt}")
    return out


async def stored_instances(server: Server) -> list[str]:
    """The ids in the server's store, oldest first, read from the store itself."""
    rows = await server.service.store.list_instances(InstanceQuery(), 10_000)
    return [record.id for _, record in reversed(rows)]


def assert_names_field(error: grpc.aio.AioRpcError, code: grpc.StatusCode, field: str) -> None:
    assert error.code() == code, error.details()
    details = error.details() or ""
    assert details.startswith(f"{field}: "), details


# ------------------------------------------------------------ CreateInstance
async def test_create_generates_distinct_ids(server: Server) -> None:
    first = await create(server, "three-steps", '{"a": 1}')
    second = await create(server, "three-steps", '{"a": 2}')
    assert first.instance_id and second.instance_id
    assert first.instance_id != second.instance_id
    # A generated id is itself a valid id a caller could have chosen.
    for response in (first, second):
        assert len(response.instance_id) <= 100
        assert response.instance_id.replace("-", "").replace("_", "").isalnum()
        assert response.status in (RUNNING, QUEUED)
    done = await run(server, "three-steps", '{"a": 3}')
    assert done.status == COMPLETE
    for response, a in ((first, 1), (second, 2)):
        instance = await status(server, response.instance_id)
        assert instance.instance_id == response.instance_id
        assert instance.workflow == "three-steps"
        assert json.loads(instance.params_json) == {"a": a}


async def test_create_with_given_id(server: Server) -> None:
    response = await create(server, "three-steps", '{"user": "ada"}', "order-42_A")
    assert response.instance_id == "order-42_A"
    assert response.status == RUNNING
    events = await watch(server, "order-42_A")
    assert events[-1].status_changed.status == COMPLETE
    instance = await status(server, "order-42_A")
    assert json.loads(instance.output_json) == {"sum": 6, "params": {"user": "ada"}}


@pytest.mark.parametrize("instance_id", ["x" * 100, "_leading_underscore", "a", "9-", "A_b-C"])
async def test_create_accepts_valid_ids(server: Server, instance_id: str) -> None:
    done = await run(server, "three-steps", "", instance_id)
    assert done.instance_id == instance_id
    assert done.status == COMPLETE


@pytest.mark.parametrize("params", ["", "   ", "null"])
async def test_empty_params_mean_null(server: Server, params: str) -> None:
    done = await run(server, "three-steps", params)
    assert done.params_json == "null"
    assert json.loads(done.output_json) == {"sum": 6, "params": None}


async def test_duplicate_id_is_already_exists_and_changes_nothing(server: Server) -> None:
    await create(server, "three-steps", '{"v": 1}', "dup")
    # While the first may still be running, and again once it has finished.
    error = await rpc_error(create(server, "three-steps", '{"v": 2}', "dup"))
    assert_names_field(error, ALREADY_EXISTS, "instance_id")
    assert "'dup'" in (error.details() or "")
    events = await watch(server, "dup")
    assert events[-1].status_changed.status == COMPLETE
    for workflow in ("three-steps", "repeats"):
        error = await rpc_error(create(server, workflow, '{"v": 3}', "dup"))
        assert error.code() == ALREADY_EXISTS
    instance = await status(server, "dup")
    assert instance.workflow == "three-steps"
    assert json.loads(instance.params_json) == {"v": 1}
    assert instance.status == COMPLETE
    assert json.loads(instance.output_json) == {"sum": 6, "params": {"v": 1}}
    # The rejected creates added no events to the first instance.
    assert await watch(server, "dup") == events
    assert await stored_instances(server) == ["dup"]


async def test_unknown_workflow_is_not_found(server: Server) -> None:
    error = await rpc_error(create(server, "no-such-flow", "{}", "orphan"))
    assert error.code() == NOT_FOUND
    details = error.details() or ""
    assert details.startswith("workflow: 'no-such-flow' is not registered"), details
    for name in ALL_WORKFLOWS:
        assert name in details
    assert (await rpc_error(status(server, "orphan"))).code() == NOT_FOUND


BIG = 2048  # max_payload_bytes of the servers in the tests below


@pytest.mark.parametrize(
    ("workflow", "instance_id", "params", "field"),
    [
        pytest.param("", "rej", "{}", "workflow", id="empty-workflow"),
        pytest.param("three-steps", "rej", "{not json", "params_json", id="not-json"),
        pytest.param("three-steps", "rej", "{'a': 1}", "params_json", id="single-quotes"),
        pytest.param("three-steps", "rej", '{"a": 1} x', "params_json", id="trailing-garbage"),
        pytest.param("three-steps", "rej", "NaN", "params_json", id="nan"),
        pytest.param("three-steps", "rej", '{"x": NaN}', "params_json", id="nested-nan"),
        pytest.param("three-steps", "rej", "[-Infinity]", "params_json", id="infinity"),
        pytest.param("three-steps", "rej", '{"x": 1e999}', "params_json", id="float-overflow"),
        pytest.param(
            "three-steps", "rej", '"' + "a" * (BIG - 1) + '"', "params_json", id="over-limit"
        ),
        pytest.param(
            "three-steps", "rej", '"' + "é" * (BIG // 2) + '"', "params_json", id="over-limit-utf8"
        ),
        pytest.param(
            "three-steps",
            "rej",
            "[" * 1000 + "]" * 1000,
            "params_json",
            id="deeply-nested",
        ),
        pytest.param("three-steps", "x" * 101, "{}", "instance_id", id="id-101-chars"),
        pytest.param("three-steps", "a b", "{}", "instance_id", id="id-space"),
        pytest.param("three-steps", "-x", "{}", "instance_id", id="id-leading-dash"),
        pytest.param("three-steps", "é", "{}", "instance_id", id="id-non-ascii"),
        pytest.param("three-steps", "a/b", "{}", "instance_id", id="id-slash"),
        pytest.param("three-steps", "a\n", "{}", "instance_id", id="id-trailing-newline"),
    ],
)
async def test_invalid_create_is_rejected_and_stores_nothing(
    make_server: ServerFactory, workflow: str, instance_id: str, params: str, field: str
) -> None:
    server = await make_server(limits={"max_payload_bytes": BIG})
    error = await rpc_error(create(server, workflow, params, instance_id))
    assert_names_field(error, INVALID, field)
    details = error.details() or ""
    if len(params.encode()) > BIG:
        assert "over the limit of 2,048 bytes" in details, details
        assert "max_payload_bytes" in details, details
    # Nothing was stored under the id, or under any id.
    lookup = await rpc_error(status(server, instance_id))
    if field == "instance_id":
        assert lookup.code() == INVALID
    else:
        assert lookup.code() == NOT_FOUND
    # A later good create goes through; once it is durable, it is the only one.
    await run(server, "three-steps", "{}", "good")
    assert await stored_instances(server) == ["good"]


@pytest.mark.parametrize(
    ("params", "problems"),
    [
        ('{"orderId": "o-1"}', ["quantity: required, missing"]),
        (
            '{"orderId": 7, "quantity": "2"}',
            [
                "orderId: input should be a valid string, got 7",
                "quantity: input should be a valid integer, got '2'",
            ],
        ),
        (
            '{"orderId": "o-1", "quantity": 2, "note": 5}',
            ["note: input should be a valid string, got 5"],
        ),
        ("[1, 2]", ["(the params): input should be an object, got [1, 2]"]),
        ("", ["(the params): input should be an object, got None"]),
    ],
)
async def test_params_that_do_not_match_their_typed_dict_are_refused(
    server: Server, params: str, problems: list[str]
) -> None:
    error = await rpc_error(create(server, "typed-params", params, "typed-1"))
    assert_names_field(error, INVALID, "params_json")
    details = error.details() or ""
    assert "does not match OrderParams, the params workflow 'typed-params' declares" in details
    for problem in problems:
        assert problem in details, details
    assert (await rpc_error(status(server, "typed-1"))).code() == NOT_FOUND
    # In a batch, the refusal names the item; nothing of the batch is stored.
    batch = pb.CreateInstancesRequest(
        requests=[
            pb.CreateInstanceRequest(
                workflow="typed-params", params_json='{"orderId": "a", "quantity": 1}'
            ),
            pb.CreateInstanceRequest(workflow="typed-params", params_json=params),
        ]
    )
    error = await rpc_error(server.stub.CreateInstances(batch, timeout=TIMEOUT))
    assert (error.details() or "").startswith("requests[1].params_json: does not match OrderParams")
    assert await stored_instances(server) == []


async def test_params_that_match_their_typed_dict_are_taken_as_sent(server: Server) -> None:
    # Keys the TypedDict does not name are allowed, as a TypedDict allows them.
    sent = '{"orderId": "o-2", "quantity": 3, "extra": [1]}'
    done = await run(server, "typed-params", sent, "typed-2")
    assert done.status == COMPLETE, done.error
    assert json.loads(done.params_json) == json.loads(sent)
    assert json.loads(done.output_json) == {"order": "o-2", "quantity": 3}


async def test_message_past_the_grpc_cap_is_refused(make_server: ServerFactory) -> None:
    # The server takes messages up to about 2 x max_payload_bytes + 64 KiB.
    server = await make_server(limits={"max_payload_bytes": BIG})
    params = '"' + "a" * 200_000 + '"'
    error = await rpc_error(create(server, "three-steps", params, "huge"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await rpc_error(status(server, "huge"))).code() == NOT_FOUND
    assert await stored_instances(server) == []


async def test_params_at_the_limit_are_accepted(make_server: ServerFactory) -> None:
    server = await make_server(limits={"max_payload_bytes": BIG})
    params = '"' + "a" * (BIG - 2) + '"'
    assert len(params.encode()) == BIG
    await create(server, "repeats", params, "at-limit")
    instance = await status(server, "at-limit")
    assert instance.params_json == params


async def test_concurrent_creates_of_one_id_make_one_instance(server: Server) -> None:
    results = await asyncio.gather(
        *(create(server, "three-steps", json.dumps({"n": n}), "same") for n in range(20)),
        return_exceptions=True,
    )
    winners = [n for n, r in enumerate(results) if isinstance(r, pb.CreateInstanceResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1, results
    assert len(losers) == 19, results
    assert {e.code() for e in losers} == {ALREADY_EXISTS}
    events = await watch(server, "same")
    assert kinds(events).count("status:RUNNING") == 1
    assert events[-1].status_changed.status == COMPLETE
    instance = await status(server, "same")
    assert json.loads(instance.params_json) == {"n": winners[0]}
    assert await stored_instances(server) == ["same"]


async def test_concurrent_creates_of_distinct_ids_all_succeed(server: Server) -> None:
    ids = [f"many-{n}" for n in range(30)]
    responses = await asyncio.gather(*(create(server, "three-steps", "", i) for i in ids))
    assert [r.instance_id for r in responses] == ids
    for instance_id in ids:
        events = await watch(server, instance_id)
        assert events[-1].status_changed.status == COMPLETE
    assert sorted(await stored_instances(server)) == sorted(ids)


# ---------------------------------------------------------------- GetStatus
async def test_status_of_a_completed_instance(server: Server) -> None:
    done = await run(server, "three-steps", '{"k": [1, 2]}', "full")
    assert done.instance_id == "full"
    assert done.workflow == "three-steps"
    assert done.status == COMPLETE
    assert json.loads(done.params_json) == {"k": [1, 2]}
    assert json.loads(done.output_json) == {"sum": 6, "params": {"k": [1, 2]}}
    assert not done.HasField("error")
    for field in ("create_time", "update_time", "end_time"):
        assert done.HasField(field), field
    assert done.create_time.ToNanoseconds() <= done.end_time.ToNanoseconds()
    assert done.end_time == done.update_time
    assert [s.name for s in done.steps] == ["one", "two", "three"]
    for index, step in enumerate(done.steps):
        assert step.index == index
        assert step.occurrence == 1
        assert step.attempts == 1
        assert step.status == SUCCEEDED
        assert json.loads(step.output_json) == {"n": index + 1}
        assert step.HasField("start_time") and step.HasField("end_time")
        assert step.start_time.ToNanoseconds() <= step.end_time.ToNanoseconds()
        assert not step.HasField("error")
        assert not step.HasField("next_attempt_time")
    # Events: status RUNNING, 3 x (started, succeeded), status COMPLETE.
    assert done.last_sequence == 8


async def test_repeated_step_names_are_separate_steps(server: Server) -> None:
    done = await run(server, "repeats")
    assert done.status == COMPLETE
    assert json.loads(done.output_json) == [0, 10, 20]
    assert [(s.name, s.occurrence, s.index) for s in done.steps] == [
        ("poll", 1, 0),
        ("poll", 2, 1),
        ("poll", 3, 2),
    ]
    assert [json.loads(s.output_json) for s in done.steps] == [0, 10, 20]
    events = await watch(server, done.instance_id)
    refs = [e.step_succeeded.step for e in events if e.HasField("step_succeeded")]
    assert refs == [
        pb.StepRef(name="poll", occurrence=n, index=n - 1, kind=pb.STEP_KIND_DO) for n in (1, 2, 3)
    ]


async def test_status_gives_the_stored_size_of_every_payload(make_server: ServerFactory) -> None:
    # Non-ASCII text: sizes are the stored UTF-8 bytes, not characters.
    server = await make_server(limits={"max_payload_bytes": BIG})
    await create(server, "approval", '{"who": "Zoë", "timeout": "1 minute"}', "sizes")

    async def waiting() -> bool:
        return any(s.name == "approval" for s in (await status(server, "sizes")).steps)

    await eventually(waiting)
    early = await status(server, "sizes")
    assert early.payloads.output_bytes == 0
    assert [s.output_size_bytes for s in early.steps] == [len(b"null"), 0]
    await server.stub.SendEvent(
        pb.SendEventRequest(instance_id="sizes", type="approval", payload_json='{"ok": "sí"}')
    )
    await watch(server, "sizes")
    done = await status(server, "sizes")
    assert done.status == COMPLETE
    record = await server.service.store.get_instance("sizes")
    stored = await server.service.store.get_steps("sizes")
    assert record is not None and record.params is not None and record.output is not None
    results = [len(s.output or b"") for s in stored]
    # The event wait's result is the event taken, so it counts as a step result.
    assert [s.name for s in done.steps] == ["request", "approval", "apply"]
    assert [s.output_size_bytes for s in done.steps] == results
    assert results[1] == len(done.steps[1].output_json.encode()) > len('{"ok": "sí"}')
    assert done.payloads == pb.PayloadSizes(
        params_bytes=len(record.params),
        output_bytes=len(record.output),
        largest_step_bytes=max(results),
        total_bytes=len(record.params) + len(record.output) + sum(results),
        limit_bytes=BIG,
    )
    assert done.payloads.params_bytes == len(done.params_json.encode()) != len(done.params_json)
    assert done.payloads.output_bytes == len(done.output_json.encode())
    # A listing carries no steps, so only params, output and the limit.
    (listed,) = (await server.stub.ListInstances(pb.ListInstancesRequest())).instances
    assert listed.payloads == pb.PayloadSizes(
        params_bytes=len(record.params),
        output_bytes=len(record.output),
        total_bytes=len(record.params) + len(record.output),
        limit_bytes=BIG,
    )


async def test_status_of_unknown_and_bad_ids(server: Server) -> None:
    error = await rpc_error(status(server, "nobody-home"))
    assert_names_field(error, NOT_FOUND, "instance_id")
    assert "'nobody-home'" in (error.details() or "")
    for bad in ("", "a b", "-x", "x" * 101):
        assert_names_field(await rpc_error(status(server, bad)), INVALID, "instance_id")


# ----------------------------------------------------------------- failures
async def test_step_that_raises_errors_the_instance(server: Server) -> None:
    done = await run(server, "raises")
    assert done.status == ERRORED
    assert (done.error.name, done.error.message) == ("ValueError", "bad input row 7")
    assert done.output_json == ""
    assert done.HasField("end_time")
    fine, boom = done.steps
    assert (fine.name, fine.status, fine.attempts) == ("fine", SUCCEEDED, 1)
    assert (boom.name, boom.status, boom.attempts) == ("boom", FAILED, 2)
    assert (boom.error.name, boom.error.message) == ("ValueError", "bad input row 7")
    assert boom.HasField("end_time")
    assert not boom.HasField("next_attempt_time")
    # Where the step's body raised, kept with the step and with the instance's error.
    where = boom.error.traceback
    assert where.startswith("Traceback (most recent call last):\n")
    assert '    raise ValueError("bad input row 7")\n' in where
    assert where.endswith("ValueError: bad input row 7\n")
    assert done.error.traceback == where
    assert fine.error.traceback == ""
    events = await watch(server, done.instance_id)
    assert kinds(events)[-4:] == [
        "attempt_failed:boom#1",
        "step_started:boom#2",
        "step_failed:boom#2",
        "status:ERRORED",
    ]
    assert events[-1].status_changed.error == done.error
    assert events[-4].attempt_failed.error.traceback == where
    assert events[-2].step_failed.error.traceback == where


async def test_caught_non_retryable_failure_completes(server: Server) -> None:
    done = await run(server, "catches")
    assert done.status == COMPLETE
    assert json.loads(done.output_json) == {
        "caught": "NonRetryableError",
        "message": "card declined",
    }
    charge, refund = done.steps
    assert (charge.name, charge.status, charge.attempts) == ("charge", FAILED, 1)
    assert (charge.error.name, charge.error.message) == ("NonRetryableError", "card declined")
    assert (refund.name, refund.status, refund.output_json) == ("refund", SUCCEEDED, '"refunded"')
    assert not done.HasField("error")


async def test_error_outside_a_step(server: Server) -> None:
    done = await run(server, "raises-outside")
    assert done.status == ERRORED
    assert done.error.name == "KeyError"
    assert "missing-key" in done.error.message
    assert list(done.steps) == []
    # An error raised by run() itself has its traceback too, from run() down.
    assert done.error.traceback.splitlines()[1:3] == [
        f'  File "{Path(wf.__file__)}", line {wf.RaisesOutsideStep.run.__code__.co_firstlineno + 1}, in run',
        '    raise KeyError("missing-key")',
    ]
    assert done.error.traceback.endswith("KeyError: 'missing-key'\n")


async def test_a_long_traceback_is_cut_in_the_middle(server: Server) -> None:
    done = await run(server, "deep-raise")
    assert done.error.name == "RecursionError"
    where = done.error.traceback
    assert len(where.encode()) <= 8 * 1024
    assert where.startswith("Traceback (most recent call last):\n")
    assert "the middle is left out" in where
    assert where.endswith("RecursionError: bottom of the dive\n")
    # What stays of the end is whole lines: the innermost frames.
    assert '    raise RecursionError("bottom of the dive") from exc\n' in where


async def test_hanging_step_times_out_per_attempt(server: Server) -> None:
    done = await run(server, "hangs")
    assert done.status == ERRORED
    assert done.error.name == "StepTimeoutError"
    assert "timed out" in done.error.message
    (hang,) = done.steps
    assert (hang.status, hang.attempts, hang.error.name) == (FAILED, 2, "StepTimeoutError")
    # Where the body was when its time ran out: the await that was cut.
    assert "in hang\n    await asyncio.sleep(3600)\n" in hang.error.traceback
    assert hang.error.traceback.endswith("CancelledError\n")


async def test_step_result_not_json(server: Server) -> None:
    done = await run(server, "not-json")
    assert done.status == ERRORED
    assert done.error.name == "StepResultError"
    assert "'set'" in done.error.message and "not JSON" in done.error.message
    (step,) = done.steps
    # Not retryable: the same code would return the same value again.
    assert (step.status, step.attempts) == (FAILED, 1)


@pytest.mark.parametrize(("size", "ok"), [(BIG - 2, True), (BIG - 1, False), (3 * BIG, False)])
async def test_step_result_over_the_limit(make_server: ServerFactory, size: int, ok: bool) -> None:
    server = await make_server(limits={"max_payload_bytes": BIG})
    done = await run(server, "too-big", json.dumps({"size": size}))
    (step,) = done.steps
    if ok:
        assert done.status == COMPLETE
        assert len(step.output_json.encode()) == BIG
        return
    assert done.status == ERRORED
    assert done.error.name == "StepResultError"
    assert "2,048 bytes" in done.error.message
    assert "max_payload_bytes" in done.error.message
    assert (step.status, step.attempts) == (FAILED, 1)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


class BadResult(WorkflowEntrypoint[str]):
    """A step whose result json.dumps accepts as a type but cannot store.

    Hosted only by ``bad_result_server``: tests/workflows.py has no such case.
    """

    async def run(self, event: WorkflowEvent[str], step: WorkflowStep) -> Any:
        values: dict[str, Any] = {"lone-surrogate": "\ud800", "too-deep": _nested(5000)}
        try:
            await step.do("bad", lambda: values[event.payload])
        except StepFailedError as exc:
            return {"caught": exc.error_name}
        return "unreachable"


@pytest.fixture
async def bad_result_server(tmp_path: Path) -> AsyncIterator[Server]:
    config = write_config(tmp_path, {"bad-result": f"{__name__}:BadResult"})
    service = Service(load_config(config))
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    yield Server(service, channel)
    await channel.close()
    await service.stop(0.1)


@pytest.mark.parametrize("case", ["lone-surrogate", "too-deep"])
async def test_step_result_that_cannot_be_encoded(bad_result_server: Server, case: str) -> None:
    done = await run(bad_result_server, "bad-result", json.dumps(case))
    (step,) = done.steps
    assert (step.status, step.attempts, step.error.name) == (FAILED, 1, "StepResultError")
    assert done.status == COMPLETE
    assert json.loads(done.output_json) == {"caught": "StepResultError"}


async def test_workflow_output_not_json(server: Server) -> None:
    done = await run(server, "output-not-json")
    assert done.status == ERRORED
    assert done.error.name == "WorkflowOutputError"
    assert "not JSON" in done.error.message
    assert done.output_json == ""


async def test_flaky_step_retries_with_constant_backoff(server: Server) -> None:
    done = await run(server, "flaky", '{"failures": 2, "limit": 5}')
    assert done.status == COMPLETE
    assert done.output_json == "3"
    (step,) = done.steps
    assert (step.name, step.status, step.attempts) == ("flaky", SUCCEEDED, 3)
    events = await watch(server, done.instance_id)
    assert kinds(events) == [
        "status:RUNNING",
        "step_started:flaky#1",
        "attempt_failed:flaky#1",
        "step_started:flaky#2",
        "attempt_failed:flaky#2",
        "step_started:flaky#3",
        "step_succeeded:flaky#3",
        "status:COMPLETE",
    ]
    failed = [e for e in events if e.HasField("attempt_failed")]
    for number, event in enumerate(failed, start=1):
        attempt_failed = event.attempt_failed
        assert attempt_failed.error.name == "ConnectionError"
        assert attempt_failed.error.message == f"attempt {number} failed"
        assert attempt_failed.retry_delay.ToMilliseconds() == 1
        assert attempt_failed.HasField("next_attempt_time")
        started = events[event.sequence - 2]
        assert started.HasField("step_started")
        assert (
            attempt_failed.next_attempt_time.ToMilliseconds() >= started.time.ToMilliseconds() + 1
        )
    assert events[-1].status_changed.output_json == "3"


async def test_retries_exhausted_on_flaky(server: Server) -> None:
    done = await run(server, "flaky", '{"failures": 5, "limit": 2}')
    assert done.status == ERRORED
    assert (done.error.name, done.error.message) == ("ConnectionError", "attempt 3 failed")
    assert done.steps[0].attempts == 3


async def test_bad_workflows_do_not_disturb_others(server: Server) -> None:
    bad = ["raises", "raises-outside", "hangs", "not-json", "output-not-json"]
    results = await asyncio.gather(
        *(run(server, name) for name in bad),
        *(run(server, "three-steps", json.dumps({"n": n})) for n in range(5)),
    )
    assert [r.status for r in results[: len(bad)]] == [ERRORED] * len(bad)
    for n, good in enumerate(results[len(bad) :]):
        assert good.status == COMPLETE
        assert json.loads(good.output_json) == {"sum": 6, "params": {"n": n}}
    after = await run(server, "three-steps")
    assert after.status == COMPLETE
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------ WatchInstance
async def test_watch_streams_every_event_in_order(server: Server) -> None:
    created = await create(server, "three-steps", '{"w": 1}')
    events = await watch(server, created.instance_id)
    assert kinds(events) == [
        "status:RUNNING",
        "step_started:one#1",
        "step_succeeded:one#1",
        "step_started:two#1",
        "step_succeeded:two#1",
        "step_started:three#1",
        "step_succeeded:three#1",
        "status:COMPLETE",
    ]
    assert [e.sequence for e in events] == list(range(1, 9))
    assert {e.instance_id for e in events} == {created.instance_id}
    assert all(e.HasField("time") for e in events)
    for index, name in enumerate(["one", "two", "three"]):
        started, succeeded = events[1 + 2 * index], events[2 + 2 * index]
        assert started.step_started.step == pb.StepRef(
            name=name, occurrence=1, index=index, kind=pb.STEP_KIND_DO
        )
        assert succeeded.step_succeeded.step == started.step_started.step
        assert json.loads(succeeded.step_succeeded.output_json) == {"n": index + 1}
    final = events[-1].status_changed
    instance = await status(server, created.instance_id)
    assert final.output_json == instance.output_json
    assert json.loads(final.output_json) == {"sum": 6, "params": {"w": 1}}
    assert instance.last_sequence == events[-1].sequence


async def test_watch_resumes_exactly_after_a_sequence(server: Server) -> None:
    done = await run(server, "three-steps")
    full = await watch(server, done.instance_id)
    assert len(full) == done.last_sequence == 8
    for after in range(len(full) + 1):
        assert await watch(server, done.instance_id, after) == full[after:], after


async def test_watch_of_a_finished_instance_replays_and_ends(server: Server) -> None:
    done = await run(server, "raises")
    first = await watch(server, done.instance_id)
    second = await watch(server, done.instance_id)
    assert first == second
    assert first[-1].status_changed.status == ERRORED
    assert first[-1].status_changed.error.name == "ValueError"


async def test_watch_bad_requests(server: Server) -> None:
    done = await run(server, "three-steps")
    error = await watch_error(server, done.instance_id, done.last_sequence + 1)
    assert_names_field(error, INVALID, "after_sequence")
    assert f"({done.last_sequence})" in (error.details() or "")
    error = await watch_error(server, done.instance_id, 10**12)
    assert_names_field(error, INVALID, "after_sequence")
    error = await watch_error(server, done.instance_id, -1)
    assert_names_field(error, INVALID, "after_sequence")
    error = await watch_error(server, "no-such-instance")
    assert_names_field(error, NOT_FOUND, "instance_id")
    for bad in ("", "a b", "x" * 101):
        assert_names_field(await watch_error(server, bad), INVALID, "instance_id")


async def test_concurrent_watchers_each_get_every_event(
    server: Server, gate: asyncio.Event
) -> None:
    created = await create(server, "blocks", "", "blocked")
    streams: list[list[pb.WatchInstanceResponse]] = [[], [], []]

    async def follow(into: list[pb.WatchInstanceResponse], after: int) -> None:
        request = pb.WatchInstanceRequest(instance_id=created.instance_id, after_sequence=after)
        async for event in server.stub.WatchInstance(request):
            into.append(event)

    # Wait until the step is running and blocked on the gate.
    async def blocked() -> bool:
        instance = await status(server, "blocked")
        return len(instance.steps) == 1 and instance.last_sequence == 2

    await eventually(blocked, TIMEOUT)
    running = await status(server, "blocked")
    assert running.status == RUNNING
    assert running.output_json == ""
    assert not running.HasField("end_time")
    (step,) = running.steps
    assert (step.name, step.status, step.attempts) == ("wait", STEP_RUNNING, 1)
    assert not step.HasField("end_time")

    tasks = [asyncio.create_task(follow(stream, 0)) for stream in streams]
    resumed: list[pb.WatchInstanceResponse] = []
    tasks.append(asyncio.create_task(follow(resumed, 1)))
    # Every watcher is live (has caught up with the stored events) before the release.
    await eventually(
        lambda: asyncio.sleep(0, all(len(s) == 2 for s in streams) and len(resumed) == 1),
        TIMEOUT,
    )
    assert all(not t.done() for t in tasks)
    gate.set()
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*tasks)

    expected = [
        "status:RUNNING",
        "step_started:wait#1",
        "step_succeeded:wait#1",
        "status:COMPLETE",
    ]
    for stream in streams:
        assert kinds(stream) == expected
        assert [e.sequence for e in stream] == [1, 2, 3, 4]
        assert stream == streams[0]
    assert resumed == streams[0][1:]
    assert streams[0][-1].status_changed.output_json == '"released"'


# ------------------------------------------------------------ concurrency bound
async def test_running_instances_are_bounded_and_queue_in_order(
    make_server: ServerFactory, gate: asyncio.Event
) -> None:
    server = await make_server(limits={"max_running_instances": 2})
    # Creation order is not the ids' sort order, so a FIFO queue is told apart.
    ids = ["q-e", "q-d", "q-c", "q-b", "q-a"]
    created = [await create(server, "blocks", "", i) for i in ids]
    assert [c.status for c in created] == [RUNNING, RUNNING, QUEUED, QUEUED, QUEUED]

    async def statuses() -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for instance_id in ids:
            instance = await status(server, instance_id)
            out.append((instance.status, len(instance.steps)))
        return out

    async def settled(expected: list[tuple[int, int]]) -> bool:
        return await statuses() == expected

    blocked, queued, done = (RUNNING, 1), (QUEUED, 0), (COMPLETE, 1)
    await eventually(lambda: settled([blocked, blocked, queued, queued, queued]), TIMEOUT)
    # Stable: still two running, three queued, after the instances had time to move.
    for _ in range(5):
        await asyncio.sleep(0.02)
        assert await statuses() == [blocked, blocked, queued, queued, queued]

    # Release the running two only: the next two in creation order take their slots.
    first, second = gate, asyncio.Event()
    Blocks.gate = second
    first.set()
    await eventually(lambda: settled([done, done, blocked, blocked, queued]), TIMEOUT)
    third = asyncio.Event()
    Blocks.gate = third
    second.set()
    await eventually(lambda: settled([done, done, done, done, blocked]), TIMEOUT)
    third.set()
    for instance_id in ids:
        events = await watch(server, instance_id)
        assert events[-1].status_changed.status == COMPLETE
    instances = [await status(server, i) for i in ids]
    assert [i.status for i in instances] == [COMPLETE] * 5
    # Each queued instance was RUNNING only after a slot was freed.
    for instance_id in ids[2:]:
        assert kinds(await watch(server, instance_id)) == [
            "status:QUEUED",
            "status:RUNNING",
            "step_started:wait#1",
            "step_succeeded:wait#1",
            "status:COMPLETE",
        ]
    starts = [i.steps[0].start_time.ToMilliseconds() for i in instances]
    ends = [i.steps[0].end_time.ToMilliseconds() for i in instances]
    assert max(ends[:2]) <= min(starts[2:4])
    assert max(ends[2:4]) <= starts[4]


# ---------------------------------------------------- ListWorkflows, health
async def test_list_workflows(server: Server) -> None:
    response = await server.stub.ListWorkflows(pb.ListWorkflowsRequest(), timeout=TIMEOUT)
    listed = {(w.name, w.binding, w.class_name) for w in response.workflows}
    assert listed == {
        (name, name.upper().replace("-", "_"), target) for name, target in ALL_WORKFLOWS.items()
    }
    names = [w.name for w in response.workflows]
    assert names == sorted(names)


async def test_health_check(server: Server) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "cruzflow.v1.WorkflowService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == serving, service
    error = await rpc_error(
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    )
    assert error.code() == NOT_FOUND


async def test_many_create_and_watch_at_once_see_every_event(server: Server) -> None:
    """Watches racing fresh creates must read a current snapshot: no NOT_FOUND, no gaps."""

    async def one() -> list[int]:
        created = await server.stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="three-steps", params_json="{}")
        )
        stream = server.stub.WatchInstance(
            pb.WatchInstanceRequest(instance_id=created.instance_id), timeout=60
        )
        return [event.sequence async for event in stream]

    results = await asyncio.gather(*[one() for _ in range(400)])
    assert all(seqs == list(range(1, 9)) for seqs in results), [
        s for s in results if s != list(range(1, 9))
    ][:3]


async def test_wait_instance_long_polls_until_final(server: Server, gate: asyncio.Event) -> None:
    from google.protobuf.duration_pb2 import Duration

    created = await server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="blocks"))
    instance_id = created.instance_id
    early = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=instance_id, timeout=Duration(nanos=50_000_000))
    )
    assert early.instance.status == pb.INSTANCE_STATUS_RUNNING
    assert not early.instance.steps
    waiting = asyncio.ensure_future(
        server.stub.WaitInstance(
            pb.WaitInstanceRequest(instance_id=instance_id, include_steps=True)
        )
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()
    gate.set()
    final = (await waiting).instance
    assert final.status == pb.INSTANCE_STATUS_COMPLETE
    # Built from the final event, it must equal what the store says.
    stored = await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))
    assert final == stored.instance, [
        (f.name, getattr(final, f.name), getattr(stored.instance, f.name))
        for f in pb.Instance.DESCRIPTOR.fields
        if getattr(final, f.name) != getattr(stored.instance, f.name)
    ]
    assert json.loads(final.output_json) == "released"
    assert [s.name for s in final.steps] == ["wait"]
    again = await server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id=instance_id))
    assert again.instance.status == pb.INSTANCE_STATUS_COMPLETE


async def test_wait_instance_rejects_bad_requests(server: Server) -> None:
    from google.protobuf.duration_pb2 import Duration

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id=""))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    created = await server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="three-steps"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await server.stub.WaitInstance(
            pb.WaitInstanceRequest(instance_id=created.instance_id, timeout=Duration(seconds=-1))
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout" in (info.value.details() or "")


# ------------------------------------------------------------ RunInstance
async def test_run_instance_creates_and_answers_once_final(server: Server) -> None:
    answer = await server.stub.RunInstance(
        pb.RunInstanceRequest(
            instance=pb.CreateInstanceRequest(
                workflow="three-steps", params_json='{"n": 2}', instance_id="run-1"
            ),
            include_steps=True,
        ),
        timeout=TIMEOUT,
    )
    final = answer.instance
    assert (final.instance_id, final.status) == ("run-1", COMPLETE)
    assert [s.name for s in final.steps] == ["one", "two", "three"]
    # Built without a read, it must equal what the store says.
    assert final == await status(server, "run-1")
    bare = await server.stub.RunInstance(
        pb.RunInstanceRequest(instance=pb.CreateInstanceRequest(workflow="three-steps"))
    )
    assert bare.instance.status == COMPLETE and not bare.instance.steps
    assert bare.instance.instance_id not in ("", "run-1")
    # A taken id is refused as CreateInstance refuses it, and the instance is untouched.
    error = await rpc_error(
        server.stub.RunInstance(
            pb.RunInstanceRequest(
                instance=pb.CreateInstanceRequest(workflow="three-steps", instance_id="run-1")
            )
        )
    )
    assert error.code() == ALREADY_EXISTS, error.details()
    assert (await status(server, "run-1")) == final


async def test_run_instance_answers_at_its_timeout_and_the_instance_goes_on(
    server: Server, gate: asyncio.Event
) -> None:
    from google.protobuf.duration_pb2 import Duration

    early = await server.stub.RunInstance(
        pb.RunInstanceRequest(
            instance=pb.CreateInstanceRequest(workflow="blocks", instance_id="slow"),
            timeout=Duration(nanos=50_000_000),
        ),
        timeout=TIMEOUT,
    )
    assert early.instance.status == RUNNING
    gate.set()
    waited = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id="slow"), timeout=TIMEOUT
    )
    assert json.loads(waited.instance.output_json) == "released"


async def test_run_instance_refusals_create_nothing(make_server: ServerFactory) -> None:
    from google.protobuf.duration_pb2 import Duration

    server = await make_server(limits={"max_watchers": 1})

    def request(**fields: Any) -> pb.RunInstanceRequest:
        return pb.RunInstanceRequest(
            instance=pb.CreateInstanceRequest(workflow="three-steps", instance_id="r"), **fields
        )

    bad_timeout = await rpc_error(server.stub.RunInstance(request(timeout=Duration(seconds=-1))))
    assert_names_field(bad_timeout, INVALID, "timeout")
    unknown = await rpc_error(
        server.stub.RunInstance(
            pb.RunInstanceRequest(instance=pb.CreateInstanceRequest(workflow="nope"))
        )
    )
    assert_names_field(unknown, NOT_FOUND, "workflow")
    bad_params = await rpc_error(
        server.stub.RunInstance(
            pb.RunInstanceRequest(
                instance=pb.CreateInstanceRequest(workflow="three-steps", params_json="{")
            )
        )
    )
    assert_names_field(bad_params, INVALID, "params_json")
    # The one watcher this server takes is busy: refused before the create.
    hub = server.service.engine.core.hub
    await server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="approval", instance_id="w"))
    waiting = asyncio.ensure_future(
        server.stub.WaitInstance(
            pb.WaitInstanceRequest(instance_id="w", timeout=Duration(seconds=1)), timeout=TIMEOUT
        )
    )

    async def watchers(count: int) -> bool:
        return hub.count == count

    await eventually(lambda: watchers(1))
    full = await rpc_error(server.stub.RunInstance(request()))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, full.details()
    assert "(limits.max_watchers)" in (full.details() or "")
    assert await stored_instances(server) == ["w"]
    await waiting
    await eventually(lambda: watchers(0))
    served = await server.stub.RunInstance(request(), timeout=TIMEOUT)
    assert served.instance.status == COMPLETE
    assert await stored_instances(server) == ["w", "r"]


# ------------------------------------------------------------ CountInstances
def _counted(response: pb.CountInstancesResponse) -> list[tuple[str, str, int]]:
    return [(c.workflow, pb.InstanceStatus.Name(c.status)[16:], c.count) for c in response.counts]


async def _count(server: Server, **fields: Any) -> pb.CountInstancesResponse:
    return await server.stub.CountInstances(pb.CountInstancesRequest(**fields), timeout=TIMEOUT)


async def test_count_instances_per_workflow_and_status_with_each_filter(server: Server) -> None:
    empty = await _count(server)
    assert (list(empty.counts), empty.total) == ([], 0)

    async def batch(*items: tuple[str, str]) -> list[pb.Instance]:
        created = await server.stub.CreateInstances(
            pb.CreateInstancesRequest(
                requests=[
                    pb.CreateInstanceRequest(workflow=workflow, lookup_key=key)
                    for workflow, key in items
                ]
            ),
            timeout=TIMEOUT,
        )
        ids = [c.instance_id for c in created.instances]

        async def settled() -> list[pb.Instance]:
            found = [await status(server, i) for i in ids]
            # Each ends, or (approval) waits for its event.
            return found if all(i.status not in (QUEUED, RUNNING) for i in found) else []

        found: list[pb.Instance] = await eventually(settled)
        return found

    first = await batch(("three-steps", "user:1"), ("three-steps", ""), ("raises", "user:1"))
    # The next batch is created strictly later, to the ms the filters take.
    await eventually(lambda: _later_than(first[-1].create_time.ToMilliseconds()))
    second = await batch(("approval", "user:1"), ("three-steps", ""), ("raises", ""))
    split = second[0].create_time
    assert split.ToMilliseconds() > first[-1].create_time.ToMilliseconds()

    everything = await _count(server)
    # By workflow name, then status.
    assert _counted(everything) == [
        ("approval", "WAITING", 1),
        ("raises", "ERRORED", 2),
        ("three-steps", "COMPLETE", 3),
    ]
    assert everything.total == 6
    by_workflow = await _count(server, workflow="three-steps")
    assert (_counted(by_workflow), by_workflow.total) == ([("three-steps", "COMPLETE", 3)], 3)
    keyed = await _count(server, lookup_key="user:1")
    assert _counted(keyed) == [
        ("approval", "WAITING", 1),
        ("raises", "ERRORED", 1),
        ("three-steps", "COMPLETE", 1),
    ]
    assert keyed.total == 3
    later = await _count(server, create_time_min=split)
    assert _counted(later) == [
        ("approval", "WAITING", 1),
        ("raises", "ERRORED", 1),
        ("three-steps", "COMPLETE", 1),
    ]
    earlier = await _count(server, create_time_max=split)
    assert _counted(earlier) == [("raises", "ERRORED", 1), ("three-steps", "COMPLETE", 2)]
    assert earlier.total == 3
    combined = await _count(server, workflow="raises", lookup_key="user:1", create_time_max=split)
    assert (_counted(combined), combined.total) == ([("raises", "ERRORED", 1)], 1)
    assert (await _count(server, workflow="no-such-workflow")).total == 0
    # A control moves an instance from one count to another.
    waiting = second[0].instance_id
    await server.stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id=waiting))
    assert _counted(await _count(server, workflow="approval")) == [("approval", "TERMINATED", 1)]


async def _later_than(ms: int) -> bool:
    return time.time() * 1000 > ms + 2


async def test_count_instances_refuses_bad_filters_as_list_instances_does(server: Server) -> None:
    far = Timestamp(seconds=10**15)
    # In binary protobuf: the JSON mapping cannot spell some of these times.
    for filters in (
        {"workflow": "no spaces allowed"},
        {"workflow": "x" * 300},
        {"lookup_key": "k" * 257},
        {"lookup_key": "bad\x00key"},
        {"create_time_min": Timestamp(seconds=2000), "create_time_max": Timestamp(seconds=1000)},
        {"create_time_min": Timestamp(seconds=1000), "create_time_max": Timestamp(seconds=1000)},
        {"create_time_max": far},
        {"create_time_min": Timestamp(seconds=1, nanos=-1)},
    ):
        counted = await rpc_error(server.binary.CountInstances(pb.CountInstancesRequest(**filters)))
        listed = await rpc_error(server.binary.ListInstances(pb.ListInstancesRequest(**filters)))
        assert counted.code() == INVALID, (filters, counted.details())
        assert counted.details() == listed.details(), filters
    refused = await rpc_error(
        server.stub.CountInstances(pb.CountInstancesRequest(lookup_key="k" * 257))
    )
    assert (refused.details() or "").startswith("lookup_key: 257 characters, over the limit")


# ----------------------------------------------------------------- trace ids
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _tracing() -> Providers:
    spans = TracerProvider()
    spans.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    return Providers.of(spans, rpc_spans="all")


async def test_instances_carry_the_trace_id_of_their_creating_call(
    make_server: ServerFactory,
) -> None:
    traced = await make_server(telemetry=_tracing())
    caller = (("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01"),)
    created = await traced.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="three-steps"), metadata=caller, timeout=TIMEOUT
    )
    joined = created.instance_id
    waited = await traced.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=joined), timeout=TIMEOUT
    )
    assert waited.instance.status == COMPLETE
    assert waited.instance.trace_id == TRACE
    assert (await status(traced, joined)).trace_id == TRACE
    # Without a caller's trace the instance gets a root trace of its own.
    own = (await create(traced, "three-steps")).instance_id
    root = (await status(traced, own)).trace_id
    assert len(root) == 32 and int(root, 16) != 0 and root != TRACE
    listed = await traced.stub.ListInstances(pb.ListInstancesRequest(), timeout=TIMEOUT)
    assert {i.instance_id: i.trace_id for i in listed.instances} == {joined: TRACE, own: root}
    async with Client(traced.address) as client:
        assert (await client.instance(joined).status()).trace_id == TRACE
    # With tracing off, nothing is stored, and the field stays empty.
    plain = await make_server()
    untraced = await plain.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="three-steps"), metadata=caller, timeout=TIMEOUT
    )
    assert (await status(plain, untraced.instance_id)).trace_id == ""


@pytest.mark.parametrize(
    ("trace_parent", "trace_id"),
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01", TRACE),
        (f"00-{TRACE}-00f067aa0ba902b7-00", TRACE),
        # A later version may add fields; version 00 may not.
        (f"01-{TRACE}-00f067aa0ba902b7-01-more", TRACE),
        (f"00-{TRACE}-00f067aa0ba902b7-01-more", ""),
        (f"ff-{TRACE}-00f067aa0ba902b7-01", ""),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", ""),
        (f"00-{TRACE.upper()}-00f067aa0ba902b7-01", ""),
        (f"00-{TRACE[:-1]}-00f067aa0ba902b7-01", ""),
        (f"00-{TRACE}-00f067aa0ba902b7", ""),
        (f" 00-{TRACE}-00f067aa0ba902b7-01", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_the_trace_id_of_a_stored_trace_parent(trace_parent: str | None, trace_id: str) -> None:
    assert convert.trace_id(trace_parent) == trace_id
