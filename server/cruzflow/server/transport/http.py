"""The WorkflowService over HTTP: the Connect protocol (JSON or binary
protobuf, unary and server streams; gRPC-Web too), served by the
``connectrpc`` library on an ASGI server, plus two routes in the shape of the
seed's Worker (``POST /workflows/{name}/trigger``, ``GET
/workflows/{name}/status/{id}``).

Nothing here decides anything about a call: the handlers are those of
``api.WorkflowApi``, the token checks those of ``auth.Gate``, and a refusal
is answered with the code and message ``api.refusal`` gives it, so a call
gets the same answer over HTTP as over gRPC. The convenience routes are
forwarded, as Connect calls, to the same application: they pass the same
checks, limits and spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec
from connectrpc.errors import ConnectError
from connectrpc.interceptor import Interceptor
from connectrpc.request import RequestContext
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from cruzflow.server import auth, caller
from cruzflow.server.engine import validate
from cruzflow.server.records import InstanceStatus
from cruzflow.server.transport.api import SERVICE, WorkflowApi, malformed, refusal
from cruzflow.server.transport.console import Console
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1.workflows_connect import WorkflowServiceASGIApplication

ASGIApp = Callable[
    [dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]

_RULE: contextvars.ContextVar[auth.TokenRule | None] = contextvars.ContextVar(
    "cruzflow_http_token", default=None
)
"""The token rule of the call being served (set before its request is read)."""


CORS_REQUEST_HEADERS = [
    "authorization",
    "content-type",
    "connect-protocol-version",
    "connect-timeout-ms",
    "grpc-timeout",
    "x-grpc-web",
    "x-user-agent",
    "traceparent",
    "tracestate",
]
"""What a browser may send cross-origin: Connect's and gRPC-Web's headers,
the bearer token, and the caller's trace context."""
CORS_RESPONSE_HEADERS = ["grpc-status", "grpc-message", "grpc-status-details-bin"]
"""What a page may read of an answer: gRPC-Web's status headers."""


def _error(code: str, message: str) -> ConnectError:
    return ConnectError(Code[code], message)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# ------------------------------------------------------------------ codecs


class _Json(Codec[Message, Any]):
    """The proto JSON mapping, compact (the library's default indents every
    answer), refusing a body that is not a message of its method with the
    words gRPC's servicer uses."""

    def name(self) -> str:
        return "json"

    def encode(self, message: Message) -> bytes:
        return json.dumps(
            json_format.MessageToDict(message), separators=(",", ":"), ensure_ascii=False
        ).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        message = message_class()
        try:
            json_format.Parse(bytes(data), message, ignore_unknown_fields=False)
        except Exception as exc:  # any parse failure is the caller's
            raise _error(
                "INVALID_ARGUMENT",
                malformed(message.DESCRIPTOR.full_name, str(exc), json=True),
            ) from None
        return message


class _Proto(Codec[Message, Any]):
    """Binary protobuf; a body that does not parse gets INVALID_ARGUMENT."""

    _inner = google_protobuf_binary_codec()

    def name(self) -> str:
        return "proto"

    def encode(self, message: Message) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self._inner.decode(data, message_class)
        except Exception as exc:
            name = message_class.DESCRIPTOR.full_name
            raise _error("INVALID_ARGUMENT", malformed(name, str(exc))) from None


# ---------------------------------------------------------------- handlers


def _translate(exc: Exception) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    code, message = refusal(exc)
    return _error(code, message)


