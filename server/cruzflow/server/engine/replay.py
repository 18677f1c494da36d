"""A recorded history replayed against workflow code, in a sandbox.

No step body runs and nothing is stored: each step the code reaches is
matched with the recorded one by the engine's own rule
(``steps.match_recorded``) and answered with its recorded result or error,
until the code returns, raises, reaches a step the history has not done
yet (there the live run would go on), or reaches another step than the one
recorded (there the live run would fail with NonDeterminismError).
``cruzflow check`` runs it over live histories before a deploy;
``cruzflow.testing.WorkflowTestEnv.replay`` over an exported instance.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cruzflow.sdk.api import WorkflowEvent
from cruzflow.sdk.retries import StepPolicy
from cruzflow.sdk.step import WorkflowStep
from cruzflow.server.engine.errors import (
    ChildWorkflowError,
    EventTimeoutError,
    FatalWorkflowError,
    StepFailedError,
)
from cruzflow.server.engine.steps import StepChanged, match_recorded, version_taken
from cruzflow.server.records import InstanceStatus, StepKind, StepRecord, StepStatus

# The words a step's kind is shown with (as the clients spell them).
KIND_WORDS = {
    StepKind.DO: "do",
    StepKind.SLEEP: "sleep",
    StepKind.WAIT_FOR_EVENT: "waitForEvent",
    StepKind.CHILD: "child",
    StepKind.ROLLBACK: "rollback",
    StepKind.VERSION: "version",
}
# Loop turns without progress, while a parallel branch waits at a step not
# yet done, after which the replay counts as settled there.
_IDLE_TURNS = 50


@dataclass(frozen=True, slots=True)
class History:
    """What a replay needs of an instance: its params and recorded steps."""

    instance_id: str
    workflow: str
    status: InstanceStatus
    params: bytes
    created_at: int
    steps: tuple[StepRecord, ...]
    output: bytes | None = None
    error: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class StepAt:
    """A step as a replay names it: its position, kind, name and occurrence."""

    index: int
    kind: str
    name: str
    occurrence: int = 1

    def __str__(self) -> str:
        more = f" (occurrence {self.occurrence})" if self.occurrence != 1 else ""
        return f"#{self.index} {self.kind} {self.name!r}{more}"


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where the code left the recorded history: ``recorded`` is the step the
    history has there (None: the code reached a step past the history's end
    that the history never did), ``code`` the step the code reached there
    (None: the code did not reach the recorded step at all, as when a step
    was removed)."""

    index: int
    recorded: StepAt | None
    code: StepAt | None
    message: str


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """How replaying one history against the code went.

    ``outcome`` is "completed" (run returned ``output``), "errored" (run
    raised ``error``, name and message), "waiting" (the code reached
    ``next_step``, not done yet in the history: the live run goes on from
    there) or "diverged" (see ``divergence``).
    """

    instance_id: str
    workflow: str
    outcome: str
    steps_replayed: int
    next_step: StepAt | None = None
    output: Any = None
    error: tuple[str, str] | None = None
    divergence: Divergence | None = None

    @property
    def diverged(self) -> bool:
        return self.divergence is not None


class _Stop(BaseException):
    """Ends the replay's run (a step not done yet, or a divergence)."""


