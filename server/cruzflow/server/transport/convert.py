"""Engine records to protobuf messages."""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from cruzflow.server.engine import validate
from cruzflow.server.records import (
    EventKind,
    EventRecord,
    InstanceRecord,
    ScheduleRecord,
    StepKind,
    StepRecord,
)
from cruzflow.v1 import workflows_pb2 as pb


def _ts(ms: int | None) -> Timestamp | None:
    if ms is None:
        return None
    return Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def ms(ts: Timestamp, field: str) -> int:
    """A request's timestamp in ms since the epoch; InvalidArgument naming ``field``
    if it is not a valid Timestamp (nanos out of range, past year 9999)."""
    return validate.timestamp_ms(ts.seconds, ts.nanos, field)


def seconds(duration: Duration, field: str) -> float:
    """A request's duration in seconds; InvalidArgument naming ``field`` if it is
    not a valid Duration or is negative."""
    return validate.duration_s(duration.seconds, duration.nanos, field)


def _text(data: bytes | None) -> str:
    return data.decode() if data is not None else ""


# A W3C traceparent: version, trace id, parent id, flags (a later version
# may add fields after them).
_TRACE_PARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?")


def trace_id(trace_parent: str | None) -> str:
    """The trace id of a stored W3C ``traceparent``; "" when there is none or
    it is malformed."""
    match = _TRACE_PARENT.fullmatch(trace_parent or "")
    if match is None:
        return ""
    version, trace, more = match.groups()
    # Version ff is invalid, version 00 has exactly four fields, and an
    # all-zero trace id is no trace.
    if version == "ff" or (version == "00" and more) or trace == "0" * 32:
        return ""
    return trace


def _error(name: str | None, message: str | None, traceback: str | None = None) -> pb.Error | None:
    if name is None:
        return None
    return pb.Error(name=name, message=message or "", traceback=traceback or "")


def _size(data: bytes | None) -> int:
    return len(data) if data is not None else 0


def payloads(record: InstanceRecord, steps: list[StepRecord], limit: int) -> pb.PayloadSizes:
    """The stored sizes of the instance's params, output and the given steps'
    results, against ``limit`` (limits.max_payload_bytes)."""
    params, output = _size(record.params), _size(record.output)
    results = [_size(s.output) for s in steps]
    return pb.PayloadSizes(
        params_bytes=params,
        output_bytes=output,
        largest_step_bytes=max(results, default=0),
        total_bytes=params + output + sum(results),
        limit_bytes=limit,
    )


def instance(record: InstanceRecord, steps: list[StepRecord], limit: int) -> pb.Instance:
    """``limit`` is limits.max_payload_bytes, reported beside the payloads' sizes."""
    return pb.Instance(
        instance_id=record.id,
        workflow=record.workflow,
        status=pb.InstanceStatus.ValueType(int(record.status)),
        params_json=_text(record.params),
        output_json=_text(record.output),
        error=_error(record.error_name, record.error_message, record.error_traceback),
        create_time=_ts(record.created_at),
        update_time=_ts(record.updated_at),
        end_time=_ts(record.ended_at),
        steps=[step(s) for s in steps],
        last_sequence=record.last_seq,
        lookup_key=record.lookup_key or "",
        wake_time=_ts(record.wake_at),
        start_time=_ts(record.run_started_at or record.created_at),
        trace_id=trace_id(record.trace_parent),
        parent_id=record.parent_id or "",
        priority=record.priority,
        concurrency_key=record.concurrency_key or "",
        schedule_id=record.schedule_id or "",
        payloads=payloads(record, steps, limit),
    )


def schedule(record: ScheduleRecord, next_due: int | None) -> pb.Schedule:
    return pb.Schedule(
        schedule_id=record.id,
        workflow=record.workflow,
        cron=record.cron,
        timezone=record.timezone,
        params_json=_text(record.params),
        catch_up=pb.CatchUpPolicy.ValueType(int(record.catch_up)),
        paused=record.paused,
        origin=pb.ScheduleOrigin.ValueType(int(record.origin)),
        last_due_time=_ts(record.last_due_at),
        last_instance_id=record.last_instance_id or "",
        next_due_time=_ts(next_due),
        create_time=_ts(record.created_at),
        update_time=_ts(record.updated_at),
    )


