"""The narrow interface between the engine and a database.

SQLite (``store/sqlite.py``) is the embedded default: one server owns the
file (a lock file), so its lease never expires, ``claim`` hands over every
unfinished instance once, and nobody else commits anything to be told of.
A store shared by several servers (PostgreSQL) fills the same protocol with
leases on instance rows, fencing by lease epoch in ``apply``, and
notifications between servers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from cruzflow.server.records import (
    Batch,
    Command,
    EventRecord,
    InboxEvent,
    InstanceQuery,
    InstanceRecord,
    InstanceStatus,
    Lease,
    Notice,
    Refusal,
    ScheduleRecord,
    StepRecord,
)


class StoreError(Exception):
    """The store could not read or write (disk full, locked, unreachable).

    ``cause`` names the fault in a few words ("disk full", "database locked",
    "read-only", ...). ``transient`` is true when nothing of the failed write
    was applied and the same write may succeed once the fault is mended, so
    the journal holds it and tries again instead of dropping it.
    """

    def __init__(
        self, message: str, *, cause: str = "store error", transient: bool = False
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.transient = transient


HELD_ELSEWHERE = "held by another server"
"""The ``cause`` of the StoreError ``claim_one`` raises for an instance another
live lease holds."""


READ_BATCH = 250
"""The most instances one ``get_instances`` or ``read_events_many`` takes."""


class Store(Protocol):
    """What the engine needs of a database: durable batches, reads, and who runs
    what. ``owner`` leases make several servers on one database safe: each
    unfinished instance is run by the one server whose lease holds it."""

    async def open(self) -> None:
        """Connect and apply migrations; a second server on a store that admits
        one only is refused here (StoreError)."""

    async def close(self) -> None:
        """Release connections. Pending writes must be applied first."""

    def page_token_key(self) -> bytes:
        """A random secret made when the store was created and kept in it, that
        signs ListInstances page tokens; the same after every restart (and, on
        a shared database, the same for every replica). Read once by ``open``."""

    # ----------------------------------------------------------- ownership
    @property
    def lease_period_s(self) -> float | None:
        """How long a lease lives without ``renew``; None if it never expires
        (a store with one server: SQLite's lock file is its lease)."""

    async def acquire(self, owner: str) -> Lease:
        """A lease for this server, ``owner`` naming it (unique per process)."""

    async def renew(self, lease: Lease) -> bool:
        """Keep ``lease`` alive for another period; False once it was lost (it
        expired), and the server must stop the runs it holds: their writes are
        refused from now on."""

    async def release(self, lease: Lease) -> None:
        """Give up the lease and the instances it holds (a graceful stop), so
        the other servers take them over at once instead of after the lease
        expires."""

    async def claim(self, lease: Lease, limit: int) -> list[InstanceRecord]:
        """Up to ``limit`` runnable instances (queued, running or pausing) that no
        live lease holds, oldest first, with their ``last_seq``: held by
        ``lease`` from now on. Waiting instances come through ``due_wakes``
        and ``claim_one``; paused ones on resume.

        With one server per store (SQLite), the first call returns every
        runnable instance and later calls none: the server created all others.
        """

    async def claim_one(self, lease: Lease, instance_id: str) -> InstanceRecord | None:
        """The instance, held by ``lease`` from now on, to wake it or to apply a
        control to it; None if no instance has that id. StoreError (not
        transient, ``cause`` HELD_ELSEWHERE) naming the holder if another live
        lease holds it."""

    # -------------------------------------------------------------- writes
    async def apply(self, batch: Batch, lease: Lease) -> dict[str, Refusal]:
        """Apply the batch in one transaction, durably, under ``lease``.

        Returns only when the transaction is durable. An instance whose writes
        cannot be applied (its new id is taken; another lease holds it, or
        ``lease`` was lost) is named in the result with why, and none of its
        writes land; the other instances' writes do. Raises StoreError and
        applies nothing if the store itself fails; the batch is left as it
        was, so the journal may apply the same batch again after a transient
        error.
        """

    # ------------------------------------------------------------ commands
    async def send_command(self, command: Command) -> None:
        """Record a control call for the server that holds the instance, durably,
        and tell that server (a ``NoticeKind.COMMAND`` notice)."""

    async def pending_commands(self, instance_id: str) -> list[Command]:
        """The instance's commands nobody has taken, oldest first."""

    async def take_command(self, command_id: str, taker: str) -> bool:
        """Take a pending command, for ``taker`` to do it (the holding server) or
        to give it up (the asking server, ``taker`` ABANDONED): True for the
        one caller that takes it, False if it was taken already."""

    async def answer_command(self, command_id: str, outcome: str) -> None:
        """Record what doing a taken command gave, durably."""

    async def command_outcome(self, command_id: str) -> str | None:
        """The command's recorded outcome; None while it is pending or being
        done. ABANDONED once its asker gave it up."""

    # ---------------------------------------------------------- notification
    def subscribe(self, listener: Callable[[list[Notice]], None]) -> None:
        """Have ``listener`` told of what other servers commit: new events of an
        instance (its watchers read them from the store), instances made
        runnable. Called on the event loop. A store with one server has no
        other servers to hear from; a lost notice costs latency, never an
        event (watchers and the timers read the store as well)."""

    # --------------------------------------------------------------- reads
    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        """The instance with its ``last_seq`` and ``audited``, or None. One
        indexed lookup (and a probe of the small audit index)."""

    async def get_steps(self, instance_id: str) -> list[StepRecord]:
        """The instance's steps in index order."""

    async def read_events(self, instance_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        """Up to ``limit`` events with ``seq > after_seq``, in order."""

    async def get_instances(self, instance_ids: Sequence[str]) -> dict[str, InstanceRecord]:
        """What ``get_instance`` gives for each of ``instance_ids`` (at most
        READ_BATCH) that is stored, by id: one query for them all."""

    async def read_events_many(
        self, cursors: Sequence[tuple[str, int]], limit_each: int
    ) -> list[EventRecord]:
        """For each (instance id, sequence) of ``cursors`` (at most READ_BATCH,
        ids distinct), up to ``limit_each`` of its events after that sequence,
        in one query: the first instance's in order, then the next one's (an
        instance given ``limit_each`` of them may have more)."""

    async def read_audit(self, instance_id: str, limit: int) -> list[EventRecord]:
        """The newest ``limit`` of the instance's REPAIRED events, oldest first
        (one range of the small audit index)."""

    async def take_events(self, instance_id: str, type: str, limit: int) -> list[InboxEvent]:
        """Up to ``limit`` unconsumed inbox events of that type, oldest first."""

    async def pending_types(self, instance_id: str, prefix: str) -> list[str]:
        """The types of the instance's unconsumed inbox events that start with
        ``prefix`` (one index range): which of a parent's children have ended
        since it last recorded one."""

    async def due_wakes(self, before: int, limit: int) -> list[tuple[str, int]]:
        """(id, wake_at) of waiting instances due before ``before`` (ms), soonest first."""

    async def count_unfinished(self) -> dict[InstanceStatus, int]:
        """How many instances are in each unfinished status (telemetry's
        baseline at start; it follows the changes after that)."""

    async def list_instances(
        self, query: InstanceQuery, limit: int
    ) -> list[tuple[int, InstanceRecord]]:
        """Up to ``limit`` instances matching ``query``, newest first, each with its
        position in creation order (the keyset cursor for the next page).

        Each page starts at its cursor with an index search, so page 1000
        costs what page 1 does. Records carry ``last_seq``.
        """

    async def count_instances(self, query: InstanceQuery) -> list[tuple[str, InstanceStatus, int]]:
        """(workflow, status, count) of the instances matching ``query``, one per
        workflow and status that has any, in no particular order; one GROUP BY
        statement. ``query.statuses`` and ``older_than`` are not used: every
        status is counted."""

    async def ended_before(self, before: int, limit: int) -> list[str]:
        """Ids of up to ``limit`` finished instances that ended before ``before``
        (ms), the longest ended first: retention's candidates."""

    # ------------------------------------------------------------ schedules
    # Written at once (not through a batch): a schedule changes seldom, and
    # what makes a due time fire once is its instance's id, not these rows.
    async def put_schedule(self, schedule: ScheduleRecord, *, replace: bool = False) -> bool:
        """Store a new schedule: True, or False if its id is taken. With
        ``replace`` (a config schedule at start) a stored one of that id takes
        the new definition and origin, keeping its paused flag and cursor."""

    async def drop_config_schedules(self, keep: list[str]) -> list[str]:
        """Delete the schedules of the config (origin CONFIG) whose id is not in
        ``keep``; the ids deleted."""

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None: ...

    async def list_schedules(
        self, workflow: str | None, after: str, limit: int
    ) -> list[ScheduleRecord]:
        """Up to ``limit`` schedules with an id after ``after`` (bytewise), by id;
        only those of ``workflow`` unless it is None."""

    async def pause_schedule(self, schedule_id: str, paused: bool, at: int) -> bool:
        """Set the paused flag; resuming also moves the cursor to ``at`` (the due
        times that passed while paused are not caught up). False: no such
        schedule."""

    async def delete_schedule(self, schedule_id: str) -> bool:
        """False: no such schedule."""

    async def mark_schedule(
        self, schedule_id: str, cursor_at: int, instance_id: str | None = None
    ) -> None:
        """Every due time up to ``cursor_at`` is done with (the cursor never
        moves back); with ``instance_id``, the instance fired at that due time
        (kept as the last fired unless a later one is)."""
