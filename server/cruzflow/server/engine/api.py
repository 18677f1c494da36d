"""The types workflow code is written against (re-exported by ``cruzflow.workflows``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

if TYPE_CHECKING:
    from cruzflow.server.engine.context import WorkflowStep

# Payload type; a bare WorkflowEntrypoint means WorkflowEntrypoint[Any].
P = TypeVar("P", default=Any)


@dataclass(frozen=True, slots=True)
class WorkflowEvent(Generic[P]):
    """What ``run`` is started with."""

    payload: P
    """The params given at creation, decoded from JSON."""
    timestamp: datetime
    """When the instance was created (UTC)."""
    instance_id: str
    """The instance's id."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """Handed to a step callback that takes one argument."""

    step_name: str
    """The name given to ``step.do``."""
    attempt: int
    """1 for the first attempt, 2 for the first retry, and so on."""
    instance_id: str
    """The instance running the step."""
    deadline: float
    """When this attempt times out, as ``time.time()`` seconds."""


class WorkflowEntrypoint(Generic[P]):
    """Base class of a workflow: subclass it and define ``run``.

    ``self.env`` holds the bindings the config declares: its ``[vars]``, its
    databases, and its workflows (here or on other servers).
    """

    env: Any

    def __init__(self, env: Any = None) -> None:
        self.env = env

    async def run(self, event: WorkflowEvent[P], step: WorkflowStep) -> Any:
        """The workflow's body. Its return value (JSON) is the instance's output."""
        raise NotImplementedError(
            f"{type(self).__name__} must define async def run(self, event, step)"
        )
