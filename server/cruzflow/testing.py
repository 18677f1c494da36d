"""Test a workflow in-process, without a server.

    from cruzflow.testing import WorkflowTestEnv, sqlite_database

    async def test_onboarding(tmp_path):
        env = {"DB": sqlite_database(tmp_path / "app.db"), "EMAIL_API_URL": "outbox:"}
        async with WorkflowTestEnv(OnboardingWorkflow, env=env) as t:
            t.mock_step_result("send-welcome-email", {"queued": True})
            t.mock_step_error("setup-billing", ConnectionError("stripe is down"), times=2)
            run = await t.run({"userId": "42", "email": "ada@example.com", "plan": "pro"})
        assert run.status == "complete", run.error
        assert run.step("send-welcome-email").mocked
        assert run.step("setup-billing").attempts == 3

The workflow runs on the real engine, on a real SQLite store in a temporary
folder: retries, timeouts, checkpoints and replay are the server's own. The
kit only changes what the engine computes at three points (see
``cruzflow.server.engine.hooks``): the body of a mocked step, the wake time of
a sleep or event wait, and the delay before a retry. A mocked step is
checkpointed like a real one, so a replay returns its stored result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from cruzflow.sdk.api import Env, WorkflowEntrypoint
from cruzflow.server.bindings import SqliteDatabase
from cruzflow.server.checking import export_instance, load_export
from cruzflow.server.engine.errors import ServiceError, Unavailable
from cruzflow.server.engine.replay import Divergence, ReplayResult, replay
from cruzflow.server.engine.runtime import Engine, Limits, WorkflowSpec
from cruzflow.server.engine.steps import to_json
from cruzflow.server.records import (
    EventKind,
    EventRecord,
    InboxEvent,
    InstanceStatus,
    StepKind,
    StepRecord,
    StepStatus,
)
from cruzflow.server.store.sqlite import SqliteStore

__all__ = [
    "Divergence",
    "ErrorInfo",
    "InstanceHandle",
    "ReplayResult",
    "StepResult",
    "WorkflowRun",
    "WorkflowTestEnv",
    "sqlite_database",
]

_STATUSES = {status.label: status for status in InstanceStatus}
_OUTCOMES = {
    StepStatus.RUNNING: "running",
    StepStatus.SUCCEEDED: "succeeded",
    StepStatus.FAILED: "failed",
}
_KINDS = {
    StepKind.DO: "do",
    StepKind.SLEEP: "sleep",
    StepKind.WAIT_FOR_EVENT: "wait_for_event",
    StepKind.CHILD: "child",
    StepKind.ROLLBACK: "rollback",
    StepKind.VERSION: "version",
}
_EVENT_PAGE = 1000


def sqlite_database(path: str | PathLike[str]) -> SqliteDatabase:
    """A SQLite database binding for ``env``, as a ``[[sqlite_databases]]`` entry of
    the config gives the server: ``env={"DB": sqlite_database(tmp_path / "app.db")}``
    makes ``self.env.DB`` work in the workflow. The file is created on first use;
    the env closes it when the ``async with`` block ends."""
    return SqliteDatabase(Path(path))


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error as the engine records it. Two are equal by name and message."""

    name: str
    """The exception's class name, e.g. ``"ConnectionError"``."""
    message: str
    """The exception's text."""
    traceback: str | None = field(default=None, compare=False)
    """Where it was raised, as Python prints it (bounded); None if no code raised it."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """One step of an instance, as stored, with what the test kit did to it."""

    name: str
    """The step's name."""
    occurrence: int
    """1 for the first step of that name in the run, 2 for the second, and so on."""
    index: int
    """The step's position in the run, from 0."""
    kind: str
    """``"do"``, ``"sleep"``, ``"wait_for_event"``, ``"child"``, ``"rollback"`` or
    ``"version"`` (a ``step.version`` marker)."""
    outcome: str
    """``"succeeded"``, ``"failed"``, or ``"running"`` while it is not decided."""
    attempts: int
    """Attempts made so far (1 for a sleep or an event wait)."""
    output: Any
    """The stored result, decoded from JSON (an event wait: ``{"type", "payload",
    "timestamp"}``; a sleep or an undecided step: None)."""
    error: ErrorInfo | None
    """Why the step failed, once it has failed for good; else None."""
    attempt_errors: tuple[ErrorInfo, ...]
    """The error of each failed attempt, in order (the last one is ``error`` when
    the step failed)."""
    mocked_attempts: tuple[int, ...]
    """The attempts whose body a mock (``mock_step_result``, ``mock_step_error``)
    replaced."""
    skipped_seconds: float
    """Sleep, event-wait timeout and retry delay the env skipped for this step."""
    event_type: str | None
    """The type an event wait waits for; None for other steps."""

    @property
    def mocked(self) -> bool:
        """Whether a mock replaced the body of at least one attempt."""
        return bool(self.mocked_attempts)


