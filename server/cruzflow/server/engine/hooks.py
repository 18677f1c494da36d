"""A seam for tools that drive the engine in-process, such as ``cruzflow.testing``.

The engine knows nothing of tests: it consults an ``EngineHooks`` at three
points, and holds ``None`` when it is given none, so an engine without hooks
pays one ``is not None`` test at each point and nothing else. A hook changes
only the value computed there; the engine records, retries and replays the
outcome as usual, so a step whose body a hook replaced is checkpointed like
any other, and a replay returns its stored result without asking the hook.
Hooks are called on the engine's event loop and must neither block nor raise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from cruzflow.server.records import StepKind


class EngineHooks(Protocol):
    def step_body(
        self, instance_id: str, name: str, occurrence: int, attempt: int, body: Callable[..., Any]
    ) -> Callable[..., Any]:
        """The callable to run as this attempt of ``step.do``: ``body`` itself, or a
        stand-in that, like a body, takes no argument or a StepContext."""
        ...

    def timer_due(
        self, instance_id: str, name: str, occurrence: int, kind: StepKind, due_ms: int
    ) -> int:
        """When a new sleep (``kind`` SLEEP) wakes or a new event wait (WAIT_FOR_EVENT)
        times out, in ms since the epoch, given ``due_ms``, the time the workflow
        asked for. Called once per sleep or wait; a replay reuses the stored time."""
        ...

    def retry_delay(
        self, instance_id: str, name: str, occurrence: int, failed_attempt: int, delay_s: float
    ) -> float:
        """Seconds to wait before the retry that follows attempt ``failed_attempt``,
        given ``delay_s``, the delay the step's retry policy asks for."""
        ...
