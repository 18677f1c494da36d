"""An approval flow: an expense request waits, durably, for a person's decision.

It is the example to try the controls on (pause, resume, send-event,
terminate, restart): it records the request, sleeps through a cool-off in
which the requester may still withdraw it, opens a task for the approver,
then waits up to a day for an "approval" event whose payload decides the
outcome: {"approved": true, "by": "grace@example.com"}.
"""

from __future__ import annotations

from typing import Any, TypedDict

from cruzflow.workflows import (
    EventTimeoutError,
    NonRetryableError,
    WorkflowEntrypoint,
    WorkflowEvent,
    WorkflowStep,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS ExpenseRequest (
    id TEXT PRIMARY KEY, requester TEXT NOT NULL, amount INTEGER NOT NULL,
    status TEXT NOT NULL, decidedBy TEXT);
CREATE TABLE IF NOT EXISTS ApprovalTask (
    requestId TEXT PRIMARY KEY, approver TEXT NOT NULL, instanceId TEXT NOT NULL);
"""

# Short enough to watch it end, long enough to pause an instance inside it;
# [vars] COOL_OFF overrides it.
COOL_OFF = "5 seconds"
DECISION_TIMEOUT = "1 day"


class ApprovalParams(TypedDict):
    requestId: str
    requester: str
    amount: int


class ApprovalWorkflow(WorkflowEntrypoint[ApprovalParams]):
    async def run(self, event: WorkflowEvent[ApprovalParams], step: WorkflowStep) -> Any:
        request_id = event.payload["requestId"]
        requester = event.payload["requester"]
        amount = event.payload["amount"]
        db = self.env.DB

        async def record_request() -> dict[str, Any]:
            if amount <= 0:
                # No retry can mend the request: fail the step (and the instance) now.
                raise NonRetryableError(f"amount must be a positive number of cents, got {amount}")
            await db.executescript(SCHEMA)
            # REPLACE: a restarted instance records its request afresh as pending.
            await db.execute(
                "INSERT OR REPLACE INTO ExpenseRequest (id, requester, amount, status)"
                " VALUES (?, ?, ?, 'pending')",
                (request_id, requester, amount),
            )
            return {"status": "pending"}

        await step.do(
            "record-request",
            {"retries": {"limit": 3, "delay": "5 seconds"}, "timeout": "30 seconds"},
            record_request,
        )

        # Durable: the instance leaves memory and wakes at the same time after a restart.
        cool_off = str(self.env.COOL_OFF) if "COOL_OFF" in self.env else COOL_OFF
        await step.sleep("cool-off", cool_off)

        async def notify_approver() -> dict[str, Any]:
            # The application lists open tasks; its "approve" button sends the event.
            approver = str(self.env.APPROVER)
            await db.execute(
                "INSERT OR REPLACE INTO ApprovalTask (requestId, approver, instanceId)"
                " VALUES (?, ?, ?)",
                (request_id, approver, event.instance_id),
            )
            return {"approver": approver}

        await step.do(
            "notify-approver",
            {"retries": {"limit": 3, "delay": "10 seconds"}, "timeout": "15 seconds"},
            notify_approver,
        )

        reason = None
        try:
            decision = await step.wait_for_event(
                "approval", type="approval", timeout=DECISION_TIMEOUT
            )
        except EventTimeoutError:
            approved, by, reason = False, None, f"no decision within {DECISION_TIMEOUT}"
        else:
            answer = decision["payload"] if isinstance(decision["payload"], dict) else {}
            approved, by = answer.get("approved") is True, answer.get("by")

        async def record_decision() -> dict[str, Any]:
            status = "approved" if approved else "rejected"
            await db.execute(
                "UPDATE ExpenseRequest SET status = ?, decidedBy = ? WHERE id = ?",
                (status, by, request_id),
            )
            await db.execute("DELETE FROM ApprovalTask WHERE requestId = ?", (request_id,))
            return {"status": status}

        await step.do("record-decision", record_decision)
        output: dict[str, Any] = {"requestId": request_id, "approved": approved, "by": by}
        if reason is not None:
            output["reason"] = reason
        return output
