"""An instance while the engine holds it in memory, and what it writes.

A ``Run`` carries the instance's sequence number and status between its
writes, adds its events, step rows and status changes to the journal's
open batch, and waits for them at step boundaries (``barrier``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cruzflow.server.engine.core import Core, WorkflowSpec, ms
from cruzflow.server.engine.errors import Suspend, Terminating
from cruzflow.server.engine.journal import Durable
from cruzflow.server.records import (
    CHILD_ENDED,
    EventKind,
    EventRecord,
    InboxEvent,
    InstanceRecord,
    InstanceStatus,
    InstanceUpdate,
    StepRecord,
)
from cruzflow.server.store.base import StoreError

log = logging.getLogger("cruzflow.engine")


def about(run: Run, step: str | None = None, traceback: str | None = None) -> dict[str, Any]:
    """The fields a log record about an instance carries (see telemetry's formats)."""
    fields = {"instance_id": run.id, "workflow": run.spec.name}
    if step is not None:
        fields["step"] = step
    if traceback is not None:
        fields["traceback"] = traceback
    return fields


class Run:
    """An instance while the engine holds it in memory (running, queued, or held
    by a control call). At most one exists per instance: see ``Controls.hold``."""

    __slots__ = (
        "abandon", "busy", "claimed", "compensations", "core", "created_at", "ended", "error",
        "gate", "held", "id", "idle", "last_write", "next_index", "occurrences", "params",
        "parent_id",
        "parked", "pause_requested", "poked", "pokes", "queued", "record", "replay",
        "replay_names",
        "resumed", "run_started_at", "seq", "span", "spec", "status", "stirred", "strays",
        "task", "terminating", "trace_parent", "versions",
    )  # fmt: skip

    def __init__(
        self, core: Core, record: InstanceRecord, spec: WorkflowSpec, resumed: bool
    ) -> None:
        self.core = core
        # As loaded or created: the fields no run changes (params, lookup key,
        # parent...) for a reply built without a read (Reads.wait).
        self.record = record
        self.id = record.id
        self.spec = spec
        self.params = record.params
        self.created_at = record.created_at
        self.run_started_at = record.run_started_at or record.created_at
        self.status = record.status
        self.seq = record.last_seq
        self.resumed = resumed
        self.next_index = 0
        self.occurrences: dict[str, int] = {}
        self.replay: dict[int, StepRecord] | None = None
        # The same records by (name, occurrence): built when first asked for.
        self.replay_names: dict[tuple[str, int], StepRecord] | None = None
        self.last_write: Durable | None = None
        self.task: asyncio.Task[None] | None = None
        # A pause asked for while running: taken at the next step boundary.
        self.pause_requested = record.status == InstanceStatus.WAITING_FOR_PAUSE
        # An event arrived for this instance while its run was in memory; and
        # how many have: a wait compares it with the count it saw when it last
        # looked at what it waits for (see park).
        self.poked = False
        self.pokes = 0
        # Inbox events this run has taken but whose taking is not yet durable.
        self.claimed: set[int] = set()
        self.queued = False
        self.held = 0
        self.trace_parent = record.trace_parent
        # 0 while it waits for its concurrency key's slot (see Scheduler.enqueue).
        self.gate = record.gate
        # The error this run ended the instance with, and its traceback, for the observer.
        self.error: tuple[str, str, str | None] | None = None
        # The observer's token for the run in memory (its span).
        self.span: Any = None
        # Tasks other than ``task`` that took a step (asyncio.gather,
        # TaskGroup): cut when run() ends, so none writes after the end.
        self.strays: set[asyncio.Task[Any]] = set()
        # Attempts of step bodies in flight (more than one with parallel steps),
        # and what a branch waiting at a boundary for them to end waits on.
        self.busy = 0
        self.idle: asyncio.Event | None = None
        # Parallel branches waiting in memory while others run (see park):
        # each one's wake time and the poke count it saw; and what they wait on.
        self.parked: dict[asyncio.Task[Any] | None, tuple[int, int]] = {}
        self.stirred: asyncio.Event | None = None
        # The instance whose step.child started this one, told when it ends.
        self.parent_id = record.parent_id
        self.abandon = record.abandon
        # The rollbacks of the steps that succeeded, registered as run() goes
        # (replayed steps too), and whether a terminate with rollback unwinds it.
        self.compensations: list[Any] = []
        self.terminating = False
        # The children whose end is in the inbox, not yet recorded, and the
        # poke count when that was read (StepRunner.child reads it again after
        # a poke): one read per wake-up, however many children wait.
        self.ended: tuple[int, frozenset[str]] | None = None
        # What each step.version name answered in this run (made on first use).
        self.versions: dict[str, bool] | None = None

    @property
    def active(self) -> bool:
        return self.task is not None

    def reset_for_replay(self) -> None:
        """Run ``run`` from the top again, replaying what the store holds."""
        self.resumed = True
        self.next_index = 0
        self.occurrences = {}
        self.replay = None
        self.replay_names = None
        self.claimed = set()
        self.poked = False
        self.compensations = []
        self.ended = None
        self.versions = None

    def emit(
        self,
        kind: EventKind,
        data: dict[str, Any],
        payload: bytes | None = None,
        at: int | None = None,
    ) -> Durable:
        self.seq += 1
        at = ms() if at is None else at
        fut = self.core.journal.append(EventRecord(self.id, self.seq, at, kind, data, payload))
        self.last_write = fut
        return fut

    def put_step(self, record: StepRecord) -> None:
        self.last_write = self.core.journal.put_step(record)

    def set_status(
        self,
        status: InstanceStatus,
        output: bytes | None = None,
        error: tuple[str, str] | None = None,
        wake_at: int | None = None,
        traceback: str | None = None,
    ) -> Durable:
        """Record a new status; ``error`` (name, message) and its ``traceback``
        with ERRORED."""
        now = ms()
        observer = self.core.observer
        if observer is not None:
            if status != self.status:
                observer.status_changed(self.spec.name, self.status, status)
            self.error = None if error is None else (*error, traceback)
        self.status = status
        finished = status.finished
        if finished and self.spec.gate is not None:
            # Its key's slot frees in the same commit, and the next waiting
            # instance of the key is let through in it.
            self.core.journal.gate(self.id, self.spec.name, self.spec.gate)
        self.core.journal.update_instance(
            InstanceUpdate(
                self.id, status, now, output,
                error[0] if error else None, error[1] if error else None,
                now if finished else None, wake_at, traceback, self.run_started_at,
            )
        )  # fmt: skip
        data: dict[str, Any] = {"status": int(status)}
        if error:
            data["err"] = [*error] if traceback is None else [*error, traceback]
        if wake_at is not None:
            data["wake"] = wake_at
        # The event carries the instance's own update time: a status built from
        # it (WaitInstance) equals the stored one to the millisecond.
        if finished and self.parent_id is not None:
            return self._tell_parent(self.parent_id, now, data, output)
        return self.emit(EventKind.STATUS_CHANGED, data, output, now)

    def _tell_parent(
        self, parent_id: str, now: int, data: dict[str, Any], output: bytes | None
    ) -> Durable:
        """A child's end: its parent's wake-up is stored in the same commit, so
        a crash cannot lose it (the store also sets a waiting parent due, see
        the stores' inbox trigger), and the parent is poked once it is durable."""
        self.core.journal.add_inbox(InboxEvent(parent_id, CHILD_ENDED + self.id, b"null", now))
        durable = self.emit(EventKind.STATUS_CHANGED, data, output, now)
        poke = self.core.poke

        def told(fut: Durable) -> None:
            if not fut.cancelled() and fut.exception() is None:
                poke(parent_id)

        durable.add_done_callback(told)
        return durable

    async def barrier(self) -> None:
        """Wait until every write of this instance so far is durable."""
        fut = self.last_write
        if fut is None:
            return
        if fut.done() and fut.exception() is None:
            refused = fut.result()
        else:
            try:
                refused = await asyncio.shield(fut)
            except Exception as exc:
                self._not_stored(exc)
                raise Suspend() from exc
        if refused and self.id in refused:
            # Another server holds the instance (this one lost its lease): its
            # run there goes on; this one stops without writing more.
            log.warning(
                "instance %s: the store refused its writes (%s); this server stops its run",
                self.id,
                refused[self.id].value,
                extra=about(self),
            )
            raise Suspend()

    def _not_stored(self, exc: BaseException) -> None:
        # The journal logged the failure once; at a stop that gave up on a
        # failing store every instance gets here, so say it quietly then.
        log.log(
            logging.DEBUG if self.core.stopping else logging.ERROR,
            "instance %s: checkpoint not stored (%s); it resumes after a restart",
            self.id,
            exc,
            extra=about(self),
        )

    async def reclaim(self) -> None:
        """On a shared store, take the instance again before writing to it once
        it was stored waiting (a write that parks an instance frees it for any
        server); Suspend if another server took it meanwhile."""
        core = self.core
        if not core.shared:
            return
        try:
            record = await core.store.claim_one(core.lease, self.id)
        except StoreError as exc:
            log.info(
                "instance %s: taken by another server while it parked (%s)",
                self.id,
                exc,
                extra=about(self),
            )
            raise Suspend() from exc
        if record is None or record.last_seq != self.seq:
            raise Suspend()  # purged, or moved on elsewhere

    def recorded(self, name: str, occurrence: int) -> StepRecord | None:
        """The replayed step of that name and occurrence, wherever it was recorded."""
        if self.replay_names is None:
            self.replay_names = {(s.name, s.occurrence): s for s in (self.replay or {}).values()}
        return self.replay_names.get((name, occurrence))

    def took_step(self) -> None:
        """Called as a step starts: a step in a task of its own (a parallel
        branch) is remembered until that task ends."""
        task = asyncio.current_task()
        if task is not self.task and task is not None and task not in self.strays:
            self.strays.add(task)
            task.add_done_callback(self._branch_ended)

    def _branch_ended(self, task: asyncio.Task[Any]) -> None:
        self.strays.discard(task)
        if self.parked:
            self._stir()  # the branches waiting in memory may be the last ones now

    def poke(self) -> None:
        """An event came for this instance: its waits look again."""
        self.poked = True
        self.pokes += 1
        self._stir()

    def _stir(self) -> None:
        """Wake the branches waiting in memory, to look again."""
        if self.stirred is not None:
            self.stirred.set()
            self.stirred = None

    async def cut_strays(self) -> None:
        """Cancel the parallel branches still in a step once run() has ended
        (returned, raised, or unwound to suspend), and wait for them: an
        attempt still running is cut short, as at a server stop, and nothing
        of theirs is written after the run's own end."""
        strays = [task for task in self.strays if not task.done()]
        for task in strays:
            task.cancel()
        if strays:
            await asyncio.gather(*strays, return_exceptions=True)

    def attempt_ended(self) -> None:
        self.busy -= 1
        if not self.busy and self.idle is not None:
            self.idle.set()

    async def enter_step(self) -> None:
        """A step boundary: prior writes durable, and a stop or pause taken here.

        A pause waits for the attempts in flight in parallel branches to end,
        as it waits for a single running step: none is cut short by it, and
        this branch starts nothing meanwhile."""
        await self.barrier()
        if self.core.stopping:
            raise Suspend()
        if self.terminating:
            raise Terminating()
        if self.pause_requested:
            while self.busy and self.pause_requested and not self.core.stopping:
                if self.idle is None or self.idle.is_set():
                    self.idle = asyncio.Event()
                await self.idle.wait()
            if self.core.stopping:
                raise Suspend()
            if self.pause_requested:
                self.pause_requested = False
                self.set_status(InstanceStatus.PAUSED)
                await self.barrier()
                raise Suspend()
        if self.status == InstanceStatus.PAUSED:
            raise Suspend()  # another branch took the pause while this one waited

    async def _wait_in_memory(
        self, task: asyncio.Task[Any] | None, wake_at: int, seen: int
    ) -> None:
        """Wait until ``wake_at``, a poke, another branch's end, or a stop."""
        if self.stirred is None:
            self.stirred = asyncio.Event()
        waits = [
            asyncio.ensure_future(self.stirred.wait()),
            asyncio.ensure_future(self.core.stopped.wait()),
        ]
        self.parked[task] = (wake_at, seen)
        try:
            await asyncio.wait(waits, timeout=max(0.0, (wake_at - ms()) / 1000),
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            del self.parked[task]
            for wait in waits:
                wait.cancel()
        if self.core.stopping:
            raise Suspend()

    async def park(self, wake_at: int, seen: int) -> None:
        """Leave memory until ``wake_at`` (or an event); the run replays then.

        ``seen`` is the poke count when the caller last looked at what it
        waits for. Returns instead if an event arrived since, so the caller
        looks again. A pause asked for on the way here is taken instead.

        A parallel branch waits in memory while other branches run; the last
        one to wait parks the run, until the soonest of their wake times.
        """
        if self.pause_requested:
            await self.enter_step()
        if self.pokes != seen:
            return
        current = asyncio.current_task()
        if any(t is not current and not t.done() and t not in self.parked for t in self.strays):
            await self._wait_in_memory(current, wake_at, seen)
            return
        # Any event since the earliest look of a waiting branch wakes the run.
        floor = min([seen, *(s for _, s in self.parked.values())])
        wake_at = min([wake_at, *(w for w, _ in self.parked.values())])
        self.set_status(InstanceStatus.WAITING, wake_at=wake_at)
        await self.barrier()
        if self.pause_requested:
            # Asked for while the park was committing: it leaves paused
            # (Scheduler.settle), not waiting; a resume replays the wait.
            raise Suspend()
        if self.pokes != floor or (not self.core.stopping and wake_at <= ms()):
            await self.reclaim()
            self.set_status(InstanceStatus.RUNNING)
            self._stir()
            return
        if self.core.observer is not None:
            self.core.observer.parked(self.span, wake_at)
        self.core.wake_at(self.id, wake_at)
        raise Suspend()
