"""Steps run in parallel inside one instance (asyncio.gather, TaskGroup), on
the real engine and store of the test kit: each is checkpointed on its own,
keeps its identity (name and occurrence, position in call order) whatever
order they finish in, and a replay reruns only the unfinished ones. Branches
still in a step when run() ends are cut then, so nothing is written after
the instance's end."""

from __future__ import annotations

import asyncio
import inspect
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


# ------------------------------------------ Cloudflare's decorator form


class Diamond(WorkflowEntrypoint):
    """Cloudflare's DAG example: two steps the last one needs, run at once
    (each waits for the other to have started, so run one after the other
    they would never finish)."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        started = {"dep_1": asyncio.Event(), "dep_2": asyncio.Event()}

        async def meet(me: str, other: str) -> str:
            BODIES[me] += 1
            started[me].set()
            await asyncio.wait_for(started[other].wait(), 5)
            return me

        @step.do()
        async def dep_1() -> str:
            return await meet("dep_1", "dep_2")

        @step.do("second dependency")
        async def dep_2() -> str:
            return await meet("dep_2", "dep_1")

        @step.do(concurrent=True)
        async def final_step(dep_1: str, dep_2: str, ctx: Any) -> Any:
            BODIES["final_step"] += 1
            return {"got": [dep_1, dep_2], "attempt": ctx.attempt, "name": ctx.step_name}

        first = await final_step()
        again = await final_step()  # run once: the same result
        return {"first": first, "again": again}


async def test_the_decorator_form_runs_needed_steps_concurrently_once() -> None:
    BODIES.clear()
    async with WorkflowTestEnv(Diamond) as t:
        run = await t.run({}, timeout=20)
    assert run.status == "complete", run.error
    result = {"got": ["dep_1", "dep_2"], "attempt": 1, "name": "final_step"}
    assert run.output == {"first": result, "again": result}
    assert [(s.index, s.name) for s in run.steps] == [
        (0, "dep_1"),
        (1, "second dependency"),
        (2, "final_step"),
    ]
    assert BODIES == {"dep_1": 1, "dep_2": 1, "final_step": 1}


class Chain(WorkflowEntrypoint):
    """Without concurrent=True the needed steps run one after another, in the
    order of the parameters; a step already run is not run again; config
    carries the retries."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        order: list[str] = []

        @step.do(config={"retries": {"limit": 2, "delay": 0}})
        async def fetch(ctx: Any) -> int:
            order.append(f"fetch:{ctx.attempt}")
            if ctx.attempt == 1:
                raise ConnectionError("flaky")
            return 20

        @step.do()
        def double(fetch: int) -> int:
            order.append("double")
            return fetch * 2

        @step.do()
        async def total(double: int, fetch: int) -> int:
            order.append("total")
            return double + fetch

        assert await fetch() == 20
        return {"total": await total(), "order": order}


async def test_without_concurrent_the_needed_steps_run_in_order_and_once() -> None:
    async with WorkflowTestEnv(Chain) as t:
        run = await t.run({})
    assert run.status == "complete", run.error
    assert run.output == {"total": 60, "order": ["fetch:1", "fetch:2", "double", "total"]}
    assert [(s.name, s.attempts) for s in run.steps] == [("fetch", 2), ("double", 1), ("total", 1)]


