"""Rows as records: both stores select the columns of each table in the same
order, so one mapping serves them (only what differs by database differs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cruzflow.server.records import (
    CatchUp,
    EventKind,
    EventRecord,
    InboxEvent,
    InstanceRecord,
    InstanceStatus,
    ScheduleOrigin,
    ScheduleRecord,
    StepKind,
    StepRecord,
    StepStatus,
)


def instance_of(row: Sequence[Any]) -> InstanceRecord:
    """id, workflow, status, params, created_at, updated_at, output, error_name,
    error_message, ended_at, lookup_key, wake_at, trace_parent,
    error_traceback, run_started_at, then the newest event's sequence; then,
    where the query reads them, parent_id, abandon, priority, concurrency_key,
    gate and schedule_id."""
    return InstanceRecord(
        id=row[0],
        workflow=row[1],
        status=InstanceStatus(row[2]),
        params=row[3],
        created_at=row[4],
        updated_at=row[5],
        output=row[6],
        error_name=row[7],
        error_message=row[8],
        ended_at=row[9],
        lookup_key=row[10],
        wake_at=row[11],
        trace_parent=row[12],
        error_traceback=row[13],
        run_started_at=row[14],
        last_seq=row[15],
        # Past the record table PostgreSQL's functions return: reads add them.
        parent_id=row[16] if len(row) > 16 else None,
        abandon=bool(row[17]) if len(row) > 17 else False,
        priority=row[18] if len(row) > 18 else 0,
        concurrency_key=row[19] if len(row) > 19 else None,
        gate=row[20] if len(row) > 20 else None,
        schedule_id=row[21] if len(row) > 21 else None,
    )


def step_of(r: Sequence[Any]) -> StepRecord:
    """instance_id, idx, name, occurrence, status, attempts, started_at,
    ended_at, output, error_name, error_message, next_attempt_at, kind,
    event_type, error_traceback."""
    return StepRecord(
        instance_id=r[0],
        index=r[1],
        name=r[2],
        occurrence=r[3],
        status=StepStatus(r[4]),
        attempts=r[5],
        started_at=r[6],
        ended_at=r[7],
        output=r[8],
        error_name=r[9],
        error_message=r[10],
        next_attempt_at=r[11],
        kind=StepKind(r[12]),
        event_type=r[13],
        error_traceback=r[14],
    )


def event_of(r: Sequence[Any]) -> EventRecord:
    """instance_id, seq, at, kind, data (JSON text), payload."""
    return EventRecord(r[0], r[1], r[2], EventKind(r[3]), json.loads(r[4]), r[5])


def inbox_of(r: Sequence[Any]) -> InboxEvent:
    """id, instance_id, type, payload, at, trace_parent."""
    return InboxEvent(r[1], r[2], r[3], r[4], r[0], r[5])


def schedule_of(r: Sequence[Any]) -> ScheduleRecord:
    """id, workflow, cron, timezone, params, catch_up, paused, origin,
    created_at, updated_at, cursor_at, last_due_at, last_instance_id."""
    return ScheduleRecord(
        id=r[0],
        workflow=r[1],
        cron=r[2],
        timezone=r[3],
        params=bytes(r[4]),
        catch_up=CatchUp(r[5]),
        paused=bool(r[6]),
        origin=ScheduleOrigin(r[7]),
        created_at=r[8],
        updated_at=r[9],
        cursor_at=r[10],
        last_due_at=r[11],
        last_instance_id=r[12],
    )