@dataclass(frozen=True, slots=True)
class WorkflowRun:
    """An instance as the store holds it: status, output or error, and its steps."""

    id: str
    """The instance's id."""
    status: str
    """The status as the model spells it: ``"complete"``, ``"errored"``,
    ``"running"``, ``"waiting"``, ``"queued"``, ``"paused"``, ``"terminated"``..."""
    output: Any
    """What ``run`` returned, decoded from JSON; None until it is complete."""
    error: ErrorInfo | None
    """Why the instance ended ``errored``; else None."""
    steps: tuple[StepResult, ...]
    """Every step the instance has taken, in order."""

    def step(self, name: str, occurrence: int = 1) -> StepResult:
        """The step of that name (its ``occurrence``-th use in the run); KeyError,
        naming the steps taken, if it never ran."""
        for step in self.steps:
            if step.name == name and step.occurrence == occurrence:
                return step
        taken = ", ".join(f"{s.name!r}#{s.occurrence}" for s in self.steps) or "none"
        raise KeyError(
            f"instance {self.id!r} has no step {name!r} (occurrence {occurrence}); "
            f"steps taken: {taken}"
        )


@dataclass(frozen=True, slots=True)
class _Mock:
    occurrence: int | None
    result: bytes | None = None
    error: Exception | type[Exception] | None = None
    times: int | None = None

    def covers(self, occurrence: int, attempt: int) -> bool:
        if self.occurrence is not None and self.occurrence != occurrence:
            return False
        return self.error is None or self.times is None or attempt <= self.times


_StepKey = tuple[str, str, int]  # instance id, step name, occurrence


class _Hooks:
    """The kit's side of the engine seam (``EngineHooks``)."""

    def __init__(self, skip_sleeps: bool, skip_retry_delays: bool, skip_timeouts: bool) -> None:
        self.skip_sleeps = skip_sleeps
        self.skip_retry_delays = skip_retry_delays
        self.skip_timeouts = skip_timeouts
        self.mocks: dict[str, list[_Mock]] = {}
        self.mocked: dict[_StepKey, list[int]] = {}
        self.skipped: dict[_StepKey, float] = {}

    def step_body(
        self, instance_id: str, name: str, occurrence: int, attempt: int, body: Callable[..., Any]
    ) -> Callable[..., Any]:
        mocks = self.mocks.get(name)
        if not mocks:
            return body
        chosen: _Mock | None = None
        # An error that covers this attempt wins over a result; the newest of each kind wins.
        for mock in reversed(mocks):
            if mock.covers(occurrence, attempt) and (chosen is None or mock.error is not None):
                chosen = mock
                if mock.error is not None:
                    break
        if chosen is None:
            return body
        self.mocked.setdefault((instance_id, name, occurrence), []).append(attempt)
        return _stand_in(chosen)

    def timer_due(
        self, instance_id: str, name: str, occurrence: int, kind: StepKind, due_ms: int
    ) -> int:
        skip = self.skip_sleeps if kind is StepKind.SLEEP else self.skip_timeouts
        now = int(time.time() * 1000)
        if not skip or due_ms <= now:
            return due_ms
        self._skip(instance_id, name, occurrence, (due_ms - now) / 1000)
        return now

    def retry_delay(
        self, instance_id: str, name: str, occurrence: int, failed_attempt: int, delay_s: float
    ) -> float:
        if not self.skip_retry_delays or delay_s <= 0:
            return delay_s
        self._skip(instance_id, name, occurrence, delay_s)
        return 0.0

    def _skip(self, instance_id: str, name: str, occurrence: int, seconds: float) -> None:
        key = (instance_id, name, occurrence)
        self.skipped[key] = self.skipped.get(key, 0.0) + seconds


