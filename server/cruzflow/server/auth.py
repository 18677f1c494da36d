"""Bearer-token authentication and authorisation, as a gRPC server interceptor.

Every call to the workflow service must carry ``authorization: Bearer
<token>`` with a token of the config's ``[[auth.tokens]]``. A token may be
limited to the read methods, and to the instances of named workflows.

What the interceptor answers:

* no token, or one that matches none: ``UNAUTHENTICATED``;
* a read-only token on a method that changes something: ``PERMISSION_DENIED``;
* a workflow-limited token creating or listing instances of another workflow
  (or listing without naming a workflow): ``PERMISSION_DENIED``, naming the
  workflows it may use;
* a workflow-limited token naming an instance of another workflow:
  ``NOT_FOUND``, worded as for an instance that does not exist. Instance ids
  are chosen by callers ("onboarding-user-42"), so telling "exists, but not
  yours" from "does not exist" would let a limited token probe the other
  workflows' instances; such a token sees the server as if it held only its
  workflows' instances.

The health service is always open (probes carry no token); reflection is
open when the config says so. Tokens are compared as SHA-256 digests with
``hmac.compare_digest``, against every configured token each time, so the
time a check takes does not depend on how much of a token was right. No
token, digest or file content is ever put in a log record, a span or an
error message: only the token's ``name``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from opentelemetry import trace

# A workflow-limited token gets the engine's words for an unknown id for another
# workflow's instance too, so ids cannot be probed.
from cruzflow.server.engine.core import not_found_message
from cruzflow.v1 import workflows_pb2 as pb

log = logging.getLogger("cruzflow.auth")

SERVICE = "/" + pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name + "/"
READ_METHODS = frozenset(
    {"GetStatus", "WatchInstance", "WaitInstance", "ListInstances", "ListWorkflows"}
)
"""What a token with ``access = "read"`` may call: nothing it does changes an instance."""
_INSTANCE_METHODS = frozenset(
    {
        "GetStatus",
        "WatchInstance",
        "WaitInstance",
        "PauseInstance",
        "ResumeInstance",
        "TerminateInstance",
        "RestartInstance",
        "SendEvent",
    }
)
_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = "/grpc.reflection."

TOKEN_ATTRIBUTE = "cruzflow.auth.token"
"""Span attribute holding the name (never the value) of the token a call was made with."""
INTERNAL_NAME = "(this server)"
"""The name of the token the server's own bindings call it with; config names cannot
contain parentheses or spaces, so it is never mistaken for one of them."""

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token; send 'authorization: Bearer <token>'"


def digest(token: str) -> bytes:
    """What is kept of a token: its SHA-256, compared in constant time."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class TokenRule:
    """One accepted token: its name, its digest, and what it may do."""

    name: str
    digest: bytes = field(repr=False)
    read_only: bool = False
    workflows: frozenset[str] | None = None
    """The workflows whose instances it may see and change; None: all of them."""

    def allows(self, workflow: str) -> bool:
        return self.workflows is None or workflow in self.workflows

    def allowed(self) -> str:
        return ", ".join(sorted(self.workflows or ()))


