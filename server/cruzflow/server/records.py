"""The record types: instances, steps, events, and a batch of writes.

The bottom floor: the engine and every store import these, and they import
nothing of either, so store and engine do not import each other.

The numbers of the enums are the numbers of the protobuf enums of the same
name (a test pins that), so the transport converts them without a table.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class InstanceStatus(enum.IntEnum):
    QUEUED = 1
    RUNNING = 2
    PAUSED = 3
    WAITING = 4
    WAITING_FOR_PAUSE = 5
    COMPLETE = 6
    ERRORED = 7
    TERMINATED = 8
    UNKNOWN = 9

    @property
    def label(self) -> str:
        """The status as users of the model spell it: ``waitingForPause``."""
        return _LABELS[self]

    @property
    def finished(self) -> bool:
        return self in FINISHED


_LABELS = {
    InstanceStatus.QUEUED: "queued",
    InstanceStatus.RUNNING: "running",
    InstanceStatus.PAUSED: "paused",
    InstanceStatus.WAITING: "waiting",
    InstanceStatus.WAITING_FOR_PAUSE: "waitingForPause",
    InstanceStatus.COMPLETE: "complete",
    InstanceStatus.ERRORED: "errored",
    InstanceStatus.TERMINATED: "terminated",
    InstanceStatus.UNKNOWN: "unknown",
}
FINISHED = frozenset({InstanceStatus.COMPLETE, InstanceStatus.ERRORED, InstanceStatus.TERMINATED})
UNFINISHED = tuple(s for s in InstanceStatus if s not in FINISHED and s != InstanceStatus.UNKNOWN)


class StepStatus(enum.IntEnum):
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3


class StepKind(enum.IntEnum):
    DO = 1
    SLEEP = 2
    WAIT_FOR_EVENT = 3
    CHILD = 4
    ROLLBACK = 5
    VERSION = 6


# Inbox events of types starting so are the engine's own: SendEvent and
# wait_for_event refuse them. A child's end is told to its parent as
# CHILD_ENDED + the child's id (the parent's wait reads the child's record).
RESERVED_EVENT_PREFIX = "cruzflow:"
# The step row that records a terminate with rollback until it is done (a
# position no step of run() takes): kind ROLLBACK, name "terminate".
TERMINATE_STEP = -1
CHILD_ENDED = "cruzflow:child:"


class EventKind(enum.IntEnum):
    STATUS_CHANGED = 1
    STEP_STARTED = 2
    ATTEMPT_FAILED = 3
    STEP_SUCCEEDED = 4
    STEP_FAILED = 5
    REPAIRED = 6
    """An audited change of the recorded steps (see Repair): data holds
    ``act``, ``actor``, ``peer``, ``why`` and the step's ref if any; the
    payload, the output set."""


@dataclass(slots=True)
class InstanceRecord:
    id: str
    workflow: str
    status: InstanceStatus
    params: bytes
    created_at: int  # ms since the epoch
    updated_at: int
    output: bytes | None = None
    error_name: str | None = None
    error_message: str | None = None
    ended_at: int | None = None
    last_seq: int = 0
    lookup_key: str | None = None
    wake_at: int | None = None
    trace_parent: str | None = None
    """The creator's trace context (W3C traceparent), when telemetry is on."""
    error_traceback: str | None = None
    """With ``error_name``: where the error was raised (bounded, see tracebacks.py)."""
    run_started_at: int | None = None
    """When the current run began: the creation, or the last RestartInstance
    (None in rows stored before it was kept: the creation)."""
    parent_id: str | None = None
    """The instance whose ``step.child`` started this one."""
    abandon: bool = False
    """With a parent: left running when the parent is terminated or restarted
    (``parent_close="abandon"``), instead of terminated with it."""
    priority: int = 0
    """Higher starts first among the instances waiting for a concurrency slot."""
    concurrency_key: str | None = None
    """The key whose slots the instance takes ("" for a workflow-wide limit);
    None for a workflow without limits."""
    gate: int | None = None
    """None: no limit applies; 0: waiting for a slot; 1: let through (holds a
    slot until it finishes). Unknown (None) in records a shared store's claim
    returns: those are never 0."""
    schedule_id: str | None = None
    """The schedule that created the instance; None when a caller did."""
    audited: bool = False
    """Whether its event log holds REPAIRED events (set by ``get_instance``
    only): GetStatus reads them only then."""


@dataclass(slots=True)
class InstanceUpdate:
    """The new mutable fields of an existing instance."""

    id: str
    status: InstanceStatus
    updated_at: int
    output: bytes | None = None
    error_name: str | None = None
    error_message: str | None = None
    ended_at: int | None = None
    wake_at: int | None = None
    error_traceback: str | None = None
    run_started_at: int | None = None
    """Written when set; None keeps the stored value."""


@dataclass(slots=True)
class StepRecord:
    instance_id: str
    index: int
    name: str
    occurrence: int
    status: StepStatus
    attempts: int
    started_at: int
    ended_at: int | None = None
    output: bytes | None = None
    error_name: str | None = None
    error_message: str | None = None
    next_attempt_at: int | None = None
    kind: StepKind = StepKind.DO
    event_type: str | None = None
    """For an event wait, the type it waits for; for a child (CHILD), the
    child's instance id."""
    error_traceback: str | None = None