def _stand_in(mock: _Mock) -> Callable[[], Any]:
    error, result = mock.error, mock.result

    def mocked_body() -> Any:
        if error is not None:
            raise error() if isinstance(error, type) else error
        # Decoded afresh each time, so a workflow that mutates it cannot change the mock.
        return None if result is None else json.loads(result)

    return mocked_body


def _json(value: Any, what: str) -> bytes:
    try:
        return to_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(
            f"{what}: not JSON ({exc}); use dicts, lists, strings, numbers, booleans or None"
        ) from None


def _kebab(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def _limits(values: Mapping[str, Any] | None) -> Limits:
    if not values:
        return Limits()
    known = {f.name for f in dataclasses.fields(Limits)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"limits: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    return Limits(**values)


_FINISHED_LABELS = frozenset(s.label for s in InstanceStatus if s.finished)


def _labels(statuses: tuple[str, ...]) -> set[InstanceStatus]:
    if not statuses:
        raise TypeError("name at least one status, e.g. wait_for_status('complete', 'errored')")
    wanted = set()
    for label in statuses:
        status = _STATUSES.get(label)
        if status is None:
            raise ValueError(f"unknown status {label!r}; use one of {', '.join(_STATUSES)}")
        wanted.add(status)
    return wanted


class WorkflowTestEnv:
    """Runs one workflow class in-process on the real engine and a temporary store.

    ``async with WorkflowTestEnv(MyWorkflow, env={...}) as t:`` then mock what the
    test needs (``mock_step_result``, ``mock_step_error``, ``mock_event``) and
    ``await t.run(params)``, or ``await t.start(params)`` to observe an instance
    while it runs.

    ``env`` becomes ``self.env``: a mapping of vars and bindings (use
    ``sqlite_database`` for a database), or an ``Env``. The options:

    * ``skip_sleeps`` (default True): ``step.sleep`` and ``step.sleep_until``
      end at once instead of at their wake time. Pass False to see the instance
      ``waiting`` and wake on the wall clock.
    * ``skip_retry_delays`` (default True): a failed attempt is retried at once
      instead of after its ``retries.delay`` and back-off, as Temporal's
      time-skipping test server does. Retry limits, timeouts and
      ``NonRetryableError`` still apply. Each step's ``skipped_seconds`` tells
      how much waiting was skipped, so the back-off schedule can be asserted.
    * ``skip_event_timeouts`` (default False): a ``step.wait_for_event`` that
      finds no event of its type already sent (``mock_event``) times out at once,
      to test the timeout path without waiting for it.

    ``directory`` holds the store (``cruzflow.db``); a temporary folder, removed
    at the end, when None. ``limits`` overrides fields of the engine's limits,
    e.g. ``{"max_steps_per_instance": 50}``. ``name`` is the workflow's name
    (default: the class name in kebab case). ``workflows`` hosts other
    workflows beside it, by name: the ones its ``step.child`` calls start.
    """

    def __init__(
        self,
        workflow: type[WorkflowEntrypoint[Any]],
        *,
        env: Mapping[str, Any] | Env | None = None,
        skip_sleeps: bool = True,
        skip_retry_delays: bool = True,
        skip_event_timeouts: bool = False,
        directory: str | PathLike[str] | None = None,
        limits: Mapping[str, Any] | None = None,
        name: str | None = None,
        workflows: Mapping[str, type[WorkflowEntrypoint[Any]]] | None = None,
    ) -> None:
        if not (inspect.isclass(workflow) and issubclass(workflow, WorkflowEntrypoint)):
            raise TypeError(
                f"WorkflowTestEnv: expected a subclass of cruzflow.workflows.WorkflowEntrypoint, "
                f"got {workflow!r}"
            )
        if not inspect.iscoroutinefunction(workflow.run):
            raise TypeError(
                f"{workflow.__qualname__}.run must be defined with 'async def run(self, event, step)'"
            )
        name = name or _kebab(workflow.__name__)
        self._spec = WorkflowSpec(
            name,
            re.sub(r"\W", "_", name).upper(),
            f"{workflow.__module__}:{workflow.__qualname__}",
            workflow,
        )
        # Other workflows the env hosts, by name: the children its step.child starts.
        self._others = {
            other: WorkflowSpec(other, re.sub(r"\W", "_", other).upper(),
                                f"{cls.__module__}:{cls.__qualname__}", cls)
            for other, cls in (workflows or {}).items()
        }  # fmt: skip
        self._env = env if isinstance(env, Env) else Env(dict(env or {}))
        self._limits = _limits(limits)
        self._hooks = _Hooks(skip_sleeps, skip_retry_delays, skip_event_timeouts)
        self._events: list[tuple[str, bytes]] = []
        self._ids: set[str] = set()
        self._directory = Path(directory) if directory is not None else None
        self._temporary: Path | None = None
        self._engine: Engine | None = None
        self._store: SqliteStore | None = None
        self._running = asyncio.Event()
        self._restarting = False

    # ----------------------------------------------------------- lifecycle
    async def __aenter__(self) -> WorkflowTestEnv:
        if self._directory is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="cruzflow-test-"))
        await self._start_engine()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the engine, close the env's databases, remove a temporary store.
        The ``async with`` block does this at its end."""
        try:
            await self._stop_engine(0.0)
            await self._env.aclose()
        finally:
            if self._temporary is not None:
                shutil.rmtree(self._temporary, ignore_errors=True)
                self._temporary = None

    @property
    def store_path(self) -> Path:
        """The SQLite file that holds the instances, steps and events."""
        folder = self._directory or self._temporary
        if folder is None:
            raise RuntimeError("the env is not started; use 'async with WorkflowTestEnv(...)'")
        return folder / "cruzflow.db"

    @property
    def engine(self) -> Engine:
        """The engine the env runs: the service's operations (pause, terminate,
        list_instances...) without gRPC, for what this kit does not wrap."""
        if self._engine is None:
            raise RuntimeError("the env is not started; use 'async with WorkflowTestEnv(...)'")
        return self._engine

    async def _start_engine(self) -> None:
        store = SqliteStore(self.store_path)
        await store.open()
        try:
            engine = Engine(
                store,
                {**self._others, self._spec.name: self._spec},
                self._env,
                self._limits,
                hooks=self._hooks,
            )
            await engine.start()
        except BaseException:
            await store.close()
            raise
        self._store, self._engine = store, engine
        self._running.set()

    async def _stop_engine(self, grace: float) -> None:
        engine, store = self._engine, self._store
        self._engine = self._store = None
        self._running.clear()
        if engine is not None:
            await engine.shutdown(grace)
        if store is not None:
            await store.close()

    async def restart_engine(self, grace: float = 0.0) -> None:
        """Stop the engine as a server stop does (attempts in flight get ``grace``
        seconds, then are cut) and start a new one on the same store: unfinished
        instances resume by replaying ``run``, which returns recorded step results
        without calling their bodies. Handles stay valid."""
        self._restarting = True
        try:
            await self._stop_engine(grace)
            await self._start_engine()
        finally:
            self._restarting = False
            if self._engine is None:
                self._running.set()  # a failed start: waiters then fail at once, not hang

    # --------------------------------------------------------------- mocks
    def mock_step_result(self, name: str, value: Any, *, occurrence: int | None = None) -> None:
        """Every attempt of ``step.do(name, ...)`` returns ``value`` instead of calling
        the step's body; the result is checkpointed as a real one would be.

        ``occurrence`` limits it to that use of the name in a run (1 is the first);
        None covers every use. Applies to instances of this env from then on."""
        self._mock(name, _Mock(occurrence, result=_json(value, f"mocked result of {name!r}")))

    def mock_step_error(
        self,
        name: str,
        error: Exception | type[Exception],
        *,
        times: int | None = None,
        occurrence: int | None = None,
    ) -> None:
        """Attempts of ``step.do(name, ...)`` raise ``error`` instead of calling the
        step's body: the first ``times`` attempts of the step, then the real body
        (or a ``mock_step_result``) runs; every attempt when ``times`` is None.

        The engine treats it as the body's own error: it retries by the step's
        policy, fails the step at once for a ``NonRetryableError``, and raises
        ``StepFailedError`` into ``run`` once no retry is left."""
        if not (
            isinstance(error, Exception)
            or (isinstance(error, type) and issubclass(error, Exception))
        ):
            raise TypeError(f"mock_step_error: expected an exception, got {error!r}")
        if times is not None and (isinstance(times, bool) or times < 1):
            raise ValueError(f"mock_step_error: times must be 1 or more, or None, got {times!r}")
        self._mock(name, _Mock(occurrence, error=error, times=times))

    def _mock(self, name: str, mock: _Mock) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"step name must be a non-empty string, got {name!r}")
        if mock.occurrence is not None and mock.occurrence < 1:
            raise ValueError(f"occurrence must be 1 or more, or None, got {mock.occurrence!r}")
        self._hooks.mocks.setdefault(name, []).append(mock)

    def mock_event(self, type: str, payload: Any = None) -> None:
        """Send an event of ``type`` to every instance this env creates from now on,
        stored with the instance, so its first ``step.wait_for_event(type=type)``
        takes it at once (a second call queues a second event for the next wait of
        that type). To send one to a running instance, use
        ``InstanceHandle.send_event``."""
        limit = self._limits.max_event_type_length
        if not isinstance(type, str) or not type or len(type) > limit:
            raise ValueError(f"event type must be a string of 1 to {limit} characters")
        self._events.append((type, _json(payload, f"payload of the {type!r} event")))

    def clear_mocks(self) -> None:
        """Forget every mocked step and event: bodies run for real from now on."""
        self._hooks.mocks.clear()
        self._events.clear()

    # ----------------------------------------------------------- instances
    async def replay(self, fixture: Mapping[str, Any] | str | PathLike[str]) -> ReplayResult:
        """Replay an exported instance against the code of this env's workflow
        (or of the one in ``workflows`` named as the instance's), as a server
        running this code would replay it: no step body runs and nothing is
        stored; each step gets its recorded result or error.

        ``fixture`` is what ``cruzflow export ID > fixture.json`` wrote (its
        path, its text, or the parsed data; ``InstanceHandle.export`` gives
        the same). The result says how the code went on from the history:
        ``outcome`` "completed" (``output``), "errored" (``error``),
        "waiting" (at ``next_step``, not done in the history) or "diverged":
        ``divergence`` names the position, the recorded step and the code's.
        """
        history, _ = load_export(Path(fixture) if isinstance(fixture, PathLike) else fixture)
        spec = self._others.get(history.workflow, self._spec)
        return await replay(spec.cls, self._env, history)

    def instance(self, id: str) -> InstanceHandle:
        """The handle of an instance already in the store: one started before a
        ``restart_engine``, or by an earlier env on the same ``directory``."""
        return InstanceHandle(self, id)

    async def start(self, params: Any = None, *, id: str | None = None) -> InstanceHandle:
        """Create an instance with ``params`` (JSON) and return at once with its handle.

        ``id`` as CreateInstance takes it; a generated one when None. The events
        of ``mock_event`` are stored with the instance, in the same commit."""
        engine = self.engine
        data = _json(params, "params")
        if id is not None and id in self._ids:
            raise ValueError(f"instance {id!r} exists already in this env; choose another id")
        try:
            spec, data, key = engine.admission.check_new(self._spec.name, id or "", data, "")
        except ServiceError as exc:
            raise ValueError(str(exc)) from None
        instance_id = id or uuid.uuid4().hex
        self._ids.add(instance_id)
        # No await from the admit to the last event: they commit in one batch,
        # so the first wait for an event already finds it stored.
        _, durable = engine.admission.admit(spec, instance_id, data, key=key)
        now = int(time.time() * 1000)
        for event_type, payload in self._events:
            engine.journal.add_inbox(InboxEvent(instance_id, event_type, payload, now))
        await engine.core.durable(durable, "the instance could not be stored", instance_id)
        return InstanceHandle(self, instance_id)

    async def run(
        self, params: Any = None, *, id: str | None = None, timeout: float = 60.0
    ) -> WorkflowRun:
        """Create an instance, wait until it is complete, errored or terminated, and
        return it. A workflow that fails gives a run with ``status == "errored"``
        and its ``error``; TimeoutError, saying where it stands, if it has not
        ended within ``timeout`` seconds."""
        handle = await self.start(params, id=id)
        return await handle.result(timeout=timeout)

    async def _snapshot(self, instance_id: str) -> WorkflowRun:
        engine = self.engine
        record, steps = await engine.get(instance_id)
        events: list[EventRecord] = []
        while True:
            page = await engine.store.read_events(
                instance_id, events[-1].seq if events else 0, _EVENT_PAGE
            )
            events.extend(page)
            if len(page) < _EVENT_PAGE:
                break
        errors: dict[int, list[ErrorInfo]] = {}
        for event in events:
            if event.kind in (EventKind.ATTEMPT_FAILED, EventKind.STEP_FAILED):
                err = event.data.get("err") or ["", ""]
                errors.setdefault(event.data["idx"], []).append(
                    ErrorInfo(err[0], err[1], err[2] if len(err) > 2 else None)
                )
        return WorkflowRun(
            id=record.id,
            status=record.status.label,
            output=json.loads(record.output) if record.output is not None else None,
            error=(
                ErrorInfo(record.error_name, record.error_message or "", record.error_traceback)
                if record.error_name
                else None
            ),
            steps=tuple(self._step(instance_id, s, errors.get(s.index, [])) for s in steps),
        )

    def _step(self, instance_id: str, step: StepRecord, errors: list[ErrorInfo]) -> StepResult:
        key = (instance_id, step.name, step.occurrence)
        failed = step.status is StepStatus.FAILED
        return StepResult(
            name=step.name,
            occurrence=step.occurrence,
            index=step.index,
            kind=_KINDS[step.kind],
            outcome=_OUTCOMES[step.status],
            attempts=step.attempts,
            output=(
                json.loads(step.output)
                if step.output is not None and step.status is StepStatus.SUCCEEDED
                else None
            ),
            error=(
                ErrorInfo(step.error_name or "", step.error_message or "", step.error_traceback)
                if failed
                else None
            ),
            attempt_errors=tuple(errors),
            mocked_attempts=tuple(self._hooks.mocked.get(key, ())),
            skipped_seconds=self._hooks.skipped.get(key, 0.0),
            event_type=step.event_type,
        )


class InstanceHandle:
    """An instance created by ``WorkflowTestEnv.start``: observe it, send it events."""

    def __init__(self, env: WorkflowTestEnv, instance_id: str) -> None:
        self._env = env
        self.id = instance_id
        """The instance's id."""

    def __repr__(self) -> str:
        return f"InstanceHandle({self.id!r})"

    async def status(self) -> str:
        """The instance's status now, e.g. ``"running"`` or ``"waiting"``."""
        record, _ = await self._env.engine.get(self.id)
        return record.status.label

    async def snapshot(self) -> WorkflowRun:
        """The instance as stored now, with its steps so far."""
        return await self._env._snapshot(self.id)

    async def export(self) -> dict[str, Any]:
        """The instance's whole history, as ``cruzflow export`` writes it (a
        fixture for ``WorkflowTestEnv.replay``)."""
        return await export_instance(self._env.engine, self.id)

    async def send_event(self, type: str, payload: Any = None) -> None:
        """Send an event as the SendEvent RPC does: stored, then taken by the
        instance's next ``wait_for_event`` of that type (waking it if it waits)."""
        try:
            await self._env.engine.send_event(self.id, type, _json(payload, "payload"))
        except ServiceError as exc:
            raise ValueError(str(exc)) from None

    async def pause(self) -> str:
        """Pause it as the PauseInstance RPC does; returns the new status
        (``"paused"``, or ``"waitingForPause"`` while a step finishes).
        ValueError, with the service's message, if it cannot be paused."""
        return await self._control(self._env.engine.pause)

    async def resume(self) -> str:
        """Resume a paused instance as the ResumeInstance RPC does; returns its status."""
        return await self._control(self._env.engine.resume)

    async def terminate(self) -> str:
        """End it now as the TerminateInstance RPC does (``"terminated"``)."""
        return await self._control(self._env.engine.terminate)

    async def restart(self) -> str:
        """Run it again from scratch as the RestartInstance RPC does; returns its
        status. ``result()`` then waits for the new run's end."""
        return await self._control(self._env.engine.restart)

    async def _control(self, call: Callable[[str], Awaitable[InstanceStatus]]) -> str:
        try:
            return (await call(self.id)).label
        except ServiceError as exc:
            raise ValueError(str(exc)) from None

    async def wait_for_status(self, *statuses: str, timeout: float = 60.0) -> str:
        """Wait until the instance has been in one of ``statuses`` (labels such as
        ``"waiting"``, ``"complete"``); return that status. Its history counts, so a
        status it has passed through already is not missed. AssertionError if it
        ends in another status; TimeoutError after ``timeout`` seconds."""
        wanted = _labels(statuses)
        found = await self._follow(
            lambda e: (
                e.kind is EventKind.STATUS_CHANGED and InstanceStatus(e.data["status"]) in wanted
            ),
            timeout,
            f"become {' or '.join(statuses)}",
        )
        if found is None:
            now = await self.status()
            raise AssertionError(
                f"instance {self.id!r} ended {now} without being {' or '.join(statuses)}"
            )
        return InstanceStatus(found.data["status"]).label

    async def wait_for_step(
        self, name: str, *, occurrence: int = 1, timeout: float = 60.0
    ) -> StepResult:
        """Wait until the step has succeeded or failed for good, and return it
        (``.output`` is its result). AssertionError if the instance ends without
        deciding it; TimeoutError after ``timeout`` seconds."""
        found = await self._follow(
            lambda e: (
                e.kind in (EventKind.STEP_SUCCEEDED, EventKind.STEP_FAILED)
                and e.data.get("name") == name
                and e.data.get("occ") == occurrence
            ),
            timeout,
            f"finish step {name!r} (occurrence {occurrence})",
        )
        run = await self.snapshot()
        if found is None:
            taken = ", ".join(repr(s.name) for s in run.steps) or "none"
            raise AssertionError(
                f"instance {self.id!r} ended {run.status} without finishing step {name!r} "
                f"(occurrence {occurrence}); its steps: {taken}"
            )
        return run.step(name, occurrence)

    async def result(self, timeout: float = 60.0) -> WorkflowRun:
        """Wait until the instance is complete, errored or terminated; return it.
        After a restart (``restart()``), the end of the run since then: an end
        that a restart followed does not count. TimeoutError, saying where it
        stands, after ``timeout`` seconds."""
        after = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    end = await self._follow(
                        lambda e: (
                            e.kind is EventKind.STATUS_CHANGED
                            and InstanceStatus(e.data["status"]).finished
                        ),
                        None,
                        "end",
                        after=after,
                    )
                    run = await self.snapshot()
                    if end is None or run.status in _FINISHED_LABELS:
                        return run
                    after = end.seq  # restarted since that end: follow the new run
        except TimeoutError:
            raise TimeoutError(await self._stuck(timeout, "end")) from None

    async def _follow(
        self,
        match: Callable[[EventRecord], bool],
        timeout: float | None,
        what: str,
        after: int = 0,
    ) -> EventRecord | None:
        """The first event of the instance's log after sequence ``after`` (from
        its start by default) that ``match``es; None if the log ends first.
        TimeoutError saying where it stands after ``timeout`` s (None: no bound)."""
        last = after
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._env._restarting:
                        await self._env._running.wait()
                    engine = self._env.engine
                    stream = cast(AsyncGenerator[EventRecord, None], engine.watch(self.id, last))
                    try:
                        # Closed on return, so the engine drops the subscription at once.
                        async with contextlib.aclosing(stream):
                            async for event in stream:
                                last = event.seq
                                if match(event):
                                    return event
                        return None
                    except Unavailable:
                        # Stopped under us: follow the next engine of a restart_engine.
                        if not self._env._restarting:
                            raise RuntimeError(
                                f"the env stopped while waiting for instance {self.id!r}"
                            ) from None
        except TimeoutError:
            if timeout is None:
                raise  # an outer bound's: its owner says where the instance stands
            raise TimeoutError(await self._stuck(timeout, what)) from None

    async def _stuck(self, timeout: float, what: str) -> str:
        with contextlib.suppress(Exception):
            run = await self.snapshot()
            message = (
                f"instance {self.id!r} did not {what} within {timeout:g} s: it is {run.status}"
            )
            for step in run.steps:
                if step.outcome != "running":
                    continue
                if step.kind == "wait_for_event":
                    message += (
                        f"; step {step.name!r} waits for a {step.event_type!r} event: send it "
                        f"with mock_event({step.event_type!r}, ...) before start or "
                        f"handle.send_event, or pass skip_event_timeouts=True to time it out"
                    )
                elif step.kind == "sleep":
                    message += f"; step {step.name!r} sleeps: pass skip_sleeps=True to skip it"
                else:
                    message += f"; step {step.name!r} is at attempt {step.attempts}"
            return message
        return f"instance {self.id!r} did not {what} within {timeout:g} s"