class Sandbox:
    """The ``StepRuntime`` of a replay: answers each step from the history."""

    def __init__(self, history: History) -> None:
        # A rollback's steps come after run() ended, and a terminate's row
        # has no position: run() takes neither.
        self.replay = {
            s.index: s for s in history.steps if s.index >= 0 and s.kind is not StepKind.ROLLBACK
        }
        self._names = {(s.name, s.occurrence): s for s in self.replay.values()}
        self.next_index = 0
        self.occurrences: dict[str, int] = {}
        self.versions: dict[str, bool] = {}
        self.consumed: set[int] = set()
        self.main: asyncio.Task[Any] | None = None
        self.strays: set[asyncio.Task[Any]] = set()
        self.progress = 0
        self.waiting = 0
        self.next_step: StepAt | None = None
        self.divergence: Divergence | None = None

    def _recorded(self, name: str, occurrence: int) -> StepRecord | None:
        return self._names.get((name, occurrence))

    def _next(self, name: str, kind: StepKind) -> tuple[int, StepRecord | None]:
        occurrence = self.occurrences[name] = self.occurrences.get(name, 0) + 1
        task = asyncio.current_task()
        if task is not self.main and task is not None and task not in self.strays:
            self.strays.add(task)
            task.add_done_callback(self.strays.discard)
        in_order = not self.strays
        try:
            index, stored = match_recorded(
                self.replay, self._recorded, self.next_index, name, occurrence, kind, in_order
            )
        except StepChanged as exc:
            self._diverge(exc)
        if in_order and stored is not None:
            self._check_order(stored, name, occurrence, kind)
        self.next_index = max(self.next_index, index + 1)
        self.progress += 1
        if stored is not None:
            self.consumed.add(stored.index)
        return index, stored

    def _check_order(self, stored: StepRecord, name: str, occurrence: int, kind: StepKind) -> None:
        """Steps in order must come in their recorded order. The engine hands a
        step its result by name wherever it was recorded (parallel branches
        need that); in order, one recorded elsewhere than where the code
        reaches it means the code moved it, and the check says so."""
        expected = self.next_index
        here = self.replay.get(expected)
        while here is not None and here.kind is StepKind.VERSION and kind is not StepKind.VERSION:
            expected += 1
            here = self.replay.get(expected)
        if here is None or here.index == stored.index:
            return
        message = (
            f"step #{expected} is {KIND_WORDS[kind]} {name!r} in the code but was recorded as "
            f"{KIND_WORDS[here.kind]} {here.name!r}; the code's step was recorded at "
            f"#{stored.index}: a step was moved (the recorded results would be handed out "
            f"in another order than they were made)"
        )
        self._diverge(StepChanged(message, expected, here, name, occurrence, kind))

    def _diverge(self, exc: StepChanged) -> Any:
        if self.divergence is None:
            self.divergence = Divergence(
                exc.index,
                _step_at(exc.stored),
                StepAt(exc.index, KIND_WORDS[exc.kind], exc.name, exc.occurrence),
                str(exc.error_message),
            )
        raise _Stop() from None

    async def _not_done(self, index: int, name: str, kind: StepKind) -> Any:
        """The code reached a step the history has not done: the live run goes
        on from here. A parallel branch waits here while the others replay."""
        at = StepAt(index, KIND_WORDS[kind], name, self.occurrences[name])
        if self.next_step is None or index < self.next_step.index:
            self.next_step = at
        if asyncio.current_task() is self.main:
            raise _Stop()
        self.waiting += 1
        await asyncio.get_running_loop().create_future()  # cancelled as the replay ends

    async def do(
        self,
        name: str,
        fn: Callable[..., Any],
        policy: StepPolicy,
        rollback: tuple[Callable[..., Any], StepPolicy] | None = None,
    ) -> Any:
        index, stored = self._next(name, StepKind.DO)
        if stored is not None:
            if stored.status is StepStatus.SUCCEEDED:
                return _value(stored)
            if stored.status is StepStatus.FAILED:
                raise StepFailedError(
                    name, stored.error_name or "", stored.error_message or "",
                    stored.error_traceback,
                )  # fmt: skip
        return await self._not_done(index, name, StepKind.DO)

    async def sleep_until(self, name: str, due_at: Callable[[int], int]) -> None:
        index, stored = self._next(name, StepKind.SLEEP)
        if stored is None or stored.status is not StepStatus.SUCCEEDED:
            await self._not_done(index, name, StepKind.SLEEP)

    async def wait_for_event(self, name: str, type: str, timeout_s: float) -> dict[str, Any]:
        index, stored = self._next(name, StepKind.WAIT_FOR_EVENT)
        if stored is not None:
            if stored.status is StepStatus.SUCCEEDED:
                value: dict[str, Any] = _value(stored)
                return value
            if stored.status is StepStatus.FAILED:
                raise EventTimeoutError(name, stored.error_name or "", stored.error_message or "")
        result: dict[str, Any] = await self._not_done(index, name, StepKind.WAIT_FOR_EVENT)
        return result

    async def child(
        self,
        name: str,
        workflow: str,
        params: Any,
        instance_id: str | None,
        lookup_key: str | None,
        abandon: bool,
    ) -> Any:
        index, stored = self._next(name, StepKind.CHILD)
        if stored is not None:
            if stored.status is StepStatus.SUCCEEDED:
                return _value(stored)
            if stored.status is StepStatus.FAILED:
                raise ChildWorkflowError(
                    name, stored.error_name or "", stored.error_message or "",
                    stored.event_type or "",
                )  # fmt: skip
        return await self._not_done(index, name, StepKind.CHILD)

    def version(self, name: str) -> bool:
        known = self.versions.get(name)
        if known is not None:
            return known
        try:
            taken, record = version_taken(self.replay, self._recorded, self.next_index, name)
        except StepChanged as exc:
            self._diverge(exc)
        if record:
            self._next(name, StepKind.VERSION)
        elif taken:
            stored = self._recorded(name, 1)
            assert stored is not None
            self.consumed.add(stored.index)
            self.next_index = max(self.next_index, stored.index + 1)
        self.versions[name] = taken
        return taken

    def unreached(self) -> StepRecord | None:
        """The first recorded step the code did not reach (markers aside)."""
        left = [
            s for i, s in sorted(self.replay.items())
            if i not in self.consumed and s.kind is not StepKind.VERSION
        ]  # fmt: skip
        return left[0] if left else None


