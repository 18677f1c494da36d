"""The control calls, on any instance: pause, resume, terminate, restart,
SendEvent, and the wake-up of a sleeping or waiting one.

Each holds the instance's one in-memory handle exclusively against the
other control calls (``hold``), loading it from the store (and taking it
over, ``Store.claim_one``) if it is not in memory, and answers once its
change is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cruzflow.server.engine import validate
from cruzflow.server.engine.core import Core, ms, not_found_message
from cruzflow.server.engine.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from cruzflow.server.engine.journal import Durable
from cruzflow.server.engine.run import Run
from cruzflow.server.engine.scheduler import Scheduler
from cruzflow.server.engine.timers import Timers
from cruzflow.server.records import (
    ABANDONED,
    RESERVED_EVENT_PREFIX,
    TERMINATE_STEP,
    UNFINISHED,
    Command,
    EventKind,
    InboxEvent,
    InstanceQuery,
    InstanceStatus,
    InstanceUpdate,
    Repair,
    RepairAction,
    StepKind,
    StepRecord,
    StepStatus,
)
from cruzflow.server.store.base import HELD_ELSEWHERE, StoreError

# What a wake-up runs again (queued: taken up from a shared store).
_WAKEABLE = (InstanceStatus.WAITING, InstanceStatus.QUEUED)
# Stored so, an instance is free on a shared store: a call takes it first.
_PARKED = InstanceStatus.WAITING
# Tries of a control call of an instance another server runs: that server may
# die meanwhile, and the next try finds the instance free (or held anew).
_ASKS = 3
# A refusal of the server that did a call, raised here as it was there.
_REFUSALS: dict[str, type[ServiceError]] = {
    "FailedPrecondition": FailedPrecondition,
    "NotFound": NotFound,
    "InvalidArgument": InvalidArgument,
    "Unavailable": Unavailable,
}


# What repairs may change: an instance nothing runs, stopped by an error, a
# terminate or a pause, or stuck waiting.
_REPAIRABLE = (
    InstanceStatus.ERRORED,
    InstanceStatus.TERMINATED,
    InstanceStatus.PAUSED,
    InstanceStatus.WAITING,
)
# The longest reason kept in an audit entry.
MAX_REASON = 1000

Outcome = tuple[InstanceStatus, dict[str, Any] | None]
"""The status a control call left the instance in, and for an audited one its
audit entry (the REPAIRED event's data, with its time ``at`` and ``out``)."""


def _answer(outcome: str) -> Outcome | None:
    """A recorded outcome as this server's answer (see Controls.serve_commands)."""
    if outcome == ABANDONED:
        return None
    what, _, rest = outcome.partition(":")
    if what == "status":
        status, _, audit = rest.partition(":")
        return InstanceStatus(int(status)), (json.loads(audit) if audit else None)
    kind, _, message = rest.partition(":")
    raise _REFUSALS.get(kind, Unavailable)(message)


def _verb(kind: str) -> str:
    """A command kind as its call is named in a message (not its JSON)."""
    if kind.startswith("repair:"):
        return "restart" if Repair.decode(kind).action is RepairAction.RESTART else "repair"
    return kind


log = logging.getLogger("cruzflow.engine")


def _step_field(name: str, occurrence: int, field: str, limit: int, required: bool) -> int:
    """Check a call's step name and occurrence; the occurrence (0 means 1)."""
    if required and not name:
        raise InvalidArgument(
            f"{field}: required: the name of the step (GetStatus lists an instance's steps)"
        )
    validate.check_text(name, field, limit, "max_step_name_length", required=required)
    if occurrence < 0:
        raise InvalidArgument(
            f"occurrence: {occurrence} is not an occurrence; 1 is the first step of that name "
            f"in a run (0 means 1)"
        )
    return occurrence or 1


def _reason(reason: str, required: bool) -> str:
    if required and not reason.strip():
        raise InvalidArgument(
            "reason: required: say why, for the audit entry kept in the instance's history"
        )
    if len(reason) > MAX_REASON:
        raise InvalidArgument(
            f"reason: {len(reason):,} characters, over the limit of {MAX_REASON}; shorten it"
        )
    return reason


def repair_request(
    core: Core,
    step: str,
    occurrence: int,
    output: str | bytes | None,
    retry: bool,
    reason: str,
    actor: str,
    peer: str,
) -> Repair:
    """A RepairInstance call's arguments checked (InvalidArgument naming the
    field), as the Repair to do."""
    limits = core.limits
    occurrence = _step_field(step, occurrence, "step", limits.max_step_name_length, True)
    if output and retry:
        raise InvalidArgument(
            "output_json and retry: give one, not both: output_json replaces the step's "
            "result, retry runs it again"
        )
    if not output and not retry:
        raise InvalidArgument(
            "output_json or retry: give one: output_json (the step's new result, as JSON "
            'text, e.g. "null" or \'{"ok": true}\') or retry (run the failed step again)'
        )
    data = None
    if output:
        data = validate.parse_json_field(
            output, "output_json", limits.max_payload_bytes, limits.max_json_depth
        )
    action = RepairAction.RETRY if retry else RepairAction.SET_OUTPUT
    return Repair(action, step, occurrence, _reason(reason, True), actor, peer, ms(), data)


def restart_request(
    core: Core, from_step: str, occurrence: int, reason: str, actor: str, peer: str
) -> Repair | None:
    """A RestartInstance call's arguments checked: the audited restart to do,
    or None for a plain one (from scratch, no reason)."""
    occurrence = _step_field(
        from_step, occurrence, "from_step", core.limits.max_step_name_length, False
    )
    if not from_step and not reason:
        return None
    return Repair(
        RepairAction.RESTART, from_step or None, occurrence, _reason(reason, False), actor, peer,
        ms(),
    )  # fmt: skip


class Controls:
    def __init__(self, core: Core, scheduler: Scheduler, timers: Timers) -> None:
        self._core = core
        self._scheduler = scheduler
        self._timers = timers

    @contextlib.asynccontextmanager
    async def hold(self, instance_id: str) -> AsyncIterator[Run]:
        """The instance's one in-memory handle, loaded if need be, held exclusively
        against other control calls (not against its own running task)."""
        self._core.check_id(instance_id)
        if self._core.stopping:
            raise Unavailable("the server is shutting down; retry once it is back")
        # Every control call writes: refused like a create while the store fails.
        self._core.refuse_while_store_fails()
        lock, users = self._core.locks.get(instance_id) or (asyncio.Lock(), 0)
        self._core.locks[instance_id] = (lock, users + 1)
        try:
            async with lock:
                run = self._core.live.get(instance_id)
                parking = self._core.shared and run is not None and run.status == _PARKED
                if parking and run is not None and run.last_write is not None:
                    # The write that parks it frees it for any server: let it
                    # land first, or the claim below lands before it and the
                    # instance is free again after (this server's writes fenced).
                    await self._core.durable(run.last_write, "the call could not be stored")
                if run is None or parking or (self._core.shared and not (run.active or run.queued)):
                    # Not in memory; or, on a shared store, parked (or parking)
                    # here: take it (again), and drop a handle another server
                    # has moved past.
                    record = await self._core.store.claim_one(self._core.lease, instance_id)
                    if record is None:
                        raise NotFound(not_found_message(instance_id))
                    run = self._core.live.get(instance_id)
                    stale = run is not None and run.seq != record.last_seq
                    if stale and run is not None and not (run.active or run.queued or run.held):
                        del self._core.live[instance_id]
                        run = None
                    if run is None:
                        spec = self._core.workflows.get(record.workflow)
                        if spec is None:
                            raise FailedPrecondition(
                                f"instance {instance_id!r} is of workflow {record.workflow!r}, "
                                f"which this server's config does not host; add it back first"
                            )
                        if spec.gate is not None:
                            # Whether it waits for a concurrency slot: a shared
                            # store's claim does not say (see InstanceRecord.gate).
                            record = await self._core.store.get_instance(instance_id) or record
                            # (A claim may have taken it up during that await.)
                            run = self._core.live.get(instance_id)
                        if run is None:
                            run = Run(self._core, record, spec, resumed=True)
                            self._core.live[instance_id] = run
                run.held += 1
                try:
                    yield run
                finally:
                    run.held -= 1
                    self._scheduler.settle(run)
        finally:
            lock, users = self._core.locks[instance_id]
            if users <= 1:
                del self._core.locks[instance_id]
            else:
                self._core.locks[instance_id] = (lock, users - 1)

    async def wake(self, instance_id: str) -> None:
        """Run a waiting instance whose time has come (or that was sent an
        event) again; with several servers, also take up a queued one."""
        core = self._core
        if core.journal.fault is not None:
            # Its replay could not commit anything: look again in a second.
            self._timers.schedule(instance_id, ms() + 1000)
            return
        try:
            if core.shared and instance_id not in core.live:
                # Only a waiting or queued instance is taken over for this: a
                # paused one stays free for whoever resumes it.
                record = await core.store.get_instance(instance_id)
                if record is None or record.status not in _WAKEABLE or record.gate == 0:
                    return  # (one waiting for a concurrency slot is let through first)
            async with self.hold(instance_id) as run:
                if run.active or run.queued or run.status not in _WAKEABLE:
                    return
                run.reset_for_replay()
                self._scheduler.enqueue(run)
        except (NotFound, FailedPrecondition, Unavailable, StoreError) as exc:
            # Another server took it first, or it ended meanwhile.
            log.debug(
                "instance %s not woken: %s", instance_id, exc, extra={"instance_id": instance_id}
            )

    def poke(self, instance_id: str) -> None:
        """An event came for the instance (a child of it ended): its run looks
        at its inbox again if it is running here, else it is woken (on a
        shared store, by whichever server gets to it first)."""
        core = self._core
        run = core.live.get(instance_id)
        if run is not None and run.active:
            run.poke()
        elif not core.stopping:
            core.spawn(self.wake(instance_id))

    async def _end_children(self, parent_id: str, only: set[str] | None = None) -> None:
        """Terminate the unfinished children of ``parent_id`` that were not
        started with parent_close="abandon" (and, through their own
        termination, theirs); only those of ids ``only`` if given."""
        store = self._core.store
        query = InstanceQuery(parent_id=parent_id, statuses=UNFINISHED)
        while True:
            page = await store.list_instances(query, 100)
            for _, child in page:
                if child.abandon or (only is not None and child.id not in only):
                    continue
                with contextlib.suppress(FailedPrecondition, NotFound):
                    await self.terminate(child.id)
            if len(page) < 100:
                return
            query = dataclasses.replace(query, older_than=page[-1][0])

    def _refuse(self, verb: str, run: Run, allowed: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"instance {run.id!r} is {run.status.label}; only {allowed} instances can be {verb}"
        )

    async def pause(self, instance_id: str) -> InstanceStatus:
        """Pause at the next step boundary (WAITING_FOR_PAUSE until then)."""
        return await self._control("pause", instance_id)

    async def resume(self, instance_id: str) -> InstanceStatus:
        return await self._control("resume", instance_id)

    async def terminate(self, instance_id: str, rollback: bool = False) -> InstanceStatus:
        """End the instance now; with ``rollback``, once the compensations of its
        succeeded steps have run (it runs until then, and answers RUNNING)."""
        return await self._control("terminate-rollback" if rollback else "terminate", instance_id)

    async def restart(self, instance_id: str, repair: Repair | None = None) -> Outcome:
        """Run again from scratch: same id and params, step results cleared.
        With ``repair`` (RESTART), audited, and from its step if it names one:
        the results before it kept, it and those after it cleared."""
        if repair is None:
            return await self._control_audited("restart", instance_id)
        return await self._control_audited(repair.encode(), instance_id)

    async def repair(self, instance_id: str, repair: Repair) -> Outcome:
        """Replace one step's recorded result (SET_OUTPUT) or clear a failed one to
        run again (RETRY), audited, and let the instance go on from there."""
        return await self._control_audited(repair.encode(), instance_id)

    async def _control(self, kind: str, instance_id: str) -> InstanceStatus:
        return (await self._control_audited(kind, instance_id))[0]

    async def _control_audited(self, kind: str, instance_id: str) -> Outcome:
        """Do a control call here if this server may hold the instance; if
        another server runs it, record the call for that server and wait for
        its answer. If that server does not take the call in time (it died:
        its lease expires and the instance is free again), give the call up
        and try again."""
        for _ in range(_ASKS):
            try:
                async with self.hold(instance_id) as run:
                    return await self._do(kind, run)
            except StoreError as exc:
                if exc.cause != HELD_ELSEWHERE:
                    raise
            answer = await self._ask(kind, instance_id)
            if answer is not None:
                return answer
        raise Unavailable(
            f"instance {instance_id!r} is run by another server that did not answer the "
            f"{_verb(kind)} call; retry"
        )

    async def _do(self, kind: str, run: Run) -> Outcome:
        if kind == "pause":
            return await self._pause(run), None
        if kind == "resume":
            return await self._resume(run), None
        if kind == "terminate":
            return await self._terminate(run), None
        if kind == "terminate-rollback":
            return await self._terminate_rolling_back(run), None
        if kind.startswith("repair:"):
            repair = Repair.decode(kind)
            if repair.action is RepairAction.RESTART:
                return await self._restart(run, repair)
            return await self._repair(run, repair)
        if kind == "restart":
            return await self._restart(run)
        # Recorded by a newer server (a call this one does not know): refused,
        # never taken for another call.
        raise FailedPrecondition(
            f"this server does not know the {kind.partition(':')[0]!r} call; upgrade it to the "
            f"version of the server that asked"
        )

    async def _pause(self, run: Run) -> InstanceStatus:
        status = run.status
        if status == InstanceStatus.WAITING_FOR_PAUSE:
            return status
        if status.finished or status == InstanceStatus.PAUSED:
            raise self._refuse("paused", run, "queued, running or waiting")
        if run.active:
            # Taken at the run's next step boundary, or as it parks.
            run.pause_requested = True
            durable = run.set_status(InstanceStatus.WAITING_FOR_PAUSE)
        else:
            self._scheduler.dequeue(run)
            self._timers.cancel(run.id)
            durable = run.set_status(InstanceStatus.PAUSED)
        # The status the pause set: the run may move past it while its write commits.
        paused = run.status
        await self._core.durable(durable, "the pause could not be stored", run.id)
        return paused

    async def _resume(self, run: Run) -> InstanceStatus:
        status = run.status
        if status not in (InstanceStatus.PAUSED, InstanceStatus.WAITING_FOR_PAUSE):
            raise self._refuse("resumed", run, "paused")
        run.pause_requested = False
        if run.active:
            durable: Durable | None = run.set_status(InstanceStatus.RUNNING)
        else:
            run.reset_for_replay()
            durable = self._scheduler.enqueue(run, announce=True)
        # The status the resume set: the run may move past it (even finish)
        # while its write commits.
        resumed = run.status
        if durable is not None:
            await self._core.durable(durable, "the resume could not be stored", run.id)
        return resumed

    async def _stop_to_end(self, run: Run) -> None:
        """Take an unfinished instance out of running, waiting and the queue,
        and terminate its children first (a crash meanwhile leaves none
        running unowned); refused once it is finished."""
        if run.status.finished:
            raise self._refuse("terminated", run, "unfinished")
        await self._scheduler.stop_task(run)
        self._scheduler.dequeue(run)
        self._timers.cancel(run.id)
        await self._end_children(run.id)
        run.pause_requested = False

    async def _terminate(self, run: Run) -> InstanceStatus:
        await self._stop_to_end(run)
        durable = run.set_status(InstanceStatus.TERMINATED)
        await self._core.durable(durable, "the termination could not be stored", run.id)
        self._scheduler.fill_slots()
        return run.status

    async def _terminate_rolling_back(self, run: Run) -> InstanceStatus:
        """Record the terminate (a step row the run finds when it replays), then
        run the instance again: at its first step not yet done it unwinds,
        runs its compensations, and ends terminated (Scheduler.drive)."""
        await self._stop_to_end(run)
        now = ms()
        run.put_step(
            StepRecord(run.id, TERMINATE_STEP, "terminate", 1, StepStatus.RUNNING, 1, now,
                       kind=StepKind.ROLLBACK)
        )  # fmt: skip
        # Durable before the run replays its records, so that it finds it.
        assert run.last_write is not None
        await self._core.durable(run.last_write, "the termination could not be stored", run.id)
        run.reset_for_replay()
        durable = self._scheduler.enqueue(run, announce=True)
        assert durable is not None
        status = run.status
        await self._core.durable(durable, "the termination could not be stored", run.id)
        return status

    async def _restart(self, run: Run, repair: Repair | None = None) -> Outcome:
        """Run again from scratch; with ``repair`` naming a step, from that step:
        the rows before it kept (replayed), it and those after it cleared."""
        target = None
        if repair is not None and repair.step is not None:
            # Looked up before anything changes: a refusal leaves all as it was.
            target = self._find(run, await self._settled_steps(run), repair)
            if target.kind is StepKind.ROLLBACK:
                raise InvalidArgument(
                    f"step {target.name!r} is a rollback, which runs as its instance unwinds; "
                    f"restart from the step it rolls back, or from an earlier one"
                )
        await self._scheduler.stop_task(run)
        self._scheduler.dequeue(run)
        self._timers.cancel(run.id)
        if target is None:
            # The new run starts new children; the old run's go as at a terminate.
            await self._end_children(run.id)
            self._core.journal.clear_steps(run.id)
        else:
            # What the stopped run recorded up to its stop counts too.
            steps = await self._settled_steps(run)
            cleared = [s for s in steps if s.index >= target.index or s.index < 0]
            children = {s.event_type for s in cleared if s.kind is StepKind.CHILD and s.event_type}
            if children:
                await self._end_children(run.id, children)
            self._keep_steps(run, [s for s in steps if 0 <= s.index < target.index])
        if run.gate is not None and run.status.finished:
            # Its key's slot was freed as it finished: it waits for one again.
            run.gate = 0
        # A new run: its children get new ids (the kept child steps keep theirs).
        run.run_started_at = ms()
        audit = None if repair is None else self._audit(run, repair, target)
        if target is not None:
            # Durable before the run replays the kept rows, so that it finds them.
            assert run.last_write is not None
            await self._core.durable(run.last_write, "the restart could not be stored", run.id)
        run.reset_for_replay()
        run.resumed = target is not None  # from scratch: nothing to replay
        run.pause_requested = False
        durable = self._scheduler.enqueue(run, announce=True)
        assert durable is not None
        restarted = run.status  # RUNNING or QUEUED, whatever the run reaches meanwhile
        await self._core.durable(durable, "the restart could not be stored", run.id)
        return restarted, audit

    # ------------------------------------------------------------ repairs
    async def _settled_steps(self, run: Run) -> list[StepRecord]:
        """The instance's stored steps, once every write of its so far is stored."""
        if run.last_write is not None:
            await self._core.durable(run.last_write, "the call could not be stored", run.id)
        return await self._core.store.get_steps(run.id)

    @staticmethod
    def _find(run: Run, steps: list[StepRecord], repair: Repair) -> StepRecord:
        """The step the call names; NotFound naming the steps there are."""
        assert repair.step is not None
        for step in steps:
            if (
                step.index >= 0
                and step.name == repair.step
                and step.occurrence == repair.occurrence
            ):
                return step
        counts: dict[str, int] = {}
        for step in steps:
            if step.index >= 0:
                counts[step.name] = max(counts.get(step.name, 0), step.occurrence)
        if not counts:
            there = "it has recorded no steps yet"
        else:
            names = [f"{n!r}" + (f" ({c} occurrences)" if c > 1 else "") for n, c in counts.items()]
            more = f" and {len(names) - 20} more" if len(names) > 20 else ""
            there = f"its steps are {', '.join(names[:20])}{more}"
        return_what = f"step {repair.step!r}" + (
            f" (occurrence {repair.occurrence})" if repair.occurrence != 1 else ""
        )
        raise NotFound(f"instance {run.id!r} has no {return_what}; {there} (see GetStatus)")

    def _keep_steps(self, run: Run, kept: list[StepRecord]) -> None:
        """Store only ``kept`` of the instance's steps: all go, these come back,
        in one commit (the stores' restart path, so both fence it alike)."""
        run.last_write = self._core.journal.clear_steps(run.id)
        for step in kept:
            run.put_step(step)

    def _audit(self, run: Run, repair: Repair, step: StepRecord | None) -> dict[str, Any]:
        """Record the audit entry (a REPAIRED event); its data, time and output."""
        data: dict[str, Any] = {
            "act": int(repair.action), "actor": repair.actor, "peer": repair.peer,
            "why": repair.reason,
        }  # fmt: skip
        if step is not None:
            data.update(name=step.name, occ=step.occurrence, idx=step.index)
            if step.kind is not StepKind.DO:
                data["k"] = int(step.kind)
        now = ms()
        run.emit(EventKind.REPAIRED, data, repair.output, at=now)
        out = None if repair.output is None else repair.output.decode()
        return {**data, "at": now, "out": out}

    def _unrepairable(self, run: Run) -> FailedPrecondition:
        status = run.status
        what = f"instance {run.id!r} is {status.label}"
        if status == InstanceStatus.COMPLETE:
            how = (
                "its results are final; to run it again from a step, restart it from that "
                "step (RestartInstance with from_step)"
            )
        elif status == InstanceStatus.WAITING_FOR_PAUSE:
            how = "its running step finishes first; repair it once it is paused"
        else:
            how = (
                "a step may be running; pause it first (PauseInstance) and repair it once "
                "paused, or restart it from that step (RestartInstance with from_step)"
            )
        return FailedPrecondition(
            f"{what}; only errored, terminated, paused or waiting instances can be repaired: {how}"
        )

    async def _repair(self, run: Run, repair: Repair) -> Outcome:
        status = run.status
        if run.active or run.queued or status not in _REPAIRABLE:
            raise self._unrepairable(run)
        steps = await self._settled_steps(run)
        target = self._find(run, steps, repair)
        label = f"step {target.name!r}"
        if target.kind in (StepKind.SLEEP, StepKind.ROLLBACK):
            raise InvalidArgument(
                f"{label} is a {'sleep' if target.kind is StepKind.SLEEP else 'rollback'}: it "
                f"has no result to replace or retry; repair another step, or restart the "
                f"instance from a step (RestartInstance with from_step)"
            )
        if repair.action is RepairAction.RETRY:
            if target.kind is StepKind.CHILD:
                raise InvalidArgument(
                    f"{label} starts a child instance, which a retry would start again under "
                    f"the same id; repair it with an output, or restart the instance from it "
                    f"(RestartInstance with from_step), which starts a new child"
                )
            if target.status is StepStatus.SUCCEEDED:
                raise FailedPrecondition(
                    f"{label} succeeded, so there is nothing to retry; replace its result "
                    f"(output_json), or restart the instance from it (RestartInstance with "
                    f"from_step) to run it and the steps after it again"
                )
        if any(s.kind is StepKind.ROLLBACK or s.index < 0 for s in steps):
            raise FailedPrecondition(
                f"instance {run.id!r} has run rollbacks (step.do's rollback=), which undid "
                f"its succeeded steps; going on from a repaired step would build on undone "
                f"work: restart it from a step instead (RestartInstance with from_step)"
            )
        now = ms()
        if repair.action is RepairAction.SET_OUTPUT:
            run.put_step(StepRecord(
                run.id, target.index, target.name, target.occurrence, StepStatus.SUCCEEDED,
                max(target.attempts, 1), target.started_at or now, now, output=repair.output,
                kind=target.kind, event_type=target.event_type,
            ))  # fmt: skip
        else:
            # Its row goes: the step runs afresh, with its full retries.
            self._keep_steps(run, [s for s in steps if s.index != target.index])
        audit = self._audit(run, repair, target)
        # Durable before the run replays its records, so that it finds them.
        assert run.last_write is not None
        await self._core.durable(run.last_write, "the repair could not be stored", run.id)
        # It goes on from there: the steps recorded after it are replayed.
        self._timers.cancel(run.id)
        if run.gate is not None and status.finished:
            run.gate = 0  # its key's slot was freed as it finished
        run.pause_requested = False
        run.reset_for_replay()
        durable = self._scheduler.enqueue(run, announce=True)
        assert durable is not None
        repaired = run.status
        await self._core.durable(durable, "the repair could not be stored", run.id)
        return repaired, audit

    # ------------------------------------------------ calls across servers
    async def _ask(self, kind: str, instance_id: str) -> Outcome | None:
        """Record the call for the server that holds the instance and wait for
        its answer: the status it left the instance in (or its refusal, raised
        as here); None once the call was given up untaken."""
        core = self._core
        store = core.store
        command = Command(uuid.uuid4().hex, instance_id, kind, ms())
        await store.send_command(command)
        period = store.lease_period_s or 5.0
        give_up_at = time.monotonic() + period + 2.0
        delay = 0.01
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
            outcome = await store.command_outcome(command.id)
            if outcome is not None:
                return _answer(outcome)
            if time.monotonic() >= give_up_at:
                if await store.take_command(command.id, ABANDONED):
                    return None
                # Taken just now: its holder is at it; its answer comes soon.
                give_up_at = time.monotonic() + period + 2.0

    async def serve_commands(self, instance_id: str) -> None:
        """Do the calls other servers recorded for an instance this one holds."""
        store = self._core.store
        try:
            commands = await store.pending_commands(instance_id)
        except StoreError as exc:
            log.warning("reading the calls for %s failed (%s)", instance_id, exc)
            return
        for command in commands:
            try:
                if not await store.take_command(command.id, self._core.owner):
                    continue
                try:
                    async with self.hold(instance_id) as run:
                        status, audit = await self._do(command.kind, run)
                    outcome = f"status:{int(status)}"
                    if audit is not None:
                        outcome += ":" + json.dumps(audit, separators=(",", ":"))
                except (ServiceError, StoreError) as exc:
                    kind = type(exc).__name__ if isinstance(exc, ServiceError) else "Unavailable"
                    outcome = f"error:{kind}:{exc}"
                await store.answer_command(command.id, outcome)
            except StoreError as exc:
                log.warning(
                    "answering a %s call for %s failed (%s)", _verb(command.kind), instance_id, exc
                )

    async def send_event(self, instance_id: str, type: str, payload: str | bytes) -> None:
        """Store an event for the instance's wait_for_event of that type."""
        limit = self._core.limits.max_event_type_length
        if not type or len(type) > limit:
            raise InvalidArgument(
                f"type: required, 1 to {limit} characters (limits.max_event_type_length)"
            )
        validate.check_text(type, "type", limit, "max_event_type_length", required=True)
        if type.startswith(RESERVED_EVENT_PREFIX):
            raise InvalidArgument(
                f"type: {RESERVED_EVENT_PREFIX!r} starts the engine's own event types; "
                f"name yours otherwise"
            )
        data = validate.parse_json_field(
            payload,
            "payload_json",
            self._core.limits.max_payload_bytes,
            self._core.limits.max_json_depth,
        )
        try:
            async with self.hold(instance_id) as run:
                await self._deliver(run, type, data)
        except StoreError as exc:
            if exc.cause != HELD_ELSEWHERE:
                raise
            # Another server runs it: the event is stored for it here, and
            # the store tells that server, whose run looks at its inbox.
            await self._deliver_elsewhere(instance_id, type, data)

    async def _deliver_elsewhere(self, instance_id: str, type: str, data: bytes) -> None:
        record = await self._core.record(instance_id)
        if record.status.finished:
            raise FailedPrecondition(
                f"instance {instance_id!r} is {record.status.label}; only unfinished instances "
                f"can be sent events"
            )
        core = self._core
        sender = core.observer.sending() if core.observer is not None else None
        durable = core.journal.add_inbox(
            InboxEvent(instance_id, type, data, ms(), trace_parent=sender)
        )
        await core.durable(durable, "the event could not be stored")

    async def _deliver(self, run: Run, type: str, data: bytes) -> None:
        """Store an event for ``run``, held by this server, and wake it if it waits."""
        if run.status.finished:
            raise self._refuse("sent events", run, "unfinished")
        now = ms()
        # The sender's trace context, for the wait that takes the event to link to.
        sender = self._core.observer.sending() if self._core.observer is not None else None
        durable = self._core.journal.add_inbox(
            InboxEvent(run.id, type, data, now, trace_parent=sender)
        )
        if run.status == InstanceStatus.WAITING and not (run.active or run.queued):
            # Parked: it goes on at once, in the same commit as the event (on a
            # shared store, a write of it as waiting would also free it for any
            # server again). A server killed now leaves it running: it resumes
            # at the next start, or another server takes it over once this
            # server's lease expires.
            self._timers.cancel(run.id)
            run.reset_for_replay()
            self._scheduler.enqueue(run)
            await self._core.durable(durable, "the event could not be stored", run.id)
            return
        if run.status == InstanceStatus.WAITING:
            # Due now, in the same commit as the event: a server killed before
            # the run takes it wakes the instance as soon as it starts again
            # (through the wake index), not at the wait's timeout.
            self._core.journal.update_instance(
                InstanceUpdate(
                    run.id, run.status, now, wake_at=now, run_started_at=run.run_started_at
                )
            )
        await self._core.durable(durable, "the event could not be stored", run.id)
        if run.active:
            run.poke()
        elif run.status == InstanceStatus.WAITING and not run.queued:
            self._timers.cancel(run.id)
            run.reset_for_replay()
            self._scheduler.enqueue(run)
