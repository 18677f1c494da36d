"""The WorkflowService's one handler layer: request message in, engine call,
response message out, for every transport.

Each method is named as in proto/cruzflow/v1/workflows.proto and takes and
returns the generated messages. A refusal is raised as the engine raises it
(``errors.ServiceError`` or ``StoreError``); :func:`refusal` gives its code
name and message, which the gRPC servicer (``servicer.py``) and the Connect
application (``http.py``) turn into their own status, so that both answer
every call alike.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from cruzflow.server import caller
from cruzflow.server.engine import errors, validate
from cruzflow.server.engine.admission import NewInstance
from cruzflow.server.engine.runtime import Engine
from cruzflow.server.engine.schedules import ScheduleSpec
from cruzflow.server.records import CatchUp, ScheduleRecord
from cruzflow.server.store.base import StoreError
from cruzflow.server.transport import convert
from cruzflow.v1 import workflows_pb2 as pb

log = logging.getLogger("cruzflow.transport")

SERVICE = pb.DESCRIPTOR.services_by_name["WorkflowService"]
"""The service's descriptor: its methods' names, messages and streaming."""

REFUSALS = (errors.ServiceError, StoreError)
"""What a handler raises for a call it refuses; anything else is a fault."""

_CODES: list[tuple[type[Exception], str]] = [
    (errors.InvalidArgument, "INVALID_ARGUMENT"),
    (errors.NotFound, "NOT_FOUND"),
    (errors.AlreadyExists, "ALREADY_EXISTS"),
    (errors.FailedPrecondition, "FAILED_PRECONDITION"),
    (errors.ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (errors.Unavailable, "UNAVAILABLE"),
    (StoreError, "UNAVAILABLE"),
]


def refusal(exc: Exception) -> tuple[str, str]:
    """The status code name (as gRPC spells it: ``NOT_FOUND``) and message
    with which to answer a call that raised ``exc``. Anything but a refusal is
    logged with its traceback and answered ``INTERNAL``, naming only its type."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, validate.fit(str(exc))
    log.error("internal error", exc_info=exc)
    return "INTERNAL", f"internal error: {type(exc).__name__}"


def malformed(type_name: str, problem: str, *, json: bool = False) -> str:
    """The message for a request that is not a valid message of its method."""
    # One line: parsers' messages may hold newlines.
    problem = validate.fit(" ".join(problem.split()))[:300]
    how = (
        "send it in the proto's JSON mapping: its field names (camelCase, e.g. "
        '{"workflow": "...", "paramsJson": "{}"}; the proto\'s own snake_case names '
        "are accepted too)"
        if json
        else "encode it from proto/cruzflow/v1/workflows.proto, with UTF-8 text in string fields"
    )
    return f"request: not a valid {type_name} message ({problem}); {how}"


def _new(request: pb.CreateInstanceRequest) -> NewInstance:
    """A create request's fields as the engine takes them (CreateInstance,
    CreateInstances' items, RunInstance's instance)."""
    r = request
    return (r.workflow, r.instance_id, r.params_json, r.lookup_key, r.priority, r.concurrency_key)


def _status(value: int) -> pb.InstanceStatus.ValueType:
    return pb.InstanceStatus.ValueType(int(value))


