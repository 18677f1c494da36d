"""Steps run in parallel inside one instance (asyncio.gather, TaskGroup), on
the real engine and store of the test kit: each is checkpointed on its own,
keeps its identity (name and occurrence, position in call order) whatever
order they finish in, and a replay reruns only the unfinished ones. Branches
still in a step when run() ends are cut then, so nothing is written after
the instance's end."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from cruzflow.server.records import EventKind
from cruzflow.testing import WorkflowTestEnv
from cruzflow.workflows import WorkflowEntrypoint, WorkflowEvent, WorkflowStep

BODIES: Counter[str] = Counter()
"""How often each step's body finished, across engine restarts."""


class FanOut(WorkflowEntrypoint):
    """Ten steps at once with random durations, five more in a TaskGroup
    (all named "same": occurrences 1 to 5), then one that sums them."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        delays = event.payload["delays"]

        def work(name: str, value: int) -> Any:
            async def body() -> int:
                await asyncio.sleep(delays[value])
                BODIES[name] += 1
                return value * value

            return body

        squares = await asyncio.gather(
            *(step.do(f"square-{i}", work(f"square-{i}", i)) for i in range(10))
        )
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(step.do("same", work(f"same-{i}", i))) for i in range(5)]
        more = [task.result() for task in tasks]
        return await step.do("sum", lambda: {"squares": squares, "more": more})


class LeavesOneBehind(WorkflowEntrypoint):
    """gather() raises at the first failure while the other branch still runs."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def slow() -> str:
            await asyncio.sleep(0.5)
            BODIES["slow"] += 1
            return "slow"

        def boom() -> None:
            raise ValueError("boom")

        try:
            await asyncio.gather(
                step.do("slow", slow), step.do("boom", boom, retries={"limit": 0, "delay": 0})
            )
        except Exception as exc:
            return {"caught": type(exc).__name__}
        return {"caught": None}


def delays(seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, 0.15) for _ in range(10)]


async def test_parallel_steps_keep_their_identity_whatever_order_they_finish_in() -> None:
    BODIES.clear()
    async with WorkflowTestEnv(FanOut) as t:
        run = await t.run({"delays": delays(1)})
    assert run.status == "complete", run.error
    assert run.output == {"squares": [i * i for i in range(10)], "more": [0, 1, 4, 9, 16]}
    # Positions follow the calls, not the finishing order.
    names = [(s.index, s.name, s.occurrence) for s in run.steps]
    assert names == [
        *((i, f"square-{i}", 1) for i in range(10)),
        *((10 + i, "same", i + 1) for i in range(5)),
        (15, "sum", 1),
    ]
    assert all(s.outcome == "succeeded" and s.attempts == 1 for s in run.steps)
    finished = sorted(run.steps[:10], key=lambda s: s.output)
    assert [s.output for s in finished] == [i * i for i in range(10)]


async def test_a_restart_mid_flight_reruns_only_the_unfinished_steps() -> None:
    cut_midway = 0
    for seed in range(5):
        BODIES.clear()
        async with WorkflowTestEnv(FanOut) as t:
            handle = await t.start({"delays": delays(seed)})
            # Cut the engine while some of the ten are done and some are not.
            await asyncio.sleep(0.07)
            before = await handle.snapshot()
            done_before = {s.name for s in before.steps if s.outcome == "succeeded"}
            await t.restart_engine()
            run = await handle.result()
        assert run.status == "complete", run.error
        assert run.output["squares"] == [i * i for i in range(10)]
        # A step whose result was stored before the cut never ran again...
        for name in done_before:
            assert BODIES[name] == 1, (seed, name, BODIES)
        # ...and every body finished exactly once or (cut short) twice.
        assert all(BODIES[f"square-{i}"] in (1, 2) for i in range(10)), BODIES
        cut_midway += 0 < len(done_before & {f"square-{i}" for i in range(10)}) < 10
    # The random durations put the cut among the ten at least once.
    assert cut_midway >= 1


async def test_branches_left_running_when_run_ends_are_cut() -> None:
    BODIES.clear()
    async with WorkflowTestEnv(LeavesOneBehind) as t:
        handle = await t.start({})
        run = await handle.result()
        assert run.output == {"caught": "StepFailedError"}
        await asyncio.sleep(0.8)  # longer than the slow step's body
        assert BODIES["slow"] == 0
        events = [e async for e in t.engine.watch(handle.id)]
        # The instance's end is its last event: nothing of the cut branch after it.
        assert events[-1].kind == EventKind.STATUS_CHANGED
        assert events[-1].data["status"] == 6  # COMPLETE
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        slow = (await handle.snapshot()).step("slow")
        assert (slow.outcome, slow.attempts) == ("running", 1)
