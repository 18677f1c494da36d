"""The engine: creates instances, runs them on one event loop, resumes them.

A thin facade over its parts, each in a file of its own:

- ``admission.py``: new instances, checked, stored, started or queued;
- ``scheduler.py``: slots and the queue, ownership (claims), driving runs;
- ``run.py`` and ``steps.py``: an instance in memory, and its steps
  (replay, attempts, retries, checkpoints);
- ``controls.py``: pause, resume, terminate, restart, SendEvent, wake-ups;
- ``timers.py``: when sleeping and waiting instances wake;
- ``reads.py``: GetStatus, WaitInstance, WatchInstance, ListInstances,
  CountInstances;
- ``retention.py``: finished instances purged after their retention;
- ``schedules.py``: cron schedules, an instance at each due time;
- ``core.py``: what they share; ``journal.py``: group commit.

It imports neither grpc nor a database driver: it talks to a ``Store`` and
hands its writes to the ``Journal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from cruzflow.server.engine.admission import Admission, NewInstance
from cruzflow.server.engine.controls import Controls, Outcome, repair_request, restart_request
from cruzflow.server.engine.core import Core, Limits, WorkflowSpec
from cruzflow.server.engine.hooks import EngineHooks
from cruzflow.server.engine.journal import Journal
from cruzflow.server.engine.observer import Observer
from cruzflow.server.engine.reads import Reads, check_timeout
from cruzflow.server.engine.retention import Retention
from cruzflow.server.engine.scheduler import Scheduler
from cruzflow.server.engine.schedules import Schedules, ScheduleSpec
from cruzflow.server.engine.timers import Timers
from cruzflow.server.records import (
    EventRecord,
    InstanceRecord,
    InstanceStatus,
    ScheduleRecord,
    StepRecord,
)
from cruzflow.server.store.base import Store, StoreError

__all__ = ["Engine", "Limits", "WorkflowSpec"]

log = logging.getLogger("cruzflow.engine")


class Engine:
    """Hosts workflow classes and runs their instances."""

    def __init__(
        self,
        store: Store,
        workflows: Mapping[str, WorkflowSpec],
        env: Any = None,
        limits: Limits | None = None,
        observer: Observer | None = None,
        hooks: EngineHooks | None = None,
        schedules: Sequence[ScheduleSpec] = (),
    ) -> None:
        self.core = core = Core(store, workflows, env, limits or Limits(), observer, hooks)
        self.timers = Timers(core)
        self.scheduler = Scheduler(core, self.timers)
        self.controls = Controls(core, self.scheduler, self.timers)
        self.admission = Admission(core, self.scheduler)
        self.reads = Reads(core)
        self.retention = Retention(core)
        self.schedules = Schedules(core, self.admission, schedules)
        core.wake_at = self.timers.schedule
        core.poke = self.controls.poke
        core.admission = self.admission
        self.timers.on_due = self.controls.wake
        self.scheduler.wake = self.controls.wake
        self.scheduler.serve_commands = self.controls.serve_commands
        self.scheduler.on_fault = self._tell_store_fault
        self._background: list[asyncio.Task[None]] = []
        self._lease_keeper: asyncio.Task[None] | None = None
        # Told when the store starts failing to commit (the error) and when it
        # commits again (None); the service turns it into health.
        self.store_listeners: list[Callable[[StoreError | None], None]] = []

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Take this server's lease, start the writer, resume what the store
        hands over (every unfinished instance, on SQLite), start the timers."""
        core = self.core
        core.lease = await core.store.acquire(core.owner)
        core.journal = Journal(
            core.store,
            core.lease,
            core.hub.publish,
            core.observer,
            on_fault=lambda _: self._tell_store_fault(),
            on_gates=self.scheduler.let_through,
        )
        core.journal.start()
        if core.observer is not None:
            for status, count in (await core.store.count_unfinished()).items():
                core.observer.census(status, count)
        core.store.subscribe(self.scheduler.heard)
        await self.scheduler.claim()
        # Instances left waiting for a concurrency slot: the commit that would
        # have let them through may have been lost with the last server, and a
        # workflow may have lost its limits (then all of them go through).
        # Done before anything else is taken, so it is one commit of its own.
        try:
            await core.journal.gate_sweep(core.gates)
        except Exception as exc:  # the journal logged why; the next start looks again
            log.warning("opening the concurrency gates at start failed (%s)", exc)
        await self.schedules.start()
        self._background.append(asyncio.create_task(self.timers.loop(), name="cruzflow-timers"))
        period = core.store.lease_period_s
        if period is not None:
            # Several servers on one store: keep the lease (until the stop has
            # drained: see shutdown), and take up what waits for a slot, or
            # what a server that died left, at least once a second (so within
            # a second of its lease's expiry).
            self._lease_keeper = asyncio.create_task(
                self.scheduler.keep_lease(period), name="cruzflow-lease"
            )
            self._background.append(
                asyncio.create_task(
                    self.scheduler.claim_loop(min(1.0, period / 5)), name="cruzflow-claims"
                )
            )
        self._start_background()

    def _start_background(self) -> None:
        """Start the engine's housekeeping tasks; shutdown cancels them."""
        self._background.append(asyncio.create_task(self.retention.loop(), name="cruzflow-purge"))
        self._background.append(
            asyncio.create_task(self.schedules.loop(), name="cruzflow-schedules")
        )

    async def shutdown(self, grace: float) -> None:
        """Stop taking work, let attempts in flight finish for ``grace`` s, then stop."""
        core = self.core
        core.stopping = True
        core.stopped.set()
        for task in [*self._background, *core.spawned]:
            task.cancel()
        await asyncio.gather(*self._background, *core.spawned, return_exceptions=True)
        tasks = [r.task for r in core.runs.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "cancelled %d attempt(s) still running after %.1f s", len(pending), grace
                )
                await asyncio.wait(pending)
        await core.journal.close()
        # Renewed while the attempts drained and their writes committed; the
        # other servers (if any) take this one's instances over at once now.
        if self._lease_keeper is not None:
            self._lease_keeper.cancel()
            await asyncio.gather(self._lease_keeper, return_exceptions=True)
        with contextlib.suppress(StoreError):
            await core.store.release(core.lease)
        # Everything is durable and published; end the watch streams.
        core.hub.close()

    def _tell_store_fault(self) -> None:
        """Tell the listeners (health) the store's fault: a commit that cannot
        land, or (a shared store) a lease that cannot be renewed; None once
        neither fails."""
        fault = self.store_fault
        for listener in self.store_listeners:
            listener(fault)

    # ------------------------------------------------------------ the state
    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def limits(self) -> Limits:
        return self.core.limits

    @property
    def journal(self) -> Journal:
        return self.core.journal

    @property
    def stopping(self) -> bool:
        return self.core.stopping

    @property
    def store_fault(self) -> StoreError | None:
        """The error the store fails commits (or lease renewals) with, while it
        does; else None."""
        return self.core.journal.fault or self.core.lease_fault

    @property
    def purged(self) -> int:
        """Finished instances purged after their retention since the engine started."""
        return self.core.journal.purged

    def workflows(self) -> list[WorkflowSpec]:
        return sorted(self.core.workflows.values(), key=lambda w: w.name)

    def check_id(self, instance_id: str, creating: bool = False) -> None:
        """InvalidArgument unless ``instance_id`` is a well-formed id."""
        self.core.check_id(instance_id, creating)

    # ---------------------------------------------------------------- calls
    async def create(
        self,
        workflow: str,
        instance_id: str = "",
        params: str | bytes = b"",
        lookup_key: str = "",
        priority: int = 0,
        concurrency_key: str = "",
    ) -> tuple[str, InstanceStatus]:
        """Store a new instance durably and schedule it; returns its id and status.
        ``priority`` and ``concurrency_key`` matter to a workflow with limits."""
        return await self.admission.create(
            workflow, instance_id, params, lookup_key, priority, concurrency_key
        )

    async def create_many(self, requests: list[NewInstance]) -> list[tuple[str, InstanceStatus]]:
        """Store new instances in one transaction, all of them or none (see
        ``Admission.create_many``)."""
        return await self.admission.create_many(requests)

    async def get(self, instance_id: str) -> tuple[InstanceRecord, list[StepRecord]]:
        """The durable status of an instance and its steps."""
        return await self.reads.get(instance_id)

    async def repairs(self, record: InstanceRecord) -> list[EventRecord]:
        """The audit entries of an instance read by ``get`` (see Reads.repairs)."""
        return await self.reads.repairs(record)

    async def wait(
        self, instance_id: str, timeout: float | None = None, include_steps: bool = False
    ) -> tuple[InstanceRecord, list[StepRecord]]:
        """The instance once it is final, or as it is when ``timeout`` s have passed."""
        return await self.reads.wait(instance_id, timeout, include_steps)

    async def run(
        self,
        workflow: str,
        instance_id: str = "",
        params: str | bytes = b"",
        lookup_key: str = "",
        priority: int = 0,
        concurrency_key: str = "",
        *,
        timeout: float | None = None,
        include_steps: bool = False,
    ) -> tuple[InstanceRecord, list[StepRecord]]:
        """``create``, then ``wait`` (RunInstance). What would refuse the wait
        (a bad timeout, no room for one more waiter) refuses before anything is
        created, so a refusal never leaves an instance the caller was not told of."""
        check_timeout(timeout)
        self.reads.room("RunInstance")
        instance_id, _ = await self.admission.create(
            workflow, instance_id, params, lookup_key, priority, concurrency_key
        )
        return await self.reads.wait(instance_id, timeout, include_steps, room_taken=True)

    def watch(self, instance_id: str, after_seq: int = 0) -> AsyncIterator[EventRecord]:
        """Every durable event of the instance after ``after_seq``, live, until its end."""
        return self.reads.watch(instance_id, after_seq)

    def watch_many(self, cursors: Sequence[tuple[str, int]]) -> AsyncIterator[list[EventRecord]]:
        """The events of several instances, each after its own sequence, in
        batches of those ready together, until every one has ended."""
        return self.reads.watch_many(cursors)

    async def list_instances(
        self,
        workflow: str = "",
        statuses: list[int] | None = None,
        created_min: int | None = None,
        created_max: int | None = None,
        lookup_key: str = "",
        page_size: int = 0,
        page_token: str = "",
        parent_id: str = "",
        schedule_id: str = "",
    ) -> tuple[list[InstanceRecord], str]:
        """A page of instances, newest first, and the token of the next page."""
        return await self.reads.list_instances(
            workflow, statuses, created_min, created_max, lookup_key, page_size, page_token,
            parent_id, schedule_id,
        )  # fmt: skip

    async def count_instances(
        self,
        workflow: str = "",
        created_min: int | None = None,
        created_max: int | None = None,
        lookup_key: str = "",
    ) -> list[tuple[str, InstanceStatus, int]]:
        """(workflow, status, count) per workflow and status, by workflow then
        status, with ListInstances' filters but statuses."""
        return await self.reads.count_instances(workflow, created_min, created_max, lookup_key)

    async def pause(self, instance_id: str) -> InstanceStatus:
        """Pause at the next step boundary (WAITING_FOR_PAUSE until then)."""
        return await self.controls.pause(instance_id)

    async def resume(self, instance_id: str) -> InstanceStatus:
        return await self.controls.resume(instance_id)

    async def terminate(self, instance_id: str, rollback: bool = False) -> InstanceStatus:
        return await self.controls.terminate(instance_id, rollback)

    async def restart(
        self,
        instance_id: str,
        from_step: str = "",
        occurrence: int = 0,
        reason: str = "",
        actor: str = "anonymous",
        peer: str = "",
    ) -> InstanceStatus:
        """Run again from scratch: same id and params, step results cleared; or
        from ``from_step`` (its ``occurrence``), the results before it kept.
        A restart from a step or with a ``reason`` is audited (see repair)."""
        return (
            await self.restart_audited(instance_id, from_step, occurrence, reason, actor, peer)
        )[0]

    async def restart_audited(
        self,
        instance_id: str,
        from_step: str = "",
        occurrence: int = 0,
        reason: str = "",
        actor: str = "anonymous",
        peer: str = "",
    ) -> Outcome:
        """restart, and its audit entry if it has one."""
        repair = restart_request(self.core, from_step, occurrence, reason, actor, peer)
        return await self.controls.restart(instance_id, repair)

    async def repair(
        self,
        instance_id: str,
        step: str,
        occurrence: int = 0,
        output: str | bytes | None = None,
        retry: bool = False,
        reason: str = "",
        actor: str = "anonymous",
        peer: str = "",
    ) -> Outcome:
        """Replace the recorded result of step ``step`` (its ``occurrence``) with
        ``output`` (JSON), or with ``retry`` clear a failed step to run again;
        recorded in the instance's history as done by ``actor`` (from ``peer``)
        for ``reason``; then the instance goes on from there. Allowed for
        errored, terminated, paused and waiting instances. The status it left
        the instance in, and the audit entry."""
        spec = repair_request(self.core, step, occurrence, output, retry, reason, actor, peer)
        return await self.controls.repair(instance_id, spec)

    async def send_event(self, instance_id: str, type: str, payload: str | bytes) -> None:
        """Store an event for the instance's wait_for_event of that type."""
        await self.controls.send_event(instance_id, type, payload)

    async def purge_finished(self) -> int:
        """Delete the finished instances past their retention; how many went."""
        return await self.retention.purge_finished()

    # ------------------------------------------------------------ schedules
    async def create_schedule(self, spec: ScheduleSpec) -> ScheduleRecord:
        """Store a new cron schedule (see engine/schedules.py)."""
        return await self.schedules.create(spec)

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord:
        return await self.schedules.get(schedule_id)

    async def list_schedules(
        self, workflow: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ScheduleRecord], str]:
        """A page of schedules by id, and the token of the next page."""
        return await self.schedules.list(workflow, page_size, page_token)

    async def pause_schedule(self, schedule_id: str) -> ScheduleRecord:
        return await self.schedules.pause(schedule_id, True)

    async def resume_schedule(self, schedule_id: str) -> ScheduleRecord:
        """Fire again from the next due time; what passed while paused is not caught up."""
        return await self.schedules.pause(schedule_id, False)

    async def delete_schedule(self, schedule_id: str) -> None:
        await self.schedules.delete(schedule_id)

    async def trigger_schedule(self, schedule_id: str) -> tuple[str, InstanceStatus]:
        """Create an instance of the schedule now; its id and status."""
        return await self.schedules.trigger(schedule_id)

    def next_due(self, schedule: ScheduleRecord) -> int | None:
        """When the schedule fires next (ms); None while paused."""
        return self.schedules.next_due(schedule)
