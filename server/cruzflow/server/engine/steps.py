"""Where a step is executed and checkpointed: the engine's side of ``step``.

``cruzflow.sdk.step.WorkflowStep`` (what ``run`` receives) checks what the
workflow passes and calls the ``StepRunner`` of its run: it replays stored
results, runs attempts with their retries and timeouts, and writes each
step's row and events into the journal's open batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cruzflow.sdk.api import RollbackContext, StepContext
from cruzflow.sdk.retries import StepPolicy
from cruzflow.server.engine.errors import (
    ChildWorkflowError,
    EventTimeoutError,
    FatalWorkflowError,
    NonDeterminismError,
    NonRetryableError,
    ServiceError,
    StepFailedError,
    StepTimeoutError,
    Suspend,
)
from cruzflow.server.engine.scope import StepScope, current_step
from cruzflow.server.engine.tracebacks import format_error
from cruzflow.server.engine.validate import has_control
from cruzflow.server.records import (
    CHILD_ENDED,
    RESERVED_EVENT_PREFIX,
    EventKind,
    InstanceStatus,
    StepKind,
    StepRecord,
    StepStatus,
)

if TYPE_CHECKING:
    from cruzflow.server.engine.core import Core
    from cruzflow.server.engine.run import Run

log = logging.getLogger("cruzflow.engine")

_wants_context: dict[Any, bool] = {}


def _takes_context(fn: Callable[..., Any]) -> bool:
    """Whether the callback has a required positional parameter for the context."""
    key = getattr(fn, "__code__", None) or getattr(getattr(fn, "__func__", None), "__code__", None)
    if key is not None and inspect.ismethod(fn):
        key = (key, True)
    cached = _wants_context.get(key) if key is not None else None
    if cached is not None:
        return cached
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    wants = any(
        p.kind is p.VAR_POSITIONAL
        or (p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)
        for p in params
    )
    if key is not None:
        _wants_context[key] = wants
    return wants


@dataclass(slots=True)
class _Slot:
    """One step of a run: it writes the step's row and names it in its events."""

    run: Run
    index: int
    name: str
    occurrence: int
    kind: StepKind
    started_at: int = 0
    event_type: str | None = None

    def ref(self, attempt: int) -> dict[str, Any]:
        ref: dict[str, Any] = {
            "name": self.name, "occ": self.occurrence, "idx": self.index, "att": attempt,
        }  # fmt: skip
        if self.kind is not StepKind.DO:
            ref["k"] = int(self.kind)
        return ref

    def record(self, status: StepStatus, attempt: int, **fields: Any) -> None:
        self.run.put_step(StepRecord(
            self.run.id, self.index, self.name, self.occurrence, status, attempt,
            self.started_at, kind=self.kind, event_type=self.event_type, **fields,
        ))  # fmt: skip

    def emit(
        self, kind: EventKind, attempt: int, payload: bytes | None = None, **extra: Any
    ) -> None:
        self.run.emit(kind, {**self.ref(attempt), **extra}, payload)

    def succeed(self, attempt: int, output: bytes, **fields: Any) -> None:
        self.record(StepStatus.SUCCEEDED, attempt, ended_at=_ms(), output=output, **fields)
        self.emit(EventKind.STEP_SUCCEEDED, attempt, output)

    async def fail(
        self, attempt: int, error_name: str, error_message: str, error_traceback: str | None = None
    ) -> None:
        """Record the step failed for good; durable before ``run`` is told."""
        self.record(
            StepStatus.FAILED, attempt, ended_at=_ms(), error_name=error_name,
            error_message=error_message, error_traceback=error_traceback,
        )  # fmt: skip
        self.emit(
            EventKind.STEP_FAILED, attempt, err=_err(error_name, error_message, error_traceback)
        )
        await self.run.barrier()


