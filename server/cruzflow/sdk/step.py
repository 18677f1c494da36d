"""``step``, the object ``run`` receives: the authoring side of a step.

``WorkflowStep`` checks and normalises what the workflow passes (the step
body, its options, durations, times) and hands each step to a
``StepRuntime``, which the engine implements: it runs the step, checkpoints
it and replays it (``cruzflow.server.engine.steps``). Nothing here knows how
a step is stored, so this module imports nothing of the server.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar, overload

from cruzflow.sdk.durations import Duration, to_seconds
from cruzflow.sdk.retries import DEFAULT_POLICY, RetryConfig, StepConfig, StepPolicy, resolve

T = TypeVar("T")


class StepRuntime(Protocol):
    """What runs a run's steps: the engine, one per run in memory."""

    async def do(
        self,
        name: str,
        fn: Callable[..., Any],
        policy: StepPolicy,
        rollback: tuple[Callable[..., Any], StepPolicy] | None = None,
    ) -> Any:
        """Run ``fn`` as the step ``name`` under ``policy``; its JSON result, stored
        before it is returned (or the stored one, on a replay). ``rollback``
        (its callback and policy) undoes it if the instance fails later."""

    async def sleep_until(self, name: str, due_at: Callable[[int], int]) -> None:
        """Sleep durably until ``due_at(start)`` (ms since the epoch), where
        ``start`` is when the sleep first began (ms)."""

    async def wait_for_event(self, name: str, type: str, timeout_s: float) -> dict[str, Any]:
        """Wait durably for an event of ``type``, at most ``timeout_s`` seconds."""

    async def child(
        self,
        name: str,
        workflow: str,
        params: Any,
        instance_id: str | None,
        lookup_key: str | None,
        abandon: bool,
    ) -> Any:
        """Start a child instance once and wait durably for its output."""

    def version(self, name: str) -> bool:
        """Whether this run takes the code path of version marker ``name``."""


