"""Which step attempt the running code belongs to, for code outside the engine.

The engine sets ``current_step`` around each step body (see
``StepRunner._attempt``, engine/steps.py). Bindings read it to give a call made inside a
step the attempt's remaining time as its deadline and a replay-stable
idempotency key, without the engine knowing anything about them.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class StepScope:
    """The step attempt a body runs in."""

    instance_id: str
    """The instance running the step."""
    created_at: int
    """When the instance was created (ms since the epoch): an instance id may be
    used again once the old instance was purged, and this tells the two apart."""
    step_name: str
    occurrence: int
    """1 for the first step of this name in the run, 2 for the next, ..."""
    attempt: int
    deadline: float
    """When the attempt times out, as ``time.monotonic()`` seconds."""
    counters: dict[str, int] | None = None
    """Per key, how many ids this attempt has derived so far (see ``next_number``);
    made on first use, as most attempts call no binding."""

    def remaining(self) -> float:
        """Seconds until the attempt times out (negative once it has)."""
        return self.deadline - time.monotonic()

    def next_number(self, key: str) -> int:
        """1, 2, 3... for successive calls with ``key`` in this attempt.

        A retried attempt starts again at 1, so the n-th call of one attempt
        and the n-th call of the next get the same number.
        """
        if self.counters is None:
            self.counters = {}
        number = self.counters[key] = self.counters.get(key, 0) + 1
        return number


current_step: ContextVar[StepScope | None] = ContextVar("cruzflow_current_step", default=None)
"""The step attempt of the running code, or None outside step bodies."""
