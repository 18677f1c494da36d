"""Protobuf messages to the client's domain types, and JSON in and out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from cruzflow.client._types import (
    CallerInfo,
    ErrorInfo,
    EventKind,
    InstanceCount,
    InstanceCounts,
    InstanceStatus,
    InstanceStatusInfo,
    PayloadSizes,
    RepairInfo,
    ScheduleInfo,
    StepInfo,
    StepKind,
    StepRef,
    StepStatus,
    WatchEvent,
    WorkflowInfo,
)
from cruzflow.client.errors import InvalidArgument
from cruzflow.v1 import workflows_pb2 as pb

# Enum numbers go through the proto's own names (INSTANCE_STATUS_RUNNING ->
# RUNNING), so the client never keeps a second copy of the numbering.
_STATUS_FROM_PB: dict[int, InstanceStatus] = {
    number: InstanceStatus[name.removeprefix("INSTANCE_STATUS_")]
    for name, number in pb.InstanceStatus.items()
    if name.removeprefix("INSTANCE_STATUS_") in InstanceStatus.__members__
}
_STATUS_TO_PB = {status: number for number, status in _STATUS_FROM_PB.items()}
_STEP_STATUS_FROM_PB: dict[int, StepStatus] = {
    number: StepStatus[name.removeprefix("STEP_STATUS_")]
    for name, number in pb.StepStatus.items()
    if name.removeprefix("STEP_STATUS_") in StepStatus.__members__
}
_STEP_KIND_FROM_PB: dict[int, StepKind] = {
    number: StepKind[name.removeprefix("STEP_KIND_")]
    for name, number in pb.StepKind.items()
    if name.removeprefix("STEP_KIND_") in StepKind.__members__
}


def status(number: int) -> InstanceStatus:
    """An InstanceStatus number; one this client does not know reads as UNKNOWN."""
    return _STATUS_FROM_PB.get(number, InstanceStatus.UNKNOWN)


def status_to_pb(value: InstanceStatus | str) -> pb.InstanceStatus.ValueType:
    """The proto number of a status given as the enum or its word (``"running"``)."""
    try:
        member = InstanceStatus(value)
    except ValueError:
        known = ", ".join(s.value for s in InstanceStatus if s is not InstanceStatus.UNKNOWN)
        raise InvalidArgument(f"status: {value!r} is not a status; use one of {known}") from None
    if member is InstanceStatus.UNKNOWN:
        raise InvalidArgument("status: 'unknown' cannot be listed; name a real status")
    return pb.InstanceStatus.ValueType(_STATUS_TO_PB[member])


def encode_json(value: Any, field: str) -> str:
    """``value`` as compact JSON text; a value that is not JSON is refused here,
    before any call is made."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(
            f"{field}: not JSON ({exc}); pass dicts, lists, strings, numbers, booleans or None"
        ) from None


def decode_json(text: str) -> Any:
    """A JSON field of a message; empty means null."""
    return json.loads(text) if text else None


