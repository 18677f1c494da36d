"""The errors workflow code raises or catches (re-exported by ``cruzflow.workflows``).

Faults of a caller of the service and the engine's own control-flow signals
live in the server (``cruzflow.server.engine.errors``); these are the
workflow author's.
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


class ChildWorkflowError(StepFailedError):
    """The child instance of a ``step.child`` ended without completing: it
    errored or was terminated. ``child_id`` is its instance id; the error's
    message says how it ended (and the child's own error, if it errored)."""

    def __init__(self, step_name: str, error_name: str, error_message: str, child_id: str) -> None:
        super().__init__(step_name, error_name, error_message)
        self.child_id = child_id


class StepTimeoutError(WorkflowError):
    """An attempt of a step ran past its ``timeout``."""
