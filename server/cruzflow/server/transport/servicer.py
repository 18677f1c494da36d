"""The WorkflowService over gRPC: the handlers of ``api.WorkflowApi``, with
their refusals answered as gRPC status codes.

``add_to_server`` registers them so that a request which is not a valid
protobuf message of its method (corrupt bytes, a string field that is not
UTF-8) gets INVALID_ARGUMENT: gRPC's own answer to a failed deserializer is
UNKNOWN, the code of a server fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, cast

import grpc

from cruzflow.server import caller
from cruzflow.server.transport.api import SERVICE, WorkflowApi, malformed, refusal
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    code, message = refusal(exc)
    await context.abort(grpc.StatusCode[code], message)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


def _unary(handler: Callable[[Any], Any]) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        caller.PEER.set(context.peer() or "")
        try:
            return await handler(request)
        except Exception as exc:
            await _abort(context, exc)

    return unary


def _stream(handler: Callable[[Any], AsyncIterator[Any]]) -> Callable[..., Any]:
    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            async for response in handler(request):
                yield response
        except Exception as exc:
            await _abort(context, exc)

    return stream


class WorkflowServicer:
    """The generated servicer's methods (``CreateInstance``, ...), each the
    matching handler of ``api``."""

    def __init__(self, api: WorkflowApi) -> None:
        for method in SERVICE.methods:
            handler = getattr(api, method.name)
            adapt = _stream if method.server_streaming else _unary
            setattr(self, method.name, adapt(handler))


class _Malformed:
    """Stands for a request whose bytes did not parse as its message."""

    __slots__ = ("problem", "type_name")

    def __init__(self, type_name: str, problem: str) -> None:
        self.type_name = type_name
        self.problem = problem

    def message(self) -> str:
        return malformed(self.type_name, self.problem)


def _lenient(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # any parse failure is the caller's
            return _Malformed(type_name, str(exc))

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


def add_to_server(api: WorkflowApi, server: grpc.aio.Server) -> None:
    """Serve ``api`` on ``server``; malformed requests get INVALID_ARGUMENT."""
    registrar = _Registrar(server)
    servicer = cast(pb_grpc.WorkflowServiceServicer, WorkflowServicer(api))
    pb_grpc.add_WorkflowServiceServicer_to_server(servicer, cast(grpc.aio.Server, registrar))
    # Stubs from another grpcio-tools might register differently: fail loudly.
    if not registrar.registered:
        raise RuntimeError("the generated stubs did not register their method handlers")