class WorkflowApi:
    """The service's methods over one engine; see the module's docstring."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._payload_limit = engine.limits.max_payload_bytes

    async def CreateInstance(self, request: pb.CreateInstanceRequest) -> pb.CreateInstanceResponse:
        instance_id, status = await self._engine.create(*_new(request))
        return pb.CreateInstanceResponse(instance_id=instance_id, status=_status(status))

    async def CreateInstances(
        self, request: pb.CreateInstancesRequest
    ) -> pb.CreateInstancesResponse:
        created = await self._engine.create_many([_new(r) for r in request.requests])
        return pb.CreateInstancesResponse(
            instances=[
                pb.CreateInstanceResponse(instance_id=instance_id, status=_status(status))
                for instance_id, status in created
            ]
        )

    async def GetStatus(self, request: pb.GetStatusRequest) -> pb.GetStatusResponse:
        record, steps = await self._engine.get(request.instance_id)
        message = convert.instance(record, steps, self._payload_limit)
        message.repairs.extend(convert.repair_of(e) for e in await self._engine.repairs(record))
        return pb.GetStatusResponse(instance=message)

    async def WatchInstance(
        self, request: pb.WatchInstanceRequest
    ) -> AsyncIterator[pb.WatchInstanceResponse]:
        async for record in self._engine.watch(request.instance_id, request.after_sequence):
            yield convert.event(record)

    async def WatchInstances(
        self, request: pb.WatchInstancesRequest
    ) -> AsyncIterator[pb.WatchInstancesResponse]:
        cursors = [(c.instance_id, c.after_sequence) for c in request.instances]
        event = convert.event
        async for records in self._engine.watch_many(cursors):
            yield pb.WatchInstancesResponse(events=[event(record) for record in records])

    async def WaitInstance(self, request: pb.WaitInstanceRequest) -> pb.WaitInstanceResponse:
        timeout = (
            convert.seconds(request.timeout, "timeout") if request.HasField("timeout") else None
        )
        record, steps = await self._engine.wait(request.instance_id, timeout, request.include_steps)
        return pb.WaitInstanceResponse(
            instance=convert.instance(record, steps, self._payload_limit)
        )

    async def RunInstance(self, request: pb.RunInstanceRequest) -> pb.RunInstanceResponse:
        timeout = (
            convert.seconds(request.timeout, "timeout") if request.HasField("timeout") else None
        )
        record, steps = await self._engine.run(
            *_new(request.instance), timeout=timeout, include_steps=request.include_steps
        )
        return pb.RunInstanceResponse(instance=convert.instance(record, steps, self._payload_limit))

    async def ListInstances(self, request: pb.ListInstancesRequest) -> pb.ListInstancesResponse:
        created_min, created_max = _created(request)
        page, token = await self._engine.list_instances(
            workflow=request.workflow,
            statuses=list(request.statuses),
            created_min=created_min,
            created_max=created_max,
            lookup_key=request.lookup_key,
            page_size=request.page_size,
            page_token=request.page_token,
            parent_id=request.parent_id,
            schedule_id=request.schedule_id,
        )
        return pb.ListInstancesResponse(
            instances=[convert.instance(record, [], self._payload_limit) for record in page],
            next_page_token=token,
        )

    async def PauseInstance(self, request: pb.PauseInstanceRequest) -> pb.PauseInstanceResponse:
        return pb.PauseInstanceResponse(
            status=_status(await self._engine.pause(request.instance_id))
        )

    async def ResumeInstance(self, request: pb.ResumeInstanceRequest) -> pb.ResumeInstanceResponse:
        return pb.ResumeInstanceResponse(
            status=_status(await self._engine.resume(request.instance_id))
        )

    async def TerminateInstance(
        self, request: pb.TerminateInstanceRequest
    ) -> pb.TerminateInstanceResponse:
        return pb.TerminateInstanceResponse(
            status=_status(await self._engine.terminate(request.instance_id, request.rollback))
        )

    async def RestartInstance(
        self, request: pb.RestartInstanceRequest
    ) -> pb.RestartInstanceResponse:
        status, _ = await self._engine.restart_audited(
            request.instance_id,
            request.from_step,
            request.occurrence,
            request.reason,
            caller.actor(),
            caller.peer(),
        )
        return pb.RestartInstanceResponse(status=_status(status))

    async def RepairInstance(self, request: pb.RepairInstanceRequest) -> pb.RepairInstanceResponse:
        status, audit = await self._engine.repair(
            request.instance_id,
            request.step,
            request.occurrence,
            request.output_json,
            request.retry,
            request.reason,
            caller.actor(),
            caller.peer(),
        )
        assert audit is not None
        return pb.RepairInstanceResponse(status=_status(status), repair=convert.repair(audit))

    async def SendEvent(self, request: pb.SendEventRequest) -> pb.SendEventResponse:
        await self._engine.send_event(request.instance_id, request.type, request.payload_json)
        return pb.SendEventResponse()

    async def ListWorkflows(self, request: pb.ListWorkflowsRequest) -> pb.ListWorkflowsResponse:
        return pb.ListWorkflowsResponse(
            workflows=[
                pb.Workflow(name=w.name, binding=w.binding, class_name=w.class_name)
                for w in self._engine.workflows()
            ]
        )

    async def CountInstances(self, request: pb.CountInstancesRequest) -> pb.CountInstancesResponse:
        created_min, created_max = _created(request)
        counts = await self._engine.count_instances(
            workflow=request.workflow,
            created_min=created_min,
            created_max=created_max,
            lookup_key=request.lookup_key,
        )
        return pb.CountInstancesResponse(
            counts=[
                pb.InstanceCount(workflow=workflow, status=_status(status), count=count)
                for workflow, status, count in counts
            ],
            total=sum(count for _, _, count in counts),
        )

    async def GetCaller(self, request: pb.GetCallerRequest) -> pb.GetCallerResponse:
        # The answer of a server without authentication. With it, the token
        # gate (auth.Gate.response) fills in the calling token's rule on
        # every transport: only the gate knows which token called.
        return pb.GetCallerResponse(auth_required=False)

    # ------------------------------------------------------------ schedules
    def _schedule(self, record: ScheduleRecord) -> pb.Schedule:
        return convert.schedule(record, self._engine.next_due(record))

    async def CreateSchedule(self, request: pb.CreateScheduleRequest) -> pb.CreateScheduleResponse:
        given = request.schedule
        catch_up = int(given.catch_up) or int(CatchUp.ONCE)
        if catch_up not in CatchUp._value2member_map_:
            raise errors.InvalidArgument(
                f"schedule.catch_up: {catch_up} is not a catch-up policy; use "
                f"CATCH_UP_POLICY_SKIP or CATCH_UP_POLICY_ONCE (the default when unset)"
            )
        spec = ScheduleSpec(
            id=given.schedule_id,
            workflow=given.workflow,
            cron=given.cron,
            timezone=given.timezone or "UTC",
            params=given.params_json.encode(),
            catch_up=CatchUp(catch_up),
            paused=given.paused,
        )
        record = await self._engine.create_schedule(spec)
        return pb.CreateScheduleResponse(schedule=self._schedule(record))

    async def GetSchedule(self, request: pb.GetScheduleRequest) -> pb.GetScheduleResponse:
        record = await self._engine.get_schedule(request.schedule_id)
        return pb.GetScheduleResponse(schedule=self._schedule(record))

    async def ListSchedules(self, request: pb.ListSchedulesRequest) -> pb.ListSchedulesResponse:
        page, token = await self._engine.list_schedules(
            request.workflow, request.page_size, request.page_token
        )
        return pb.ListSchedulesResponse(
            schedules=[self._schedule(r) for r in page], next_page_token=token
        )

    async def PauseSchedule(self, request: pb.PauseScheduleRequest) -> pb.PauseScheduleResponse:
        record = await self._engine.pause_schedule(request.schedule_id)
        return pb.PauseScheduleResponse(schedule=self._schedule(record))

    async def ResumeSchedule(self, request: pb.ResumeScheduleRequest) -> pb.ResumeScheduleResponse:
        record = await self._engine.resume_schedule(request.schedule_id)
        return pb.ResumeScheduleResponse(schedule=self._schedule(record))

    async def DeleteSchedule(self, request: pb.DeleteScheduleRequest) -> pb.DeleteScheduleResponse:
        await self._engine.delete_schedule(request.schedule_id)
        return pb.DeleteScheduleResponse()

    async def TriggerSchedule(
        self, request: pb.TriggerScheduleRequest
    ) -> pb.TriggerScheduleResponse:
        instance_id, status = await self._engine.trigger_schedule(request.schedule_id)
        return pb.TriggerScheduleResponse(instance_id=instance_id, status=_status(status))


def _created(
    request: pb.ListInstancesRequest | pb.CountInstancesRequest,
) -> tuple[int | None, int | None]:
    """A request's create_time_min and create_time_max, in ms; None when unset."""
    low, high = request.create_time_min, request.create_time_max
    return (
        convert.ms(low, "create_time_min") if request.HasField("create_time_min") else None,
        convert.ms(high, "create_time_max") if request.HasField("create_time_max") else None,
    )


def _check_coverage() -> None:
    """Every method of the contract has its handler here (at import: a method
    added to the proto without one fails loudly, on every transport)."""
    missing = [m.name for m in SERVICE.methods if not callable(getattr(WorkflowApi, m.name, None))]
    if missing:
        raise RuntimeError(f"WorkflowApi has no handler for {', '.join(missing)}")


_check_coverage()