class _Service:
    """The generated Connect service's methods (``create_instance``, ...),
    each the matching handler of ``api``, with the gate's request checks."""

    def __init__(self, api: WorkflowApi, gate: auth.Gate | None) -> None:
        for method in SERVICE.methods:
            handler = getattr(api, method.name)
            make = self._stream if method.server_streaming else self._unary
            setattr(self, _snake(method.name), make(method.name, handler, gate))

    @staticmethod
    def _unary(
        name: str, handler: Callable[[Any], Awaitable[Any]], gate: auth.Gate | None
    ) -> Callable[[Any, RequestContext[Any, Any]], Awaitable[Any]]:
        async def unary(request: Any, ctx: RequestContext[Any, Any]) -> Any:
            caller.PEER.set(ctx.client_address or "")
            try:
                if gate is not None:
                    rule = _rule()
                    caller.TOKEN.set(rule.name)
                    await _checked(gate, rule, name, request, ctx)
                    return gate.response(rule, name, await handler(request))
                return await handler(request)
            except Exception as exc:
                raise _translate(exc) from None

        return unary

    @staticmethod
    def _stream(
        name: str, handler: Callable[[Any], AsyncIterator[Any]], gate: auth.Gate | None
    ) -> Callable[[Any, RequestContext[Any, Any]], AsyncIterator[Any]]:
        async def stream(request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                if gate is not None:
                    await _checked(gate, _rule(), name, request, ctx)
                async for response in handler(request):
                    yield response
            except Exception as exc:
                raise _translate(exc) from None

        return stream


def _rule() -> auth.TokenRule:
    """The call's token rule, which ``_Auth`` set before the request was read.
    Fail closed: a call that reaches a handler without one is refused."""
    rule = _RULE.get()
    if rule is None:
        raise _error("UNAUTHENTICATED", auth.UNAUTHENTICATED_MESSAGE)
    return rule


async def _checked(
    gate: auth.Gate, rule: auth.TokenRule, name: str, request: Any, ctx: RequestContext[Any, Any]
) -> None:
    try:
        await gate.request(rule, name, request)
    except auth.Refusal as refused:
        auth.logged(refused, _method(ctx), ctx.client_address or "?", rule)
        raise _error(refused.code, refused.message) from None


def _method(ctx: RequestContext[Any, Any]) -> str:
    return f"/{ctx.method.service_name}/{ctx.method.name}"


class _Auth:
    """The gate's token and method checks, before the request is read."""

    def __init__(self, gate: auth.Gate) -> None:
        self._gate = gate

    async def on_start(self, ctx: RequestContext[Any, Any]) -> None:
        rule = self._gate.match(ctx.request_headers.get("authorization"))
        # The server span (when rpc_spans makes one) names the token, refused or not.
        auth.annotate(rule)
        try:
            self._gate.method(rule, ctx.method.name)
        except auth.Refusal as refused:
            auth.logged(refused, _method(ctx), ctx.client_address or "?", rule)
            raise _error(refused.code, refused.message) from None
        _RULE.set(rule)

    async def on_end(
        self, token: None, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        return None


class _InFlight:
    """At most ``limit`` calls in flight (streams included), as gRPC's
    ``maximum_concurrent_rpcs``: past it a call is refused at once."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.count = 0

    async def on_start(self, ctx: RequestContext[Any, Any]) -> bool:
        if self.count >= self._limit:
            raise _error(
                "RESOURCE_EXHAUSTED",
                f"the server has {self._limit} calls in flight (limits.max_concurrent_rpcs); "
                f"retry shortly",
            )
        self.count += 1
        return True

    async def on_end(
        self, token: bool, ctx: RequestContext[Any, Any], error: Exception | None
    ) -> None:
        if token:
            self.count -= 1


def connect_app(
    api: WorkflowApi,
    gate: auth.Gate | None,
    *,
    max_in_flight: int,
    read_max_bytes: int,
    telemetry: Sequence[Interceptor] = (),
) -> WorkflowServiceASGIApplication:
    """The service as a Connect ASGI application. ``telemetry``: interceptors
    that make spans (outermost, so refused calls get theirs)."""
    interceptors: list[Any] = [_InFlight(max_in_flight), *telemetry]
    if gate is not None:
        interceptors.append(_Auth(gate))
    return WorkflowServiceASGIApplication(
        cast(Any, _Service(api, gate)),
        interceptors=interceptors,
        read_max_bytes=read_max_bytes,
        codecs=[_Proto(), _Json()],
    )


# --------------------------------------------------- the seed's two routes

_TRIGGER = re.compile(r"^/workflows/([^/]+)/trigger$")
_STATUS = re.compile(r"^/workflows/([^/]+)/status/([^/]+)$")
_SERVICE_PATH = f"/{SERVICE.full_name}/"


def status_word(status: int) -> str:
    """A status as Cloudflare's ``instance.status()`` spells it (``running``);
    the proto's numbers are the engine's."""
    try:
        return InstanceStatus(status).label
    except ValueError:
        return InstanceStatus.UNKNOWN.label


class _TooLarge(Exception):
    """A body past the listener's limit."""


class HttpApp:
    """The ASGI application of the HTTP listener: Connect under
    ``/cruzflow.v1.WorkflowService/``, the seed's two routes under
    ``/workflows/``, ``GET /healthz`` for load balancers and probes
    (open, like gRPC's health service: 200 while ``serving()``, else 503),
    and the web ``console`` at ``/`` when given; anything else is a 404.
    ``read_max_bytes``: the largest body a route reads (as the Connect
    application's)."""

    def __init__(
        self,
        connect: ASGIApp,
        read_max_bytes: int,
        serving: Callable[[], bool] = lambda: True,
        gate: auth.Gate | None = None,
        console: Console | None = None,
    ) -> None:
        self._connect = connect
        self._read_max_bytes = read_max_bytes
        self._serving = serving
        self._gate = gate
        self._console = console

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            return  # HttpListener runs uvicorn with lifespan off, and no websockets
        path: str = scope["path"]
        if path.startswith(_SERVICE_PATH):
            refused = _unserved(path[len(_SERVICE_PATH) :], scope, self._gate)
            if refused is None:
                await self._connect(scope, receive, send)
            else:
                await _send_json(send, *refused)
            return
        if (match := _TRIGGER.match(path)) is not None:
            await self._route(scope, receive, send, "POST", self._trigger, match.groups())
            return
        if (match := _STATUS.match(path)) is not None:
            await self._route(scope, receive, send, "GET", self._status, match.groups())
            return
        if path == "/healthz" and scope["method"] in ("GET", "HEAD"):
            serving = self._serving()
            status = "SERVING" if serving else "NOT_SERVING"
            await _send_json(send, 200 if serving else 503, {"status": status})
            return
        if self._console is not None and self._console.serves(path):
            await self._console(scope, send)
            return
        await _send_json(
            send,
            404,
            {
                "code": "not_found",
                "message": f"no route {path}; the API is at {_SERVICE_PATH}<Method> (Connect), "
                f"and POST /workflows/<name>/trigger, GET /workflows/<name>/status/<id>, "
                f"GET /healthz{'; the web console is at GET /' if self._console else ''}",
            },
        )

    async def _route(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
        method: str,
        handler: Callable[..., Awaitable[None]],
        parts: tuple[str, ...],
    ) -> None:
        if scope["method"] != method:
            await _send_json(
                send,
                405,
                {"code": "unimplemented", "message": f"{scope['path']} answers {method} only"},
                [(b"allow", method.encode())],
            )
            return
        try:
            body = await self._body(scope, receive)
        except _TooLarge:
            await _send_json(
                send,
                429,
                {
                    "code": "resource_exhausted",
                    "message": f"the body is larger than {self._read_max_bytes} bytes, the "
                    f"most this server reads (about twice limits.max_payload_bytes)",
                },
            )
            return
        await handler(scope, send, body, *parts)

    async def _body(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]]) -> bytes:
        """The request's body, refused (``_TooLarge``) as soon as it is
        known to be past the limit: by its Content-Length, or as it comes."""
        limit = self._read_max_bytes
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
                raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _trigger(
        self,
        scope: dict[str, Any],
        send: Callable[[Any], Awaitable[None]],
        body: bytes,
        workflow: str,
    ) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            params = body.decode()
        except UnicodeDecodeError:
            await _send_json(
                send,
                400,
                {"code": "invalid_argument", "message": "params: the body is not UTF-8 JSON"},
            )
            return
        request = pb.CreateInstanceRequest(
            workflow=workflow,
            params_json=params,
            instance_id=query.get("id", [""])[0],
            lookup_key=query.get("lookupKey", [""])[0],
        )
        status, created = await self._call(scope, "CreateInstance", request)
        if isinstance(created, pb.CreateInstanceResponse):
            answer = {"id": created.instance_id, "status": status_word(created.status)}
            await _send_json(send, status, answer)
            return
        refused = cast(dict[str, Any], created)
        # Here the params are the body, not a field the caller named.
        message = str(refused.get("message", ""))
        if message.startswith("params_json:"):
            refused["message"] = "params (the request body):" + message[len("params_json:") :]
        await _send_json(send, status, refused)

    async def _status(
        self,
        scope: dict[str, Any],
        send: Callable[[Any], Awaitable[None]],
        body: bytes,
        workflow: str,
        instance_id: str,
    ) -> None:
        request = pb.GetStatusRequest(instance_id=instance_id)
        status, found = await self._call(scope, "GetStatus", request)
        if not isinstance(found, pb.GetStatusResponse):
            await _send_json(send, status, found)
            return
        instance = found.instance
        if instance.workflow != workflow:
            # Another workflow's instance, as for one that does not exist.
            message = validate.fit(f"workflow {workflow!r} has no instance {instance_id!r}")
            await _send_json(send, 404, {"code": "not_found", "message": message})
            return
        error = instance.error if instance.HasField("error") else None
        answer = {
            "id": instance.instance_id,
            "status": status_word(instance.status),
            "output": json.loads(instance.output_json) if instance.output_json else None,
            "error": None if error is None else {"name": error.name, "message": error.message},
        }
        await _send_json(send, status, answer)

    async def _call(
        self, scope: dict[str, Any], method: str, request: Message
    ) -> tuple[int, Message | dict[str, Any]]:
        """``request`` as a Connect call to ``method`` through the same
        application (its checks, limits and spans), in binary protobuf (the
        params are not escaped again): the HTTP status and the response
        message, or the Connect error's JSON body."""
        body = request.SerializeToString()
        headers = [
            (name, value)
            for name, value in scope.get("headers", ())
            if name.lower()
            not in (b"content-type", b"content-length", b"content-encoding", b"accept-encoding")
        ]
        headers += [
            (b"content-type", b"application/proto"),
            (b"content-length", str(len(body)).encode()),
        ]
        inner = {
            **scope,
            "method": "POST",
            "path": _SERVICE_PATH + method,
            "raw_path": (_SERVICE_PATH + method).encode(),
            "query_string": b"",
            "headers": headers,
        }
        sent = False

        async def inner_receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await _never()

        status = 500
        chunks: list[bytes] = []

        async def inner_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._connect(inner, inner_receive, inner_send)
        data = b"".join(chunks)
        if status == 200:
            output = message_factory.GetMessageClass(SERVICE.methods_by_name[method].output_type)
            return status, output.FromString(data)
        try:
            error = json.loads(data)
        except ValueError:
            error = None
        if not isinstance(error, dict):
            error = {"code": "internal", "message": "internal error: an unreadable answer"}
        return status, error