def step(record: StepRecord) -> pb.Step:
    return pb.Step(
        name=record.name,
        occurrence=record.occurrence,
        index=record.index,
        status=pb.StepStatus.ValueType(int(record.status)),
        attempts=record.attempts,
        start_time=_ts(record.started_at),
        end_time=_ts(record.ended_at),
        output_json=_text(record.output),
        error=_error(record.error_name, record.error_message, record.error_traceback),
        next_attempt_time=_ts(record.next_attempt_at),
        kind=pb.StepKind.ValueType(int(record.kind)),
        # The store keeps a child step's child id where an event wait's type goes.
        event_type=(record.event_type or "") if record.kind != StepKind.CHILD else "",
        child_instance_id=(record.event_type or "") if record.kind == StepKind.CHILD else "",
        output_size_bytes=_size(record.output),
    )


def repair(audit: dict[str, Any]) -> pb.Repair:
    """An audit entry: a REPAIRED event's data with its time ``at`` and the
    output it set ``out`` (see Controls._audit)."""
    step = None
    if "name" in audit:
        step = pb.StepRef(
            name=audit["name"],
            occurrence=audit["occ"],
            index=audit["idx"],
            kind=pb.StepKind.ValueType(audit.get("k", 1)),
        )
    return pb.Repair(
        time=_ts(audit["at"]),
        actor=audit.get("actor", ""),
        peer=audit.get("peer", ""),
        reason=audit.get("why", ""),
        action=pb.RepairAction.ValueType(audit.get("act", 0)),
        step=step,
        output_json=audit.get("out") or "",
    )


def repair_of(record: EventRecord) -> pb.Repair:
    """A REPAIRED event as its audit entry."""
    return repair({**record.data, "at": record.at, "out": _text(record.payload) or None})


def event(record: EventRecord) -> pb.WatchInstanceResponse:
    d = record.data
    msg = pb.WatchInstanceResponse(
        instance_id=record.instance_id, sequence=record.seq, time=_ts(record.at)
    )
    kind = record.kind
    if kind == EventKind.REPAIRED:
        msg.repaired.CopyFrom(repair_of(record))
        return msg
    if kind == EventKind.STATUS_CHANGED:
        err = d.get("err")
        msg.status_changed.CopyFrom(
            pb.StatusChanged(
                status=pb.InstanceStatus.ValueType(d["status"]),
                output_json=_text(record.payload),
                error=_error(*err) if err else None,
            )
        )
        return msg
    ref = pb.StepRef(
        name=d["name"],
        occurrence=d["occ"],
        index=d["idx"],
        kind=pb.StepKind.ValueType(d.get("k", 1)),
    )
    attempt = d["att"]
    if kind == EventKind.STEP_STARTED:
        msg.step_started.CopyFrom(pb.StepStarted(step=ref, attempt=attempt))
    elif kind == EventKind.STEP_SUCCEEDED:
        msg.step_succeeded.CopyFrom(
            pb.StepSucceeded(step=ref, attempt=attempt, output_json=_text(record.payload))
        )
    elif kind == EventKind.ATTEMPT_FAILED:
        delay_ms = d["delay"]
        msg.attempt_failed.CopyFrom(
            pb.AttemptFailed(
                step=ref,
                attempt=attempt,
                error=_error(*d["err"]),
                next_attempt_time=_ts(d["next"]),
                retry_delay=Duration(seconds=delay_ms // 1000, nanos=(delay_ms % 1000) * 1_000_000),
            )
        )
    elif kind == EventKind.STEP_FAILED:
        msg.step_failed.CopyFrom(pb.StepFailed(step=ref, attempt=attempt, error=_error(*d["err"])))
    return msg
