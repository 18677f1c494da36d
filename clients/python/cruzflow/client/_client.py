"""The asynchronous client: ``Client``, ``WorkflowBinding`` and ``InstanceHandle``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

import grpc
from google.protobuf import json_format

from cruzflow.client import _convert
from cruzflow.client._retry import RetryPolicy, call_with_retry
from cruzflow.client._types import (
    CallerInfo,
    InstanceCounts,
    InstancePage,
    InstanceStatus,
    InstanceStatusInfo,
    RepairInfo,
    ScheduleInfo,
    WatchEvent,
    WorkflowInfo,
)
from cruzflow.client.errors import (
    CruzflowError,
    DeadlineExceeded,
    FailedPrecondition,
    InstanceAlreadyExists,
    InstanceNotFound,
    InvalidArgument,
    ResultTimeout,
    Unavailable,
    WorkflowFailed,
    WorkflowTerminated,
    from_rpc_error,
)
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

EXPORT_FORMAT = "cruzflow.instance/1"
"""The ``format`` of what ``InstanceHandle.export`` returns."""

if TYPE_CHECKING:
    from cruzflow.v1.workflows_pb2_grpc import WorkflowServiceAsyncStub

__all__ = ["Client", "InstanceHandle", "NewInstance", "WorkflowBinding"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

DEFAULT_TARGET = "127.0.0.1:50051"

_DEFAULT_RETRY = RetryPolicy()
# Watches and waits outlive a server restart: up to 30 failed reconnections
# in a row (about 50 s of trying) before they give up.
_DEFAULT_RECONNECT = RetryPolicy(max_attempts=30, max_backoff=2.0)

# How long one WaitInstance long-poll may last on the server; result() polls
# again until the instance is final or its own timeout passes. Short enough
# for proxies that cut idle calls.
_LONG_POLL = 30.0

_CHANNEL_OPTIONS: dict[str, Any] = {
    # The server bounds its replies (a page of listings may hold many 1 MiB
    # payloads); gRPC's 4 MiB default would refuse a legitimate answer.
    "grpc.max_receive_message_length": -1,
    # gRPC's reconnect backoff grows to 120 s by default, so a client would
    # notice a restarted server minutes late; ours retries itself.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
}

_PAUSED = (InstanceStatus.PAUSED, InstanceStatus.WAITING_FOR_PAUSE)
# repair()'s output when none is given (None is an output: JSON null).
_NO_OUTPUT: Any = object()


@dataclass(frozen=True, slots=True)
class NewInstance:
    """One instance to create with ``WorkflowBinding.create_batch``.

    A mapping with the same keys (``{"params": ..., "id": ...}``) works too.
    """

    params: Any = None
    id: str | None = None
    lookup_key: str | None = None
    priority: int = 0
    """Among instances waiting for a slot of the workflow's concurrency limit,
    higher starts first."""
    concurrency_key: str | None = None
    """The concurrency key to take a slot of, instead of the one the config's
    ``concurrency_key`` path finds in the params."""


def _check_timeout(timeout: float | None, what: str = "timeout") -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InvalidArgument(
            f"{what}: must be a number of seconds over 0, or None; got {timeout!r}"
        )
    return float(timeout)


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what}: must be a non-empty string, got {value!r}")
    return value


class Client:
    """An asynchronous client of a cruzflow server.

    ::

        async with Client("127.0.0.1:50051") as client:
            onboarding = client.workflow("onboarding-workflow")
            instance = await onboarding.create({"userId": "42"}, id="onboarding-42")
            print(await instance.result(timeout=60))

    ``timeout`` is the deadline of each call in seconds (``None``: none); every
    method takes a ``timeout=`` of its own that overrides it. ``retry`` says
    how calls that are safe to repeat are retried (``None``: never):

    * reads (``status``, ``get``, ``list_*``, ``count_instances``, ``caller``,
      ``get_schedule``) always, and ``pause_schedule``, ``resume_schedule``;
    * ``create`` and ``create_batch`` only when every instance has an ``id``
      (a lost answer to a create without one may hide an instance that was
      stored; it is never retried). An ``ALREADY_EXISTS`` answer to such a
      retry is taken as success when the instance found has the same
      workflow, params and lookup key;
    * ``pause``, ``resume`` and ``terminate``; a ``FAILED_PRECONDITION``
      answer to a retry is taken as success when the instance is already
      where the call would have put it (paused, no longer paused,
      terminated);
    * never ``restart`` nor ``send_event``: a repeat would restart the
      instance again or deliver the event twice.

    A call that is never retried waits for the channel to connect, up to its
    timeout, instead of failing at once while the server restarts; it is sent
    only once connected, so it cannot happen twice. It raises
    :class:`Unavailable` if no connection was made in time.

    ``reconnect`` is the policy of ``InstanceHandle.watch`` and
    ``InstanceHandle.result``/``wait``, which outlive server restarts; by
    default they give up after 30 failed reconnections in a row. ``metadata``
    is sent with every call; ``token`` adds ``authorization: Bearer <token>``.
    ``credentials`` (``grpc.ssl_channel_credentials(...)``) makes the channel
    secure. ``channel_options`` are gRPC channel arguments, over the client's
    own defaults.

    Use a client within one event loop; ``close()`` it (or use ``async with``)
    when done.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 10.0,
        retry: RetryPolicy | None = _DEFAULT_RETRY,
        reconnect: RetryPolicy | None = _DEFAULT_RECONNECT,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._target = _check_text(target, "target")
        self.timeout = _check_timeout(timeout)
        for name, policy in (("retry", retry), ("reconnect", reconnect)):
            if policy is not None and not isinstance(policy, RetryPolicy):
                raise InvalidArgument(f"{name}: must be a RetryPolicy or None, got {policy!r}")
        self.retry = retry
        self.reconnect = reconnect
        pairs = list(metadata)
        for pair in pairs:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(part, str) for part in pair)
            ):
                raise InvalidArgument(f"metadata: expected (key, value) string pairs, got {pair!r}")
        if token is not None:
            pairs.append(("authorization", f"Bearer {_check_text(token, 'token')}"))
        self._metadata = tuple(pairs)
        self._credentials = credentials
        self._options = list({**_CHANNEL_OPTIONS, **dict(channel_options)}.items())
        self._channel: grpc.aio.Channel | None = None
        self._owns_channel = True
        self._stub: WorkflowServiceAsyncStub | None = None
        self._closed = False

    @classmethod
    def from_channel(
        cls,
        channel: grpc.aio.Channel,
        *,
        timeout: float | None = 10.0,
        retry: RetryPolicy | None = _DEFAULT_RETRY,
        reconnect: RetryPolicy | None = _DEFAULT_RECONNECT,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
    ) -> Self:
        """A client on a channel of the caller's; ``close()`` leaves the channel open."""
        client = cls(
            timeout=timeout, retry=retry, reconnect=reconnect, metadata=metadata, token=token
        )
        client._channel = channel
        client._owns_channel = False
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (unless it was given to ``from_channel``); calls in
        flight are cancelled. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        if self._channel is not None and self._owns_channel:
            await self._channel.close()

    def __repr__(self) -> str:
        return f"Client({self._target!r})" if self._owns_channel else "Client(<channel>)"

    # ------------------------------------------------------------ handles
    def workflow(self, name: str) -> WorkflowBinding:
        """The binding of the workflow ``name`` (no call is made)."""
        return WorkflowBinding(self, _check_text(name, "workflow"))

    def instance(self, id: str) -> InstanceHandle:
        """A handle on the instance ``id`` (no call is made; see ``WorkflowBinding.get``)."""
        return InstanceHandle(self, _check_text(id, "instance_id"))

    def watch_many(
        self,
        instances: Mapping[str, int] | Iterable[str | InstanceHandle | tuple[str, int]],
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[WatchEvent, None]:
        """Every event of several instances (up to 1,000), as they happen, in
        one stream (WatchInstances), ending once every one has reached a final
        status. Those of each instance come in order; the instances' events
        interleave as they happen.

        ``instances`` are ids or handles (followed from their first event), or
        ``(id, after_sequence)`` pairs or a mapping of id to the sequence to
        resume after. A stream cut by the network or a server stop or restart
        is opened again with each instance's last sequence received, so no
        event is missed or repeated (as ``InstanceHandle.watch``); it gives up
        (raising :class:`Unavailable`) after ``Client(reconnect=...)`` attempts
        in a row that brought no event. ``timeout`` bounds the whole watch
        (:class:`DeadlineExceeded`). To stop early, ``break`` out of
        ``async with contextlib.aclosing(...)`` so the stream is closed at once.
        """
        return self._watch_many(_cursors(instances), _check_timeout(timeout))

    async def _watch_many(
        self, lasts: dict[str, int], limit: float | None
    ) -> AsyncGenerator[WatchEvent, None]:
        policy = self.reconnect
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        failures = 0
        while lasts:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(
                    f"watch of {len(lasts)} instances ended by its timeout before their end",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            call = self._rpc().WatchInstances(
                pb.WatchInstancesRequest(
                    instances=[
                        pb.WatchCursor(instance_id=instance_id, after_sequence=last)
                        for instance_id, last in lasts.items()
                    ]
                ),
                timeout=remaining,
                metadata=self._metadata,
            )
            try:
                async for message in call:
                    for item in message.events:
                        last = lasts.get(item.instance_id)
                        if last is None or item.sequence <= last:
                            continue
                        event = _convert.event(item)
                        failures = 0
                        if event.is_final:
                            # Ended: a reconnection no longer asks for it (it may
                            # be purged by then).
                            del lasts[event.instance_id]
                        else:
                            lasts[event.instance_id] = event.sequence
                        yield event
                return
            except asyncio.CancelledError:
                self._raise_if_closed_under(None)
                raise
            except grpc.aio.AioRpcError as exc:
                failures += 1
                if policy is None or self._closed or not policy.retries(exc.code(), failures):
                    raise from_rpc_error(exc, None) from exc
            finally:
                call.cancel()
            pause = policy.backoff(failures)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - loop.time()))
            await asyncio.sleep(pause)

    # -------------------------------------------------------------- reads
    async def list_workflows(self, *, timeout: float | None = None) -> list[WorkflowInfo]:
        """The workflows the server hosts."""
        response = await self._unary(
            self._rpc().ListWorkflows,
            pb.ListWorkflowsRequest(),
            timeout=self._deadline(timeout),
            retry=self.retry,
        )
        return [_convert.workflow(w) for w in response.workflows]

    async def list_instances_page(
        self,
        *,
        workflow: str | None = None,
        status: InstanceStatus | str | Iterable[InstanceStatus | str] | None = None,
        create_time_min: datetime | None = None,
        create_time_max: datetime | None = None,
        lookup_key: str | None = None,
        parent_id: str | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
        schedule_id: str | None = None,
    ) -> InstancePage:
        """One page of instances, newest first, without their steps.

        Each filter narrows: ``workflow`` by name, ``status`` one status or
        several, ``create_time_min`` (inclusive) and ``create_time_max``
        (exclusive) aware datetimes, ``lookup_key`` the key given at creation,
        ``parent_id`` the instance whose ``step.child`` started them,
        ``schedule_id`` the schedule that created them. ``page_size`` is 1 to
        1000 (the server's default, 100, when ``None``).
        Pass the page's ``next_page_token`` back, with the same filters, for
        the next page.
        """
        request = pb.ListInstancesRequest(
            workflow=workflow or "",
            statuses=[_convert.status_to_pb(s) for s in _statuses(status)],
            lookup_key=lookup_key or "",
            page_size=page_size or 0,
            page_token=page_token or "",
            parent_id=parent_id or "",
            schedule_id=schedule_id or "",
        )
        if create_time_min is not None:
            request.create_time_min.CopyFrom(_convert.timestamp(create_time_min))
        if create_time_max is not None:
            request.create_time_max.CopyFrom(_convert.timestamp(create_time_max))
        response = await self._unary(
            self._rpc().ListInstances, request, timeout=self._deadline(timeout), retry=self.retry
        )
        return InstancePage(_convert.instances(response.instances), response.next_page_token)

    async def list_instances(
        self,
        *,
        workflow: str | None = None,
        status: InstanceStatus | str | Iterable[InstanceStatus | str] | None = None,
        create_time_min: datetime | None = None,
        create_time_max: datetime | None = None,
        lookup_key: str | None = None,
        parent_id: str | None = None,
        page_size: int | None = None,
        timeout: float | None = None,
        schedule_id: str | None = None,
    ) -> AsyncGenerator[InstanceStatusInfo, None]:
        """Every instance that matches the filters (see ``list_instances_page``),
        newest first, fetching page after page as the iteration goes on."""
        token: str | None = None
        while True:
            page = await self.list_instances_page(
                workflow=workflow,
                status=status,
                create_time_min=create_time_min,
                create_time_max=create_time_max,
                lookup_key=lookup_key,
                parent_id=parent_id,
                page_size=page_size,
                page_token=token,
                timeout=timeout,
                schedule_id=schedule_id,
            )
            for info in page.instances:
                yield info
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def count_instances(
        self,
        *,
        workflow: str | None = None,
        create_time_min: datetime | None = None,
        create_time_max: datetime | None = None,
        lookup_key: str | None = None,
        timeout: float | None = None,
    ) -> InstanceCounts:
        """How many instances there are per workflow and status, in one call;
        the filters are ``list_instances_page``'s, but the status."""
        request = pb.CountInstancesRequest(workflow=workflow or "", lookup_key=lookup_key or "")
        if create_time_min is not None:
            request.create_time_min.CopyFrom(_convert.timestamp(create_time_min))
        if create_time_max is not None:
            request.create_time_max.CopyFrom(_convert.timestamp(create_time_max))
        response = await self._unary(
            self._rpc().CountInstances, request, timeout=self._deadline(timeout), retry=self.retry
        )
        return _convert.counts(response)

    async def caller(self, *, timeout: float | None = None) -> CallerInfo:
        """What this client's token may do: whether the server asks for one,
        its name, whether it is read-only, and which workflows it is limited to."""
        response = await self._unary(
            self._rpc().GetCaller,
            pb.GetCallerRequest(),
            timeout=self._deadline(timeout),
            retry=self.retry,
        )
        return _convert.caller(response)

    # ---------------------------------------------------------- schedules
    async def create_schedule(
        self,
        id: str,
        workflow: str,
        cron: str,
        *,
        params: Any = None,
        timezone: str = "UTC",
        catch_up: str = "once",
        paused: bool = False,
        timeout: float | None = None,
    ) -> ScheduleInfo:
        """Store a cron schedule: an instance of ``workflow`` with ``params`` at
        each due time of ``cron`` (five fields, or six with seconds first) in
        ``timezone``. ``catch_up`` says what happens to due times missed while
        no server ran: ``"once"`` fires the most recent, ``"skip"`` none. Not
        retried (a lost answer may hide a schedule that was stored)."""
        request = pb.CreateScheduleRequest(
            schedule=pb.Schedule(
                schedule_id=_check_text(id, "schedule_id"),
                workflow=_check_text(workflow, "workflow"),
                cron=cron,
                timezone=timezone,
                params_json=_convert.encode_json(params, "params"),
                catch_up=_convert.catch_up_to_pb(catch_up),
                paused=paused,
            )
        )
        response = await self._unary(
            self._rpc().CreateSchedule, request, timeout=self._deadline(timeout), retry=None
        )
        return _convert.schedule(response.schedule)

    async def get_schedule(self, id: str, *, timeout: float | None = None) -> ScheduleInfo:
        """The schedule ``id``, with its last and next due times."""
        response = await self._unary(
            self._rpc().GetSchedule,
            pb.GetScheduleRequest(schedule_id=_check_text(id, "schedule_id")),
            timeout=self._deadline(timeout),
            retry=self.retry,
        )
        return _convert.schedule(response.schedule)

    async def list_schedules(
        self, *, workflow: str | None = None, timeout: float | None = None
    ) -> list[ScheduleInfo]:
        """Every schedule (of ``workflow``, if given), by id, page after page."""
        out: list[ScheduleInfo] = []
        token = ""
        while True:
            response = await self._unary(
                self._rpc().ListSchedules,
                pb.ListSchedulesRequest(workflow=workflow or "", page_size=1000, page_token=token),
                timeout=self._deadline(timeout),
                retry=self.retry,
            )
            out += [_convert.schedule(s) for s in response.schedules]
            token = response.next_page_token
            if not token:
                return out

    async def pause_schedule(self, id: str, *, timeout: float | None = None) -> ScheduleInfo:
        """Stop the schedule firing until ``resume_schedule`` (retried: pausing
        twice is pausing once)."""
        response = await self._unary(
            self._rpc().PauseSchedule,
            pb.PauseScheduleRequest(schedule_id=_check_text(id, "schedule_id")),
            timeout=self._deadline(timeout),
            retry=self.retry,
        )
        return _convert.schedule(response.schedule)

    async def resume_schedule(self, id: str, *, timeout: float | None = None) -> ScheduleInfo:
        """Let a paused schedule fire again, from its next due time."""
        response = await self._unary(
            self._rpc().ResumeSchedule,
            pb.ResumeScheduleRequest(schedule_id=_check_text(id, "schedule_id")),
            timeout=self._deadline(timeout),
            retry=self.retry,
        )
        return _convert.schedule(response.schedule)

    async def delete_schedule(self, id: str, *, timeout: float | None = None) -> None:
        """Delete a schedule made through the API; its instances stay."""
        await self._unary(
            self._rpc().DeleteSchedule,
            pb.DeleteScheduleRequest(schedule_id=_check_text(id, "schedule_id")),
            timeout=self._deadline(timeout),
            retry=None,
        )

    async def trigger_schedule(self, id: str, *, timeout: float | None = None) -> InstanceHandle:
        """Create an instance of the schedule now (paused or not); its handle.
        Not retried: a repeat would create a second instance."""
        response = await self._unary(
            self._rpc().TriggerSchedule,
            pb.TriggerScheduleRequest(schedule_id=_check_text(id, "schedule_id")),
            timeout=self._deadline(timeout),
            retry=None,
        )
        return InstanceHandle(self, response.instance_id)

    # ----------------------------------------------------------- plumbing
    def _rpc(self) -> WorkflowServiceAsyncStub:
        if self._closed:
            raise RuntimeError("the cruzflow client is closed")
        if self._stub is None:
            if self._channel is None:
                # Made here, not in __init__, so that it binds to the loop the
                # client is used in.
                if self._credentials is None:
                    self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
                else:
                    self._channel = grpc.aio.secure_channel(
                        self._target, self._credentials, options=self._options
                    )
            self._stub = pb_grpc.WorkflowServiceStub(self._channel)
        return self._stub

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else _check_timeout(timeout)

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req | Callable[[], Req],
        *,
        timeout: float | None,
        retry: RetryPolicy | None,
        instance_id: str | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> Resp:
        """One unary call, retried under ``retry``; failures become CruzflowErrors.

        ``request`` may be a function, to build each attempt's request afresh.
        A call without retries waits for the channel to connect (up to its
        timeout) rather than fail at once while the channel reconnects: it is
        sent only once connected, so waiting cannot make it happen twice.
        """
        patient = retry is None

        async def attempt() -> Resp:
            message = request() if callable(request) else request
            return await method(
                message, timeout=timeout, metadata=self._metadata, wait_for_ready=patient
            )

        try:
            return await call_with_retry(
                attempt, retry, on_retry=on_retry, stopped=lambda: self._closed
            )
        except asyncio.CancelledError:
            self._raise_if_closed_under(instance_id)
            raise
        except grpc.aio.AioRpcError as exc:
            if patient and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not self._ready():
                where = f" at {self._target}" if self._owns_channel else ""
                raise Unavailable(
                    f"could not connect to the server{where} within {timeout:g} s",
                    code=grpc.StatusCode.UNAVAILABLE,
                    instance_id=instance_id,
                ) from exc
            raise from_rpc_error(exc, instance_id) from exc

    def _raise_if_closed_under(self, instance_id: str | None) -> None:
        """gRPC cancels the calls of a closed channel with CancelledError; unless
        the task itself is being cancelled, that is the close, not a cancellation."""
        task = asyncio.current_task()
        if self._closed and task is not None and not task.cancelling():
            raise CruzflowError(
                "the client was closed while the call was in flight",
                code=grpc.StatusCode.CANCELLED,
                instance_id=instance_id,
            ) from None

    def _ready(self) -> bool:
        channel = self._channel
        return channel is not None and (
            channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY
        )


