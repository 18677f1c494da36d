"""Workflow classes the tests run, in-process and in real server processes.

Steps that must be counted append a line to the file named by the
CRUZFLOW_TEST_SIDE_FILE variable, so a test can tell how often a step's body
really ran, across server processes.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from typing import Any, ClassVar, NotRequired, TypedDict

from cruzflow.workflows import (
    ChildWorkflowError,
    EventTimeoutError,
    NonRetryableError,
    RollbackContext,
    StepContext,
    StepFailedError,
    WorkflowEntrypoint,
    WorkflowEvent,
    WorkflowStep,
)


def mark(name: str) -> None:
    path = os.environ.get("CRUZFLOW_TEST_SIDE_FILE")
    if path:
        with open(path, "a") as side:
            side.write(name + "\n")
            side.flush()
            os.fsync(side.fileno())


def count(path: str, name: str) -> int:
    try:
        with open(path) as side:
            return sum(1 for line in side if line.strip() == name)
    except FileNotFoundError:
        return 0


class ThreeSteps(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        a = await step.do("one", lambda: {"n": 1})
        b = await step.do("two", lambda: {"n": a["n"] + 1})
        c = await step.do("three", lambda: {"n": b["n"] + 1})
        return {"sum": a["n"] + b["n"] + c["n"], "params": event.payload}


class Sleepy(WorkflowEntrypoint):
    """Step "slow" sleeps params.seconds (default 2); every body marks the side file."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        seconds = (event.payload or {}).get("seconds", 2)
        tag = (event.payload or {}).get("tag", event.instance_id)

        async def before() -> str:
            mark(f"{tag}:before")
            return "ok"

        async def slow(ctx: StepContext) -> int:
            mark(f"{tag}:slow:{ctx.attempt}")
            await asyncio.sleep(seconds)
            mark(f"{tag}:slow-done")
            return ctx.attempt

        async def after() -> str:
            mark(f"{tag}:after")
            return "done"

        await step.do("before", before)
        attempt = await step.do("slow", {"retries": {"limit": 3, "delay": 0}}, slow)
        await step.do("after", after)
        return {"slow_attempt": attempt, "tag": tag}


class Flaky(WorkflowEntrypoint):
    """Fails its step params.failures times, then succeeds."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        failures = event.payload["failures"]

        async def flaky(ctx: StepContext) -> int:
            if ctx.attempt <= failures:
                raise ConnectionError(f"attempt {ctx.attempt} failed")
            return ctx.attempt

        backoff = event.payload.get("backoff", "constant")
        retries = {"limit": event.payload.get("limit", 5), "delay": 1, "backoff": backoff}
        return await step.do("flaky", flaky, retries=retries)


class CatchesFailure(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def boom() -> None:
            raise NonRetryableError("card declined")

        try:
            await step.do("charge", boom)
        except StepFailedError as exc:
            await step.do("refund", lambda: "refunded")
            return {"caught": exc.error_name, "message": exc.error_message}
        return {"caught": None}


class Raises(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        await step.do("fine", lambda: 1)

        async def boom() -> None:
            raise ValueError("bad input row 7")

        await step.do("boom", boom, retries={"limit": 1, "delay": 0})
        return "unreachable"


class DeepRaise(WorkflowEntrypoint):
    """Fails from deep recursion: a traceback far over the size kept."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        def dive(depth: int) -> None:
            # Each level adds a chained exception of its own, so Python's
            # traceback cannot fold the repeats.
            try:
                if depth > 0:
                    dive(depth - 1)
            except ValueError as exc:
                raise ValueError(f"unwinding level {depth}") from exc
            else:
                raise ValueError("the deepest level")

        try:
            dive(100)
        except ValueError as exc:
            raise RecursionError("bottom of the dive") from exc


class OrderParams(TypedDict):
    """The params TypedWorkflow declares (checked at creation)."""

    orderId: str
    quantity: int
    note: NotRequired[str]


class TypedParams(WorkflowEntrypoint[OrderParams]):
    async def run(self, event: WorkflowEvent[OrderParams], step: WorkflowStep) -> Any:
        return {"order": event.payload["orderId"], "quantity": event.payload["quantity"]}


