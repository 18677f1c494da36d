"""Workflows the benchmark runs; the server imports them as ``bench.workflows``.

When the server's environment has ``CRUZFLOW_BENCH_MARKS`` set to a file, the
step bodies of SlowStep append a line to it each time they begin and end:
``<time.time()> <instance> <step> <attempt> begin|end <server pid>``. W3
counts from it which step bodies ran again after the server was killed (and,
with several servers on one database, which server ran them). The appends are
plain ``write``\\ s with O_APPEND, not fsync'd: a SIGKILL loses nothing the
kernel already has, and an fsync per line would stall the server's event
loop in the very restart W3 times.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from cruzflow.workflows import StepContext, WorkflowEntrypoint, WorkflowEvent, WorkflowStep

# Held for W3 (kill the server during this step, restart, time to all done).
SLOW_STEP_SECONDS = 2.0
# How long a Sleeper sleeps: far longer than any benchmark.
SLEEPER_SLEEP = "1 day"

_MARKS_PATH = os.environ.get("CRUZFLOW_BENCH_MARKS", "")
_marks_fd = -1


def _mark(ctx: StepContext, phase: str) -> None:
    global _marks_fd
    if not _MARKS_PATH:
        return
    if _marks_fd < 0:
        _marks_fd = os.open(_MARKS_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # One write of a short line with O_APPEND: lines never interleave.
    line = (
        f"{time.time():.6f} {ctx.instance_id} {ctx.step_name} {ctx.attempt} {phase} {os.getpid()}\n"
    )
    os.write(_marks_fd, line.encode())


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


async def _first_marked(ctx: StepContext) -> dict[str, Any]:
    _mark(ctx, "begin")
    _mark(ctx, "end")
    return {"step": 1, "ok": True}


async def _slow_marked(ctx: StepContext) -> dict[str, Any]:
    _mark(ctx, "begin")
    await asyncio.sleep(SLOW_STEP_SECONDS)
    _mark(ctx, "end")
    return {"step": 2, "slept_s": SLOW_STEP_SECONDS}


async def _third_marked(ctx: StepContext) -> dict[str, Any]:
    _mark(ctx, "begin")
    _mark(ctx, "end")
    return {"step": 3, "ok": True}


class SlowStep(WorkflowEntrypoint[Any]):
    """One quick step, one 2-second step, one quick step: the W3 shape."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> dict[str, Any]:
        a = await step.do("s1", _first_marked)
        b = await step.do("slow", _slow_marked)
        c = await step.do("s3", _third_marked)
        return {"steps": [a["step"], b["step"], c["step"]], "params": event.payload}


async def _part(ctx: StepContext) -> int:
    return int(ctx.step_name.rpartition("-")[2])


class FanOut(WorkflowEntrypoint[Any]):
    """W4: params.steps trivial steps at once (asyncio.gather), then one that sums them."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> int:
        parts = await asyncio.gather(
            *(step.do(f"part-{i}", _part) for i in range(event.payload["steps"]))
        )
        return await step.do("sum", lambda: sum(parts))


class Sleeper(WorkflowEntrypoint[Any]):
    """One tiny step, then a durable sleep of a day: what ``--sleepers`` piles up."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> dict[str, Any]:
        a = await step.do("tiny", _first)
        await step.sleep("long", SLEEPER_SLEEP)
        return {"steps": [a["step"]], "params": event.payload}


async def _limited_step(ctx: StepContext) -> dict[str, Any]:
    _mark(ctx, "begin")
    _mark(ctx, "end")
    return {"ok": True}


class Limited(WorkflowEntrypoint[Any]):
    """W5: two trivial steps, run under the config's concurrency limit; the
    marks show when each instance began its first step and ended its last."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> dict[str, Any]:
        await step.do("w5-a", _limited_step)
        await step.do("w5-b", _limited_step)
        return {"n": event.payload}
