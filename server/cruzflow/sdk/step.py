"""``step``, the object ``run`` receives: the authoring side of a step.

``WorkflowStep`` checks and normalises what the workflow passes (the step
body, its options, durations, times) and hands each step to a
``StepRuntime``, which the engine implements: it runs the step, checkpoints
it and replays it (``cruzflow.server.engine.steps``). Nothing here knows how
a step is stored, so this module imports nothing of the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar, overload

from cruzflow.sdk.durations import Duration, to_seconds
from cruzflow.sdk.retries import DEFAULT_POLICY, RetryConfig, StepConfig, StepPolicy, resolve

T = TypeVar("T")


class StepRuntime(Protocol):
    """What runs a run's steps: the engine, one per run in memory."""

    async def do(self, name: str, fn: Callable[..., Any], policy: StepPolicy) -> Any:
        """Run ``fn`` as the step ``name`` under ``policy``; its JSON result, stored
        before it is returned (or the stored one, on a replay)."""

    async def sleep_until(self, name: str, due_at: Callable[[int], int]) -> None:
        """Sleep durably until ``due_at(start)`` (ms since the epoch), where
        ``start`` is when the sleep first began (ms)."""

    async def wait_for_event(self, name: str, type: str, timeout_s: float) -> dict[str, Any]:
        """Wait durably for an event of ``type``, at most ``timeout_s`` seconds."""


class WorkflowStep:
    """Runs steps for one instance: each result is checkpointed before it is used."""

    __slots__ = ("_runtime",)

    def __init__(self, runtime: StepRuntime) -> None:
        self._runtime = runtime

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
        if config is None and retries is None and timeout is None:
            policy = DEFAULT_POLICY
        else:
            policy = resolve(config, retries, timeout)
        return await self._runtime.do(name, fn, policy)

    async def sleep(self, name: str, duration: Duration) -> None:
        """Sleep durably: the instance waits (holding no coroutine) and resumes on time,
        across server restarts. ``duration`` as for timeouts: "1 day", ms, timedelta."""
        seconds = to_seconds(duration, "step.sleep duration")
        await self._runtime.sleep_until(name, lambda start: start + int(seconds * 1000))

    async def sleep_until(self, name: str, when: datetime | float) -> None:
        """Sleep durably until ``when``: an aware datetime, or seconds since the epoch."""
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise ValueError("step.sleep_until: give an aware datetime (with tzinfo), e.g. UTC")
            target = when.timestamp()
        elif isinstance(when, int | float) and not isinstance(when, bool):
            target = float(when)
        else:
            raise TypeError(
                f"step.sleep_until: expected a datetime or epoch seconds, got {type(when).__name__}"
            )
        await self._runtime.sleep_until(name, lambda start: int(target * 1000))

    async def wait_for_event(
        self, name: str, *, type: str, timeout: Duration = "24 hours"
    ) -> dict[str, Any]:
        """Wait durably for an event of ``type`` sent with SendEvent; return it as
        ``{"type", "payload", "timestamp"}``. An event sent before the wait began
        is delivered too; each event is delivered to one wait, once. Past
        ``timeout`` it raises EventTimeoutError (a StepFailedError)."""
        seconds = to_seconds(timeout, "step.wait_for_event timeout")
        return await self._runtime.wait_for_event(name, type, seconds)
