"""Workflows of tests/e2e/test_telemetry_logs.py, run in a real server process."""

from __future__ import annotations

import logging
from typing import Any

from cruzflow.workflows import WorkflowEntrypoint, WorkflowEvent, WorkflowStep


class LogsThenFails(WorkflowEntrypoint):
    """One step that logs a warning of its own, then fails for good."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def charge() -> None:
            logging.getLogger("billing").warning("charging card %s", event.payload["card"])
            raise ValueError("card declined")

        await step.do("charge", charge, retries={"limit": 0})