def _value(stored: StepRecord) -> Any:
    return json.loads(stored.output) if stored.output is not None else None


def _step_at(record: StepRecord | None) -> StepAt | None:
    if record is None:
        return None
    return StepAt(record.index, KIND_WORDS.get(record.kind, "do"), record.name, record.occurrence)


async def replay(
    cls: type[Any], env: Any, history: History, *, settle_s: float = 10.0
) -> ReplayResult:
    """Replay ``history`` against the workflow class ``cls`` (built with ``env``)."""
    sandbox = Sandbox(history)
    event = WorkflowEvent(
        payload=json.loads(history.params),
        timestamp=datetime.fromtimestamp(history.created_at / 1000, UTC),
        instance_id=history.instance_id,
    )
    workflow = cls(env)
    task = asyncio.ensure_future(workflow.run(event, WorkflowStep(sandbox)))
    sandbox.main = task
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    idle = 0
    while not task.done():
        seen = sandbox.progress
        await asyncio.sleep(0)
        if sandbox.progress != seen or not sandbox.waiting:
            idle = 0
            if sandbox.progress == seen:
                # run() awaits something other than a step (or a branch that
                # does): let it, up to the deadline.
                await asyncio.wait({task}, timeout=0.005)
                if loop.time() > deadline:
                    break
            continue
        idle += 1
        if idle >= _IDLE_TURNS:
            break
    left = [t for t in (task, *sandbox.strays) if not t.done()]
    for t in left:
        t.cancel()
    if left:
        await asyncio.gather(*left, return_exceptions=True)
    return _result(history, sandbox, task)


def _result(history: History, sandbox: Sandbox, task: asyncio.Task[Any]) -> ReplayResult:
    replayed = len(sandbox.consumed)
    base = (history.instance_id, history.workflow)
    # Taken first, so that no task is left with an exception never retrieved.
    exc = None if task.cancelled() else task.exception()
    if sandbox.divergence is not None:
        return ReplayResult(*base, "diverged", replayed, divergence=sandbox.divergence)
    output: Any = None
    error: tuple[str, str] | None = None
    outcome = "waiting"
    if not task.cancelled():
        if exc is None:
            outcome, output = "completed", task.result()
        elif isinstance(exc, StepFailedError | FatalWorkflowError):
            outcome, error = "errored", (exc.error_name, exc.error_message)
        elif isinstance(exc, Exception):
            outcome, error = "errored", (type(exc).__name__, str(exc))
        elif not isinstance(exc, _Stop):
            raise exc
    if sandbox.next_step is None and outcome == "waiting":
        # Cut by the settle deadline: run() awaited something that never came.
        outcome = "errored"
        error = ("ReplayStuck", "run() awaited something other than a step and never went on")
    left = sandbox.unreached()
    if left is not None:
        if outcome == "waiting":
            where = f"the code stopped at {sandbox.next_step}, not done yet"
        elif error is not None:
            where = f"the code raised {error[0]}: {error[1]:.200} first"
        else:
            where = "the code returned first"
        message = (
            f"step {_step_at(left)} was recorded but the code does not reach it ({where}): "
            f"a step was removed, renamed or moved"
        )
        divergence = Divergence(left.index, _step_at(left), None, message)
        return ReplayResult(*base, "diverged", replayed, divergence=divergence)
    return ReplayResult(*base, outcome, replayed, sandbox.next_step, output, error)


def breaks(history: History, result: ReplayResult) -> bool:
    """Whether the new code would break the instance: it leaves the recorded
    history, or it fails an instance that has not failed."""
    if result.diverged:
        return True
    return result.outcome == "errored" and history.status is not InstanceStatus.ERRORED