class WorkflowStep:
    """Runs steps for one instance: each result is checkpointed before it is used."""

    __slots__ = ("_declared", "_runtime")

    def __init__(self, runtime: StepRuntime) -> None:
        self._runtime = runtime
        # The step functions declared with the decorator form, by function name.
        self._declared: dict[str, StepFunction] = {}

    @overload
    def do(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *,
        retries: RetryConfig | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: StepConfig | Mapping[str, Any] | None = None,
    ) -> Coroutine[Any, Any, T]: ...

    @overload
    def do(
        self,
        name: str,
        fn: Callable[..., T],
        /,
        *,
        retries: RetryConfig | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: StepConfig | Mapping[str, Any] | None = None,
    ) -> Coroutine[Any, Any, T]: ...

    @overload
    def do(
        self,
        name: str,
        config: StepConfig | Mapping[str, Any],
        fn: Callable[..., Awaitable[T]],
        /,
        *,
        rollback: Callable[..., Any] | None = None,
        rollback_config: StepConfig | Mapping[str, Any] | None = None,
    ) -> Coroutine[Any, Any, T]: ...

    @overload
    def do(
        self,
        name: str,
        config: StepConfig | Mapping[str, Any],
        fn: Callable[..., T],
        /,
        *,
        rollback: Callable[..., Any] | None = None,
        rollback_config: StepConfig | Mapping[str, Any] | None = None,
    ) -> Coroutine[Any, Any, T]: ...

    @overload
    def do(
        self,
        name: str | None = None,
        *,
        concurrent: bool = False,
        config: StepConfig | Mapping[str, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], StepFunction]: ...

    def do(
        self,
        name: str | None = None,
        config_or_fn: Any = None,
        fn: Any = None,
        *,
        retries: RetryConfig | Mapping[str, Any] | None = None,
        timeout: Duration | None = None,
        concurrent: bool = False,
        config: StepConfig | Mapping[str, Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: StepConfig | Mapping[str, Any] | None = None,
    ) -> Any:
        """Run ``fn`` as a durable step named ``name``; await it for its result.

        ``step.do(name, fn)``, ``step.do(name, config, fn)`` or
        ``step.do(name, fn, retries=..., timeout=...)``. ``fn`` is an async
        (or plain) callable taking no argument or a StepContext. Its result
        must be JSON; it is stored before the step returns, and on a replay
        the stored result is returned without calling ``fn``. Steps may run
        in parallel (``asyncio.gather``, ``TaskGroup``): each is checkpointed
        on its own, and keeps the position of its call.

        ``rollback`` (a callable taking no argument or a RollbackContext)
        registers a compensation once the step has succeeded: if the instance
        later fails for good, or is terminated with rollback, the
        compensations of its succeeded steps run in reverse order of their
        steps' starts, each a durable step (kind "rollback") with its own
        retries and timeout (``rollback_config``, as ``config``).

        Without a body it is Cloudflare's decorator form,
        ``@step.do(name=None, *, concurrent=False, config=None)``: see
        :class:`StepFunction`.
        """
        if config_or_fn is None and fn is None:
            if rollback is not None or rollback_config is not None:
                raise TypeError("step.do(...) as a decorator does not take rollback= yet")
            if retries is not None or timeout is not None:
                raise TypeError(
                    "step.do(...) as a decorator takes config={'retries': ..., 'timeout': ...}, "
                    "not retries= or timeout="
                )
            return self._decorator(name, concurrent, config)
        if concurrent or config is not None:
            raise TypeError(
                f"step.do({name!r}, fn): concurrent= and config= belong to the decorator form "
                f"@step.do(name, concurrent=..., config=...); pass the config positionally: "
                f"step.do(name, config, fn)"
            )
        if fn is None:
            fn, given = config_or_fn, None
        else:
            given = config_or_fn
        if not isinstance(name, str):
            raise TypeError(f"step.do: the step name must be a string, got {type(name).__name__}")
        if not callable(fn):
            raise TypeError(
                f"step.do({name!r}): the step body must be a callable, got {type(fn).__name__}"
            )
        if given is None and retries is None and timeout is None:
            policy = DEFAULT_POLICY
        else:
            policy = resolve(given, retries, timeout)
        if rollback is None:
            if rollback_config is not None:
                raise TypeError(f"step.do({name!r}): rollback_config= needs rollback=")
            return self._runtime.do(name, fn, policy)
        if not callable(rollback):
            raise TypeError(
                f"step.do({name!r}): rollback must be a callable, got {type(rollback).__name__}"
            )
        undo = DEFAULT_POLICY if rollback_config is None else resolve(rollback_config)
        return self._runtime.do(name, fn, policy, (rollback, undo))

    def _decorator(
        self, name: str | None, concurrent: bool, config: StepConfig | Mapping[str, Any] | None
    ) -> Callable[[Callable[..., Any]], StepFunction]:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"@step.do: the step name must be a string, got {type(name).__name__}")
        policy = DEFAULT_POLICY if config is None else resolve(config)

        def declare(func: Callable[..., Any]) -> StepFunction:
            if not callable(func):
                raise TypeError(f"@step.do decorates a function, got {type(func).__name__}")
            declared = StepFunction(self, func, name or func.__name__, concurrent, policy)
            self._declared[func.__name__] = declared
            return declared

        return declare

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
        self,
        name: str,
        event_type: str | None = None,
        timeout: Duration = "24 hours",
        *,
        type: str | None = None,
    ) -> dict[str, Any]:
        """Wait durably for an event of ``type`` sent with SendEvent; return it as
        ``{"type", "payload", "timestamp"}``. An event sent before the wait began
        is delivered too; each event is delivered to one wait, once. Past
        ``timeout`` it raises EventTimeoutError (a StepFailedError).

        ``wait_for_event(name, type="approval")``, or as Cloudflare's Python
        Workflows spell it, ``wait_for_event(name, "approval", timeout)``."""
        if (event_type is None) == (type is None):
            raise TypeError(
                f"step.wait_for_event({name!r}): give the event type once, as "
                f"type='approval' or as the second argument"
            )
        seconds = to_seconds(timeout, "step.wait_for_event timeout")
        return await self._runtime.wait_for_event(name, event_type or type or "", seconds)

    async def child(
        self,
        name: str,
        workflow: str,
        params: Any = None,
        *,
        id: str | None = None,
        lookup_key: str | None = None,
        parent_close: str = "terminate",
    ) -> Any:
        """Start an instance of ``workflow`` with ``params`` as a child of this one,
        exactly once, and wait durably (holding no coroutine) for its output.

        The child's id is derived from this instance, its current run and the
        step (a replay finds the same child; a restarted parent starts new
        ones), unless ``id`` gives one. If the child errors or is terminated,
        ChildWorkflowError (a StepFailedError) is raised here. ``parent_close``
        says what terminating or restarting this instance does to the child
        while it runs: "terminate" it (the default) or "abandon" it (it runs on).
        """
        if parent_close not in ("terminate", "abandon"):
            raise ValueError(
                f"step.child({name!r}): parent_close must be 'terminate' or 'abandon', "
                f"got {parent_close!r}"
            )
        if not isinstance(workflow, str) or not workflow:
            raise TypeError(f"step.child({name!r}): workflow must be a workflow's name")
        return await self._runtime.child(
            name, workflow, params, id, lookup_key, parent_close == "abandon"
        )

    def version(self, name: str) -> bool:
        """Whether this run takes the new code path marked ``name``: a safe way
        to change a workflow's code under instances that are already running.

        ::

            if step.version("charge-v2"):
                receipt = await step.do("charge with tax", charge_with_tax)
            else:
                receipt = await step.do("charge", charge)

        True for an instance that reaches this point under code that has the
        marker (the marker is recorded in its history, so every replay of it
        answers True); False for one that had already gone past this point
        under the code before (it keeps the old path, and its replays answer
        False). Later calls with the same name in a run give the same answer.
        Once no instance from before the marker runs, delete the old branch
        and the call: recorded markers no longer asked for are passed over.
        ``cruzflow check`` replays running instances against new code and
        understands markers.
        """
        return self._runtime.version(name)