def _cursors(
    instances: Mapping[str, int] | Iterable[str | InstanceHandle | tuple[str, int]],
) -> dict[str, int]:
    """``Client.watch_many``'s instances as id -> sequence to resume after."""
    if isinstance(instances, str | bytes):
        raise InvalidArgument(
            f"instances: expected ids, handles or (id, after_sequence) pairs, not one string "
            f"({instances!r}); pass [{instances!r}] to follow one instance"
        )
    items = instances.items() if isinstance(instances, Mapping) else instances
    cursors: dict[str, int] = {}
    for index, item in enumerate(items):
        if isinstance(item, InstanceHandle):
            instance_id, after = item.id, 0
        elif isinstance(item, str):
            instance_id, after = item, 0
        elif isinstance(item, tuple) and len(item) == 2:
            instance_id, after = item
        else:
            raise InvalidArgument(
                f"instances[{index}]: expected an id, a handle or an (id, after_sequence) "
                f"pair, got {item!r}"
            )
        _check_text(instance_id, f"instances[{index}] id")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise InvalidArgument(
                f"instances[{index}] after_sequence: must be an int of 0 or more, got {after!r}"
            )
        if instance_id in cursors:
            raise InvalidArgument(
                f"instances[{index}]: {instance_id!r} is listed already; list each instance once"
            )
        cursors[instance_id] = after
    if not cursors:
        raise InvalidArgument("instances: at least one instance to watch is required")
    return cursors