class NeedsAFailure(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        @step.do(config={"retries": {"limit": 0, "delay": 0}})
        def broken() -> None:
            raise ValueError("no account")

        @step.do()
        def after(broken: Any) -> str:
            return "never"

        caught = []
        for _ in range(2):
            try:
                await after()
            except Exception as exc:
                caught.append(f"{type(exc).__name__}: {exc}")
        return caught


async def test_a_failed_step_fails_what_needs_it_each_time() -> None:
    async with WorkflowTestEnv(NeedsAFailure) as t:
        run = await t.run({})
    assert run.status == "complete", run.error
    assert len(run.output) == 2 and run.output[0] == run.output[1]
    assert run.output[0].startswith("StepFailedError: ") and "no account" in run.output[0]
    assert [(s.name, s.outcome) for s in run.steps] == [("broken", "failed")]


class Misuse(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        refused = []

        def refuse(make: Any) -> None:
            try:
                make()
            except TypeError as exc:
                refused.append(str(exc))

        def unknown_parameter() -> None:
            @step.do()
            def lonely(nobody: Any) -> None: ...

        refuse(unknown_parameter)
        refuse(lambda: step.do(retries={"limit": 1}))  # type: ignore[call-overload]
        refuse(lambda: step.do("x", lambda: 1, concurrent=True))  # type: ignore[call-overload]
        return refused


async def test_misuse_of_the_decorator_form_is_a_clear_type_error() -> None:
    async with WorkflowTestEnv(Misuse) as t:
        run = await t.run({})
    assert run.status == "complete", run.error
    unknown, retries, concurrent = run.output
    assert "parameter 'nobody' names no step function declared before it" in unknown
    assert "takes config=" in retries
    assert "concurrent= and config= belong to the decorator form" in concurrent


class DiamondFanOut(WorkflowEntrypoint):
    """The decorator form across an engine restart: ten needed steps at once."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        delays = event.payload["delays"]
        parts = []
        for i in range(10):

            async def part(i: int = i) -> int:
                await asyncio.sleep(delays[i])
                BODIES[f"part_{i}"] += 1
                return i

            part.__name__ = f"part_{i}"
            parts.append(step.do()(part))

        async def joined(**kwargs: int) -> int:
            return sum(kwargs.values())

        names = [p.name for p in parts]
        joined.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
        )
        return await step.do(concurrent=True)(joined)()


async def test_the_decorator_form_survives_a_restart_mid_flight() -> None:
    BODIES.clear()
    async with WorkflowTestEnv(DiamondFanOut) as t:
        handle = await t.start({"delays": delays(3)})
        await asyncio.sleep(0.07)
        before = await handle.snapshot()
        done_before = {s.name for s in before.steps if s.outcome == "succeeded"}
        await t.restart_engine()
        run = await handle.result()
    assert run.status == "complete", run.error
    assert run.output == sum(range(10))
    assert 0 < len(done_before) < 10, done_before
    for name in done_before:
        assert BODIES[name] == 1, (name, BODIES)


# A workflow as Cloudflare's Python Workflows docs write it; only its import
# differs (`from workers import WorkflowEntrypoint`).
class CloudflareStyle(WorkflowEntrypoint):
    async def run(self, event, step):  # type: ignore[no-untyped-def]
        await step.sleep("demo sleep", "1 second")

        @step.do()
        async def dep_1():  # type: ignore[no-untyped-def]
            return "dep1"

        @step.do()
        async def dep_2():  # type: ignore[no-untyped-def]
            return "dep2"

        @step.do(concurrent=True)
        async def final_step(dep_1, dep_2):  # type: ignore[no-untyped-def]
            return f"{dep_1} {dep_2} for {event['payload']['user']}"

        joined = await final_step()
        approval = await step.wait_for_event("approval", "approval", timeout="1 hour")
        return {"joined": joined, "approved_by": approval["payload"]["by"]}


async def test_a_cloudflare_python_workflow_runs_with_only_its_import_changed() -> None:
    async with WorkflowTestEnv(CloudflareStyle) as t:
        t.mock_event("approval", {"by": "ada"})
        run = await t.run({"user": "u42"})
    assert run.status == "complete", run.error
    assert run.output == {"joined": "dep1 dep2 for u42", "approved_by": "ada"}
    assert [(s.name, s.kind) for s in run.steps] == [
        ("demo sleep", "sleep"),
        ("dep_1", "do"),
        ("dep_2", "do"),
        ("final_step", "do"),
        ("approval", "wait_for_event"),
    ]


class TwoLanes(WorkflowEntrypoint):
    """Two branches of three steps each: one fast, one slow."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def lane(name: str, seconds: float) -> list[str]:
            done = []
            for i in range(3):

                async def body(i: int = i) -> str:
                    await asyncio.sleep(seconds)
                    BODIES[f"{name}-{i}"] += 1
                    return f"{name}-{i}"

                done.append(await step.do(f"{name}-{i}", body))
            return done

        return await asyncio.gather(lane("fast", 0.02), lane("slow", 0.4))


async def test_a_pause_lets_every_branch_finish_its_attempt_first() -> None:
    BODIES.clear()
    async with WorkflowTestEnv(TwoLanes) as t:
        handle = await t.start({})
        await asyncio.sleep(0.1)
        # The fast branch is at a boundary, the slow one inside its first attempt.
        assert await handle.pause() == "waitingForPause"
        assert await handle.wait_for_status("paused", timeout=5) == "paused"
        paused = await handle.snapshot()
        slow = paused.step("slow-0")
        # The slow attempt was not cut: it finished and its result is stored.
        assert (slow.outcome, slow.attempts) == ("succeeded", 1)
        assert BODIES["slow-0"] == 1
        await asyncio.sleep(0.5)
        assert (await handle.snapshot()).status == "paused"  # nothing ran on
        await handle.resume()
        run = await handle.result()
    assert run.status == "complete", run.error
    assert run.output == [[f"fast-{i}" for i in range(3)], [f"slow-{i}" for i in range(3)]]
    assert all(s.attempts == 1 for s in run.steps), [(s.name, s.attempts) for s in run.steps]
    assert all(count == 1 for count in BODIES.values()), BODIES