class RaisesOutsideStep(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        raise KeyError("missing-key")


class Hangs(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def hang() -> None:
            await asyncio.sleep(3600)

        await step.do("hang", {"retries": {"limit": 1, "delay": 0}, "timeout": 50}, hang)


class NotJson(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        await step.do("set", lambda: {1, 2, 3})


class TooBig(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        await step.do("big", lambda: "x" * (event.payload["size"]))


class OutputNotJson(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        return object()


class Repeats(WorkflowEntrypoint):
    """The same step name three times: three separate steps."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        out = []
        for i in range(3):
            out.append(await step.do("poll", lambda i=i: i * 10))
        return out


class Blocks(WorkflowEntrypoint):
    """Waits in its step until the test sets the event on the class."""

    gate: asyncio.Event | None = None

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def wait() -> str:
            gate = type(self).gate
            assert gate is not None
            await gate.wait()
            return "released"

        return await step.do("wait", wait)


class UsesEnv(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        greeting = self.env.GREETING

        async def write() -> int:
            await self.env.DB.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
            await self.env.DB.execute("INSERT INTO t VALUES (?)", (greeting,))
            rows = await self.env.DB.execute("SELECT count(*) FROM t")
            return int(rows[0][0])

        return {"greeting": greeting, "rows": await step.do("write", write)}


class Versioned(WorkflowEntrypoint):
    """Runs step names taken from params.names, so a test can 'change the code'.

    The names come from the side file's 'names' when it exists, else params.
    """

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        names = event.payload["names"]
        override = os.environ.get("CRUZFLOW_TEST_STEP_NAMES")
        if override:
            names = override.split(",")
        out = []
        for name in names:

            async def body(name: str = name) -> str:
                mark(f"versioned:{name}")
                if name == "block":
                    await asyncio.sleep(3600)
                return name

            out.append(await step.do(name, body))
        return out


class LongFirstAttempt(WorkflowEntrypoint):
    """Step "work" sleeps params.first seconds on attempt 1, params.later (0) after.

    Marks "TAG:work:ATTEMPT" when an attempt starts and "TAG:work-done" when one ends,
    so a test can cut a long attempt short and see a short retry finish.
    """

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        tag = event.payload.get("tag", event.instance_id)
        first = event.payload.get("first", 3600)
        later = event.payload.get("later", 0)

        async def work(ctx: StepContext) -> int:
            mark(f"{tag}:work:{ctx.attempt}")
            await asyncio.sleep(first if ctx.attempt == 1 else later)
            mark(f"{tag}:work-done")
            return ctx.attempt

        attempt = await step.do("work", {"retries": {"limit": 3, "delay": 0}}, work)
        return {"work_attempt": attempt, "tag": tag}


class Naps(WorkflowEntrypoint):
    """Sleeps params.ms milliseconds between two steps."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        tag = (event.payload or {}).get("tag", event.instance_id)

        async def before() -> str:
            mark(f"{tag}:nap-before")
            return "before"

        async def after() -> str:
            mark(f"{tag}:nap-after")
            return "after"

        await step.do("before", before)
        await step.sleep("nap", event.payload["ms"])
        return await step.do("after", after)


class Approval(WorkflowEntrypoint):
    """Waits for an "approval" event (params.timeout, default 24 h) and returns it."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        timeout = (event.payload or {}).get("timeout", "24 hours")
        await step.do("request", lambda: mark(f"{event.instance_id}:requested"))
        try:
            approval = await step.wait_for_event("approval", type="approval", timeout=timeout)
        except EventTimeoutError as exc:
            return {"timed_out": exc.error_name}
        await step.do("apply", lambda: mark(f"{event.instance_id}:applied"))
        return {"approved": approval["payload"], "type": approval["type"]}


class Steps5(WorkflowEntrypoint):
    """Five steps of params.ms milliseconds each, marking each body."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        out = []
        for i in range(5):

            async def body(i: int = i) -> int:
                mark(f"{event.instance_id}:s{i}")
                await asyncio.sleep(event.payload["ms"] / 1000)
                return i

            out.append(await step.do(f"s{i}", body))
        return out


class BlocksThenWaits(WorkflowEntrypoint):
    """Holds in its first step until Blocks.gate is set, then waits for "approval"."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def hold() -> str:
            gate = Blocks.gate
            assert gate is not None
            await gate.wait()
            return "held"

        await step.do("hold", hold)
        approval = await step.wait_for_event("approval", type="approval")
        return {"approved": approval["payload"], "type": approval["type"]}


class SlowThenWaitsTwice(WorkflowEntrypoint):
    """Step "slow" (params.ms per attempt, marks "ID:slow:ATTEMPT"), then two "approval" waits.

    Events sent while "slow" runs arrive before either wait began: both must be
    kept, the first wait taking the first event and the second wait the second.
    Marks "ID:applied" once both arrived.
    """

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        ms = event.payload["ms"]

        async def slow(ctx: StepContext) -> int:
            mark(f"{event.instance_id}:slow:{ctx.attempt}")
            await asyncio.sleep(ms / 1000)
            return ctx.attempt

        attempt = await step.do("slow", {"retries": {"limit": 3, "delay": 0}}, slow)
        first = await step.wait_for_event("first", type="approval")
        second = await step.wait_for_event("second", type="approval")
        await step.do("apply", lambda: mark(f"{event.instance_id}:applied"))
        return {"slow_attempt": attempt, "first": first["payload"], "second": second["payload"]}


class Traced(WorkflowEntrypoint):
    """Three steps, the second failing its first attempt, with a sleep of
    params.nap_ms (default 0) before the third. Returns 1 + 2 + 3."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        first = await step.do("fetch", lambda: 1)

        async def charge(ctx: StepContext) -> int:
            if ctx.attempt == 1:
                raise ConnectionError("the card service hung up")
            return 2

        second = await step.do("charge", charge, retries={"limit": 2, "delay": 0})
        await step.sleep("nap", (event.payload or {}).get("nap_ms", 0))
        third = await step.do("notify", lambda: 3)
        return first + second + third


# ------------------------------------------------ workflow bindings (tests/test_bindings.py)


class Doubles(WorkflowEntrypoint):
    """A child: returns params.n doubled, and its own instance id."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        doubled = await step.do("double", lambda: event.payload["n"] * 2)
        return {"doubled": doubled, "id": event.instance_id}


class SpawnsChild(WorkflowEntrypoint):
    """Step "spawn" creates params.count (1) children of env.CHILD_WORKFLOW with
    {"n": params.n + i} and marks "ID:spawn:ATTEMPT:CHILD_ID" for each; with
    params.fail_first its first attempt then fails, with params.block_first it
    then sleeps an hour. Step "await" returns the children's results."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        params = event.payload
        count = params.get("count", 1)

        async def spawn(ctx: StepContext) -> list[str]:
            children = self.env.CHILD_WORKFLOW
            if count == 1:
                handles = [await children.create({"n": params["n"]})]
            else:
                handles = await children.create_batch(
                    [{"params": {"n": params["n"] + i}} for i in range(count)]
                )
            for handle in handles:
                mark(f"{event.instance_id}:spawn:{ctx.attempt}:{handle.id}")
            if ctx.attempt == 1 and params.get("fail_first"):
                raise ConnectionError("the step failed after creating its children")
            if ctx.attempt == 1 and params.get("block_first"):
                await asyncio.sleep(3600)
            return [handle.id for handle in handles]

        ids = await step.do("spawn", spawn, retries={"limit": 3, "delay": 0})

        async def results() -> list[Any]:
            out = []
            for child_id in ids:
                child = await self.env.CHILD_WORKFLOW.get(child_id)
                out.append(await child.result())
            return out

        return {"child_ids": ids, "children": await step.do("await", results)}


class CallsChild(WorkflowEntrypoint):
    """One step "call" (timeout params.step_timeout, params.limit retries without
    delay) making one call through env[params.binding]: "create" a child, or
    "watch" or "result" of the instance params.child_id. Returns {"output": ...},
    or {"error": name, "message": ...} when the step failed."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        params = event.payload
        binding = self.env[params["binding"]]

        async def call(ctx: StepContext) -> Any:
            mark(f"{event.instance_id}:call:{ctx.attempt}")
            if params["call"] == "create":
                return (await binding.create({"n": 1})).id
            child = await binding.get(params["child_id"])
            if params["call"] == "watch":
                return [watched.sequence async for watched in child.watch()]
            return await child.result()

        try:
            output = await step.do(
                "call",
                call,
                retries={"limit": params.get("limit", 0), "delay": 0},
                timeout=params.get("step_timeout", "10 minutes"),
            )
        except StepFailedError as exc:
            return {"error": exc.error_name, "message": exc.error_message}
        return {"output": output}


class CreatesOutsideStep(WorkflowEntrypoint):
    """Creates a child right in run(), outside any step: refused."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        await self.env.CHILD_WORKFLOW.create({"n": 1})
        return "unreachable"


# ---------------------------------------------------------------------- soak
_soak_side: int | None = None


def soak_mark(line: str) -> None:
    """Append a line to the side file, without the fsync of ``mark``.

    A SIGKILL of the server keeps what write() handed the kernel (only a
    machine crash loses it), and the soak marks tens of thousands of steps:
    an fsync each would stall the server's event loop. One write() on an
    O_APPEND file lands whole and in order.
    """
    global _soak_side
    if _soak_side is None:
        path = os.environ.get("CRUZFLOW_TEST_SIDE_FILE")
        if not path:
            return
        _soak_side = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(_soak_side, (line + "\n").encode())


class Soak(WorkflowEntrypoint):
    """The soak test's workflow: steps "a", "b", "c", shaped by params.kind.

    - "plain": three steps;
    - "retry": step "b" fails its first params.fail attempts (ConnectionError),
      20 ms apart, then succeeds;
    - "sleep": a durable sleep of params.ms before step "b";
    - "event": a wait for a "go" event before step "b", which uses its
      payload's "k".

    Each body takes params.step_ms (default 0) milliseconds.

    The output, {"kind", "n", "result"}, depends on the params (and the
    event) only: "a" gives n, "b" gives 2n (the event's k for "event"), "c"
    gives a + b. Every body marks "ID:STEP:start:ATTEMPT:TOKEN" as it begins
    and "ID:STEP:done:ATTEMPT:TOKEN" just before it returns {"v", "token"}, so
    the token of a stored result names the one run of the body that was
    recorded, and the side file shows whether the body started again after it.
    """

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        params = event.payload
        instance_id = event.instance_id
        kind = params["kind"]
        n = int(params["n"])

        def body(name: str, value: int, fail: int = 0) -> Any:
            async def run_body(ctx: StepContext) -> dict[str, Any]:
                token = uuid.uuid4().hex[:16]
                soak_mark(f"{instance_id}:{name}:start:{ctx.attempt}:{token}")
                # A little work, so that kills land inside bodies as well as between.
                await asyncio.sleep(int(params.get("step_ms", 0)) / 1000)
                if ctx.attempt <= fail:
                    raise ConnectionError(f"attempt {ctx.attempt} of {fail} planned failures")
                soak_mark(f"{instance_id}:{name}:done:{ctx.attempt}:{token}")
                return {"v": value, "token": token}

            return run_body

        a = (await step.do("a", body("a", n)))["v"]
        b_value = 2 * n
        if kind == "retry":
            retries = {"limit": 10, "delay": 20, "backoff": "constant"}
            b = (await step.do("b", body("b", b_value, int(params["fail"])), retries=retries))["v"]
        else:
            if kind == "sleep":
                await step.sleep("nap", int(params["ms"]))
            elif kind == "event":
                got = await step.wait_for_event("go", type="go", timeout="1 hour")
                b_value = int(got["payload"]["k"])
            b = (await step.do("b", body("b", b_value)))["v"]
        c = (await step.do("c", body("c", a + b)))["v"]
        return {"kind": kind, "n": n, "result": c}


class WaitsForType(WorkflowEntrypoint):
    """Waits for an event of the type params.type names."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        got = await step.wait_for_event("wait", type=event.payload["type"], timeout="1 minute")
        return got["payload"]


# ------------------------------------------------------------------ replicas
class Replicated(WorkflowEntrypoint):
    """Three steps, the second taking params.ms (1 s by default): the workflow of
    tests/e2e/test_replicas.py. Each body marks its start and its end with a
    token it returns, as Soak's do, so the side file shows whether a body ran
    again after its recorded run; the output depends on params.n only."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        n = int(event.payload["n"])
        pause = int(event.payload.get("ms", 1000)) / 1000

        def body(name: str, value: int, seconds: float) -> Any:
            async def run_body(ctx: StepContext) -> dict[str, Any]:
                token = uuid.uuid4().hex[:16]
                soak_mark(f"{event.instance_id}:{name}:start:{ctx.attempt}:{token}")
                await asyncio.sleep(seconds)
                soak_mark(f"{event.instance_id}:{name}:done:{ctx.attempt}:{token}")
                return {"v": value, "token": token}

            return run_body

        a = await step.do("a", body("a", n, 0))
        b = await step.do("b", body("b", 2 * n, pause))
        c = await step.do("c", body("c", a["v"] + b["v"], 0))
        return {"n": n, "result": c["v"]}


class FanOutRandom(WorkflowEntrypoint):
    """params.steps branches at once (asyncio.gather), each two steps in a
    row ("part-<i>", then "part-<i>-b"), each sleeping a random time drawn
    anew for every attempt, so that the steps finish, and the second ones
    begin, in another order each run and each server; then one step that
    sums them. Each body marks "<tag>:<name>:start" when it begins and
    "<tag>:<name>:done" when its work is done (before its result is stored)."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        tag = event.payload["tag"]
        most = event.payload.get("max_ms", 300) / 1000

        def work(name: str, value: int) -> Any:
            async def body(ctx: StepContext) -> int:
                mark(f"{tag}:{name}:start")
                draw = random.Random(f"{tag}:{name}:{ctx.attempt}:{os.getpid()}")
                await asyncio.sleep(draw.uniform(0, most))
                mark(f"{tag}:{name}:done")
                return value

            return body

        async def branch(i: int) -> int:
            first = await step.do(f"part-{i}", work(f"part-{i}", i))
            return await step.do(f"part-{i}-b", work(f"part-{i}-b", first * 10))

        values = await asyncio.gather(*(branch(i) for i in range(event.payload["steps"])))
        return await step.do("sum", lambda: {"values": values, "sum": sum(values)})


class Kid(WorkflowEntrypoint):
    """A child: step "work" marks "<tag>:kid-<n>:start" and sleeps params.ms
    (a random time up to it, drawn per attempt and process, if params.random),
    then marks "...:done"; with params.wait it then waits for a "go" event;
    with params.fail its step "boom" fails for good. Returns {"n", "v": 10n}."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        p = event.payload
        tag, n = p.get("tag", "kid"), p["n"]

        async def work(ctx: StepContext) -> int:
            mark(f"{tag}:kid-{n}:start")
            most = p.get("ms", 0) / 1000
            if p.get("random"):
                most = random.Random(f"{tag}:{n}:{ctx.attempt}:{os.getpid()}").uniform(0, most)
            await asyncio.sleep(most)
            mark(f"{tag}:kid-{n}:done")
            return 10 * int(n)

        v = await step.do("work", work)
        if p.get("wait"):
            await step.wait_for_event("go", type="go")
        if p.get("fail"):

            def boom() -> None:
                raise NonRetryableError(f"kid {n} gives up")

            await step.do("boom", boom)
        return {"n": n, "v": v}


class Parent(WorkflowEntrypoint):
    """Starts params.children children of workflow "kid" at once (asyncio.gather
    of step.child "kid-<i>", params {"n": i, **params.kid}, parent_close from
    params), then sums their values in step "total". With params.catch, a
    ChildWorkflowError is caught and returned as {"caught": child id, "message"}."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        p = event.payload
        close = p.get("parent_close", "terminate")

        async def kid(i: int) -> Any:
            params = {"n": i, "tag": p.get("tag", "kid"), **p.get("kid", {})}
            return await step.child(f"kid-{i}", p.get("workflow", "kid"), params,
                                    parent_close=close, id=p.get("ids", {}).get(str(i)))  # fmt: skip

        try:
            kids = await asyncio.gather(*(kid(i) for i in range(p.get("children", 1))))
        except ChildWorkflowError as exc:
            if not p.get("catch"):
                raise
            return {"caught": exc.child_id, "message": exc.error_message}
        return await step.do("total", lambda: {"kids": kids, "sum": sum(k["v"] for k in kids)})


class WaitsTogether(WorkflowEntrypoint):
    """Three branches at once: a wait for an "a" event, a wait for a "b" event,
    and a step then a sleep of params.ms; returns the three results."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def nap() -> str:
            await step.do("before-nap", lambda: "ok")
            await step.sleep("nap", event.payload.get("ms", 100))
            return "rested"

        a, b, c = await asyncio.gather(
            step.wait_for_event("a", type="a"), step.wait_for_event("b", type="b"), nap()
        )
        return {"a": a["payload"], "b": b["payload"], "nap": c}


class Limited(WorkflowEntrypoint):
    """For concurrency limits: step "work" records the instance as in it, waits
    until the test lets the instance go (``Limited.let_go``), and records its
    end; ``running`` is who is in the step now, ``most`` the most at once,
    ``order`` the order they entered it (in-process tests)."""

    running: ClassVar[set[str]] = set()
    most = 0
    order: ClassVar[list[str]] = []
    gates: ClassVar[dict[str, asyncio.Event]] = {}

    @classmethod
    def reset(cls) -> None:
        cls.running, cls.most, cls.order, cls.gates = set(), 0, [], {}

    @classmethod
    def let_go(cls, instance_id: str) -> None:
        cls.gates.setdefault(instance_id, asyncio.Event()).set()

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        me = event.instance_id

        async def work() -> str:
            cls = Limited
            cls.running.add(me)
            cls.order.append(me)
            cls.most = max(cls.most, len(cls.running))
            try:
                await cls.gates.setdefault(me, asyncio.Event()).wait()
            finally:
                cls.running.discard(me)
            return me

        done = await step.do("work", work)
        await step.do("after", lambda: None)  # a boundary, where a pause is taken
        return done


def log_line(line: str) -> None:
    """Append a line to the side file at once (fsynced): a step log that
    outlives a SIGKILL of the server that wrote it."""
    path = os.environ.get("CRUZFLOW_TEST_SIDE_FILE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


class KeyedWork(WorkflowEntrypoint):
    """For the concurrency e2e test: step "begin" logs "start <key> <id> <pid>",
    a short nap, step "end" logs "end <key> <id> <pid>" (params: key, nap in s)."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        key = str(event.payload.get("user", "-"))
        me = event.instance_id
        nap = float(event.payload.get("nap", 0.02))

        async def begin() -> None:
            log_line(f"start {key} {me} {os.getpid()}")
            await asyncio.sleep(nap)

        async def end() -> None:
            await asyncio.sleep(nap)
            log_line(f"end {key} {me} {os.getpid()}")

        await step.do("begin", begin)
        await step.do("end", end)
        return key


class Booking(WorkflowEntrypoint):
    """A saga: steps "reserve", "charge", "notify" (no rollback) and "ship",
    the first two with rollbacks that mark "<id>:undo:<step>:<attempt>:<output
    value>" (params.undo_fails: a step whose rollback raises on its first
    params.undo_fails[step] attempts; retried after params.undo_delay ms). With
    params.wait it waits for a "go"
    event before "ship"; "ship" fails for good when params.fail is true."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        p = event.payload
        me = event.instance_id

        def undo(name: str) -> Any:
            async def rollback(r: RollbackContext) -> None:
                mark(f"{me}:undo:{name}:{r.attempt}:{r.output['v']}:{r.error_name}")
                if r.attempt <= p.get("undo_fails", {}).get(name, 0):
                    raise ConnectionError(f"{name}: undo failed")

            return rollback

        def ship() -> str:
            if p.get("fail"):
                raise NonRetryableError("no courier")
            return "shipped"

        fast = {"retries": {"limit": 2, "delay": p.get("undo_delay", 10)}}
        await step.do("reserve", lambda: {"v": 1}, rollback=undo("reserve"), rollback_config=fast)
        await step.do("charge", lambda: {"v": 2}, rollback=undo("charge"), rollback_config=fast)
        await step.do("notify", lambda: {"v": 3})
        if p.get("wait"):
            await step.wait_for_event("go", type="go")
        return await step.do("ship", ship)


class Mends(WorkflowEntrypoint):
    """Fetches, naps, charges (failing while ``failing``), then ships what the
    charge gave: for RepairInstance and restarts from a step. ``calls``
    counts each step body's calls (in-process tests only)."""

    calls: ClassVar[dict[str, int]] = {}
    failing: ClassVar[bool] = True
    # Set: the charge step waits for it (an instance held running).
    hold: ClassVar[asyncio.Event | None] = None

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        def counted(name: str, value: Any) -> Any:
            async def body() -> Any:
                Mends.calls[name] = Mends.calls.get(name, 0) + 1
                if name == "charge" and Mends.failing:
                    raise NonRetryableError("card declined")
                if name == "charge" and Mends.hold is not None:
                    await Mends.hold.wait()
                return value

            return body

        order = await step.do("fetch", counted("fetch", {"order": 7}))
        await step.sleep("nap", "1 millisecond")
        charge = await step.do("charge", counted("charge", {"charged": order["order"]}))
        shipped = await step.do("ship", counted("ship", {"shipped": charge}))
        return shipped