def _statuses(
    status: InstanceStatus | str | Iterable[InstanceStatus | str] | None,
) -> list[InstanceStatus | str]:
    if status is None:
        return []
    if isinstance(status, str):
        return [status]
    return list(status)


class WorkflowBinding:
    """One workflow of the server, to create and find its instances by.

    Made by ``Client.workflow(name)``; the counterpart of a Cloudflare
    Workflows binding (``env.MY_WORKFLOW.create(...)``).
    """

    __slots__ = ("_client", "_name")

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name

    @property
    def name(self) -> str:
        """The workflow's name, e.g. ``"onboarding-workflow"``."""
        return self._name

    def __repr__(self) -> str:
        return f"WorkflowBinding({self._name!r})"

    async def create(
        self,
        params: Any = None,
        *,
        id: str | None = None,
        lookup_key: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        if_exists: Literal["error", "return"] = "error",
        timeout: float | None = None,
    ) -> InstanceHandle:
        """Create an instance; it is durably stored when this returns, and runs.

        ``params`` (any JSON value) reach ``run`` as ``event.payload``. ``id``
        is your own instance id (the server makes one when ``None``);
        ``lookup_key`` a key to find the instance by with
        ``Client.list_instances(lookup_key=...)``. For a workflow with a
        concurrency or rate limit, ``priority`` orders the instances waiting
        for a slot (higher first), and ``concurrency_key`` names the key to
        take a slot of instead of the one in the params.

        With an ``id`` the create is retried on ``UNAVAILABLE`` (it cannot
        create twice). If the id is taken, ``if_exists="error"`` raises
        :class:`InstanceAlreadyExists`, while ``if_exists="return"`` returns
        the existing instance of this workflow, whatever its params: use it
        with an id derived from an idempotency key.

        Raises :class:`WorkflowNotFound` for a workflow the server does not
        host and :class:`InvalidArgument` for a bad id or params.
        """
        if if_exists not in ("error", "return"):
            raise InvalidArgument(f"if_exists: must be 'error' or 'return', got {if_exists!r}")
        request = self._create_request(params, id, lookup_key, priority, concurrency_key)
        client = self._client
        retried = _Retried()

        try:
            response = await client._unary(
                client._rpc().CreateInstance,
                request,
                timeout=client._deadline(timeout),
                retry=client.retry if id else None,
                instance_id=id,
                on_retry=retried,
            )
        except InstanceAlreadyExists:
            assert id is not None  # only a chosen id can be taken
            if if_exists == "error" and not retried.seen:
                raise
            existing = await self._existing(id, timeout)
            if (
                existing is not None
                and existing.workflow == self._name
                and (if_exists == "return" or _stored_by(existing, request))
            ):
                return InstanceHandle(client, id)
            raise
        return InstanceHandle(client, response.instance_id)

    async def run(
        self,
        params: Any = None,
        *,
        id: str | None = None,
        lookup_key: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Create an instance and return what its ``run`` returned, in one
        round trip (``RunInstance``): ``create`` and ``result`` together.

        Takes ``create``'s arguments and raises as ``result`` does:
        :class:`WorkflowFailed` if the instance ended errored,
        :class:`WorkflowTerminated` if it was terminated, and
        :class:`ResultTimeout` (with the instance's id, which goes on
        running) if ``timeout`` seconds pass first; ``None`` waits as long
        as it takes. The instance is durably stored before it runs, as with
        ``create``. With an ``id`` the call is retried on ``UNAVAILABLE``,
        and a retry that finds the instance stored by an earlier attempt
        waits for it; a taken ``id`` otherwise raises :class:`InstanceAlreadyExists`.
        """
        _check_wait_timeout(timeout)
        request = pb.RunInstanceRequest(
            instance=self._create_request(params, id, lookup_key, priority, concurrency_key)
        )
        client = self._client
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        request.timeout.FromTimedelta(timedelta(seconds=_poll(loop, deadline)))
        retried = _Retried()

        try:
            response = await client._unary(
                client._rpc().RunInstance,
                request,
                timeout=None if client.timeout is None else _LONG_POLL + client.timeout,
                retry=client.retry if id else None,
                instance_id=id,
                on_retry=retried,
            )
        except InstanceAlreadyExists:
            assert id is not None  # only a chosen id can be taken
            existing = await self._existing(id, timeout) if retried.seen else None
            if existing is None or not _stored_by(existing, request.instance):
                raise
            # Our own earlier attempt stored it before its answer was lost.
            info = existing
        else:
            info = _convert.instance(response.instance)
        handle = InstanceHandle(client, info.id)
        if not info.status.finished:
            if deadline is not None and loop.time() >= deadline:
                assert timeout is not None
                raise ResultTimeout(info.id, timeout, info.status)
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            info = await handle.wait(remaining)
        return handle._outcome(info)

    def _create_request(
        self,
        params: Any,
        id: str | None,
        lookup_key: str | None,
        priority: int,
        concurrency_key: str | None,
    ) -> pb.CreateInstanceRequest:
        if id is not None:
            _check_text(id, "id")
        return pb.CreateInstanceRequest(
            workflow=self._name,
            instance_id=id or "",
            params_json=_convert.encode_json(params, "params"),
            lookup_key=lookup_key or "",
            priority=priority,
            concurrency_key=concurrency_key or "",
        )

    async def create_batch(
        self,
        items: Iterable[NewInstance | Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> list[InstanceHandle]:
        """Create several instances in one transaction: all of them, or none.

        Each item is a :class:`NewInstance` or a mapping with the keys
        ``params``, ``id`` and ``lookup_key`` (all optional). Returns a handle
        per item, in order. The server takes 1 to ``limits.max_batch_size``
        (100) items; one refusal names every bad item (``requests[3]...``).
        Retried on ``UNAVAILABLE`` only when every item has an ``id``.
        """
        news = [_new_instance(item, i) for i, item in enumerate(items)]
        requests = [
            pb.CreateInstanceRequest(
                workflow=self._name,
                instance_id=new.id or "",
                params_json=_convert.encode_json(new.params, f"items[{i}].params"),
                lookup_key=new.lookup_key or "",
                priority=new.priority,
                concurrency_key=new.concurrency_key or "",
            )
            for i, new in enumerate(news)
        ]
        client = self._client
        all_ids = bool(news) and all(new.id for new in news)
        retried = _Retried()

        try:
            response = await client._unary(
                client._rpc().CreateInstances,
                pb.CreateInstancesRequest(requests=requests),
                timeout=client._deadline(timeout),
                retry=client.retry if all_ids else None,
                on_retry=retried,
            )
        except InstanceAlreadyExists:
            if not retried.seen:
                raise
            # All or none: if an earlier attempt stored the batch, every item is ours.
            for request in requests:
                existing = await self._existing(request.instance_id, timeout)
                if (
                    existing is None
                    or existing.workflow != self._name
                    or existing.params != _convert.decode_json(request.params_json)
                    or existing.lookup_key != (request.lookup_key or None)
                ):
                    raise
            return [InstanceHandle(client, r.instance_id) for r in requests]
        return [InstanceHandle(client, created.instance_id) for created in response.instances]

    async def get(self, id: str, *, timeout: float | None = None) -> InstanceHandle:
        """The handle of an existing instance of this workflow.

        Raises :class:`InstanceNotFound` when there is none (also when ``id``
        is an instance of another workflow).
        """
        handle = self._client.instance(id)
        info = await handle.status(timeout=timeout)
        if info.workflow != self._name:
            raise InstanceNotFound(
                f"instance_id: {id!r} is an instance of workflow {info.workflow!r}, "
                f"not of {self._name!r}",
                code=grpc.StatusCode.NOT_FOUND,
                instance_id=id,
            )
        return handle

    async def _existing(self, id: str, timeout: float | None) -> InstanceStatusInfo | None:
        try:
            return await self._client.instance(id).status(timeout=timeout)
        except InstanceNotFound:
            return None  # purged in the meantime


class _Retried:
    """A call's ``on_retry``: whether the client has sent it again (an earlier
    attempt may then have done its work before its answer was lost)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self) -> None:
        self.seen = True


