"""The seed's onboarding workflow, ported to cruzflow."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from typing import Any, TypedDict

from cruzflow.workflows import WorkflowEntrypoint, WorkflowEvent, WorkflowStep

SCHEMA = """
CREATE TABLE IF NOT EXISTS Project (id TEXT PRIMARY KEY, name TEXT NOT NULL, orgId TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS AuthIdentity (
    id TEXT PRIMARY KEY, email TEXT, onboardingComplete INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS Subscription (userId TEXT PRIMARY KEY, plan TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, recipient TEXT NOT NULL, subject TEXT NOT NULL, body TEXT NOT NULL);
"""


class OnboardingParams(TypedDict):
    userId: str
    email: str
    plan: str


class OnboardingWorkflow(WorkflowEntrypoint[OnboardingParams]):
    async def run(self, event: WorkflowEvent[OnboardingParams], step: WorkflowStep) -> Any:
        user_id = event.payload["userId"]
        email = event.payload["email"]
        plan = event.payload["plan"]
        db = self.env.DB

        async def create_default_resources() -> dict[str, Any]:
            await db.executescript(SCHEMA)
            # A fixed id per user keeps a retried attempt from adding a second project.
            project_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"project:{user_id}"))
            await db.execute(
                "INSERT OR IGNORE INTO Project (id, name, orgId) VALUES (?, ?, ?)",
                (project_id, "My First Project", user_id),
            )
            await db.execute(
                "INSERT OR IGNORE INTO AuthIdentity (id, email) VALUES (?, ?)", (user_id, email)
            )
            return {"projectCreated": True, "projectId": project_id}

        resources = await step.do(
            "create-default-resources",
            {
                "retries": {"limit": 3, "delay": "5 seconds", "backoff": "exponential"},
                "timeout": "30 seconds",
            },
            create_default_resources,
        )

        async def send_welcome_email() -> dict[str, Any]:
            message = {
                "to": email,
                "subject": "Welcome!",
                "html": "<h1>Welcome to our platform</h1>",
            }
            return await send_email(self.env, message)

        await step.do(
            "send-welcome-email",
            {"retries": {"limit": 3, "delay": "10 seconds"}, "timeout": "15 seconds"},
            send_welcome_email,
        )

        if plan != "free":

            async def setup_billing() -> dict[str, Any]:
                await db.execute(
                    "INSERT OR REPLACE INTO Subscription (userId, plan) VALUES (?, ?)",
                    (user_id, plan),
                )
                return {"plan": plan}

            await step.do(
                "setup-billing",
                {"retries": {"limit": 2, "delay": "30 seconds"}, "timeout": "60 seconds"},
                setup_billing,
            )

        async def mark_complete() -> None:
            await db.execute(
                "UPDATE AuthIdentity SET onboardingComplete = 1 WHERE id = ?", (user_id,)
            )

        await step.do("mark-complete", mark_complete)
        return {"success": True, "userId": user_id, "projectId": resources["projectId"]}


async def send_email(env: Any, message: dict[str, str]) -> dict[str, Any]:
    """Post the message to EMAIL_API_URL, or keep it in DB's outbox for "outbox:"."""
    url = str(env.EMAIL_API_URL)
    if url == "outbox:":
        await env.DB.execute(
            "INSERT INTO outbox (recipient, subject, body) VALUES (?, ?, ?)",
            (message["to"], message["subject"], message["html"]),
        )
        return {"queued": True, "via": "outbox"}
    request = urllib.request.Request(
        url,
        data=json.dumps(message).encode(),
        headers={
            "Authorization": f"Bearer {env.EMAIL_API_KEY}",
            "Content-Type": "application/json",
        },
        method="POST",
    )

    def post() -> int:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)

    status = await asyncio.to_thread(post)
    return {"queued": True, "via": url, "status": status}
