"""The error tree of the engine.

Three families, kept apart on purpose:

* ``WorkflowError`` and its subclasses are what workflow code sees
  (``NonRetryableError`` it raises, ``StepFailedError`` it may catch); they
  are the authoring API's (``cruzflow.sdk.errors``), re-exported here.
* ``ServiceError`` and its subclasses are what a caller of the service did
  wrong (bad id, unknown workflow, ...); the transport maps each to a gRPC
  status code.
* Internal control-flow signals derive from ``BaseException`` so that a
  workflow's ``except Exception`` cannot swallow them.
"""

from __future__ import annotations

from cruzflow.sdk.errors import (
    ChildWorkflowError,
    EventTimeoutError,
    NonRetryableError,
    StepFailedError,
    StepTimeoutError,
    WorkflowError,
)

__all__ = [
    "AlreadyExists",
    "ChildWorkflowError",
    "EventTimeoutError",
    "FailedPrecondition",
    "FatalWorkflowError",
    "InvalidArgument",
    "NonDeterminismError",
    "NonRetryableError",
    "NotFound",
    "ResourceExhausted",
    "ServiceError",
    "StepFailedError",
    "StepTimeoutError",
    "Suspend",
    "Terminating",
    "Unavailable",
    "WorkflowError",
]


class ServiceError(Exception):
    """A request the service refuses; the message says how to mend it."""


class InvalidArgument(ServiceError):
    """A field of the request is malformed, too large or out of range."""


class NotFound(ServiceError):
    """The named instance or workflow does not exist."""


class AlreadyExists(ServiceError):
    """An instance with that id exists already."""


class FailedPrecondition(ServiceError):
    """The request does not fit the instance's current state."""


class ResourceExhausted(ServiceError):
    """A configured limit would be exceeded."""


class Unavailable(ServiceError):
    """The service is shutting down or its store cannot be written."""


class FatalWorkflowError(BaseException):
    """Ends the instance ``errored`` at once; ``run`` cannot catch it.

    Raised for faults of the workflow as a whole (its code changed under it,
    it broke a limit), where letting ``run`` go on would be wrong.
    """

    def __init__(self, error_name: str, error_message: str) -> None:
        super().__init__(f"{error_name}: {error_message}")
        self.error_name = error_name
        self.error_message = error_message


class NonDeterminismError(FatalWorkflowError):
    """Replay found a different step than the one recorded at that position.

    The workflow's code changed under a running instance. The instance fails
    with this error rather than hand a stored result to the wrong step.
    """

    def __init__(self, message: str) -> None:
        super().__init__("NonDeterminismError", message)


class Suspend(BaseException):
    """Unwinds ``run`` without recording anything (the server is stopping)."""


class Terminating(BaseException):
    """Unwinds ``run`` at its first step not yet done, once the instance was
    terminated with rollback: its compensations run, then it ends terminated."""
