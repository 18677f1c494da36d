"""One workflow, "order", as it is deployed and then changed: the code a
running instance was recorded under (OrderV1), and changes to it, safe and
not, for the replay check and step.version tests."""

from __future__ import annotations

from typing import Any

from cruzflow.workflows import WorkflowEntrypoint, WorkflowEvent, WorkflowStep

# What the step bodies ran, by instance: a replay must add nothing here.
CALLS: list[str] = []


def _body(instance_id: str, name: str, value: Any) -> Any:
    def body() -> Any:
        CALLS.append(f"{instance_id}:{name}")
        return value

    return body


class OrderV1(WorkflowEntrypoint[Any]):
    """reserve, wait approval, charge, ship, wait delivered."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        i = event.instance_id
        n = event.payload["n"]
        await step.do("reserve", _body(i, "reserve", {"reserved": n}))
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        charged = await step.do("charge", _body(i, "charge", n * 10))
        await step.do("ship", _body(i, "ship", "shipped"))
        await step.wait_for_event("delivered", type="deliver", timeout="1 hour")
        return {"charged": charged, "by": approval["payload"]}


class OrderRenamed(WorkflowEntrypoint[Any]):
    """ "charge" renamed "charge card"."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        i = event.instance_id
        n = event.payload["n"]
        await step.do("reserve", _body(i, "reserve", {"reserved": n}))
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        charged = await step.do("charge card", _body(i, "charge card", n * 10))
        await step.do("ship", _body(i, "ship", "shipped"))
        await step.wait_for_event("delivered", type="deliver", timeout="1 hour")
        return {"charged": charged, "by": approval["payload"]}


class OrderReordered(WorkflowEntrypoint[Any]):
    """ "ship" moved before "charge"."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        i = event.instance_id
        n = event.payload["n"]
        await step.do("reserve", _body(i, "reserve", {"reserved": n}))
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        await step.do("ship", _body(i, "ship", "shipped"))
        charged = await step.do("charge", _body(i, "charge", n * 10))
        await step.wait_for_event("delivered", type="deliver", timeout="1 hour")
        return {"charged": charged, "by": approval["payload"]}


class OrderWithoutDelivery(WorkflowEntrypoint[Any]):
    """The last step, the "delivered" wait, removed."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        i = event.instance_id
        n = event.payload["n"]
        await step.do("reserve", _body(i, "reserve", {"reserved": n}))
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        charged = await step.do("charge", _body(i, "charge", n * 10))
        await step.do("ship", _body(i, "ship", "shipped"))
        return {"charged": charged, "by": approval["payload"]}


class OrderFraudCheck(WorkflowEntrypoint[Any]):
    """A "fraud check" step added before "charge", unguarded."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        i = event.instance_id
        n = event.payload["n"]
        await step.do("reserve", _body(i, "reserve", {"reserved": n}))
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        await step.do("fraud check", _body(i, "fraud check", "clean"))
        charged = await step.do("charge", _body(i, "charge", n * 10))
        await step.do("ship", _body(i, "ship", "shipped"))
        await step.wait_for_event("delivered", type="deliver", timeout="1 hour")
        return {"charged": charged, "by": approval["payload"]}


class OrderVersioned(WorkflowEntrypoint[Any]):
    """The same "fraud check", guarded by step.version: safe under instances
    that went past this point before."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        i = event.instance_id
        n = event.payload["n"]
        await step.do("reserve", _body(i, "reserve", {"reserved": n}))
        approval = await step.wait_for_event("approval", type="approve", timeout="1 hour")
        if step.version("fraud-check"):
            await step.do("fraud check", _body(i, "fraud check", "clean"))
        charged = await step.do("charge", _body(i, "charge", n * 10))
        await step.do("ship", _body(i, "ship", "shipped"))
        await step.wait_for_event("delivered", type="deliver", timeout="1 hour")
        return {"charged": charged, "by": approval["payload"], "v2": step.version("fraud-check")}