_CONTENT_TYPES = (
    "application/json",
    "application/proto",
    "application/connect+json",
    "application/connect+proto",
    "application/grpc",
    "application/grpc-web",
)


def _unserved(
    method: str, scope: dict[str, Any], gate: auth.Gate | None
) -> tuple[int, Any, list[tuple[bytes, bytes]]] | None:
    """The answer (status, JSON body, headers) to a call the Connect
    application would refuse with an empty body (an unknown method, a GET,
    a content type it does not speak); None for any other call. The status
    is the one Connect gives; the body says how to mend the call."""
    if method not in SERVICE.methods_by_name:
        if gate is not None and gate.match(_header(scope, b"authorization")) is None:
            # As over gRPC: no word of which methods exist without a token.
            return 401, {"code": "unauthenticated", "message": auth.UNAUTHENTICATED_MESSAGE}, []
        names = ", ".join(m.name for m in SERVICE.methods)
        return (
            404,
            {
                "code": "not_found",
                "message": f"no method {method!r} in {SERVICE.full_name}; its methods are {names}",
            },
            [],
        )
    if scope["method"] != "POST":
        return (
            405,
            {
                "code": "unimplemented",
                "message": f"{method} answers POST only, with the request in the body "
                f"(Content-Type: application/json or application/proto)",
            },
            [(b"allow", b"POST")],
        )
    content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if not content_type.startswith(_CONTENT_TYPES):
        return (
            415,
            {
                "code": "invalid_argument",
                "message": f"Content-Type {content_type or '(none)'!r} is not "
                f"one the API speaks; send application/json (the request as JSON) or "
                f"application/proto (with curl: -H 'Content-Type: application/json')",
            },
            [(b"accept-post", b"application/json, application/proto")],
        )
    return None


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _never() -> dict[str, Any]:
    """What a forwarded call receives after its body: it never disconnects."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _send_json(
    send: Callable[[Any], Awaitable[None]],
    status: int,
    answer: Any,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    body = json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- listener


class HttpListener:
    """Serves an ASGI application on a bound socket, in this event loop, with
    uvicorn and its zttp protocol: HTTP/1.1 and HTTP/2 on one port (HTTP/2
    by prior knowledge in plaintext, by ALPN with TLS). ``tls``: (certificate
    file, key file, client CA file or None)."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        *,
        tls: tuple[Path, Path, Path | None] | None = None,
    ) -> None:
        import uvicorn

        class _Embedded(uvicorn.Server):
            # The service owns SIGTERM and SIGINT: uvicorn must not take them.
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        settings: dict[str, Any] = {}
        if tls is not None:
            cert, key, client_ca = tls
            settings.update(ssl_certfile=str(cert), ssl_keyfile=str(key))
            if client_ca is not None:
                settings.update(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            app,
            http="zttp",
            http2=True,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # Watch streams last until their instance ends: a stop does not wait for them.
            timeout_graceful_shutdown=1,
            timeout_keep_alive=75,
            backlog=2048,
            **settings,
        )
        # uvicorn's own lines (started, shutting down) say nothing the
        # service's log does not; its errors and warnings still show.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _Embedded(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP listener stopped as it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(SystemExit):  # uvicorn's answer to a failed startup
            await self._task
        self._sock.close()
