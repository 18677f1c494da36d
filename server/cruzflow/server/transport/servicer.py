"""The WorkflowService servicer: request in, engine call, response out.

``add_to_server`` registers it so that a request which is not a valid
protobuf message of its method (corrupt bytes, a string field that is not
UTF-8) gets INVALID_ARGUMENT: gRPC's own answer to a failed deserializer is
UNKNOWN, the code of a server fault.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc

from cruzflow.server.engine import errors, validate
from cruzflow.server.engine.runtime import Engine
from cruzflow.server.records import InstanceRecord, StepRecord
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
            await context.abort(code, validate.fit(str(exc)))
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
        async def wait() -> tuple[InstanceRecord, list[StepRecord]]:
            timeout = (
                convert.seconds(request.timeout, "timeout") if request.HasField("timeout") else None
            )
            return await self._engine.wait(request.instance_id, timeout, request.include_steps)

        record, steps = await _call(context, wait)
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
                created_min=(
                    convert.ms(low, "create_time_min")
                    if request.HasField("create_time_min")
                    else None
                ),
                created_max=(
                    convert.ms(high, "create_time_max")
                    if request.HasField("create_time_max")
                    else None
                ),
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


class _Malformed:
    """Stands for a request whose bytes did not parse as its message."""

    __slots__ = ("problem", "type_name")

    def __init__(self, type_name: str, problem: str) -> None:
        self.type_name = type_name
        self.problem = problem

    def message(self) -> str:
        return (
            f"request: not a valid {self.type_name} message ({self.problem}); encode it from "
            f"proto/cruzflow/v1/workflows.proto, with UTF-8 text in string fields"
        )


def _lenient(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # any parse failure is the caller's
            return _Malformed(type_name, validate.fit(str(exc))[:300])

    return deserialize


def _guarded(handler: Any) -> Any:
    """The method handler with a lenient deserializer and a behaviour that
    answers a malformed request INVALID_ARGUMENT."""
    parse = handler.request_deserializer
    owner = getattr(parse, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = descriptor.full_name if descriptor is not None else "request"
    lenient = _lenient(parse, type_name)
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            return await inner(request, context)

        return handler._replace(request_deserializer=lenient, unary_unary=unary)
    inner_stream = handler.unary_stream
    assert inner_stream is not None, "the service has unary and server-streaming methods only"

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
        async for response in inner_stream(request, context):
            yield response

    return handler._replace(request_deserializer=lenient, unary_stream=stream)


class _Registrar:
    """Takes what the generated ``add_..._to_server`` registers and hands the
    server guarded handlers instead."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.registered = False

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt from the registered handlers below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered = True
        guarded = {name: _guarded(handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
        self._server.add_registered_method_handlers(service, guarded)


def add_to_server(servicer: WorkflowServicer, server: grpc.aio.Server) -> None:
    """Register the service on ``server``; malformed requests get INVALID_ARGUMENT."""
    registrar = _Registrar(server)
    pb_grpc.add_WorkflowServiceServicer_to_server(servicer, cast(grpc.aio.Server, registrar))
    # Stubs from another grpcio-tools might register differently: fail loudly.
    if not registrar.registered:
        raise RuntimeError("the generated stubs did not register their method handlers")
