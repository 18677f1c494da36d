"""Which instances run, and running them: slots, the queue, ownership.

The scheduler takes over the runnable instances the store hands this
server (``claim``: at start every unfinished one; with several servers on
one database, those no live lease holds), starts up to
``max_running_instances`` and queues the rest, drives each run of
``run()`` (``drive``), and settles an instance's handle when its run ends.

An instance of a workflow with a concurrency or rate limit waits at its
key's gate before that: the store lets it through in the commit that creates
it or finishes another (``Journal.gate``), and ``let_through`` starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from cruzflow.sdk.api import WorkflowEvent
from cruzflow.sdk.step import WorkflowStep
from cruzflow.server.engine.core import Core, ms
from cruzflow.server.engine.errors import (
    FatalWorkflowError,
    StepFailedError,
    Suspend,
    Terminating,
)
from cruzflow.server.engine.journal import Durable
from cruzflow.server.engine.run import Run, about
from cruzflow.server.engine.steps import StepRunner, to_json
from cruzflow.server.engine.timers import Timers
from cruzflow.server.engine.tracebacks import format_error
from cruzflow.server.records import (
    TERMINATE_STEP,
    UNGATED,
    InstanceStatus,
    Notice,
    NoticeKind,
    StepStatus,
)
from cruzflow.server.store.base import StoreError

log = logging.getLogger("cruzflow.engine")


class Scheduler:
    def __init__(self, core: Core, timers: Timers) -> None:
        self._core = core
        self._timers = timers
        # Set by the engine: wake (or take up) an instance another server made
        # runnable here (Controls.wake).
        self.wake: Callable[[str], Coroutine[Any, Any, None]] | None = None
        # Set by the engine: told when the lease's renewal starts failing (the
        # store is out of reach) and when it works again.
        self.on_fault: Callable[[], None] | None = None
        # Set by the engine: do the control calls other servers recorded for
        # an instance this one runs (Controls.serve_commands).
        self.serve_commands: Callable[[str], Coroutine[Any, Any, None]] | None = None
        # Shared store: set to wake the claim loop; ``_maybe_waiting`` while
        # instances may wait in the store for a slot (told so, or a claim was
        # cut short by the slots this server had free).
        self._runnable = asyncio.Event()
        self._maybe_waiting = False
        # Keys a rate limit holds back: when their gate is opened again.
        self._gate_timers: dict[tuple[str, str], tuple[int, asyncio.TimerHandle]] = {}

    def free_slots(self) -> int:
        core = self._core
        return core.limits.max_running_instances - len(core.runs) - len(core.queue)

    async def claim(self) -> None:
        """Take over the runnable instances no server runs and queue them: at
        start, every unfinished one the store holds for this server (SQLite);
        with several servers, as many as this one has free slots for, among
        those no live lease holds (queued, or left by a server that died)."""
        limit = self._core.limits.max_running_instances
        if self._core.shared:
            limit = self.free_slots()
            if limit <= 0:
                return
        unfinished = await self._core.store.claim(self._core.lease, limit)
        self._maybe_waiting = self._core.shared and len(unfinished) >= limit
        # Instances that were running go first, then the queue in creation order.
        unfinished.sort(key=lambda r: r.status != InstanceStatus.RUNNING)
        missing: dict[str, int] = {}
        resumed = 0
        for record in unfinished:
            spec = self._core.workflows.get(record.workflow)
            if spec is None:
                missing[record.workflow] = missing.get(record.workflow, 0) + 1
                continue
            if record.id in self._core.live:
                continue
            run = Run(self._core, record, spec, resumed=True)
            run.queued = True
            self._core.live[run.id] = run
            if record.gate == 0:
                # Waits for its key's slot (one server: the engine's start
                # opens every gate that has instances waiting).
                self._core.gated[run.id] = run
                continue
            self._core.queue.append(run)
            resumed += 1
        for name, count in missing.items():
            log.warning(
                "%d unfinished instance(s) of workflow %r wait: it is not in the config",
                count,
                name,
            )
        if resumed:
            log.info("resuming %d unfinished instance(s)", resumed)
        self.fill_slots()

    def heard(self, notices: list[Notice]) -> None:
        """What other servers committed: their events reach this server's
        watchers through the store; an instance made runnable (an event sent
        to it, or created queued) is poked if this server runs it, else woken
        or taken up by whichever server gets to it first."""
        core = self._core
        for notice in notices:
            if notice.kind is NoticeKind.EVENTS:
                core.hub.nudge(notice.instance_id)
            elif notice.kind is NoticeKind.COMMAND:
                if notice.instance_id in core.live and self.serve_commands is not None:
                    core.spawn(self.serve_commands(notice.instance_id))
            elif notice.kind is NoticeKind.RUNNABLE and not core.stopping:
                run = core.live.get(notice.instance_id)
                if run is not None and run.active:
                    run.poke()  # its wait looks at its inbox again
                elif (run is None or not run.queued) and self.wake is not None:
                    # Parked, or just parking (its handle not yet released):
                    # the wake-up takes it if it is stored waiting.
                    core.spawn(self.wake(notice.instance_id))
                self._maybe_waiting = True
                self._runnable.set()

    def runnable_elsewhere(self) -> None:
        """Instances wait in the store for a server with a free slot."""
        self._maybe_waiting = True
        self._runnable.set()

    async def claim_loop(self, interval: float) -> None:
        """Shared store: take up runnable instances while this server has free
        slots: when told some wait, and every ``interval`` s (a server that
        died leaves its instances to be claimed once its lease expires, and a
        notice may be lost)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._runnable.wait(), interval)
            self._runnable.clear()
            if self.free_slots() > 0:
                try:
                    await self.claim()
                except StoreError as exc:
                    log.warning("claiming runnable instances failed (%s); trying again", exc)
            if any(g.starts is not None for g in self._core.gates.values()):
                # A rate limit's window moves on by time alone, and the server
                # that would have opened the gate then may have died.
                self._core.journal.gate_sweep(self._core.gates)

    async def keep_lease(self, period: float) -> None:
        """Shared store: renew this server's lease three times a period. Once it
        was lost (this server was stopped or cut off past its expiry), the
        runs it held are stopped here (other servers run them now; their
        writes from here are refused) and a new lease is taken."""
        core = self._core
        while True:
            await asyncio.sleep(period / 3)
            try:
                kept = await core.store.renew(core.lease)
            except StoreError as exc:
                if core.lease_fault is None:
                    log.warning("renewing this server's lease failed (%s); trying again", exc)
                    core.lease_fault = exc
                    self._fault_changed()
                continue
            if core.lease_fault is not None:
                core.lease_fault = None
                self._fault_changed()
            if kept:
                continue
            log.error(
                "this server's lease (%s, epoch %d) expired before it was renewed: other "
                "servers may run its %d instance(s) now; stopping them here",
                core.lease.owner,
                core.lease.epoch,
                len(core.live),
            )
            await self._drop_all()
            core.lease = await core.store.acquire(core.owner)
            core.journal.lease = core.lease
            await self.claim()

    def _fault_changed(self) -> None:
        if self.on_fault is not None:
            self.on_fault()

    async def _drop_all(self) -> None:
        """Forget every instance in memory, its run stopped (the lease that held
        them is lost: the store refuses what they would write)."""
        core = self._core
        tasks = []
        for run in list(core.live.values()):
            if run.task is not None:
                tasks.append(run.task)
                run.task.cancel()
                run.task = None
            core.runs.pop(run.id, None)
            self.dequeue(run)
            self._timers.cancel(run.id)
            if core.live.get(run.id) is run:
                del core.live[run.id]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def start(self, run: Run) -> None:
        self._core.runs[run.id] = run
        self._core.live[run.id] = run
        run.queued = False
        run.task = asyncio.create_task(self.drive(run), name=f"instance-{run.id}")

    def fill_slots(self) -> None:
        limit = self._core.limits.max_running_instances
        while self._core.queue and len(self._core.runs) < limit and not self._core.stopping:
            run = self._core.queue.popleft()
            # A pending pause stays pending: the run takes it at its next step.
            if run.status not in (InstanceStatus.RUNNING, InstanceStatus.WAITING_FOR_PAUSE):
                run.set_status(InstanceStatus.RUNNING)
            self.start(run)
        if self._maybe_waiting and len(self._core.runs) < limit:
            # Instances may wait in a shared store for this free slot.
            self._runnable.set()

    def enqueue(self, run: Run, announce: bool = False) -> Durable | None:
        """Start a run now if a slot is free, else queue it; record the status.
        One waiting for its concurrency key's slot waits for that first."""
        if run.gate == 0:
            return self._hold_at_gate(run)
        start = (
            not self._core.queue and len(self._core.runs) < self._core.limits.max_running_instances
        )
        status = InstanceStatus.RUNNING if start else InstanceStatus.QUEUED
        durable = run.set_status(status) if announce or run.status != status else None
        self._core.live[run.id] = run
        if start:
            self.start(run)
        else:
            run.queued = True
            self._core.queue.append(run)
        return durable

    def _hold_at_gate(self, run: Run) -> Durable:
        """Store the run queued, waiting for its key's slot (resumed, or restarted
        once finished), and open the gate as far as the limits allow."""
        core = self._core
        durable = run.set_status(InstanceStatus.QUEUED)
        core.journal.gate_hold(run.id, run.spec.name, run.spec.gate or UNGATED)
        if not core.shared:
            # On a shared store it waits there, free for any server once let through.
            core.live[run.id] = run
            run.queued = True
            core.gated[run.id] = run
        return durable

    def let_through(self, promoted: list[str], retry: list[tuple[str, str, int]]) -> None:
        """A commit opened concurrency gates: start (or queue for a server slot)
        the instances it let through; look again at the keys a rate limit held
        back when their window has moved on."""
        core = self._core
        if core.shared:
            if promoted:
                # Stored unowned: whichever server has a slot takes them (the
                # store told the others), this one included.
                self.runnable_elsewhere()
        else:
            for instance_id in promoted:
                run = core.gated.pop(instance_id, None)
                if run is None or core.stopping:
                    continue  # held by a control call; or it resumes at the next start
                run.queued = False
                run.gate = 1
                self.enqueue(run)
        loop = asyncio.get_running_loop()
        for workflow, key, at in retry:
            known = self._gate_timers.get((workflow, key))
            if known is not None:
                if known[0] <= at:
                    continue
                known[1].cancel()
            handle = loop.call_later(max(0, at - ms()) / 1000, self._gate_due, workflow, key)
            self._gate_timers[(workflow, key)] = (at, handle)

    def _gate_due(self, workflow: str, key: str) -> None:
        self._gate_timers.pop((workflow, key), None)
        if not self._core.stopping:
            gate = self._core.gates.get(workflow, UNGATED)
            self._core.journal.gate_key(workflow, key, gate)

    def dequeue(self, run: Run) -> None:
        if run.queued:
            if self._core.gated.pop(run.id, None) is None:
                self._core.queue.remove(run)
            run.queued = False

    def settle(self, run: Run) -> None:
        """A run's task has ended and nobody holds it: finish what it left open."""
        if run.active or run.held:
            return
        if not self._core.stopping:
            if run.status == InstanceStatus.WAITING_FOR_PAUSE:
                run.pause_requested = False
                run.set_status(InstanceStatus.PAUSED)
            elif run.poked and run.status == InstanceStatus.WAITING and not run.queued:
                # An event came while the run was leaving: go on at once.
                self._timers.cancel(run.id)
                if self._core.shared and self.wake is not None:
                    # Stored waiting, it is free: taken again through a wake-up.
                    self._core.spawn(self.wake(run.id))
                else:
                    run.reset_for_replay()
                    self.enqueue(run)
        self.release(run)

    def release(self, run: Run) -> None:
        """Drop an idle handle from memory once its writes are durable.

        Until then it stays, so nobody re-reads a stale sequence number.
        """
        if run.active or run.queued or run.held:
            return
        fut = run.last_write
        if fut is None or fut.done():
            self.forget(run)
        else:
            fut.add_done_callback(lambda _: self.forget(run))

    def forget(self, run: Run) -> None:
        if not (run.active or run.queued or run.held) and self._core.live.get(run.id) is run:
            del self._core.live[run.id]

    async def stop_task(self, run: Run) -> None:
        """Take the run away from its task (cancelled), keeping the handle."""
        task = run.task
        if task is None:
            return
        run.task = None
        self._core.runs.pop(run.id, None)
        task.cancel()
        _, pending = await asyncio.wait([task], timeout=5)
        if pending:
            log.warning(
                "instance %s: its run ignored cancellation; it is abandoned",
                run.id,
                extra=about(run),
            )

    def finish(
        self,
        run: Run,
        status: InstanceStatus,
        output: bytes | None = None,
        error: tuple[str, str] | None = None,
        traceback: str | None = None,
    ) -> None:
        # Only the run's own task may end it: after a terminate or restart
        # took the run away, a late ending of the old task is dropped.
        if run.task is asyncio.current_task():
            run.set_status(status, output, error, traceback=traceback)

    async def _roll_back(self, run: Run, runner: StepRunner, name: str, message: str) -> bool:
        """Run the compensations the run registered (none: nothing to do). False
        when the run was unwound meanwhile (a stop, a pause): it stays as
        stored, and rolls back again from its records when it runs again."""
        if not run.compensations:
            return True
        run.terminating = False  # the compensations' own steps pass their boundaries
        try:
            failed = await runner.roll_back(name, message)
        except (Suspend, asyncio.CancelledError):
            return False
        except FatalWorkflowError as exc:
            log.error("instance %s: its rollback stopped: %s", run.id, exc, extra=about(run))
            return True
        if failed:
            log.warning(
                "instance %s: the rollback of step(s) %s failed",
                run.id, ", ".join(repr(f) for f in failed), extra=about(run),
            )  # fmt: skip
        return True

    async def drive(self, run: Run) -> None:
        observer = self._core.observer
        if observer is not None:
            run.span = observer.run_started(run.spec.name, run.id, run.trace_parent, run.created_at)
        runner = StepRunner(self._core, run)
        marker = None
        try:
            if run.resumed:
                run.replay = {s.index: s for s in await self._core.store.get_steps(run.id)}
                run.replay_names = None
                # A terminate with rollback asked for, and not yet done.
                marker = run.replay.pop(TERMINATE_STEP, None)
                run.terminating = marker is not None and marker.status is StepStatus.RUNNING
            workflow = run.spec.cls(self._core.env)
            event = WorkflowEvent(
                payload=json.loads(run.params),
                timestamp=datetime.fromtimestamp(run.created_at / 1000, UTC),
                instance_id=run.id,
            )
            try:
                result = await workflow.run(event, WorkflowStep(runner))
            finally:
                # Parallel steps run() left behind end with it, before its end is written.
                await run.cut_strays()
            try:
                output = to_json(result)
            except (TypeError, ValueError, RecursionError) as exc:
                run.set_status(
                    InstanceStatus.ERRORED,
                    error=(
                        "WorkflowOutputError",
                        f"run() returned a value that is not JSON ({exc}); return dicts, lists, "
                        f"strings, numbers, booleans or None",
                    ),
                )
                return
            if len(output) > self._core.limits.max_payload_bytes:
                run.set_status(
                    InstanceStatus.ERRORED,
                    error=(
                        "WorkflowOutputError",
                        f"run() returned {len(output):,} bytes of JSON, over the limit of "
                        f"{self._core.limits.max_payload_bytes:,} bytes (limits.max_payload_bytes)",
                    ),
                )
                return
            self.finish(run, InstanceStatus.COMPLETE, output=output)
        except StepFailedError as exc:
            # run() let a failed step's error through: the step's own traceback
            # (where its body raised) says why; the step's log record has it.
            log.warning(
                "instance %s errored: step %r failed: %s: %s",
                run.id, exc.step_name, exc.error_name, exc.error_message, extra=about(run),
            )  # fmt: skip
            if await self._roll_back(run, runner, exc.error_name, exc.error_message):
                self.finish(
                    run,
                    InstanceStatus.ERRORED,
                    error=(exc.error_name, exc.error_message),
                    traceback=exc.error_traceback,
                )
        except Terminating:
            if await self._roll_back(run, runner, "Terminated", "terminated with rollback"):
                if marker is not None:
                    marker.status, marker.ended_at = StepStatus.SUCCEEDED, int(time.time() * 1000)
                    run.put_step(marker)
                self.finish(run, InstanceStatus.TERMINATED)
        except FatalWorkflowError as exc:
            where = format_error(exc)
            log.error("instance %s failed: %s", run.id, exc, extra=about(run, traceback=where))
            self.finish(
                run,
                InstanceStatus.ERRORED,
                error=(exc.error_name, exc.error_message),
                traceback=where,
            )
        except (Suspend, asyncio.CancelledError):
            pass  # left as stored; resumed after a restart or a wake-up
        except (Exception, SystemExit) as exc:
            where = format_error(exc)
            log.warning(
                "instance %s errored: run() raised %s: %s",
                run.id, type(exc).__name__, exc, extra=about(run, traceback=where),
            )  # fmt: skip
            if await self._roll_back(run, runner, type(exc).__name__, str(exc)):
                self.finish(
                    run, InstanceStatus.ERRORED, error=(type(exc).__name__, str(exc)),
                    traceback=where,
                )  # fmt: skip
        finally:
            if observer is not None:
                observer.run_ended(run.span, run.status, len(run.replay or ()), run.error)
                run.span = None
            if run.task is asyncio.current_task():
                self._core.runs.pop(run.id, None)
                run.task = None
                self.settle(run)
            self.fill_slots()
