"""The client's domain types: what the service's messages mean, in Python terms.

Payloads arrive decoded from JSON, times as aware UTC ``datetime`` objects,
and the protobuf enums as string enums whose values are the status words the
service documents (``"running"``, ``"waitingForPause"``, ``"complete"``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

__all__ = [
    "CallerInfo",
    "ErrorInfo",
    "EventKind",
    "InstanceCount",
    "InstanceCounts",
    "InstancePage",
    "InstanceStatus",
    "InstanceStatusInfo",
    "PayloadSizes",
    "StepInfo",
    "StepKind",
    "StepRef",
    "StepStatus",
    "WatchEvent",
    "WorkflowInfo",
]


class InstanceStatus(enum.StrEnum):
    """The lifecycle state of an instance, as the service spells it."""

    QUEUED = "queued"
    """Stored, waiting for a free slot to run."""
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    """In a durable sleep or waiting for an event."""
    WAITING_FOR_PAUSE = "waitingForPause"
    """A pause was asked for; the running step finishes first."""
    COMPLETE = "complete"
    ERRORED = "errored"
    TERMINATED = "terminated"
    UNKNOWN = "unknown"
    """Also what a status this client does not know yet is read as."""

    @property
    def finished(self) -> bool:
        """True for the final statuses: complete, errored and terminated."""
        return self in _FINISHED


_FINISHED = frozenset({InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED})


class StepStatus(enum.StrEnum):
    """The state of one step of an instance."""

    RUNNING = "running"
    """An attempt is in flight, or the next attempt is scheduled."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Failed after all its attempts; the error was raised into ``run``."""
    UNKNOWN = "unknown"


class StepKind(enum.StrEnum):
    """What a step does."""

    DO = "do"
    """``step.do``: runs a callback."""
    SLEEP = "sleep"
    """``step.sleep`` or ``step.sleep_until``."""
    WAIT_FOR_EVENT = "waitForEvent"
    """``step.wait_for_event``."""
    CHILD = "child"
    """``step.child``: starts a child instance and waits for its end."""
    ROLLBACK = "rollback"
    """A step's rollback, run when the instance failed or was terminated with
    rollback (and the "terminate" row of the latter)."""
    VERSION = "version"
    """A version marker (``step.version``): where new code took a new path."""
    UNKNOWN = "unknown"


class EventKind(enum.StrEnum):
    """The kind of a :class:`WatchEvent`, named as in the service's event log."""

    STATUS_CHANGED = "status_changed"
    STEP_STARTED = "step_started"
    ATTEMPT_FAILED = "attempt_failed"
    STEP_SUCCEEDED = "step_succeeded"
    STEP_FAILED = "step_failed"
    REPAIRED = "repaired"
    UNKNOWN = "unknown"
    """An event of a kind this client does not know yet."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error the way Python names it: the exception class and its text, and
    where it was raised. Two errors are equal by name and message."""

    name: str
    message: str
    traceback: str | None = field(default=None, compare=False)
    """The traceback as Python prints it (at most 8 KiB), or None when no code
    raised the error (a timed-out event wait, an interrupted attempt)."""


@dataclass(frozen=True, slots=True)
class StepInfo:
    """One step of an instance, as ``InstanceHandle.status()`` reports it."""

    name: str
    """The name given to ``step.do`` (or ``sleep``, ``wait_for_event``)."""
    occurrence: int
    """1 for the first step of this name in a run, 2 for the second, ..."""
    index: int
    """Position among all steps of the run, from 0."""
    kind: StepKind
    status: StepStatus
    attempts: int
    """Attempts started so far, including one cut short by a server restart."""
    start_time: datetime | None
    end_time: datetime | None
    output: Any
    """The step's result, decoded from JSON; ``None`` until it succeeded."""
    error: ErrorInfo | None
    """The last attempt's error; final once the step failed."""
    next_attempt_time: datetime | None
    """When a pending retry is due; for a sleep when it ends; for an event wait
    when it times out."""
    event_type: str | None
    """For an event wait: the event type it waits for."""
    child_id: str | None = None
    """For a child step: the child instance's id."""
    output_bytes: int = 0
    """The stored size of the step's result, in bytes of JSON; 0 until it
    succeeded. It must stay within ``PayloadSizes.limit_bytes``."""