class Refusal(Exception):
    """Raised by an instance lookup to answer the call with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


InstanceLookup = Callable[[str], Awaitable[str | None]]
"""The workflow of an instance, by id; None when there is no such instance.
May raise :class:`Refusal` (a malformed id, a store that cannot read)."""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call; see the module's docstring.

    ``lookup`` finds an instance's workflow, for the tokens limited to named
    workflows (the only ones that cost a read per call).
    """

    def __init__(
        self,
        tokens: Sequence[TokenRule],
        lookup: InstanceLookup,
        *,
        open_reflection: bool = True,
    ) -> None:
        if not tokens:
            raise ValueError("AuthInterceptor needs at least one token")
        self._tokens = tuple(tokens)
        self._lookup = lookup
        self._open_reflection = open_reflection

    def match(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> TokenRule | None:
        """The rule of the bearer token in ``metadata``, or None."""
        presented = _bearer(metadata)
        if presented is None:
            return None
        given = digest(presented)
        found: TokenRule | None = None
        # Every rule is compared, whatever matched before: the loop takes the
        # same time for a right token as for a wrong one. Config loading makes
        # sure no two rules share a token, so at most one matches.
        for rule in self._tokens:
            if hmac.compare_digest(given, rule.digest):
                found = rule
        return found

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method or ""
        if method.startswith(_HEALTH) or (self._open_reflection and method.startswith(_REFLECTION)):
            return await continuation(handler_call_details)
        rule = self.match(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if rule is None:
            return _refusing(
                handler, method, None, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE
            )
        if handler is None:
            return handler  # an unknown method: gRPC answers UNIMPLEMENTED
        if not method.startswith(SERVICE):
            # Reflection (when not open): any valid token may describe the API.
            return _wrap(handler, _named(rule))
        name = method[len(SERVICE) :]
        if rule.read_only and name not in READ_METHODS:
            return _refusing(
                handler,
                method,
                rule,
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {rule.name!r} is read-only; {name} changes instances, so it needs a "
                f'token with access = "write"',
            )
        if rule.workflows is None:
            return _wrap(handler, _named(rule))
        if name not in _SCOPED:
            # A method this module does not know how to limit to workflows:
            # refused rather than let through unchecked.
            return _refusing(
                handler,
                method,
                rule,
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {rule.name!r} is limited to workflows {rule.allowed()}; {name} "
                f"cannot be limited so and needs a token without workflows",
            )
        return _wrap(handler, _scoped(rule, method, self._lookup))


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
        return None  # the first authorization header decides
    return None


async def _deny(
    context: grpc.aio.ServicerContext[Any, Any],
    method: str,
    rule: TokenRule | None,
    code: grpc.StatusCode,
    message: str,
) -> NoReturn:
    """End the call with ``code``; logged (at INFO: a refusal is the caller's
    fault, but repeated ones are worth seeing) with the caller's address."""
    # Messages are built from names, ids and methods only: never a token.
    log.info(
        "refused %s from %s (token %s): %s: %s",
        method,
        context.peer(),
        "none" if rule is None else repr(rule.name),
        code.name,
        message,
    )
    await context.abort(code, message)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


def _annotate(rule: TokenRule | None) -> None:
    # The telemetry interceptor runs outside this one, so its server span is
    # current here; refused calls keep the status it records.
    if rule is not None:
        trace.get_current_span().set_attribute(TOKEN_ATTRIBUTE, rule.name)


# ------------------------------------------------------------- behaviours

Behavior = Callable[..., Any]
Wrapper = Callable[[Behavior, bool], Behavior]


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], wrapper: Wrapper
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour passed through ``wrapper`` (as the
    OpenTelemetry instrumentation wraps it: the same kind of handler, the same
    (de)serialisers)."""
    factory: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    assert behavior is not None
    return factory(
        wrapper(behavior, handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusing(
    handler: grpc.RpcMethodHandler[Any, Any] | None,
    method: str,
    rule: TokenRule | None,
    code: grpc.StatusCode,
    message: str,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that refuses the call."""

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        _annotate(rule)
        await _deny(context, method, rule, code, message)

    def wrapper(behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:

            async def refuse_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await refuse(context)
                yield  # pragma: no cover - makes this an async generator

            return refuse_stream

        async def refuse_unary(request: Any, context: Any) -> Any:
            await refuse(context)

        return refuse_unary

    if handler is None:
        # An unknown method and no valid token: refuse it like any other call
        # rather than tell an unauthenticated caller which methods exist.
        return grpc.unary_unary_rpc_method_handler(wrapper(_unused, False))
    return _wrap(handler, wrapper)


async def _unused(request: Any, context: Any) -> None:  # pragma: no cover
    raise AssertionError("never called")


def _named(rule: TokenRule) -> Wrapper:
    """A wrapper that only records which token the call was made with."""

    def wrapper(behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                _annotate(rule)
                async for response in behavior(request, context):
                    yield response

            return stream

        async def unary(request: Any, context: Any) -> Any:
            _annotate(rule)
            return await behavior(request, context)

        return unary

    return wrapper


# ---------------------------------------------------------- per workflow


async def _check_instance(
    rule: TokenRule, method: str, instance_id: str, lookup: InstanceLookup, context: Any
) -> None:
    try:
        workflow = await lookup(instance_id)
    except Refusal as exc:
        await context.abort(exc.code, exc.message)
        return  # pragma: no cover - abort raises
    if workflow is None:
        await context.abort(grpc.StatusCode.NOT_FOUND, not_found_message(instance_id))
    elif not rule.allows(workflow):
        # Deliberately the answer for an id that does not exist: see the
        # module's docstring. Only the log says what happened.
        await _deny(
            context, method, rule, grpc.StatusCode.NOT_FOUND, not_found_message(instance_id)
        )


async def _check_request(
    rule: TokenRule, method: str, request: Any, lookup: InstanceLookup, context: Any
) -> None:
    name = method[len(SERVICE) :]
    if name in _INSTANCE_METHODS:
        await _check_instance(rule, method, request.instance_id, lookup, context)
        return
    if name == "CreateInstance":
        if not rule.allows(request.workflow):
            await _deny(
                context,
                method,
                rule,
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {rule.name!r} may only create instances of {rule.allowed()}; "
                f"not of {request.workflow!r}",
            )
        return
    if name == "CreateInstances":
        refused = [
            f"requests[{i}] ({item.workflow!r})"
            for i, item in enumerate(request.requests)
            if not rule.allows(item.workflow)
        ]
        if refused:
            await _deny(
                context,
                method,
                rule,
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {rule.name!r} may only create instances of {rule.allowed()}; "
                f"not {', '.join(refused[:10])}{' ...' if len(refused) > 10 else ''}",
            )
        return
    if name == "ListInstances" and not rule.allows(request.workflow):
        # A filter on the answer instead would break paging (a page token is
        # tied to the request's filters), so the caller names the workflow.
        what = f"not {request.workflow!r}" if request.workflow else "set workflow to one of them"
        await _deny(
            context,
            method,
            rule,
            grpc.StatusCode.PERMISSION_DENIED,
            f"token {rule.name!r} may only list instances of {rule.allowed()}; {what}",
        )


def _scoped(rule: TokenRule, method: str, lookup: InstanceLookup) -> Wrapper:
    """A wrapper that checks the request against the token's workflows first."""

    def wrapper(behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                _annotate(rule)
                await _check_request(rule, method, request, lookup, context)
                async for response in behavior(request, context):
                    yield response

            return stream

        async def unary(request: Any, context: Any) -> Any:
            _annotate(rule)
            await _check_request(rule, method, request, lookup, context)
            response = await behavior(request, context)
            if method.endswith("/ListWorkflows"):
                # Only the workflows the token may use, as if the server
                # hosted no others.
                kept = [w for w in response.workflows if rule.allows(w.name)]
                return pb.ListWorkflowsResponse(workflows=kept)
            return response

        return unary

    return wrapper


_SCOPED = _INSTANCE_METHODS | {
    "CreateInstance",
    "CreateInstances",
    "ListInstances",
    "ListWorkflows",
}
