"""How gRPC failures map to the typed errors, which calls are retried, and the
metadata the client sends.

Lost answers are made by a client interceptor on a real channel to a real
server: the call reaches the server and is carried out, then the interceptor
reports UNAVAILABLE instead of the answer, as a connection cut at that moment
would.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cruzflow.client import (
    Client,
    CruzflowError,
    DeadlineExceeded,
    FailedPrecondition,
    InstanceAlreadyExists,
    InstanceNotFound,
    InstanceStatus,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    StepStatus,
    Unauthenticated,
    Unavailable,
    WorkflowNotFound,
)
from cruzflow.client.errors import from_rpc_error
from cruzflow.server.app import Service
from cruzflow.server.config import load_config
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.conftest import ALL_WORKFLOWS, Server, eventually
from tests.procs import free_port, write_config

TIMEOUT = 30.0
QUICK = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    ("code", "details", "kind"),
    [
        (grpc.StatusCode.NOT_FOUND, "instance_id: no instance 'x'; check the id", InstanceNotFound),
        (grpc.StatusCode.NOT_FOUND, "workflow: 'w' is not registered", WorkflowNotFound),
        (
            grpc.StatusCode.NOT_FOUND,
            "requests[3].workflow: 'w' is not registered",
            WorkflowNotFound,
        ),
        (grpc.StatusCode.ALREADY_EXISTS, "instance_id: exists already", InstanceAlreadyExists),
        (grpc.StatusCode.INVALID_ARGUMENT, "params_json: not valid JSON", InvalidArgument),
        (grpc.StatusCode.FAILED_PRECONDITION, "instance is complete", FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large", ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, "shutting down", Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, "no token", Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, "not yours", PermissionDenied),
        (grpc.StatusCode.INTERNAL, "internal error: KeyError", CruzflowError),
        (grpc.StatusCode.CANCELLED, "Locally cancelled", CruzflowError),
    ],
)
def test_each_grpc_code_maps_to_its_error(
    code: grpc.StatusCode, details: str, kind: type[CruzflowError]
) -> None:
    error = from_rpc_error(rpc_error(code, details), instance_id="x")
    assert type(error) is kind
    assert error.code == code
    assert error.details == details == str(error)
    assert error.instance_id == "x"
    assert code.name in repr(error)


def test_retry_policy_checks_its_fields_and_caps_its_backoff() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0)
    assert [policy.backoff(n) for n in (1, 2, 3, 4, 5, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittered = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.5)
    assert all(0.5 <= jittered.backoff(1) <= 1.0 for _ in range(100))
    assert policy.retries(grpc.StatusCode.UNAVAILABLE, 4)
    assert not policy.retries(grpc.StatusCode.UNAVAILABLE, 5)
    assert not policy.retries(grpc.StatusCode.NOT_FOUND, 1)
    codes = RetryPolicy(retryable_codes={grpc.StatusCode.DEADLINE_EXCEEDED})
    assert codes.retryable_codes == frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})
    hash(codes)
    with pytest.raises(InvalidArgument) as bad:
        RetryPolicy(max_attempts=0, initial_backoff=-1, multiplier=0.5, jitter=2)
    for field in ("max_attempts", "initial_backoff", "multiplier", "jitter"):
        assert field in str(bad.value)
    with pytest.raises(InvalidArgument, match="max_backoff"):
        RetryPolicy(initial_backoff=2, max_backoff=1)
    with pytest.raises(InvalidArgument, match="retryable_codes"):
        RetryPolicy(retryable_codes=frozenset({"UNAVAILABLE"}))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="retry"):
        Client(retry=3)  # type: ignore[arg-type]


class Tap(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts unary calls by method; makes the answer of chosen calls get lost."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lose: Counter[str] = Counter()  # method -> answers still to lose

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
        self.calls[name] += 1
        call = await continuation(client_call_details, request)
        if self.lose[name] > 0:
            self.lose[name] -= 1
            await call  # carried out by the server; only the answer goes missing
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "injected: connection lost")
        return call


@pytest.fixture
async def tapped(server: Server) -> AsyncIterator[tuple[Client, Tap]]:
    tap = Tap()
    channel = grpc.aio.insecure_channel(server.address, interceptors=[tap])
    client = Client.from_channel(channel, retry=QUICK)
    yield client, tap
    await client.close()
    await channel.close()


async def test_nothing_listening_is_unavailable_after_the_retries() -> None:
    tap = Tap()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}", interceptors=[tap])
    # Calls that are never retried wait for a connection up to their timeout.
    client = Client.from_channel(channel, retry=QUICK, timeout=0.5)
    try:
        with pytest.raises(Unavailable) as raised:
            await client.instance("x").status()
        assert isinstance(raised.value, ConnectionError)
        assert raised.value.code == grpc.StatusCode.UNAVAILABLE
        assert tap.calls["GetStatus"] == 3

        with pytest.raises(Unavailable):
            await client.workflow("three-steps").create({"a": 1})
        assert tap.calls["CreateInstance"] == 1  # without an id: never retried
        with pytest.raises(Unavailable):
            await client.workflow("three-steps").create({"a": 1}, id="chosen")
        assert tap.calls["CreateInstance"] == 1 + 3
        with pytest.raises(Unavailable):
            await client.workflow("three-steps").create_batch([{"id": "a"}, {}])
        assert tap.calls["CreateInstances"] == 1
        with pytest.raises(Unavailable):
            await client.workflow("three-steps").create_batch([{"id": "a"}, {"id": "b"}])
        assert tap.calls["CreateInstances"] == 1 + 3
        for control in ("pause", "resume", "terminate"):
            with pytest.raises(Unavailable):
                await getattr(client.instance("x"), control)()
        assert tap.calls["PauseInstance"] == tap.calls["TerminateInstance"] == 3
        with pytest.raises(Unavailable):
            await client.instance("x").restart()
        with pytest.raises(Unavailable):
            await client.instance("x").send_event("approval")
        assert tap.calls["RestartInstance"] == tap.calls["SendEvent"] == 1
        with pytest.raises(Unavailable):
            await client.list_workflows()
        assert tap.calls["ListWorkflows"] == 3
    finally:
        await client.close()
        await channel.close()
    address = f"127.0.0.1:{free_port()}"
    async with Client(address, reconnect=QUICK) as watcher:
        with pytest.raises(Unavailable):
            await anext(watcher.instance("x").watch())
        with pytest.raises(Unavailable):
            await watcher.instance("x").result()
    async with Client(address, retry=None, timeout=0.3) as no_retry:
        with pytest.raises(Unavailable) as waited:
            await no_retry.list_workflows()
    assert waited.value.details == f"could not connect to the server at {address} within 0.3 s"


class Stalls(pb_grpc.WorkflowServiceServicer):
    """A stand-in server whose GetStatus never answers."""

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatusResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_stalled_call_is_deadline_exceeded() -> None:
    stalled = grpc.aio.server()
    # A stand-in implements only the method under test.
    pb_grpc.add_WorkflowServiceServicer_to_server(Stalls(), stalled)  # type: ignore[abstract]
    port = stalled.add_insecure_port("127.0.0.1:0")
    await stalled.start()
    try:
        async with Client(f"127.0.0.1:{port}", timeout=0.3) as client:
            with pytest.raises(DeadlineExceeded) as raised:
                await client.instance("x").status()
            assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert isinstance(raised.value, TimeoutError)
        async with Client(f"127.0.0.1:{port}", timeout=None) as unbounded:
            # The per-call timeout applies where the client sets none.
            async with asyncio.timeout(TIMEOUT):
                with pytest.raises(DeadlineExceeded):
                    await unbounded.instance("x").status(timeout=0.2)
    finally:
        await stalled.stop(None)


async def test_create_with_an_id_survives_a_lost_answer(tapped: tuple[Client, Tap]) -> None:
    client, tap = tapped
    binding = client.workflow("three-steps")
    tap.lose["CreateInstance"] = 1
    handle = await binding.create({"k": 1}, id="lost-once", lookup_key="lk")
    # The retry met the instance the first attempt stored, and knew it for ours.
    assert tap.calls["CreateInstance"] == 2
    assert await handle.result(timeout=TIMEOUT) == {"sum": 6, "params": {"k": 1}}

    # The same id with other params is somebody else's instance, retry or not.
    tap.lose["CreateInstance"] = 1
    await binding.create({"k": 1}, id="lost-twice")
    with pytest.raises(InstanceAlreadyExists):
        await binding.create({"k": 2}, id="lost-twice")

    # Without an id nothing is retried: the lost answer hid a stored instance.
    tap.lose["CreateInstance"] = 1
    with pytest.raises(Unavailable):
        await binding.create({"k": 3}, lookup_key="anonymous")
    stored = [i async for i in client.list_instances(lookup_key="anonymous")]
    assert len(stored) == 1

    tap.lose["CreateInstances"] = 1
    handles = await binding.create_batch([{"id": "lost-b0"}, {"id": "lost-b1", "params": [1]}])
    assert [h.id for h in handles] == ["lost-b0", "lost-b1"]
    assert tap.calls["CreateInstances"] == 2
    assert (await handles[1].result(timeout=TIMEOUT))["params"] == [1]


async def test_run_with_an_id_survives_a_lost_answer(tapped: tuple[Client, Tap]) -> None:
    client, tap = tapped
    binding = client.workflow("three-steps")
    tap.lose["RunInstance"] = 1
    assert await binding.run({"k": 1}, id="run-lost", timeout=TIMEOUT) == {
        "sum": 6,
        "params": {"k": 1},
    }
    # The retry met the instance the first attempt stored, knew it for ours
    # and waited for it: one instance, run once.
    assert tap.calls["RunInstance"] == 2
    steps = (await client.instance("run-lost").status()).steps
    assert [s.attempts for s in steps] == [1, 1, 1]
    # Somebody else's instance under that id is refused, retry or not.
    with pytest.raises(InstanceAlreadyExists):
        await binding.run({"k": 2}, id="run-lost")
    # Without an id nothing is retried.
    tap.lose["RunInstance"] = 1
    with pytest.raises(Unavailable):
        await binding.run({"k": 3}, lookup_key="run-anonymous")
    assert len([i async for i in client.list_instances(lookup_key="run-anonymous")]) == 1


async def test_controls_survive_a_lost_answer(
    tapped: tuple[Client, Tap], gate: asyncio.Event
) -> None:
    client, tap = tapped
    handle = await client.workflow("blocks").create(id="ctl")

    async def blocked() -> bool:
        steps = (await handle.status()).steps
        return bool(steps) and steps[0].status is StepStatus.RUNNING

    await eventually(blocked, TIMEOUT)
    tap.lose["PauseInstance"] = 1
    assert await handle.pause() is InstanceStatus.WAITING_FOR_PAUSE
    assert tap.calls["PauseInstance"] == 2
    tap.lose["ResumeInstance"] = 1
    assert await handle.resume() is InstanceStatus.RUNNING
    tap.lose["TerminateInstance"] = 1
    assert await handle.terminate() is InstanceStatus.TERMINATED
    assert tap.calls["TerminateInstance"] == 2

    # A refusal that is not explained by a lost answer still raises.
    with pytest.raises(FailedPrecondition):
        await handle.pause()
    tap.lose["RestartInstance"] = 1
    with pytest.raises(Unavailable):
        await handle.restart()
    assert tap.calls["RestartInstance"] == 1


async def test_create_waits_for_a_server_that_is_starting(tmp_path: Path) -> None:
    """A create with an id, sent while the server is down, lands once it is up."""
    port = free_port()
    patient = RetryPolicy(max_attempts=200, initial_backoff=0.02, max_backoff=0.1)
    async with Client(f"127.0.0.1:{port}", retry=patient) as client:
        creating = asyncio.create_task(client.workflow("three-steps").create(id="early"))
        await asyncio.sleep(0.2)  # some attempts fail before the server listens
        assert not creating.done()
        config = write_config(tmp_path, ALL_WORKFLOWS, listen=f"127.0.0.1:{port}")
        service = Service(load_config(config))
        await service.start()
        try:
            handle = await asyncio.wait_for(creating, TIMEOUT)
            assert (await handle.result(timeout=TIMEOUT))["sum"] == 6
        finally:
            await service.stop(0.1)


class Guarded(pb_grpc.WorkflowServiceServicer):
    """A stand-in server that wants a bearer token, to see what the client sends."""

    async def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListWorkflowsResponse:
        metadata = dict(context.invocation_metadata() or ())
        auth = metadata.get("authorization")
        if auth is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "send a bearer token")
        if auth != "Bearer s3cret":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{auth!r} may not list")
        return pb.ListWorkflowsResponse(
            workflows=[pb.Workflow(name=str(metadata.get("x-team")), binding=str(auth))]
        )


async def test_token_and_metadata_reach_the_server() -> None:
    guarded = grpc.aio.server()
    pb_grpc.add_WorkflowServiceServicer_to_server(Guarded(), guarded)  # type: ignore[abstract]
    port = guarded.add_insecure_port("127.0.0.1:0")
    await guarded.start()
    address = f"127.0.0.1:{port}"
    try:
        async with Client(address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_workflows()
        async with Client(address, token="wrong") as wrong:
            with pytest.raises(PermissionDenied):
                await wrong.list_workflows()
        async with Client(address, token="s3cret", metadata=[("x-team", "billing")]) as right:
            [workflow] = await right.list_workflows()
        assert (workflow.name, workflow.binding) == ("billing", "Bearer s3cret")
        with pytest.raises(InvalidArgument, match="token"):
            Client(address, token="")
    finally:
        await guarded.stop(None)