def _time(message: Any, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    ts: Timestamp = getattr(message, name)
    return ts.ToDatetime(tzinfo=UTC)


def _error(message: Any) -> ErrorInfo | None:
    if not message.HasField("error"):
        return None
    error = message.error
    return ErrorInfo(error.name, error.message, error.traceback or None)


def timestamp(value: datetime) -> Timestamp:
    """A request timestamp; a naive ``datetime`` is refused (it names no instant)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgument(
            f"{value.isoformat()} has no time zone; pass an aware datetime (e.g. datetime.now(UTC))"
        )
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def step(message: pb.Step) -> StepInfo:
    """A Step message."""
    return StepInfo(
        name=message.name,
        occurrence=message.occurrence,
        index=message.index,
        kind=_STEP_KIND_FROM_PB.get(message.kind, StepKind.UNKNOWN),
        status=_STEP_STATUS_FROM_PB.get(message.status, StepStatus.UNKNOWN),
        attempts=message.attempts,
        start_time=_time(message, "start_time"),
        end_time=_time(message, "end_time"),
        output=decode_json(message.output_json),
        error=_error(message),
        next_attempt_time=_time(message, "next_attempt_time"),
        event_type=message.event_type or None,
        child_id=message.child_instance_id or None,
        output_bytes=message.output_size_bytes,
    )


def _payloads(message: pb.Instance) -> PayloadSizes | None:
    if not message.HasField("payloads"):
        return None
    sizes = message.payloads
    return PayloadSizes(
        params_bytes=sizes.params_bytes,
        output_bytes=sizes.output_bytes,
        largest_step_bytes=sizes.largest_step_bytes,
        total_bytes=sizes.total_bytes,
        limit_bytes=sizes.limit_bytes,
    )


def instance(message: pb.Instance) -> InstanceStatusInfo:
    """An Instance message."""
    return InstanceStatusInfo(
        id=message.instance_id,
        workflow=message.workflow,
        status=status(message.status),
        params=decode_json(message.params_json),
        output=decode_json(message.output_json),
        error=_error(message),
        create_time=_time(message, "create_time"),
        update_time=_time(message, "update_time"),
        end_time=_time(message, "end_time"),
        wake_time=_time(message, "wake_time"),
        start_time=_time(message, "start_time"),
        lookup_key=message.lookup_key or None,
        last_sequence=message.last_sequence,
        steps=tuple(step(s) for s in message.steps),
        trace_id=message.trace_id or None,
        parent_id=message.parent_id or None,
        priority=message.priority,
        concurrency_key=message.concurrency_key or None,
        schedule_id=message.schedule_id or None,
        repairs=tuple(repair(r) for r in message.repairs),
        payloads=_payloads(message),
    )


_ACTIONS = {
    pb.REPAIR_ACTION_SET_OUTPUT: "set_output",
    pb.REPAIR_ACTION_RETRY: "retry",
    pb.REPAIR_ACTION_RESTART: "restart",
}


def repair(message: pb.Repair) -> RepairInfo:
    """A Repair message (an audit entry)."""
    return RepairInfo(
        time=_time(message, "time"),
        actor=message.actor,
        peer=message.peer or None,
        reason=message.reason,
        action=_ACTIONS.get(message.action, "unknown"),
        step=_ref(message.step) if message.HasField("step") else None,
        output=decode_json(message.output_json),
    )


def instances(messages: Iterable[pb.Instance]) -> tuple[InstanceStatusInfo, ...]:
    """Several Instance messages."""
    return tuple(instance(m) for m in messages)


def _ref(message: pb.StepRef) -> StepRef:
    return StepRef(
        name=message.name,
        occurrence=message.occurrence,
        index=message.index,
        kind=_STEP_KIND_FROM_PB.get(message.kind, StepKind.UNKNOWN),
    )


def event(message: pb.WatchInstanceResponse) -> WatchEvent:
    """A WatchInstanceResponse message."""
    base: dict[str, Any] = {
        "instance_id": message.instance_id,
        "sequence": message.sequence,
        "time": _time(message, "time"),
    }
    which = message.WhichOneof("event")
    if which == "status_changed":
        changed = message.status_changed
        return WatchEvent(
            **base,
            kind=EventKind.STATUS_CHANGED,
            status=status(changed.status),
            output=decode_json(changed.output_json),
            error=_error(changed),
        )
    if which == "step_started":
        started = message.step_started
        return WatchEvent(
            **base, kind=EventKind.STEP_STARTED, step=_ref(started.step), attempt=started.attempt
        )
    if which == "attempt_failed":
        failed = message.attempt_failed
        return WatchEvent(
            **base,
            kind=EventKind.ATTEMPT_FAILED,
            step=_ref(failed.step),
            attempt=failed.attempt,
            error=_error(failed),
            next_attempt_time=_time(failed, "next_attempt_time"),
            retry_delay=(
                failed.retry_delay.ToTimedelta() if failed.HasField("retry_delay") else None
            ),
        )
    if which == "step_succeeded":
        succeeded = message.step_succeeded
        return WatchEvent(
            **base,
            kind=EventKind.STEP_SUCCEEDED,
            step=_ref(succeeded.step),
            attempt=succeeded.attempt,
            output=decode_json(succeeded.output_json),
        )
    if which == "step_failed":
        lost = message.step_failed
        return WatchEvent(
            **base,
            kind=EventKind.STEP_FAILED,
            step=_ref(lost.step),
            attempt=lost.attempt,
            error=_error(lost),
        )
    if which == "repaired":
        entry = repair(message.repaired)
        return WatchEvent(**base, kind=EventKind.REPAIRED, step=entry.step, repair=entry)
    return WatchEvent(**base, kind=EventKind.UNKNOWN)


def workflow(message: pb.Workflow) -> WorkflowInfo:
    """A Workflow message."""
    return WorkflowInfo(message.name, message.binding, message.class_name)


def counts(message: pb.CountInstancesResponse) -> InstanceCounts:
    """A CountInstancesResponse message."""
    return InstanceCounts(
        counts=tuple(
            InstanceCount(workflow=c.workflow, status=status(c.status), count=c.count)
            for c in message.counts
        ),
        total=message.total,
    )


def caller(message: pb.GetCallerResponse) -> CallerInfo:
    """A GetCallerResponse message."""
    return CallerInfo(
        auth_required=message.auth_required,
        token_name=message.token_name or None,
        read_only=message.read_only,
        workflows=tuple(message.workflows),
    )


_CATCH_UP = {pb.CATCH_UP_POLICY_SKIP: "skip", pb.CATCH_UP_POLICY_ONCE: "once"}
_ORIGIN = {pb.SCHEDULE_ORIGIN_CONFIG: "config", pb.SCHEDULE_ORIGIN_API: "api"}


def catch_up_to_pb(value: str) -> pb.CatchUpPolicy.ValueType:
    """``"skip"`` or ``"once"`` as the proto's enum; InvalidArgument otherwise."""
    for number, name in _CATCH_UP.items():
        if value == name:
            return number
    raise InvalidArgument(f"catch_up: {value!r} is not a catch-up policy; use 'skip' or 'once'")


def schedule(message: pb.Schedule) -> ScheduleInfo:
    """A Schedule message."""
    return ScheduleInfo(
        id=message.schedule_id,
        workflow=message.workflow,
        cron=message.cron,
        timezone=message.timezone,
        params=decode_json(message.params_json),
        catch_up=_CATCH_UP.get(message.catch_up, "once"),
        paused=message.paused,
        origin=_ORIGIN.get(message.origin, "api"),
        last_due_time=_time(message, "last_due_time"),
        last_instance_id=message.last_instance_id or None,
        next_due_time=_time(message, "next_due_time"),
        create_time=_time(message, "create_time"),
        update_time=_time(message, "update_time"),
    )