def _stored_by(existing: InstanceStatusInfo, request: pb.CreateInstanceRequest) -> bool:
    """Whether ``existing`` is what ``request`` would have stored: an earlier
    attempt of the same call may have stored it before its answer was lost."""
    return (
        existing.workflow == request.workflow
        and existing.params == _convert.decode_json(request.params_json)
        and existing.lookup_key == (request.lookup_key or None)
    )


def _check_wait_timeout(timeout: float | None) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
    ):
        raise InvalidArgument(f"timeout: must be 0 or more seconds, or None; got {timeout!r}")


def _poll(loop: asyncio.AbstractEventLoop, deadline: float | None) -> float:
    """How long one long poll may wait on the server: at most _LONG_POLL, and
    no longer than the deadline (loop time) leaves."""
    if deadline is None:
        return _LONG_POLL
    return max(0.0, min(_LONG_POLL, deadline - loop.time()))


def _new_instance(item: NewInstance | Mapping[str, Any], index: int) -> NewInstance:
    if isinstance(item, NewInstance):
        new = item
    elif isinstance(item, Mapping):
        unknown = sorted(set(item) - {"params", "id", "lookup_key", "priority", "concurrency_key"})
        if unknown:
            raise InvalidArgument(
                f"items[{index}]: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"use 'params', 'id', 'lookup_key', 'priority' and 'concurrency_key'"
            )
        new = NewInstance(**item)
    else:
        raise InvalidArgument(
            f"items[{index}]: expected a NewInstance or a mapping, got {type(item).__name__}"
        )
    if new.id is not None:
        _check_text(new.id, f"items[{index}].id")
    return new


