"""The step API that ``run`` receives: where a step is executed and checkpointed."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from cruzflow.server.engine.api import StepContext
from cruzflow.server.engine.durations import Duration
from cruzflow.server.engine.errors import (
    FatalWorkflowError,
    NonDeterminismError,
    NonRetryableError,
    StepFailedError,
    StepTimeoutError,
    Suspend,
)
from cruzflow.server.engine.model import EventKind, StepRecord, StepStatus
from cruzflow.server.engine.retries import (
    DEFAULT_POLICY,
    RetryConfig,
    StepConfig,
    StepPolicy,
    resolve,
)

if TYPE_CHECKING:
    from cruzflow.server.engine.runtime import Engine, _Run

T = TypeVar("T")

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


def to_json(value: Any) -> bytes:
    """Compact JSON bytes; TypeError, ValueError or RecursionError if it isn't JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _ms() -> int:
    return int(time.time() * 1000)


class WorkflowStep:
    """Runs steps for one instance: each result is checkpointed before it is used."""

    __slots__ = ("_engine", "_run")

    def __init__(self, engine: Engine, run: _Run) -> None:
        self._engine = engine
        self._run = run

    @overload
    async def do(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *,
        retries: RetryConfig | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
    ) -> T: ...

    @overload
    async def do(
        self,
        name: str,
        fn: Callable[..., T],
        /,
        *,
        retries: RetryConfig | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
    ) -> T: ...

    @overload
    async def do(
        self,
        name: str,
        config: StepConfig | Mapping[str, Any],
        fn: Callable[..., Awaitable[T]],
        /,
    ) -> T: ...

    @overload
    async def do(
        self,
        name: str,
        config: StepConfig | Mapping[str, Any],
        fn: Callable[..., T],
        /,
    ) -> T: ...

    async def do(
        self,
        name: str,
        config_or_fn: Any,
        fn: Any = None,
        /,
        *,
        retries: RetryConfig | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
    ) -> Any:
        """Run ``fn`` as a durable step named ``name`` and return its result.

        ``step.do(name, fn)``, ``step.do(name, config, fn)`` or
        ``step.do(name, fn, retries=..., timeout=...)``. ``fn`` is an async
        (or plain) callable taking no argument or a StepContext. Its result
        must be JSON; it is stored before ``do`` returns, and on a replay
        ``do`` returns the stored result without calling ``fn``.
        """
        if fn is None:
            fn, config = config_or_fn, None
        else:
            config = config_or_fn
        if not callable(fn):
            raise TypeError(
                f"step.do({name!r}): the step body must be a callable, got {type(fn).__name__}"
            )
        run = self._run
        engine = self._engine
        limits = engine.limits
        if not isinstance(name, str) or not name or len(name) > limits.max_step_name_length:
            raise ValueError(
                f"step name must be a non-empty string of at most "
                f"{limits.max_step_name_length} characters, got {name!r:.80}"
            )
        if config is None and retries is None and timeout is None:
            policy = DEFAULT_POLICY
        else:
            policy = resolve(config, retries, timeout)

        occurrence = run.occurrences[name] = run.occurrences.get(name, 0) + 1
        index = run.next_index
        run.next_index = index + 1
        if index >= limits.max_steps_per_instance:
            raise FatalWorkflowError(
                "StepLimitError",
                f"the instance reached {limits.max_steps_per_instance:,} steps "
                f"(limits.max_steps_per_instance); split the work across instances",
            )

        attempt = 0
        started_at = 0
        next_at: int | None = None
        stored = run.replay.get(index) if run.replay else None
        if stored is not None:
            if stored.name != name or stored.occurrence != occurrence:
                raise NonDeterminismError(
                    f"step #{index} is {name!r} (occurrence {occurrence}) in the code but was "
                    f"recorded as {stored.name!r} (occurrence {stored.occurrence}): the workflow "
                    f"code changed under a running instance; restart the instance or deploy the "
                    f"change under a new workflow name"
                )
            if stored.status is StepStatus.SUCCEEDED:
                return json.loads(stored.output) if stored.output is not None else None
            if stored.status is StepStatus.FAILED:
                raise StepFailedError(name, stored.error_name or "", stored.error_message or "")
            attempt, started_at, next_at = (
                stored.attempts,
                stored.started_at,
                stored.next_attempt_at,
            )

        # Everything before this step must be durable before it starts.
        await run.barrier()

        if stored is not None and next_at is None and attempt >= policy.max_attempts:
            # The last allowed attempt was cut short by a restart.
            return await self._fail(
                run,
                name,
                occurrence,
                index,
                attempt,
                started_at,
                "StepInterruptedError",
                f"attempt {attempt} was interrupted by a server restart and no retries are "
                f"left (retries.limit={policy.max_attempts - 1})",
            )
        if next_at is not None:
            await engine.wait_or_suspend((next_at - _ms()) / 1000.0)
        elif stored is not None:
            run.emit(
                EventKind.ATTEMPT_FAILED,
                {
                    "name": name,
                    "occ": occurrence,
                    "idx": index,
                    "att": attempt,
                    "err": [
                        "StepInterruptedError",
                        f"attempt {attempt} was interrupted by a server restart",
                    ],
                    "next": _ms(),
                    "delay": 0,
                },
            )

        while True:
            if engine.stopping:
                raise Suspend()
            attempt += 1
            now = _ms()
            if not started_at:
                started_at = now
            run.put_step(
                StepRecord(run.id, index, name, occurrence, StepStatus.RUNNING, attempt, started_at)
            )
            run.emit(
                EventKind.STEP_STARTED,
                {"name": name, "occ": occurrence, "idx": index, "att": attempt},
            )

            output, error_name, error_message, retryable = await self._attempt(
                run, name, fn, attempt, policy
            )
            if output is not None:
                run.put_step(
                    StepRecord(
                        run.id,
                        index,
                        name,
                        occurrence,
                        StepStatus.SUCCEEDED,
                        attempt,
                        started_at,
                        ended_at=_ms(),
                        output=output,
                    )
                )
                run.emit(
                    EventKind.STEP_SUCCEEDED,
                    {"name": name, "occ": occurrence, "idx": index, "att": attempt},
                    output,
                )
                # Round-trip through JSON so a replay returns exactly the same value.
                return json.loads(output)
            if not retryable or attempt >= policy.max_attempts:
                return await self._fail(
                    run, name, occurrence, index, attempt, started_at, error_name, error_message
                )
            delay = policy.retry_delay(attempt)
            due = _ms() + int(delay * 1000)
            run.put_step(
                StepRecord(
                    run.id,
                    index,
                    name,
                    occurrence,
                    StepStatus.RUNNING,
                    attempt,
                    started_at,
                    error_name=error_name,
                    error_message=error_message,
                    next_attempt_at=due,
                )
            )
            run.emit(
                EventKind.ATTEMPT_FAILED,
                {
                    "name": name,
                    "occ": occurrence,
                    "idx": index,
                    "att": attempt,
                    "err": [error_name, error_message],
                    "next": due,
                    "delay": int(delay * 1000),
                },
            )
            await engine.wait_or_suspend(delay)

    async def _attempt(
        self, run: _Run, name: str, fn: Callable[..., Any], attempt: int, policy: StepPolicy
    ) -> tuple[bytes | None, str, str, bool]:
        """One attempt: (result JSON, ...) on success, else (None, error name, message, retryable)."""
        try:
            async with asyncio.timeout(policy.timeout_s) as scope:
                if _takes_context(fn):
                    ctx = StepContext(name, attempt, run.id, time.time() + policy.timeout_s)
                    result = fn(ctx)
                else:
                    result = fn()
                if inspect.isawaitable(result):
                    result = await result
        except TimeoutError as exc:
            if scope.expired():
                return (
                    None,
                    StepTimeoutError.__name__,
                    f"attempt {attempt} of step {name!r} timed out after {policy.timeout_s:g} s",
                    True,
                )
            return None, type(exc).__name__, str(exc), True
        except NonRetryableError as exc:
            return None, type(exc).__name__, str(exc), False
        except Exception as exc:
            return None, type(exc).__name__, str(exc), True
        try:
            output = to_json(result)
        except (TypeError, ValueError, RecursionError) as exc:
            return (
                None,
                "StepResultError",
                f"step {name!r} returned a value that is not JSON ({exc}); return dicts, lists, "
                f"strings, numbers, booleans or None",
                False,
            )
        limit = self._engine.limits.max_payload_bytes
        if len(output) > limit:
            return (
                None,
                "StepResultError",
                f"step {name!r} returned {len(output):,} bytes of JSON, over the limit of "
                f"{limit:,} bytes (limits.max_payload_bytes); store large data elsewhere and "
                f"return a reference",
                False,
            )
        return output, "", "", True

    async def _fail(
        self,
        run: _Run,
        name: str,
        occurrence: int,
        index: int,
        attempt: int,
        started_at: int,
        error_name: str,
        error_message: str,
    ) -> Any:
        run.put_step(
            StepRecord(
                run.id,
                index,
                name,
                occurrence,
                StepStatus.FAILED,
                attempt,
                started_at,
                ended_at=_ms(),
                error_name=error_name,
                error_message=error_message,
            )
        )
        run.emit(
            EventKind.STEP_FAILED,
            {
                "name": name,
                "occ": occurrence,
                "idx": index,
                "att": attempt,
                "err": [error_name, error_message],
            },
        )
        # The failure is a recorded result: durable before run sees it.
        await run.barrier()
        raise StepFailedError(name, error_name, error_message)