class StepFunction:
    """A step declared with ``@step.do(...)`` (Cloudflare's Python Workflows
    form); ``await f()`` runs it.

    * Its name is the decorator's, or the function's own.
    * Its parameters name what it needs: a parameter named after a step
      function declared before it on the same ``step`` receives that step's
      result, and one named ``ctx`` the StepContext of the attempt; any other
      parameter must have a default, which it keeps.
    * Each step function runs once per run: the first ``await f()`` runs it
      (and the steps it needs that have not run yet: one after another in the
      order of its parameters, or all at once with ``concurrent=True``); a
      later call, or a step that needs it, gets the same result (or error).
      The steps keep deterministic positions: those of their first calls.
    """

    __slots__ = (
        "_func", "_needs", "_policy", "_step", "_task", "_wants_ctx", "concurrent", "name",
    )  # fmt: skip

    def __init__(
        self,
        step: WorkflowStep,
        func: Callable[..., Any],
        name: str,
        concurrent: bool,
        policy: StepPolicy,
    ) -> None:
        self._step = step
        self._func = func
        self._policy = policy
        self._task: asyncio.Task[Any] | None = None
        self.name = name
        self.concurrent = concurrent
        try:
            params = list(inspect.signature(func).parameters.values())
        except (TypeError, ValueError) as exc:
            raise TypeError(f"@step.do({name!r}): cannot read the function's parameters") from exc
        self._needs: list[str] = []
        for param in params:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(
                    f"@step.do({name!r}): *{param.name} is not a step; name each step it needs"
                )
            if param.name == "ctx":
                continue
            if param.name not in step._declared:
                if param.default is not param.empty:
                    continue  # not a step: it keeps its default
                declared = ", ".join(sorted(step._declared)) or "none yet"
                raise TypeError(
                    f"@step.do({name!r}): parameter {param.name!r} names no step function "
                    f"declared before it (declared: {declared}); a parameter is 'ctx', the "
                    f"name of an earlier @step.do function, or has a default"
                )
            self._needs.append(param.name)
        self._wants_ctx = any(p.name == "ctx" for p in params)

    def __call__(self) -> Coroutine[Any, Any, Any]:
        return self._result()

    async def _result(self) -> Any:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        # A caller cancelled while it waits leaves the step to its other callers.
        return await asyncio.shield(self._task)

    async def _run(self) -> Any:
        needs = [self._step._declared[name] for name in self._needs]
        if self.concurrent:
            values = await asyncio.gather(*(need() for need in needs))
        else:
            values = [await need() for need in needs]
        given = dict(zip(self._needs, values, strict=True))
        func, wants_ctx = self._func, self._wants_ctx

        async def body(ctx: Any) -> Any:
            kwargs = {**given, "ctx": ctx} if wants_ctx else given
            result = func(**kwargs)
            return await result if inspect.isawaitable(result) else result

        return await self._step._runtime.do(self.name, body, self._policy)