class InstanceHandle:
    """One workflow instance, by id: read it, control it, follow it.

    Made by ``WorkflowBinding.create``/``get`` or ``Client.instance``. It
    holds nothing but the id: every method asks the server.
    """

    __slots__ = ("_client", "_id")

    def __init__(self, client: Client, id: str) -> None:
        self._client = client
        self._id = id

    @property
    def id(self) -> str:
        """The instance id."""
        return self._id

    def __repr__(self) -> str:
        return f"InstanceHandle({self._id!r})"

    async def status(self, *, timeout: float | None = None) -> InstanceStatusInfo:
        """The instance's durable status, with its steps so far."""
        return _convert.instance(await self._get_status(timeout))

    async def _get_status(self, timeout: float | None) -> pb.Instance:
        client = self._client
        response = await client._unary(
            client._rpc().GetStatus,
            pb.GetStatusRequest(instance_id=self._id),
            timeout=client._deadline(timeout),
            retry=client.retry,
            instance_id=self._id,
        )
        instance: pb.Instance = response.instance
        return instance

    async def export(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The instance's whole history as JSON-ready data: its status with
        every step (params, results, errors, sleeps and waits) and every event
        of its log so far, each in the proto's JSON form (as grpcurl and
        HTTP/JSON show them). ``cruzflow export`` writes it to a file, and
        ``cruzflow.testing.WorkflowTestEnv.replay`` replays it against code."""
        client = self._client
        instance = await self._get_status(timeout)
        events: list[dict[str, Any]] = []
        if instance.last_sequence:
            call = client._rpc().WatchInstance(
                pb.WatchInstanceRequest(instance_id=self._id),
                timeout=client._deadline(timeout),
                metadata=client._metadata,
            )
            try:
                async for message in call:
                    events.append(json_format.MessageToDict(message))
                    if message.sequence >= instance.last_sequence:
                        break
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, self._id) from exc
            finally:
                call.cancel()
        return {
            "format": EXPORT_FORMAT,
            "instance": json_format.MessageToDict(instance),
            "events": events,
        }

    async def pause(self, *, timeout: float | None = None) -> InstanceStatus:
        """Pause at the next step boundary; returns ``PAUSED``, or
        ``WAITING_FOR_PAUSE`` while a running step finishes. Raises
        :class:`FailedPrecondition` if the instance is finished or paused."""
        client = self._client
        return await self._control(
            client._rpc().PauseInstance,
            pb.PauseInstanceRequest(instance_id=self._id),
            lambda status: status in _PAUSED,
            timeout,
        )

    async def resume(self, *, timeout: float | None = None) -> InstanceStatus:
        """Let a paused (or pausing) instance go on; returns its new status.
        Raises :class:`FailedPrecondition` unless it is paused or pausing."""
        client = self._client
        return await self._control(
            client._rpc().ResumeInstance,
            pb.ResumeInstanceRequest(instance_id=self._id),
            lambda status: status not in _PAUSED,
            timeout,
        )

    async def terminate(
        self, *, rollback: bool = False, timeout: float | None = None
    ) -> InstanceStatus:
        """End the instance now as ``TERMINATED`` (an attempt in flight is
        cancelled). Raises :class:`FailedPrecondition` once it is finished.

        With ``rollback``, the rollbacks of its succeeded steps run first
        (``step.do(..., rollback=...)``); it answers ``RUNNING`` meanwhile, and
        ends ``TERMINATED`` once they have run."""
        client = self._client
        return await self._control(
            client._rpc().TerminateInstance,
            pb.TerminateInstanceRequest(instance_id=self._id, rollback=rollback),
            lambda status: status is InstanceStatus.TERMINATED,
            timeout,
        )

    async def restart(
        self,
        *,
        from_step: str | None = None,
        occurrence: int = 1,
        reason: str = "",
        timeout: float | None = None,
    ) -> InstanceStatus:
        """Run the instance again from scratch, same id and params; returns
        ``RUNNING`` or ``QUEUED``. Never retried: a repeat would restart again.

        With ``from_step`` (and its ``occurrence``), from that step instead:
        the results recorded before it are kept (replayed, not run again), it
        and every step after it run again. A restart from a step, or one
        given a ``reason``, is recorded in the instance's ``repairs``."""
        client = self._client
        response = await client._unary(
            client._rpc().RestartInstance,
            pb.RestartInstanceRequest(
                instance_id=self._id,
                from_step=from_step or "",
                occurrence=occurrence if from_step else 0,
                reason=reason,
            ),
            timeout=client._deadline(timeout),
            retry=None,
            instance_id=self._id,
        )
        return _convert.status(response.status)

    async def repair(
        self,
        step: str,
        *,
        reason: str,
        output: Any = _NO_OUTPUT,
        retry: bool = False,
        occurrence: int = 1,
        timeout: float | None = None,
    ) -> RepairInfo:
        """Mend a stuck or failed instance: replace the recorded result of
        ``step`` (its ``occurrence``) with ``output`` (any JSON value, None
        too), or with ``retry`` run the failed step again with its full
        retries; then the instance goes on from there (the steps recorded
        after it are replayed, not run again). ``reason`` is required: the
        call is recorded in the instance's history, with who made it.

        Allowed for errored, terminated, paused and waiting instances; raises
        :class:`FailedPrecondition` for others (pause a running one first),
        :class:`NotFound` for a step it does not have, and
        :class:`InvalidArgument` for a sleep, or for both or neither of
        ``output`` and ``retry``. Returns the audit entry recorded. Never
        retried."""
        client = self._client
        has_output = output is not _NO_OUTPUT
        response = await client._unary(
            client._rpc().RepairInstance,
            pb.RepairInstanceRequest(
                instance_id=self._id,
                step=step,
                occurrence=occurrence,
                output_json=_convert.encode_json(output, "output") if has_output else "",
                retry=retry,
                reason=reason,
            ),
            timeout=client._deadline(timeout),
            retry=None,
            instance_id=self._id,
        )
        return _convert.repair(response.repair)

    async def send_event(
        self, type: str, payload: Any = None, *, timeout: float | None = None
    ) -> None:
        """Deliver an event to the instance's ``step.wait_for_event(type=...)``.

        It is stored before this returns and taken by exactly one wait (one
        that starts later too). Never retried: a repeat would deliver it
        twice. Raises :class:`FailedPrecondition` once the instance is finished.
        """
        _check_text(type, "type")
        client = self._client
        await client._unary(
            client._rpc().SendEvent,
            pb.SendEventRequest(
                instance_id=self._id,
                type=type,
                payload_json=_convert.encode_json(payload, "payload"),
            ),
            timeout=client._deadline(timeout),
            retry=None,
            instance_id=self._id,
        )

    async def watch(
        self, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        """Every event of the instance after ``after_sequence``, as it happens,
        ending after the event that brings a final status.

        A stream cut by the network or a server stop or restart is opened
        again, after the last sequence received, so no event is missed or
        repeated; it gives up (raising :class:`Unavailable`) after
        ``Client(reconnect=...)`` attempts in a row that brought no event.
        ``timeout`` bounds the whole watch (:class:`DeadlineExceeded`).
        To stop early, ``break`` out of ``async with contextlib.aclosing(...)``
        so the stream is closed at once.
        """
        if isinstance(after_sequence, bool) or not isinstance(after_sequence, int):
            raise InvalidArgument(f"after_sequence: must be an int, got {after_sequence!r}")
        if after_sequence < 0:
            raise InvalidArgument(f"after_sequence: must be 0 or more, got {after_sequence}")
        limit = _check_timeout(timeout)
        client = self._client
        policy = client.reconnect
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        last = after_sequence
        failures = 0
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(
                    f"watch of {self._id!r} ended by its timeout after sequence {last}",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                    instance_id=self._id,
                )
            call = client._rpc().WatchInstance(
                pb.WatchInstanceRequest(instance_id=self._id, after_sequence=last),
                timeout=remaining,
                metadata=client._metadata,
            )
            try:
                async for message in call:
                    event = _convert.event(message)
                    if event.sequence <= last:
                        continue
                    last = event.sequence
                    failures = 0
                    yield event
                return
            except asyncio.CancelledError:
                client._raise_if_closed_under(self._id)
                raise
            except grpc.aio.AioRpcError as exc:
                failures += 1
                if policy is None or client._closed or not policy.retries(exc.code(), failures):
                    raise from_rpc_error(exc, self._id) from exc
            finally:
                call.cancel()
            pause = policy.backoff(failures)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - loop.time()))
            await asyncio.sleep(pause)

    async def wait(self, timeout: float | None = None) -> InstanceStatusInfo:
        """The instance's status once it is final (complete, errored or
        terminated), without its steps; whatever the outcome, nothing is raised
        for it. Raises :class:`ResultTimeout` if ``timeout`` seconds pass first
        (``None``: wait as long as it takes)."""
        _check_wait_timeout(timeout)
        client = self._client
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        rpc_deadline = None if client.timeout is None else _LONG_POLL + client.timeout

        def request() -> pb.WaitInstanceRequest:
            message = pb.WaitInstanceRequest(instance_id=self._id)
            message.timeout.FromTimedelta(timedelta(seconds=_poll(loop, deadline)))
            return message

        while True:
            response = await client._unary(
                client._rpc().WaitInstance,
                request,
                timeout=rpc_deadline,
                retry=client.reconnect,
                instance_id=self._id,
            )
            info = _convert.instance(response.instance)
            if info.status.finished:
                return info
            if deadline is not None and loop.time() >= deadline:
                assert timeout is not None
                raise ResultTimeout(self._id, timeout, info.status)

    async def result(self, timeout: float | None = None) -> Any:
        """What the instance's ``run`` returned, once it is complete.

        Raises :class:`WorkflowFailed` (with the error's name and message) if
        it ended errored, :class:`WorkflowTerminated` if it was terminated,
        and :class:`ResultTimeout` if ``timeout`` seconds pass first.
        """
        return self._outcome(await self.wait(timeout))

    def _outcome(self, info: InstanceStatusInfo) -> Any:
        """The output of a final instance, or the error its end raises."""
        if info.status is InstanceStatus.COMPLETE:
            return info.output
        if info.status is InstanceStatus.ERRORED:
            error = info.error
            raise WorkflowFailed(
                self._id,
                error.name if error else "UnknownError",
                error.message if error else "",
                error.traceback if error else None,
            )
        raise WorkflowTerminated(self._id)

    async def _control(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Any],
        request: Req,
        reached: Callable[[InstanceStatus], bool],
        timeout: float | None,
    ) -> InstanceStatus:
        """A pause, resume or terminate, retried under the client's policy.

        A retry refused with FAILED_PRECONDITION may be refused because the
        first attempt did what was asked before its answer was lost: when the
        instance is where the call would put it, that is success.
        """
        client = self._client
        retried = _Retried()

        try:
            response = await client._unary(
                method,
                request,
                timeout=client._deadline(timeout),
                retry=client.retry,
                instance_id=self._id,
                on_retry=retried,
            )
        except FailedPrecondition:
            if retried.seen:
                current = (await self.status(timeout=timeout)).status
                if reached(current):
                    return current
            raise
        return _convert.status(response.status)