@dataclass(frozen=True, slots=True)
class PayloadSizes:
    """How many bytes of JSON an instance stores, against the server's limit
    (``limits.max_payload_bytes``), which params, each event payload, each
    step result and the output must each stay within."""

    params_bytes: int
    output_bytes: int
    """0 until the instance is complete."""
    largest_step_bytes: int
    """The largest step result; 0 in listings, which carry no steps."""
    total_bytes: int
    """Params, output and every step result added up (steps: as above)."""
    limit_bytes: int

    @property
    def fullest(self) -> float:
        """The largest of params, output and the step results as a share of the
        limit: 0.8 means one of them is at 80 % of what the server accepts."""
        largest = max(self.params_bytes, self.output_bytes, self.largest_step_bytes)
        return largest / self.limit_bytes if self.limit_bytes else 0.0


@dataclass(frozen=True, slots=True)
class StepRef:
    """Which step a :class:`WatchEvent` (or a :class:`RepairInfo`) is about."""

    name: str
    occurrence: int
    index: int
    kind: StepKind


@dataclass(frozen=True, slots=True)
class RepairInfo:
    """One audited change of an instance's recorded steps: a repair
    (``InstanceHandle.repair``) or a restart from a step (or with a reason)."""

    time: datetime | None
    actor: str
    """The calling token's name; "anonymous" when the server has no authentication."""
    peer: str | None
    """The caller's address as the server saw it."""
    reason: str
    action: str
    """``"set_output"``, ``"retry"`` or ``"restart"``."""
    step: StepRef | None
    """The step repaired, or restarted from; None for a restart from scratch."""
    output: Any = None
    """With ``set_output``: the result set, decoded from JSON."""


@dataclass(frozen=True, slots=True)
class InstanceStatusInfo:
    """The durable state of one instance."""

    id: str
    workflow: str
    status: InstanceStatus
    params: Any
    """The params the instance was created with, decoded from JSON."""
    output: Any
    """What ``run`` returned, decoded from JSON; ``None`` unless complete."""
    error: ErrorInfo | None
    """Set once errored."""
    create_time: datetime | None
    update_time: datetime | None
    end_time: datetime | None
    """Set once the instance reached a final status."""
    wake_time: datetime | None
    """While waiting: when it resumes by itself (a sleep ends, an event wait times out)."""
    lookup_key: str | None
    last_sequence: int
    """Sequence number of the newest event (see ``InstanceHandle.watch``)."""
    start_time: datetime | None = None
    """When the current run began: the creation, or the last restart."""
    steps: tuple[StepInfo, ...] = field(default=())
    """The steps so far, in the order ``run`` reached them; empty in listings."""
    trace_id: str | None = None
    """The W3C trace id (32 hex digits) of the trace the instance's runs belong
    to, when the server traces; ``None`` otherwise."""
    parent_id: str | None = None
    """The instance whose ``step.child`` started this one; ``None`` for one
    created through the API (list a parent's children with
    ``list_instances(parent_id=...)``)."""
    priority: int = 0
    """The priority given at creation: among instances waiting for a slot of a
    workflow's concurrency limit, higher starts first."""
    concurrency_key: str | None = None
    """The concurrency key whose slot the instance takes (a workflow limited per
    key); None otherwise."""
    schedule_id: str | None = None
    """The schedule that created the instance; ``None`` when a caller did."""
    repairs: tuple[RepairInfo, ...] = field(default=())
    """Its audited repairs and restarts from a step, oldest first (the newest
    100; ``watch`` has them all); empty in listings."""
    payloads: PayloadSizes | None = None
    """The stored size of the params, step results and output against the
    limit; ``None`` from a server too old to report it."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of an instance's durable event log.

    Which fields are set depends on ``kind``:

    * ``STATUS_CHANGED``: ``status``; ``output`` once complete, ``error`` once
      errored. The event that brings a final status ends the watch.
    * ``STEP_STARTED``: ``step``, ``attempt``.
    * ``ATTEMPT_FAILED``: ``step``, ``attempt``, ``error``,
      ``next_attempt_time``, ``retry_delay``.
    * ``STEP_SUCCEEDED``: ``step``, ``attempt``, ``output``.
    * ``STEP_FAILED``: ``step``, ``attempt``, ``error``.
    * ``REPAIRED``: ``repair`` (and ``step``, the step it is about, if any).
    """

    instance_id: str
    sequence: int
    """Starts at 1 and grows by one for every event of the instance."""
    time: datetime | None
    kind: EventKind
    status: InstanceStatus | None = None
    step: StepRef | None = None
    attempt: int | None = None
    output: Any = None
    error: ErrorInfo | None = None
    next_attempt_time: datetime | None = None
    retry_delay: timedelta | None = None
    repair: RepairInfo | None = None

    @property
    def is_final(self) -> bool:
        """True for the status change to a final status (complete, errored, terminated)."""
        return (
            self.kind is EventKind.STATUS_CHANGED
            and self.status is not None
            and self.status.finished
        )


