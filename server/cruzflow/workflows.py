"""Everything a workflow author imports.

from cruzflow.workflows import WorkflowEntrypoint, NonRetryableError

class Onboarding(WorkflowEntrypoint):
    async def run(self, event, step):
        user = await step.do("create-user", create_user)
        ...

It re-exports the authoring API (``cruzflow.sdk``), which imports nothing of
the server: importing it loads neither grpc, nor a database driver, nor the
engine. ``SqliteDatabase``, the server's database binding, is loaded only
when it is named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cruzflow.sdk.api import Env, RollbackContext, StepContext, WorkflowEntrypoint, WorkflowEvent
from cruzflow.sdk.durations import Duration
from cruzflow.sdk.errors import (
    ChildWorkflowError,
    EventTimeoutError,
    NonRetryableError,
    StepFailedError,
    StepTimeoutError,
    WorkflowError,
)
from cruzflow.sdk.retries import RetryConfig, StepConfig
from cruzflow.sdk.step import WorkflowStep

if TYPE_CHECKING:
    from cruzflow.server.bindings import SqliteDatabase

__all__ = [
    "ChildWorkflowError",
    "Duration",
    "Env",
    "EventTimeoutError",
    "NonRetryableError",
    "RetryConfig",
    "RollbackContext",
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


def __getattr__(name: str) -> Any:
    if name == "SqliteDatabase":
        from cruzflow.server.bindings import SqliteDatabase

        return SqliteDatabase
    raise AttributeError(f"module 'cruzflow.workflows' has no attribute {name!r}")