@dataclass(slots=True)
class InboxEvent:
    """An event sent to an instance; ``id`` is set once stored."""

    instance_id: str
    type: str
    payload: bytes
    at: int
    id: int = 0
    trace_parent: str | None = None
    """The sender's trace context (W3C traceparent), when telemetry is on: the
    span of the wait that takes the event links to it."""


@dataclass(slots=True)
class EventRecord:
    """One entry of an instance's append-only event log.

    ``data`` holds the small fields of the event (status, step name, attempt,
    error, retry times); ``payload`` the JSON output it carries, if any.
    """

    instance_id: str
    seq: int
    at: int
    kind: EventKind
    data: dict[str, Any]
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Gate:
    """A workflow's concurrency and rate limits, which hold per concurrency key
    (one key for the whole workflow when it names none)."""

    limit: int | None = None
    """Instances that hold a slot at once, per key; None: no bound."""
    starts: int | None = None
    """Starts (slots granted) per ``per_ms``, per key; None: no rate limit."""
    per_ms: int = 0
    """The rate limit's window, in ms."""
    key_path: tuple[str, ...] = ()
    """Where the key is in the params (object members, outer first); empty:
    one key ("") for the whole workflow."""


UNGATED = Gate()
"""What a workflow that lost its limits (from the config) lets through: all."""


@dataclass(slots=True)
class Batch:
    """Writes that commit together in one transaction.

    Updates of the same instance or step within one batch collapse to the
    last one, so a batch holds at most one row write per instance and step.
    """

    new_instances: list[InstanceRecord] = field(default_factory=list)
    instance_updates: dict[str, InstanceUpdate] = field(default_factory=dict)
    steps: dict[tuple[str, int], StepRecord] = field(default_factory=dict)
    events: list[EventRecord] = field(default_factory=list)
    # Restart: the instance's steps are deleted before this batch's steps land.
    cleared_steps: set[str] = field(default_factory=set)
    inbox: list[InboxEvent] = field(default_factory=list)
    # Inbox event id -> the instance and the step index that took it.
    consumed: dict[int, tuple[str, int]] = field(default_factory=dict)
    # Retention: instance id -> a time (ms). The instance goes, with its steps,
    # events and inbox, if it ended before that time; applied after the
    # batch's other writes, so one that changed meanwhile stays.
    purge: dict[str, int] = field(default_factory=dict)
    # Set by the store once applied: how many instances the purge removed.
    purged: int = 0
    # Concurrency gates, opened as far as their limits allow after the batch's
    # other writes, in its transaction: the limits of each workflow named; the
    # instances whose (workflow, key) to look at (created, finished, resumed);
    # (workflow, key) pairs to look at (a rate limit's window moved on); and
    # whether to look at every key that has instances waiting (at start).
    gates: dict[str, Gate] = field(default_factory=dict)
    gate_ids: set[str] = field(default_factory=set)
    gate_keys: set[tuple[str, str]] = field(default_factory=set)
    gate_sweep: bool = False
    # Existing instances stored as waiting for a slot again (resumed, restarted).
    gate_hold: set[str] = field(default_factory=set)
    # Set by the store once applied: the instances let through (now queued
    # for a server slot, holding their key's slot), and the keys a rate limit
    # holds back with when to look again (workflow, key, ms).
    promoted: list[str] = field(default_factory=list)
    gate_retry: list[tuple[str, str, int]] = field(default_factory=list)

    def without(self, ids: set[str] | frozenset[str]) -> Batch:
        """A copy of the batch with no write of the instances ``ids`` (the
        writes of the others, for a store that refuses those instances)."""
        return Batch(
            new_instances=[r for r in self.new_instances if r.id not in ids],
            instance_updates={k: u for k, u in self.instance_updates.items() if k not in ids},
            steps={k: s for k, s in self.steps.items() if k[0] not in ids},
            events=[e for e in self.events if e.instance_id not in ids],
            cleared_steps=self.cleared_steps - ids,
            inbox=[e for e in self.inbox if e.instance_id not in ids],
            consumed={k: v for k, v in self.consumed.items() if v[0] not in ids},
            purge={k: v for k, v in self.purge.items() if k not in ids},
            gates=self.gates,
            gate_ids=self.gate_ids - ids,
            gate_keys=self.gate_keys,
            gate_sweep=self.gate_sweep,
            gate_hold=self.gate_hold - ids,
        )

    def __bool__(self) -> bool:
        return bool(
            self.new_instances
            or self.instance_updates
            or self.steps
            or self.events
            or self.cleared_steps
            or self.inbox
            or self.consumed
            or self.purge
            or self.gate_ids
            or self.gate_keys
            or self.gate_sweep
        )


