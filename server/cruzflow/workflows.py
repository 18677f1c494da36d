"""Everything a workflow author imports.

from cruzflow.workflows import WorkflowEntrypoint, NonRetryableError

class Onboarding(WorkflowEntrypoint):
    async def run(self, event, step):
        user = await step.do("create-user", create_user)
        ...
"""

from cruzflow.server.bindings import Env, SqliteDatabase
from cruzflow.server.engine.api import StepContext, WorkflowEntrypoint, WorkflowEvent
from cruzflow.server.engine.context import WorkflowStep
from cruzflow.server.engine.durations import Duration
from cruzflow.server.engine.errors import (
    EventTimeoutError,
    NonRetryableError,
    StepFailedError,
    StepTimeoutError,
    WorkflowError,
)
from cruzflow.server.engine.retries import RetryConfig, StepConfig

__all__ = [
    "Duration",
    "Env",
    "EventTimeoutError",
    "NonRetryableError",
    "RetryConfig",
    "SqliteDatabase",
    "StepConfig",
    "StepContext",
    "StepFailedError",
    "StepTimeoutError",
    "WorkflowEntrypoint",
    "WorkflowError",
    "WorkflowEvent",
    "WorkflowStep",
]
