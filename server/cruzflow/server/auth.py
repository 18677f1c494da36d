"""Bearer-token authentication and authorisation, for every transport.

Every call to the workflow service must carry ``authorization: Bearer
<token>`` with a token of the config's ``[[auth.tokens]]``. A token may be
limited to the read methods, and to the instances of named workflows.

What the gate answers (over gRPC and over HTTP alike):

* no token, or one that matches none: ``UNAUTHENTICATED``;
* a read-only token on a method that changes something: ``PERMISSION_DENIED``;
* a workflow-limited token creating, listing or counting instances of
  another workflow (or listing without naming a workflow):
  ``PERMISSION_DENIED``, naming the workflows it may use; counting without
  naming one counts its workflows' instances only;
* a workflow-limited token naming a schedule of another workflow, or an
  instance of another workflow:
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
from cruzflow.server import caller
from cruzflow.server.engine.core import not_found_message
from cruzflow.server.engine.reads import MAX_WATCHED
from cruzflow.v1 import workflows_pb2 as pb

log = logging.getLogger("cruzflow.auth")

SERVICE = "/" + pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name + "/"
READ_METHODS = frozenset(
    {
        "GetStatus",
        "WatchInstance",
        "WatchInstances",
        "WaitInstance",
        "ListInstances",
        "ListWorkflows",
        "CountInstances",
        "GetCaller",
        "GetSchedule",
        "ListSchedules",
    }
)
"""What a token with ``access = "read"`` may call: nothing it does changes an instance."""
_SCHEDULE_METHODS = frozenset(
    {"GetSchedule", "PauseSchedule", "ResumeSchedule", "DeleteSchedule", "TriggerSchedule"}
)
_INSTANCE_METHODS = frozenset(
    {
        "GetStatus",
        "WatchInstance",
        "WaitInstance",
        "PauseInstance",
        "ResumeInstance",
        "TerminateInstance",
        "RestartInstance",
        "RepairInstance",
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
    """A call refused: answered with the status ``code`` (named as gRPC names
    it: ``PERMISSION_DENIED``) and ``message``, on any transport."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


InstanceLookup = Callable[[str], Awaitable[str | None]]
"""The workflow of an instance, by id; None when there is no such instance.
May raise :class:`Refusal` (a malformed id, a store that cannot read). The
same for a schedule, by its id."""