@dataclass(frozen=True, slots=True)
class InstanceQuery:
    """Which instances a listing returns, newest first; each field set narrows it."""

    workflow: str | None = None
    """Only instances of this workflow."""
    statuses: tuple[InstanceStatus, ...] = ()
    """Only instances in one of these statuses; empty means any."""
    created_min: int | None = None
    """Only instances created at or after this time (ms since the epoch)."""
    created_max: int | None = None
    """Only instances created before this time (ms since the epoch)."""
    lookup_key: str | None = None
    """Only instances created with this lookup key."""
    parent_id: str | None = None
    """Only the children of this instance (started by its ``step.child``)."""
    schedule_id: str | None = None
    """Only instances that this schedule created."""
    older_than: int | None = None
    """Keyset cursor: only instances stored before this position (the position
    the store returned with the previous page's last instance)."""


# ------------------------------------------------------------ ownership


@dataclass(frozen=True, slots=True)
class Lease:
    """A server's right to run instances, held in the store.

    ``owner`` names the server (unique per process); ``epoch`` grows each time
    a lease is granted, so a write made under a lease that was lost (expired,
    and its instances taken over) is told apart from the new holder's and
    refused by the store: the fencing token.
    """

    owner: str
    epoch: int


class Refusal(enum.Enum):
    """Why a store did not apply the writes of one instance of a batch (the
    other instances' writes were applied)."""

    CONFLICT = "conflict"
    """A new instance's id is taken: another instance has it."""
    FENCED = "fenced"
    """The instance is held by another lease, or this lease was lost."""


class NoticeKind(enum.IntEnum):
    EVENTS = 1
    """New events of the instance are stored, up to ``seq``."""
    RUNNABLE = 2
    """The instance waits for a server to run it (queued, or due to wake)."""
    COMMAND = 3
    """A control call for the instance waits for the server that runs it."""


@dataclass(frozen=True, slots=True)
class Notice:
    """A change another server committed, told to this one (see Store.subscribe)."""

    instance_id: str
    kind: NoticeKind
    seq: int = 0


class RepairAction(enum.IntEnum):
    """What an audited change did (the numbers of the protobuf enum)."""

    SET_OUTPUT = 1
    RETRY = 2
    RESTART = 3


@dataclass(frozen=True, slots=True)
class Repair:
    """An audited change of an instance's recorded steps, as asked for:
    RepairInstance (SET_OUTPUT, RETRY) or RestartInstance (RESTART, from
    ``step`` or, with none, from scratch)."""

    action: RepairAction
    step: str | None
    occurrence: int
    reason: str
    actor: str
    """The calling token's name; "anonymous" without authentication."""
    peer: str
    at: int
    """When it was asked (ms since the epoch)."""
    output: bytes | None = None
    """With SET_OUTPUT: the step's new result, as checked JSON."""

    def encode(self) -> str:
        """As a Command's kind (text in both stores): ``repair:`` and JSON."""
        return "repair:" + json.dumps({
            "act": int(self.action), "step": self.step, "occ": self.occurrence,
            "why": self.reason, "actor": self.actor, "peer": self.peer, "at": self.at,
            "out": None if self.output is None else self.output.decode(),
        }, separators=(",", ":"))  # fmt: skip

    @staticmethod
    def decode(kind: str) -> Repair:
        d = json.loads(kind.removeprefix("repair:"))
        out = d["out"]
        return Repair(
            RepairAction(d["act"]), d["step"], d["occ"], d["why"], d["actor"], d["peer"],
            d["at"], None if out is None else out.encode(),
        )  # fmt: skip


@dataclass(slots=True)
class Command:
    """A control call (pause, resume, terminate, restart) for an instance that
    another server runs: recorded in the store, done by that server, which
    records the outcome for the server that was asked."""

    id: str
    """Made by the asking server (a uuid): the same in every store."""
    instance_id: str
    kind: str
    """``pause``, ``resume``, ``terminate``, ``terminate-rollback``,
    ``restart``, or an audited change: ``repair:`` and its JSON (Repair.encode)."""
    at: int = 0
    """When it was asked (ms since the epoch)."""


COMMAND_KINDS = ("pause", "resume", "terminate", "restart")
ABANDONED = "abandoned"
"""The outcome the asking server records for a command nobody took in time."""


# ------------------------------------------------------------ schedules


class CatchUp(enum.IntEnum):
    """What a schedule does about due times no server fired in time (the
    numbers of the protobuf enum CatchUpPolicy)."""

    SKIP = 1
    ONCE = 2


class ScheduleOrigin(enum.IntEnum):
    CONFIG = 1
    API = 2


@dataclass(slots=True)
class ScheduleRecord:
    """A cron schedule as stored (times in ms since the epoch)."""

    id: str
    workflow: str
    cron: str
    timezone: str
    params: bytes
    catch_up: CatchUp
    paused: bool
    origin: ScheduleOrigin
    created_at: int
    updated_at: int
    cursor_at: int
    """Every due time up to this one is done with: fired, or passed over (the
    catch-up policy, a pause). Due times after it are still to fire."""
    last_due_at: int | None = None
    """The due time of the last instance fired at a due time."""
    last_instance_id: str | None = None
