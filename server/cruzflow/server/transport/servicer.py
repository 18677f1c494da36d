"""The WorkflowService servicer: request in, engine call, response out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from cruzflow.server.engine import errors
from cruzflow.server.engine.runtime import Engine
from cruzflow.server.store.base import StoreError
from cruzflow.server.transport import convert
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

log = logging.getLogger("cruzflow.transport")

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
]

R = TypeVar("R")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            await context.abort(code, str(exc))
    log.exception("internal error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


async def _call(context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[R]]) -> R:
    try:
        return await fn()
    except (errors.ServiceError, StoreError) as exc:
        await _abort(context, exc)


class WorkflowServicer(pb_grpc.WorkflowServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def CreateInstance(
        self,
        request: pb.CreateInstanceRequest,
        context: grpc.aio.ServicerContext[pb.CreateInstanceRequest, pb.CreateInstanceResponse],
    ) -> pb.CreateInstanceResponse:
        instance_id, status = await _call(
            context,
            lambda: self._engine.create(
                request.workflow, request.instance_id, request.params_json, request.lookup_key
            ),
        )
        return pb.CreateInstanceResponse(
            instance_id=instance_id, status=pb.InstanceStatus.ValueType(int(status))
        )

    async def GetStatus(
        self,
        request: pb.GetStatusRequest,
        context: grpc.aio.ServicerContext[pb.GetStatusRequest, pb.GetStatusResponse],
    ) -> pb.GetStatusResponse:
        record, steps = await _call(context, lambda: self._engine.get(request.instance_id))
        return pb.GetStatusResponse(instance=convert.instance(record, steps))

    async def WatchInstance(
        self,
        request: pb.WatchInstanceRequest,
        context: grpc.aio.ServicerContext[pb.WatchInstanceRequest, pb.WatchInstanceResponse],
    ) -> AsyncIterator[pb.WatchInstanceResponse]:
        try:
            async for record in self._engine.watch(request.instance_id, request.after_sequence):
                yield convert.event(record)
        except (errors.ServiceError, StoreError) as exc:
            await _abort(context, exc)

    async def WaitInstance(
        self,
        request: pb.WaitInstanceRequest,
        context: grpc.aio.ServicerContext[pb.WaitInstanceRequest, pb.WaitInstanceResponse],
    ) -> pb.WaitInstanceResponse:
        timeout = (
            request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
        )
        record, steps = await _call(
            context,
            lambda: self._engine.wait(request.instance_id, timeout, request.include_steps),
        )
        return pb.WaitInstanceResponse(instance=convert.instance(record, steps))

    async def PauseInstance(
        self,
        request: pb.PauseInstanceRequest,
        context: grpc.aio.ServicerContext[pb.PauseInstanceRequest, pb.PauseInstanceResponse],
    ) -> pb.PauseInstanceResponse:
        status = await _call(context, lambda: self._engine.pause(request.instance_id))
        return pb.PauseInstanceResponse(status=pb.InstanceStatus.ValueType(int(status)))

    async def ResumeInstance(
        self,
        request: pb.ResumeInstanceRequest,
        context: grpc.aio.ServicerContext[pb.ResumeInstanceRequest, pb.ResumeInstanceResponse],
    ) -> pb.ResumeInstanceResponse:
        status = await _call(context, lambda: self._engine.resume(request.instance_id))
        return pb.ResumeInstanceResponse(status=pb.InstanceStatus.ValueType(int(status)))

    async def TerminateInstance(
        self,
        request: pb.TerminateInstanceRequest,
        context: grpc.aio.ServicerContext[
            pb.TerminateInstanceRequest, pb.TerminateInstanceResponse
        ],
    ) -> pb.TerminateInstanceResponse:
        status = await _call(context, lambda: self._engine.terminate(request.instance_id))
        return pb.TerminateInstanceResponse(status=pb.InstanceStatus.ValueType(int(status)))

    async def RestartInstance(
        self,
        request: pb.RestartInstanceRequest,
        context: grpc.aio.ServicerContext[pb.RestartInstanceRequest, pb.RestartInstanceResponse],
    ) -> pb.RestartInstanceResponse:
        status = await _call(context, lambda: self._engine.restart(request.instance_id))
        return pb.RestartInstanceResponse(status=pb.InstanceStatus.ValueType(int(status)))

    async def SendEvent(
        self,
        request: pb.SendEventRequest,
        context: grpc.aio.ServicerContext[pb.SendEventRequest, pb.SendEventResponse],
    ) -> pb.SendEventResponse:
        await _call(
            context,
            lambda: self._engine.send_event(
                request.instance_id, request.type, request.payload_json
            ),
        )
        return pb.SendEventResponse()

    async def CreateInstances(
        self,
        request: pb.CreateInstancesRequest,
        context: grpc.aio.ServicerContext[pb.CreateInstancesRequest, pb.CreateInstancesResponse],
    ) -> pb.CreateInstancesResponse:
        items: list[tuple[str, str, str | bytes, str]] = [
            (r.workflow, r.instance_id, r.params_json, r.lookup_key) for r in request.requests
        ]
        created = await _call(context, lambda: self._engine.create_many(items))
        return pb.CreateInstancesResponse(
            instances=[
                pb.CreateInstanceResponse(
                    instance_id=instance_id, status=pb.InstanceStatus.ValueType(int(status))
                )
                for instance_id, status in created
            ]
        )

    async def ListInstances(
        self,
        request: pb.ListInstancesRequest,
        context: grpc.aio.ServicerContext[pb.ListInstancesRequest, pb.ListInstancesResponse],
    ) -> pb.ListInstancesResponse:
        low, high = request.create_time_min, request.create_time_max
        page, token = await _call(
            context,
            lambda: self._engine.list_instances(
                workflow=request.workflow,
                statuses=list(request.statuses),
                created_min=convert.ms(low) if request.HasField("create_time_min") else None,
                created_max=convert.ms(high) if request.HasField("create_time_max") else None,
                lookup_key=request.lookup_key,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )
        return pb.ListInstancesResponse(
            instances=[convert.instance(record, []) for record in page], next_page_token=token
        )

    async def ListWorkflows(
        self,
        request: pb.ListWorkflowsRequest,
        context: grpc.aio.ServicerContext[pb.ListWorkflowsRequest, pb.ListWorkflowsResponse],
    ) -> pb.ListWorkflowsResponse:
        return pb.ListWorkflowsResponse(
            workflows=[
                pb.Workflow(name=w.name, binding=w.binding, class_name=w.class_name)
                for w in self._engine.workflows()
            ]
        )
