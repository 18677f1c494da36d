"""The error tree of the engine.

Three families, kept apart on purpose:

* ``WorkflowError`` and its subclasses are what workflow code sees
  (``NonRetryableError`` it raises, ``StepFailedError`` it may catch).
* ``ServiceError`` and its subclasses are what a caller of the service did
  wrong (bad id, unknown workflow, ...); the transport maps each to a gRPC
  status code.
* Internal control-flow signals derive from ``BaseException`` so that a
  workflow's ``except Exception`` cannot swallow them.
"""

from __future__ import annotations


class WorkflowError(Exception):
    """Base class of the errors that workflow code raises or catches."""


class NonRetryableError(WorkflowError):
    """Raise inside a step to fail it at once, without further retries."""


class StepFailedError(WorkflowError):
    """A step failed after all its attempts; raised into ``run``.

    ``error_name`` and ``error_message`` describe the last attempt's error (the
    original exception's class name and text). They are the same whether the
    step failed just now or on an earlier execution that is being replayed.
    If ``run`` does not catch it, the instance ends ``errored`` with that
    name and message. ``error_traceback`` is where the last attempt's error
    was raised (None when the step did not raise, e.g. it timed out).
    """

    def __init__(
        self,
        step_name: str,
        error_name: str,
        error_message: str,
        error_traceback: str | None = None,
    ) -> None:
        super().__init__(f"step {step_name!r} failed: {error_name}: {error_message}")
        self.step_name = step_name
        self.error_name = error_name
        self.error_message = error_message
        self.error_traceback = error_traceback


class EventTimeoutError(StepFailedError):
    """``step.wait_for_event`` timed out before an event of its type arrived."""


class StepTimeoutError(WorkflowError):
    """An attempt of a step ran past its ``timeout``."""


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
