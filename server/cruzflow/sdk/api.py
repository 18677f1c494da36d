"""The types workflow code is written against (re-exported by ``cruzflow.workflows``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic

from typing_extensions import TypeVar

if TYPE_CHECKING:
    from cruzflow.sdk.step import WorkflowStep

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

    def __getitem__(self, key: str) -> Any:
        """``event["payload"]``, ``event["timestamp"]``, ``event["instanceId"]``:
        the event as Cloudflare's Python Workflows hand it to ``run`` (a dict)."""
        if key == "payload":
            return self.payload
        if key == "timestamp":
            return self.timestamp
        if key in ("instanceId", "instance_id"):
            return self.instance_id
        raise KeyError(f"{key!r}: an event has 'payload', 'timestamp' and 'instanceId'")


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


@dataclass(frozen=True, slots=True)
class RollbackContext:
    """Handed to a step's ``rollback`` callback that takes one argument: what
    it undoes, and why."""

    step_name: str
    """The name of the step being rolled back."""
    occurrence: int
    """Which step of that name in the run (1 for the first)."""
    output: Any
    """The result the step returned (and stored)."""
    error_name: str
    """Why the instance is rolled back: the error it failed with (its class
    name), or ``"Terminated"`` for a terminate with rollback."""
    error_message: str
    attempt: int
    """1 for the rollback's first attempt, 2 for its first retry, and so on."""
    instance_id: str


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


class Env:
    """Attribute access to the vars and bindings of the config: ``self.env.DB``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        known = ", ".join(sorted(self.__dict__)) or "none"
        raise AttributeError(
            f"env has no binding or var {name!r} (declared: {known}); add it to the config's "
            f"[vars], [[sqlite_databases]] or [[workflows]]"
        )

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.__dict__

    async def aclose(self) -> None:
        """Close the bindings that hold connections (databases, workflow clients):
        each value with an ``aclose_binding`` coroutine method."""
        for value in self.__dict__.values():
            closer = getattr(type(value), "aclose_binding", None)
            if closer is not None:
                await closer(value)