@dataclass(frozen=True, slots=True)
class WorkflowInfo:
    """A workflow class the server hosts."""

    name: str
    """What instances are created by, e.g. ``"onboarding-workflow"``."""
    binding: str
    """The binding name from the server's config, e.g. ``"ONBOARDING_WORKFLOW"``."""
    class_name: str
    """The Python class, as ``"package.module:Class"``."""


@dataclass(frozen=True, slots=True)
class InstancePage:
    """One page of ``Client.list_instances_page``."""

    instances: tuple[InstanceStatusInfo, ...]
    """Newest first, without their steps."""
    next_page_token: str
    """Pass it back (with the same filters) for the next page; empty on the last."""


@dataclass(frozen=True, slots=True)
class InstanceCount:
    """How many instances of a workflow are in a status."""

    workflow: str
    status: InstanceStatus
    count: int


@dataclass(frozen=True, slots=True)
class InstanceCounts:
    """The answer of ``Client.count_instances``."""

    counts: tuple[InstanceCount, ...]
    """One per workflow and status that has instances, by workflow, then status."""
    total: int
    """The sum of the counts."""

    def of(self, workflow: str | None = None, status: InstanceStatus | str | None = None) -> int:
        """The sum of the counts of ``workflow`` and ``status`` (either ``None``:
        any), e.g. ``counts.of(status="errored")``."""
        wanted = None if status is None else InstanceStatus(status)
        return sum(
            c.count
            for c in self.counts
            if (workflow is None or c.workflow == workflow)
            and (wanted is None or c.status is wanted)
        )


@dataclass(frozen=True, slots=True)
class CallerInfo:
    """What the client's token may do (``Client.caller``)."""

    auth_required: bool
    """Whether the server asks for a token; without, every call is allowed."""
    token_name: str | None
    """The token's name in the server's config; ``None`` without auth."""
    read_only: bool
    """A read-only token may call only the methods that change nothing."""
    workflows: tuple[str, ...]
    """The workflows whose instances it may see and change, sorted; empty: all."""


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A cron schedule (``Client.create_schedule``): an instance of ``workflow``
    at each due time, with the id ``sched-<id>-<due time, UTC>``."""

    id: str
    workflow: str
    cron: str
    """Five fields, or six with seconds first, e.g. ``"0 9 * * MON"``."""
    timezone: str
    """The IANA time zone the cron expression is read in."""
    params: Any
    """The params of every instance it creates, decoded from JSON."""
    catch_up: str
    """``"once"``: the most recent missed due time fires once; ``"skip"``: none."""
    paused: bool
    origin: str
    """``"config"`` (the server's [[schedules]]) or ``"api"``."""
    last_due_time: datetime | None
    """The due time of the last instance it created at a due time."""
    last_instance_id: str | None
    next_due_time: datetime | None
    """``None`` while paused."""
    create_time: datetime | None
    update_time: datetime | None