class Gate:
    """Who may call what: the checks of the module's docstring, for any
    transport. ``lookup`` finds an instance's workflow, for the tokens limited
    to named workflows (the only ones that cost a read per call)."""

    def __init__(
        self,
        tokens: Sequence[TokenRule],
        lookup: InstanceLookup,
        schedule_lookup: InstanceLookup | None = None,
    ) -> None:
        if not tokens:
            raise ValueError("a Gate needs at least one token")
        self._tokens = tuple(tokens)
        self._lookup = lookup
        self._schedule_lookup = schedule_lookup

    def match(self, authorization: str | None) -> TokenRule | None:
        """The rule of the bearer token in an ``authorization`` header's value, or None."""
        presented = _bearer(authorization)
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

    def method(self, rule: TokenRule | None, name: str) -> None:
        """Raise :class:`Refusal` unless ``rule`` may call the service's method
        ``name`` at all (before its request is read)."""
        if rule is None:
            raise Refusal("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
        if rule.read_only and name not in READ_METHODS:
            raise Refusal(
                "PERMISSION_DENIED",
                f"token {rule.name!r} is read-only; {name} changes instances, so it needs a "
                f'token with access = "write"',
            )
        if rule.workflows is not None and name not in _SCOPED:
            # A method this module does not know how to limit to workflows:
            # refused rather than let through unchecked.
            raise Refusal(
                "PERMISSION_DENIED",
                f"token {rule.name!r} is limited to workflows {rule.allowed()}; {name} "
                f"cannot be limited so and needs a token without workflows",
            )

    async def request(self, rule: TokenRule, name: str, request: Any) -> None:
        """Raise :class:`Refusal` unless ``rule``'s workflows allow ``request``
        to the method ``name`` (which :meth:`method` let through)."""
        if rule.workflows is None:
            return
        if name in _INSTANCE_METHODS:
            await self._instance(rule, request.instance_id)
        elif name == "WatchInstances" and len(request.instances) <= MAX_WATCHED:
            # Each id as WatchInstance checks it, in the engine's words with the
            # item's index. Past the limit the engine refuses the call unread.
            for i, cursor in enumerate(request.instances):
                where = f"instances[{i}].instance_id"
                try:
                    await self._instance(rule, cursor.instance_id, where)
                except Refusal as bad:
                    if bad.code != "INVALID_ARGUMENT":
                        raise
                    problem = bad.message.partition(": ")[2]
                    raise Refusal(bad.code, f"{where}: {problem}") from None
        elif name in ("CreateInstance", "RunInstance"):
            workflow = request.workflow if name == "CreateInstance" else request.instance.workflow
            if not rule.allows(workflow):
                raise Refusal(
                    "PERMISSION_DENIED",
                    f"token {rule.name!r} may only create instances of {rule.allowed()}; "
                    f"not of {workflow!r}",
                )
        elif name == "CreateInstances":
            refused = [
                f"requests[{i}] ({item.workflow!r})"
                for i, item in enumerate(request.requests)
                if not rule.allows(item.workflow)
            ]
            if refused:
                raise Refusal(
                    "PERMISSION_DENIED",
                    f"token {rule.name!r} may only create instances of {rule.allowed()}; "
                    f"not {', '.join(refused[:10])}{' ...' if len(refused) > 10 else ''}",
                )
        elif name == "ListInstances" and not rule.allows(request.workflow):
            # A filter on the answer instead would break paging (a page token is
            # tied to the request's filters), so the caller names the workflow.
            what = (
                f"not {request.workflow!r}" if request.workflow else "set workflow to one of them"
            )
            raise Refusal(
                "PERMISSION_DENIED",
                f"token {rule.name!r} may only list instances of {rule.allowed()}; {what}",
            )
        elif name in _SCHEDULE_METHODS:
            await self._schedule(rule, request.schedule_id)
        elif name == "CreateSchedule" and not rule.allows(request.schedule.workflow):
            raise Refusal(
                "PERMISSION_DENIED",
                f"token {rule.name!r} may only schedule instances of {rule.allowed()}; "
                f"not of {request.schedule.workflow!r}",
            )
        elif name == "ListSchedules" and not rule.allows(request.workflow):
            what = (
                f"not {request.workflow!r}" if request.workflow else "set workflow to one of them"
            )
            raise Refusal(
                "PERMISSION_DENIED",
                f"token {rule.name!r} may only list schedules of {rule.allowed()}; {what}",
            )
        elif name == "CountInstances" and request.workflow and not rule.allows(request.workflow):
            # Without a workflow, the answer keeps only the token's (see response).
            raise Refusal(
                "PERMISSION_DENIED",
                f"token {rule.name!r} may only count instances of {rule.allowed()}; "
                f"not {request.workflow!r}",
            )

    async def _instance(
        self, rule: TokenRule, instance_id: str, field: str = "instance_id"
    ) -> None:
        workflow = await self._lookup(instance_id)
        if workflow is None:
            raise Refusal("NOT_FOUND", not_found_message(instance_id, field))
        if not rule.allows(workflow):
            # Deliberately the answer for an id that does not exist: see the
            # module's docstring. Only the log says what happened.
            raise _Hidden("NOT_FOUND", not_found_message(instance_id, field))

    async def _schedule(self, rule: TokenRule, schedule_id: str) -> None:
        missing = f"schedule_id: no schedule {schedule_id!r}; see ListSchedules for those there are"
        if self._schedule_lookup is None:
            raise _Hidden("NOT_FOUND", missing)
        workflow = await self._schedule_lookup(schedule_id)
        if workflow is None:
            raise Refusal("NOT_FOUND", missing)
        if not rule.allows(workflow):
            # As for an instance: another workflow's schedule does not exist for it.
            raise _Hidden("NOT_FOUND", missing)

    @staticmethod
    def response(rule: TokenRule, name: str, response: Any) -> Any:
        """``response`` as ``rule`` may see it, for every token (each transport
        passes every unary answer through here): GetCaller describes the token;
        for a token limited to workflows, ListWorkflows and CountInstances keep
        only its workflows, as if the server hosted no others."""
        if name == "GetCaller":
            return pb.GetCallerResponse(
                auth_required=True,
                token_name=rule.name,
                read_only=rule.read_only,
                workflows=sorted(rule.workflows or ()),
            )
        if rule.workflows is None:
            return response
        if name == "ListWorkflows":
            kept = [w for w in response.workflows if rule.allows(w.name)]
            return pb.ListWorkflowsResponse(workflows=kept)
        if name == "CountInstances":
            counts = [c for c in response.counts if rule.allows(c.workflow)]
            return pb.CountInstancesResponse(counts=counts, total=sum(c.count for c in counts))
        return response


class _Hidden(Refusal):
    """A refusal worded as another answer (another workflow's instance, as not
    found): logged as a refusal, unlike a real NOT_FOUND."""


def logged(refused: Refusal, method: str, peer: str, rule: TokenRule | None) -> bool:
    """Log ``refused`` (at INFO: a refusal is the caller's fault, but repeated
    ones are worth seeing) with the caller's address, unless it is an answer
    that is not a refusal (an instance that does not exist); True if logged."""
    if type(refused) is Refusal and refused.code == "NOT_FOUND":
        return False
    # Messages are built from names, ids and methods only: never a token.
    log.info(
        "refused %s from %s (token %s): %s: %s",
        method,
        peer,
        "none" if rule is None else repr(rule.name),
        refused.code,
        refused.message,
    )
    return True


def annotate(rule: TokenRule | None) -> None:
    """Record on the current span which token the call was made with, and for
    the handler (its audit entries: see caller.py)."""
    # The telemetry interceptor runs outside the auth one, so its server span
    # is current here; refused calls keep the status it records.
    if rule is not None:
        trace.get_current_span().set_attribute(TOKEN_ATTRIBUTE, rule.name)
        caller.TOKEN.set(rule.name)


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        return token
    return None


# ------------------------------------------------------------------- gRPC


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """The :class:`Gate`'s checks on every gRPC call; health is always open,
    reflection when ``open_reflection`` (else any valid token may use it)."""

    def __init__(self, gate: Gate, *, open_reflection: bool = True) -> None:
        self._gate = gate
        self._open_reflection = open_reflection

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
        rule = self._gate.match(_authorization(handler_call_details.invocation_metadata))
        handler = await continuation(handler_call_details)
        if handler is None:
            if rule is None:
                # An unknown method and no valid token: refuse it like any other
                # call rather than tell an unauthenticated caller which exist.
                refused = Refusal("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
                return _refusing(None, method, None, refused)
            return handler  # an unknown method: gRPC answers UNIMPLEMENTED
        if not method.startswith(SERVICE):
            # Reflection (when not open): any valid token may describe the API.
            if rule is None:
                refused = Refusal("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
                return _refusing(handler, method, None, refused)
            return _wrap(handler, _named(rule))
        name = method[len(SERVICE) :]
        try:
            self._gate.method(rule, name)
        except Refusal as refused:
            return _refusing(handler, method, rule, refused)
        assert rule is not None
        if rule.workflows is None:
            return _wrap(handler, _named(rule, name))
        return _wrap(handler, _scoped(self._gate, rule, method))


def _authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            # The first authorization header decides.
            return value if isinstance(value, str) else None
    return None


async def _deny(
    context: grpc.aio.ServicerContext[Any, Any],
    method: str,
    rule: TokenRule | None,
    refused: Refusal,
) -> NoReturn:
    """End the call with the refusal's code and message, logged."""
    logged(refused, method, context.peer(), rule)
    await context.abort(grpc.StatusCode[refused.code], refused.message)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


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
    refused: Refusal,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as ``handler`` that refuses the call."""

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        annotate(rule)
        await _deny(context, method, rule, refused)

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
        return grpc.unary_unary_rpc_method_handler(wrapper(_unused, False))
    return _wrap(handler, wrapper)


async def _unused(request: Any, context: Any) -> None:  # pragma: no cover
    raise AssertionError("never called")


def _named(rule: TokenRule, name: str | None = None) -> Wrapper:
    """A wrapper that records which token the call was made with and, for the
    service's method ``name``, answers as the token may see it."""

    def wrapper(behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                annotate(rule)
                async for response in behavior(request, context):
                    yield response

            return stream

        async def unary(request: Any, context: Any) -> Any:
            annotate(rule)
            response = await behavior(request, context)
            return response if name is None else Gate.response(rule, name, response)

        return unary

    return wrapper


def _scoped(gate: Gate, rule: TokenRule, method: str) -> Wrapper:
    """A wrapper that checks the request against the token's workflows first."""
    name = method[len(SERVICE) :]

    async def check(request: Any, context: Any) -> None:
        annotate(rule)
        try:
            await gate.request(rule, name, request)
        except Refusal as refused:
            await _deny(context, method, rule, refused)

    def wrapper(behavior: Behavior, streaming: bool) -> Behavior:
        if streaming:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await check(request, context)
                async for response in behavior(request, context):
                    yield response

            return stream

        async def unary(request: Any, context: Any) -> Any:
            await check(request, context)
            return gate.response(rule, name, await behavior(request, context))

        return unary

    return wrapper


_SCOPED = (
    _INSTANCE_METHODS
    | _SCHEDULE_METHODS
    | {
        "WatchInstances",
        "CreateSchedule",
        "ListSchedules",
        "CreateInstance",
        "CreateInstances",
        "RunInstance",
        "ListInstances",
        "ListWorkflows",
        "CountInstances",
        "GetCaller",
    }
)
