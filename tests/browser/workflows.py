"""The workflows the console's browser tests look at."""

from __future__ import annotations

import asyncio
from typing import Any

from cruzflow.workflows import WorkflowEntrypoint, WorkflowEvent, WorkflowStep


class Expense(WorkflowEntrypoint):
    """A step that fails once and is retried, a sleep, an event wait, a last step:
    every kind of bar the timeline draws."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        params = event.payload or {}

        async def fetch(ctx: Any) -> dict[str, Any]:
            if ctx.attempt == 1:
                raise ConnectionError("receipt service unavailable (first attempt fails)")
            return {"amount": params.get("amount", 120)}

        receipt = await step.do("fetch-receipt", fetch, retries={"limit": 3, "delay": 300})
        await step.sleep("cool-off", params.get("sleep_ms", 800))
        approval = await step.wait_for_event("approval", type="approval", timeout="1 hour")
        return await step.do(
            "pay", lambda: {"paid": receipt["amount"], "by": approval["payload"].get("by")}
        )


class Ticks(WorkflowEntrypoint):
    """Many short steps in a row: an instance that runs long enough to be paused."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        count = (event.payload or {}).get("count", 200)
        pause = (event.payload or {}).get("ms", 100) / 1000
        for i in range(count):

            async def tick(i: int = i) -> int:
                await asyncio.sleep(pause)
                return i

            await step.do("tick", tick)
        return count


class Quick(WorkflowEntrypoint):
    """One step, done at once."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        return await step.do("only", lambda: event.payload)


class Fails(WorkflowEntrypoint):
    """Fails for good on its first step."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        def boom() -> None:
            raise ValueError("no such account")

        return await step.do("charge", boom, retries={"limit": 0, "delay": 0})
