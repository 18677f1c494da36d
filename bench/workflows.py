"""Workflows the benchmark runs; the server imports them as ``bench.workflows``."""

from __future__ import annotations

import asyncio
from typing import Any

from cruzflow.workflows import WorkflowEntrypoint, WorkflowEvent, WorkflowStep

# Held for W3 (kill the server during this step, restart, time to all done).
SLOW_STEP_SECONDS = 2.0


async def _first() -> dict[str, Any]:
    return {"step": 1, "ok": True}


async def _second() -> dict[str, Any]:
    return {"step": 2, "ok": True}


async def _third() -> dict[str, Any]:
    return {"step": 3, "ok": True}


class ThreeSteps(WorkflowEntrypoint[Any]):
    """The peers' unit of work: three trivial steps, each a small JSON object."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> dict[str, Any]:
        a = await step.do("s1", _first)
        b = await step.do("s2", _second)
        c = await step.do("s3", _third)
        return {"steps": [a["step"], b["step"], c["step"]], "params": event.payload}


class SlowStep(WorkflowEntrypoint[Any]):
    """One quick step, one 2-second step, one quick step: the W3 shape."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> dict[str, Any]:
        async def slow() -> dict[str, Any]:
            await asyncio.sleep(SLOW_STEP_SECONDS)
            return {"step": 2, "slept_s": SLOW_STEP_SECONDS}

        a = await step.do("s1", _first)
        b = await step.do("slow", slow)
        c = await step.do("s3", _third)
        return {"steps": [a["step"], b["step"], c["step"]], "params": event.payload}