class StepChanged(NonDeterminismError):
    """Another step was recorded where the code reached this one: ``stored``
    at ``index``, against the code's ``kind`` ``name`` (``occurrence``)."""

    def __init__(
        self, message: str, index: int, stored: StepRecord, name: str, occurrence: int,
        kind: StepKind,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.index, self.stored = index, stored
        self.name, self.occurrence, self.kind = name, occurrence, kind


def _changed(
    index: int, name: str, occurrence: int, kind: StepKind, stored: StepRecord
) -> StepChanged:
    return StepChanged(
        f"step #{index} is {kind.name.lower()} {name!r} (occurrence {occurrence}) in the "
        f"code but was recorded as {stored.kind.name.lower()} {stored.name!r} (occurrence "
        f"{stored.occurrence}): the workflow code changed under a running instance; guard "
        f"the change with step.version(...), restart the instance, or deploy the change "
        f"under a new workflow name (`cruzflow check` finds such changes before a deploy)",
        index, stored, name, occurrence, kind,
    )  # fmt: skip


def match_recorded(
    replay: dict[int, StepRecord],
    recorded: Callable[[str, int], StepRecord | None],
    index: int,
    name: str,
    occurrence: int,
    kind: StepKind,
    in_order: bool,
) -> tuple[int, StepRecord | None]:
    """Where a step of a replayed run goes, and what was recorded for it: the
    engine's rule, shared with the replay check (``engine.replay``).

    A step is its name and occurrence. In order, the recorded one is at
    ``index``; parallel branches (``in_order`` false) may reach their steps in
    another order than they did when recorded, so it is looked up by name.
    Version markers that the code no longer asks for are passed over. Raises
    NonDeterminismError when another step was recorded where this one is.
    """
    stored = replay.get(index)
    while stored is not None and stored.kind is StepKind.VERSION and kind is not StepKind.VERSION:
        index += 1  # a marker of a step.version call since removed from the code
        stored = replay.get(index)
    if stored is None or stored.name != name or stored.occurrence != occurrence:
        found = recorded(name, occurrence)
        if found is None and stored is not None and in_order:
            # Steps in order, and another one recorded here: the code changed.
            raise _changed(index, name, occurrence, kind, stored)
        stored = found
        if stored is None:
            while index in replay:  # a new step goes past the recorded ones
                index += 1
        else:
            index = stored.index
    if stored is not None and stored.kind != kind:
        raise _changed(index, name, occurrence, kind, stored)
    return index, stored


def version_taken(
    replay: dict[int, StepRecord] | None,
    recorded: Callable[[str, int], StepRecord | None],
    index: int,
    name: str,
) -> tuple[bool, bool]:
    """What ``step.version(name)`` answers at ``index`` of a run, and whether it
    records its marker there: True where the marker was recorded, or where
    nothing was recorded yet at or past this position (new code reaches this
    point for the first time: the marker is recorded); False for a run that
    went past this point under the code before the marker (it keeps the old
    path, and nothing is recorded)."""
    if replay:
        stored = recorded(name, 1)
        if stored is not None:
            if stored.kind is not StepKind.VERSION:
                raise _changed(index, name, 1, StepKind.VERSION, stored)
            return True, False
        if max(replay) >= index:
            return False, False
    return True, True


def _err(name: str, message: str, traceback: str | None) -> list[str]:
    """An error as events carry it: name, message, and the traceback if any."""
    return [name, message] if traceback is None else [name, message, traceback]


def _about(run: Run, step: str, attempt: int) -> dict[str, Any]:
    """The fields of a log record about a step (see telemetry's log formats)."""
    return {"instance_id": run.id, "workflow": run.spec.name, "step": step, "attempt": attempt}


def _about_error(run: Run, step: str, attempt: int, traceback: str | None) -> dict[str, Any]:
    about = _about(run, step, attempt)
    if traceback is not None:
        about["traceback"] = traceback
    return about


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""One encoder for every step result: json.dumps with arguments makes one per call."""


def to_json(value: Any) -> bytes:
    """Compact JSON bytes; TypeError, ValueError or RecursionError if it isn't JSON."""
    return _ENCODER.encode(value).encode()


def _ms() -> int:
    return int(time.time() * 1000)


# How long a parent waits for a child's end before it looks again by itself:
# a safety net for a wake-up lost with a server (it is normally woken at once).
_CHILD_RECHECK_MS = 3_600_000


@dataclass(slots=True)
class _Compensation:
    """A succeeded step's rollback, waiting for the instance to fail."""

    index: int
    name: str
    occurrence: int
    output: bytes | None
    fn: Callable[..., Any]
    policy: StepPolicy


def _undo(comp: _Compensation, error_name: str, error_message: str, instance_id: str) -> Any:
    """The body of a compensation's step: its rollback callback, given what it
    undoes (a RollbackContext) if it takes an argument."""

    async def body(ctx: StepContext) -> None:
        output = json.loads(comp.output) if comp.output is not None else None
        info = RollbackContext(
            comp.name, comp.occurrence, output, error_name, error_message, ctx.attempt, instance_id
        )
        result = comp.fn(info) if _takes_context(comp.fn) else comp.fn()
        if inspect.isawaitable(result):
            await result

    return body


def _child_id(run: Run, name: str, occurrence: int) -> str:
    """A child's id: the parent's, then a digest of the parent's id, its
    current run's start and the step, so a replay derives the same one and a
    restarted parent new ones."""
    seed = f"{run.id}\0{run.run_started_at}\0{name}\0{occurrence}".encode()
    return f"{run.id[:60]}-{hashlib.sha256(seed).hexdigest()[:24]}"


class StepRunner:
    """Runs the steps of one run in memory (the ``StepRuntime`` that
    ``cruzflow.sdk.step.WorkflowStep`` calls): replays what is stored, runs
    what is not, and checkpoints each result before ``run`` sees it."""

    __slots__ = ("_core", "_run")

    def __init__(self, core: Core, run: Run) -> None:
        self._core = core
        self._run = run

    async def do(
        self,
        name: str,
        fn: Callable[..., Any],
        policy: StepPolicy,
        rollback: tuple[Callable[..., Any], StepPolicy] | None = None,
        kind: StepKind = StepKind.DO,
    ) -> Any:
        """One ``step.do``: its stored result on a replay, else its attempts.
        Once it succeeded, its ``rollback`` is registered with the run."""
        run = self._run
        core = self._core
        slot, stored = self._next(name, kind)

        attempt = 0
        next_at: int | None = None
        if stored is not None:
            if stored.status is StepStatus.SUCCEEDED:
                if rollback is not None:
                    run.compensations.append(
                        _Compensation(slot.index, name, slot.occurrence, stored.output, *rollback)
                    )
                return json.loads(stored.output) if stored.output is not None else None
            if stored.status is StepStatus.FAILED:
                raise StepFailedError(
                    name,
                    stored.error_name or "",
                    stored.error_message or "",
                    stored.error_traceback,
                )
            attempt, slot.started_at, next_at = (
                stored.attempts,
                stored.started_at,
                stored.next_attempt_at,
            )

        await run.enter_step()

        if stored is not None and next_at is None and attempt >= policy.max_attempts:
            # The last allowed attempt was cut short by a restart.
            message = (
                f"attempt {attempt} was interrupted by a server restart and no retries are "
                f"left (retries.limit={policy.max_attempts - 1})"
            )
            await slot.fail(attempt, "StepInterruptedError", message)
            raise StepFailedError(name, "StepInterruptedError", message)
        if next_at is not None:
            await core.wait_or_suspend((next_at - _ms()) / 1000.0)
        elif stored is not None:
            slot.emit(
                EventKind.ATTEMPT_FAILED,
                attempt,
                err=[
                    "StepInterruptedError",
                    f"attempt {attempt} was interrupted by a server restart",
                ],
                next=_ms(),
                delay=0,
            )

        body = fn  # hooks see the real body on every attempt, not their last stand-in
        while True:
            if core.stopping:
                raise Suspend()
            attempt += 1
            if not slot.started_at:
                slot.started_at = _ms()
            slot.record(StepStatus.RUNNING, attempt)
            slot.emit(EventKind.STEP_STARTED, attempt)
            if core.hooks is not None:
                fn = core.hooks.step_body(run.id, name, slot.occurrence, attempt, body)

            observer = core.observer
            run.busy += 1
            try:
                if observer is None:
                    output, error_name, error_message, error_tb, retryable = await self._attempt(
                        run, name, fn, attempt, policy, occurrence=slot.occurrence
                    )
                else:
                    span = observer.attempt_started(
                        run.span, name, slot.occurrence, slot.index, attempt
                    )
                    try:
                        (
                            output,
                            error_name,
                            error_message,
                            error_tb,
                            retryable,
                        ) = await self._attempt(
                            run, name, fn, attempt, policy, span, occurrence=slot.occurrence
                        )
                    except BaseException as exc:  # cancelled (terminate) or cut by shutdown
                        observer.attempt_ended(span, "interrupted", (type(exc).__name__, ""), None)
                        raise
            finally:
                run.attempt_ended()
            last = output is not None or not retryable or attempt >= policy.max_attempts
            delay = 0.0
            if not last:
                delay = policy.retry_delay(attempt)
                if core.hooks is not None:
                    delay = core.hooks.retry_delay(run.id, name, slot.occurrence, attempt, delay)
            # Logged before the attempt's span ends, so the record carries its span id.
            if output is None and last:
                log.warning(
                    "step %r failed after %d attempt(s): %s: %s",
                    name, attempt, error_name, error_message,
                    extra=_about_error(run, name, attempt, error_tb),
                )  # fmt: skip
            elif output is None:
                log.info(
                    "step %r attempt %d failed (%s: %s); retrying in %g s",
                    name, attempt, error_name, error_message, delay,
                    extra=_about_error(run, name, attempt, error_tb),
                )  # fmt: skip
            if observer is not None:
                if output is not None:
                    observer.attempt_ended(span, "succeeded", None, None)
                else:
                    outcome = "failed" if last else "retrying"
                    retry = None if last else delay
                    observer.attempt_ended(span, outcome, (error_name, error_message), retry)
            if output is not None:
                slot.succeed(attempt, output)
                if rollback is not None:
                    run.compensations.append(
                        _Compensation(slot.index, name, slot.occurrence, output, *rollback)
                    )
                # Round-trip through JSON so a replay returns exactly the same value.
                return json.loads(output)
            if last:
                await slot.fail(attempt, error_name, error_message, error_tb)
                raise StepFailedError(name, error_name, error_message, error_tb)
            due = _ms() + int(delay * 1000)
            slot.record(
                StepStatus.RUNNING, attempt, error_name=error_name, error_message=error_message,
                next_attempt_at=due, error_traceback=error_tb,
            )  # fmt: skip
            slot.emit(
                EventKind.ATTEMPT_FAILED, attempt, err=_err(error_name, error_message, error_tb),
                next=due, delay=int(delay * 1000),
            )  # fmt: skip
            await core.wait_or_suspend(delay)

    def _next(self, name: str, kind: StepKind) -> tuple[_Slot, StepRecord | None]:
        """Take the next step slot, and what replay recorded there."""
        run = self._run
        limits = self._core.limits
        if kind is StepKind.ROLLBACK:
            pass  # named after a step that passed this check
        elif not isinstance(name, str) or not name or len(name) > limits.max_step_name_length:
            raise ValueError(
                f"step name must be a non-empty string of at most "
                f"{limits.max_step_name_length} characters, got {name!r:.80}"
            )
        occurrence = run.occurrences[name] = run.occurrences.get(name, 0) + 1
        run.took_step()
        replay = run.replay
        stored = None
        index = run.next_index
        if replay:
            index, stored = match_recorded(
                replay, run.recorded, index, name, occurrence, kind, not run.strays
            )
        run.next_index = max(run.next_index, index + 1)
        if index >= limits.max_steps_per_instance:
            raise FatalWorkflowError(
                "StepLimitError",
                f"the instance reached {limits.max_steps_per_instance:,} steps "
                f"(limits.max_steps_per_instance); split the work across instances",
            )
        return _Slot(run, index, name, occurrence, kind), stored

    def version(self, name: str) -> bool:
        """One ``step.version``: True for a run that reaches this point under
        the code that has it (its marker is recorded here, in the run's next
        write), False for one that went past it before; the same answer for
        every later call of that name in the run."""
        run = self._run
        taken = run.versions.get(name) if run.versions is not None else None
        if taken is not None:
            return taken
        limit = self._core.limits.max_step_name_length
        if not isinstance(name, str) or not name or len(name) > limit:
            raise ValueError(
                f"step.version: the name must be a non-empty string of at most {limit} "
                f"characters, got {name!r:.80}"
            )
        taken, record = version_taken(run.replay, run.recorded, run.next_index, name)
        if record:
            slot, _ = self._next(name, StepKind.VERSION)
            slot.started_at = _ms()
            # Durable with the run's next write, before any step it guards runs.
            slot.record(StepStatus.SUCCEEDED, 1, ended_at=slot.started_at, output=b"true")
        elif taken:
            stored = run.recorded(name, 1)
            assert stored is not None
            run.next_index = max(run.next_index, stored.index + 1)
        if run.versions is None:
            run.versions = {}
        run.versions[name] = taken
        return taken

    async def sleep_until(self, name: str, due_at: Callable[[int], int]) -> None:
        """A durable sleep until ``due_at(start)``; on a replay its stored due time."""
        run = self._run
        slot, stored = self._next(name, StepKind.SLEEP)
        if stored is not None and stored.status is StepStatus.SUCCEEDED:
            return
        await run.enter_step()
        if stored is not None and stored.next_attempt_at is not None:
            due, slot.started_at = stored.next_attempt_at, stored.started_at
        else:
            # One clock reading: a sleep of 3 s is due exactly 3 s after its start.
            slot.started_at = _ms()
            due = due_at(slot.started_at)
            self._check_wait(due - slot.started_at, "sleep")
            hooks = self._core.hooks
            if hooks is not None:
                due = hooks.timer_due(run.id, name, slot.occurrence, StepKind.SLEEP, due)
            slot.record(StepStatus.RUNNING, 1, next_attempt_at=due)
            slot.emit(EventKind.STEP_STARTED, 1)
        while due > _ms():
            await run.park(due, run.pokes)
        slot.succeed(1, b"null", next_attempt_at=due)
        if self._core.observer is not None:
            self._core.observer.waited(
                run.span, StepKind.SLEEP, name, slot.occurrence, slot.started_at, "succeeded", None
            )

    def _check_wait(self, wait_ms: int, what: str) -> None:
        limit = self._core.limits.max_sleep_s
        if wait_ms > limit * 1000:
            raise ValueError(
                f"step.{what}: {wait_ms / 86_400_000:,.1f} days is longer than the limit of "
                f"{limit / 86400:,.1f} days (limits.max_sleep)"
            )

    async def wait_for_event(self, name: str, type: str, timeout_s: float) -> dict[str, Any]:
        """A durable wait for an event of ``type``: the event as ``{"type", "payload",
        "timestamp"}``, taken once; EventTimeoutError after ``timeout_s``."""
        run = self._run
        core = self._core
        slot, stored = self._next(name, StepKind.WAIT_FOR_EVENT)
        if stored is not None:
            if stored.status is StepStatus.SUCCEEDED:
                result: dict[str, Any] = json.loads(stored.output or b"null")
                return result
            if stored.status is StepStatus.FAILED:
                raise EventTimeoutError(name, stored.error_name or "", stored.error_message or "")
        limit = core.limits.max_event_type_length
        if not isinstance(type, str) or not type or len(type) > limit:
            raise ValueError(
                f"step.wait_for_event: type must be a string of 1 to {limit} characters, "
                f"got {type!r:.80}"
            )
        if has_control(type) or type.startswith(RESERVED_EVENT_PREFIX):
            # SendEvent refuses such types, so this wait could never be answered.
            raise ValueError(
                f"step.wait_for_event: type {type!r:.80} holds a control character or starts "
                f"with {RESERVED_EVENT_PREFIX!r} (the engine's own types); name it otherwise"
            )
        slot.event_type = type
        await run.enter_step()
        if stored is not None and stored.next_attempt_at is not None:
            deadline, slot.started_at = stored.next_attempt_at, stored.started_at
        else:
            slot.started_at = _ms()
            wait_ms = int(timeout_s * 1000)
            self._check_wait(wait_ms, "wait_for_event timeout")
            deadline = slot.started_at + wait_ms
            if core.hooks is not None:
                deadline = core.hooks.timer_due(
                    run.id, name, slot.occurrence, StepKind.WAIT_FOR_EVENT, deadline
                )
            slot.record(StepStatus.RUNNING, 1, next_attempt_at=deadline)
            slot.emit(EventKind.STEP_STARTED, 1)
        while True:
            seen = run.pokes
            event = await core.take_event(run, type)
            if event is not None:
                output = to_json({
                    "type": event.type,
                    "payload": json.loads(event.payload),
                    "timestamp": datetime.fromtimestamp(event.at / 1000, UTC).isoformat(),
                })  # fmt: skip
                core.journal.consume(run.id, event.id, slot.index)
                slot.succeed(1, output)
                if core.observer is not None:
                    core.observer.waited(
                        run.span, StepKind.WAIT_FOR_EVENT, name, slot.occurrence,
                        slot.started_at, "succeeded", type, event.trace_parent,
                    )  # fmt: skip
                value: dict[str, Any] = json.loads(output)
                return value
            if _ms() >= deadline:
                message = f"no {type!r} event arrived within the wait's timeout"
                if core.observer is not None:
                    core.observer.waited(
                        run.span, StepKind.WAIT_FOR_EVENT, name, slot.occurrence,
                        slot.started_at, "timed_out", type,
                    )  # fmt: skip
                await slot.fail(1, "EventTimeoutError", message)
                raise EventTimeoutError(name, "EventTimeoutError", message)
            await run.park(deadline, seen)

    async def roll_back(self, error_name: str, error_message: str) -> list[str]:
        """Run the registered compensations, the last-started step's first, each
        a durable step of its own ("rollback:NAME", kind ROLLBACK) with its
        retries; one that fails for good does not stop the others. Returns
        the names of the steps whose rollback failed."""
        run = self._run
        failed: list[str] = []
        for comp in sorted(run.compensations, key=lambda c: c.index, reverse=True):
            body = _undo(comp, error_name, error_message, run.id)
            try:
                await self.do(f"rollback:{comp.name}", body, comp.policy, kind=StepKind.ROLLBACK)
            except StepFailedError:
                failed.append(comp.name)
        return failed

    async def child(
        self,
        name: str,
        workflow: str,
        params: Any,
        instance_id: str | None,
        lookup_key: str | None,
        abandon: bool,
    ) -> Any:
        """One ``step.child``: the child is created in the commit that records the
        step (so exactly once), then its end is waited for parked; its output is
        the step's result, its error or termination a ChildWorkflowError."""
        run = self._run
        core = self._core
        slot, stored = self._next(name, StepKind.CHILD)
        if stored is not None:
            if stored.status is StepStatus.SUCCEEDED:
                return json.loads(stored.output or b"null")
            if stored.status is StepStatus.FAILED:
                raise ChildWorkflowError(
                    name, stored.error_name or "", stored.error_message or "",
                    stored.event_type or "",
                )  # fmt: skip
        await run.enter_step()
        if stored is not None and stored.event_type:
            child_id, slot.started_at = stored.event_type, stored.started_at
            slot.event_type = child_id
        else:
            child_id = instance_id or _child_id(run, name, slot.occurrence)
            await self._create_child(slot, child_id, workflow, params, lookup_key, abandon)
        wake_up = CHILD_ENDED + child_id
        while True:
            seen = run.pokes
            if child_id not in await self._ended_children(seen):
                # Woken by the child's end (see Run._tell_parent); the recheck
                # is a safety net only, for a wake-up lost with a server.
                await run.park(_ms() + _CHILD_RECHECK_MS, seen)
                continue
            child = await core.store.get_instance(child_id)
            if child is None or child.parent_id != run.id:
                message = (
                    f"child instance {child_id!r} is gone (purged by retention before this "
                    f"instance saw its end)"
                    if child is None
                    else f"instance {child_id!r} was not started by this step; give step.child "
                    f"an id no other instance has, or none"
                )
                await slot.fail(1, "ChildWorkflowError", message)
                raise ChildWorkflowError(name, "ChildWorkflowError", message, child_id)
            if child.status.finished:
                event = await core.take_event(run, wake_up)
                if event is not None:
                    core.journal.consume(run.id, event.id, slot.index)
                if child.status is InstanceStatus.COMPLETE:
                    output = child.output or b"null"
                    slot.succeed(1, output)
                    return json.loads(output)
                how = child.status.label
                if child.status is InstanceStatus.ERRORED:
                    how += f": {child.error_name}: {child.error_message}"
                message = f"child instance {child_id!r} ({child.workflow}) {how}"
                await slot.fail(1, "ChildWorkflowError", message)
                raise ChildWorkflowError(name, "ChildWorkflowError", message, child_id)
            # Its end was told, then it was restarted: it runs again.
            await run.park(_ms() + _CHILD_RECHECK_MS, seen)

    async def _ended_children(self, seen: int) -> frozenset[str]:
        """The run's children whose end is in its inbox and not yet recorded
        (the child's last commit stores it): one read of the inbox, shared by
        every waiting branch until the next poke, instead of one read of each
        child's record per wake-up."""
        run = self._run
        if run.ended is None or run.ended[0] != seen:
            types = await self._core.store.pending_types(run.id, CHILD_ENDED)
            run.ended = (seen, frozenset(t[len(CHILD_ENDED) :] for t in types))
        return run.ended[1]

    async def _create_child(
        self,
        slot: _Slot,
        child_id: str,
        workflow: str,
        params: Any,
        lookup_key: str | None,
        abandon: bool,
    ) -> None:
        """Create the child in the same commit as the step's first row."""
        run = self._run
        core = self._core
        admission = core.admission
        try:
            params_json = to_json(params)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"step.child({slot.name!r}): params are not JSON ({exc})") from None
        try:
            spec, params_bytes, key = admission.check_new(
                workflow, child_id, params_json, lookup_key or ""
            )
            await admission.reserve_id(child_id)
        except ServiceError as exc:
            raise ValueError(f"step.child({slot.name!r}): {exc}") from None
        try:
            slot.started_at = _ms()
            slot.event_type = child_id
            _, durable = admission.admit(
                spec, child_id, params_bytes, lookup_key or "", parent=(run.id, abandon), key=key
            )
            slot.record(StepStatus.RUNNING, 1)
            slot.emit(EventKind.STEP_STARTED, 1)
        finally:
            admission.release_id(child_id)
        await core.durable(durable, "the child instance could not be stored", child_id)

    async def _attempt(
        self,
        run: Run,
        name: str,
        fn: Callable[..., Any],
        attempt: int,
        policy: StepPolicy,
        span: Any = None,
        *,
        occurrence: int,
    ) -> tuple[bytes | None, str, str, str | None, bool]:
        """One attempt: (result JSON, "", "", None, True) on success, else (None, error
        name, message, traceback or None, retryable).

        ``span`` is the observer's token for the attempt, told of what the body raised.
        """
        # Bindings called by the body read this for their deadline and idempotency keys.
        step_token = current_step.set(
            StepScope(run.id, run.created_at, name, occurrence, attempt,
                      time.monotonic() + policy.timeout_s)
        )  # fmt: skip
        try:
            async with asyncio.timeout(policy.timeout_s) as scope:
                if _takes_context(fn):
                    ctx = StepContext(name, attempt, run.id, time.time() + policy.timeout_s)
                    result = fn(ctx)
                else:
                    result = fn()
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            if span is not None:
                self._core.observer.attempt_failed(span, exc)  # type: ignore[union-attr]
            if isinstance(exc, TimeoutError) and scope.expired():
                message = (
                    f"attempt {attempt} of step {name!r} timed out after {policy.timeout_s:g} s"
                )
                # Where the body was when its time ran out: the cancelled await.
                cut = exc.__context__
                where = format_error(cut) if cut is not None else None
                return None, StepTimeoutError.__name__, message, where, True
            retryable = not isinstance(exc, NonRetryableError)
            return None, type(exc).__name__, str(exc), format_error(exc), retryable
        finally:
            current_step.reset(step_token)
        try:
            output = to_json(result)
        except (TypeError, ValueError, RecursionError) as exc:
            return (
                None,
                "StepResultError",
                f"step {name!r} returned a value that is not JSON ({exc}); return dicts, lists, "
                f"strings, numbers, booleans or None",
                None,
                False,
            )
        limit = self._core.limits.max_payload_bytes
        if len(output) > limit:
            return (
                None,
                "StepResultError",
                f"step {name!r} returned {len(output):,} bytes of JSON, over the limit of "
                f"{limit:,} bytes (limits.max_payload_bytes); store large data elsewhere and "
                f"return a reference",
                None,
                False,
            )
        return output, "", "", None, True
