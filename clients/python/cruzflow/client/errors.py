"""The exceptions of the cruzflow client.

Every failure the client raises is a :class:`CruzflowError`. A refused call
carries the gRPC status ``code`` and the server's ``details`` (which say how to
mend the request); the outcome of an instance that did not complete is
:class:`WorkflowFailed` or :class:`WorkflowTerminated`, and ``code`` is
``None`` there::

    CruzflowError
    ├── NotFound (LookupError)
    │   ├── InstanceNotFound
    │   └── WorkflowNotFound
    ├── InstanceAlreadyExists
    ├── InvalidArgument (ValueError)
    ├── FailedPrecondition
    ├── ResourceExhausted
    ├── Unavailable (ConnectionError)
    ├── DeadlineExceeded (TimeoutError)
    ├── Unauthenticated
    ├── PermissionDenied
    ├── WorkflowFailed
    ├── WorkflowTerminated
    └── ResultTimeout (TimeoutError)

Any other gRPC code (``INTERNAL``, ``CANCELLED``, ...) is raised as a plain
:class:`CruzflowError` with that code.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from cruzflow.client._types import InstanceStatus

__all__ = [
    "CruzflowError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InstanceAlreadyExists",
    "InstanceNotFound",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ResultTimeout",
    "Unauthenticated",
    "Unavailable",
    "WorkflowFailed",
    "WorkflowNotFound",
    "WorkflowTerminated",
]


class CruzflowError(Exception):
    """Base class of every error the client raises.

    ``code`` is the gRPC status code of a refused call (``None`` for an
    instance's own outcome, such as :class:`WorkflowFailed`), ``details`` the
    server's message, and ``instance_id`` the instance the call was about,
    when there was one.
    """

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        instance_id: str | None = None,
    ) -> None:
        super().__init__(details)
        self.details = details
        self.code = code
        self.instance_id = instance_id

    def __repr__(self) -> str:
        code = self.code.name if self.code is not None else None
        return f"{type(self).__name__}({self.details!r}, code={code})"


class NotFound(CruzflowError, LookupError):
    """``NOT_FOUND``: the named instance, workflow or schedule does not exist."""


class InstanceNotFound(NotFound):
    """No instance has this id (never created, or purged after its retention)."""


class WorkflowNotFound(NotFound):
    """The server hosts no workflow of this name (see ``Client.list_workflows``)."""


class InstanceAlreadyExists(CruzflowError):
    """``ALREADY_EXISTS``: an instance with this id exists already.

    ``WorkflowBinding.create(..., if_exists="return")`` returns the existing
    instance instead of raising this.
    """


class InvalidArgument(CruzflowError, ValueError):
    """``INVALID_ARGUMENT``: a field is malformed, too large or out of range.

    Also raised before any call is made for arguments the client can check
    itself (params that are not JSON, an empty id, ...).
    """


class FailedPrecondition(CruzflowError):
    """``FAILED_PRECONDITION``: the call does not fit the instance's state
    (pausing a finished instance, sending an event to one, ...)."""


class ResourceExhausted(CruzflowError):
    """``RESOURCE_EXHAUSTED``: a limit was hit (e.g. a message over gRPC's size limit)."""


class Unavailable(CruzflowError, ConnectionError):
    """``UNAVAILABLE``: the server cannot be reached, or is shutting down.

    Raised only once the client's retry policy gave up, or for a call it must
    not retry (see :class:`cruzflow.client.RetryPolicy`).
    """


class DeadlineExceeded(CruzflowError, TimeoutError):
    """``DEADLINE_EXCEEDED``: the call's deadline (its ``timeout``) passed first."""


class Unauthenticated(CruzflowError):
    """``UNAUTHENTICATED``: the server wants credentials (``Client(token=...)``)."""


class PermissionDenied(CruzflowError):
    """``PERMISSION_DENIED``: the credentials do not allow this call."""


class WorkflowFailed(CruzflowError):
    """The instance ended ``errored``; raised by ``InstanceHandle.result()``.

    ``error_name`` and ``error_message`` are the exception class name and text
    the workflow failed with (``"ValueError"``, ``"bad input row 7"``), and
    ``error_traceback`` where it was raised (None if no code raised it).
    """

    def __init__(
        self,
        instance_id: str,
        error_name: str,
        error_message: str,
        error_traceback: str | None = None,
    ) -> None:
        super().__init__(
            f"instance {instance_id!r} failed: {error_name}: {error_message}",
            instance_id=instance_id,
        )
        self.error_name = error_name
        self.error_message = error_message
        self.error_traceback = error_traceback


class WorkflowTerminated(CruzflowError):
    """The instance was terminated; raised by ``InstanceHandle.result()``."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id!r} was terminated", instance_id=instance_id)


class ResultTimeout(CruzflowError, TimeoutError):
    """``InstanceHandle.result(timeout=...)`` ran out of time before the
    instance finished; ``status`` is its status at that moment. The instance
    itself goes on."""

    def __init__(self, instance_id: str, timeout: float, status: InstanceStatus) -> None:
        super().__init__(
            f"instance {instance_id!r} did not finish within {timeout:g} s (it is {status.value})",
            instance_id=instance_id,
        )
        self.timeout = timeout
        self.status = status


_BY_CODE: dict[grpc.StatusCode, type[CruzflowError]] = {
    grpc.StatusCode.ALREADY_EXISTS: InstanceAlreadyExists,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}

# The server names the field at fault first: "workflow: 'x' is not registered
# ..." for one create, "requests[3].workflow: ..." for an item of a batch;
# an unknown instance is "instance_id: no instance ...".
_WORKFLOW_FIELD = re.compile(r"^(?:requests\[\d+\]\.)?workflow:")


def from_rpc_error(error: grpc.RpcError, instance_id: str | None = None) -> CruzflowError:
    """The :class:`CruzflowError` for a failed gRPC call (``grpc.aio.AioRpcError``)."""
    if isinstance(error, grpc.aio.AioRpcError | grpc.Call):
        code = error.code()
        details = error.details() or code.name
    else:
        code, details = grpc.StatusCode.UNKNOWN, str(error) or "unknown gRPC error"
    kind: type[CruzflowError]
    if code == grpc.StatusCode.NOT_FOUND:
        if details.startswith("schedule_id:"):
            # An unknown schedule: neither an instance nor a workflow.
            kind = NotFound
        else:
            kind = WorkflowNotFound if _WORKFLOW_FIELD.match(details) else InstanceNotFound
    else:
        kind = _BY_CODE.get(code, CruzflowError)
    return kind(details, code=code, instance_id=instance_id)
