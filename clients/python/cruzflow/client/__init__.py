"""The typed client of the cruzflow workflow service.

::

    from cruzflow.client import Client

    async with Client("127.0.0.1:50051") as client:
        onboarding = client.workflow("onboarding-workflow")
        instance = await onboarding.create({"userId": "42"}, id="onboarding-42")
        async for event in instance.watch():
            print(event.sequence, event.kind, event.status or event.step)
        print(await instance.result())

:class:`Client` is asynchronous (grpc.aio); :class:`SyncClient` offers the
same methods, blocking, for scripts. Results are the dataclasses and enums of
this package, failures the exceptions of :mod:`cruzflow.client.errors` (all
re-exported here). :func:`tls_credentials` makes the ``credentials`` of a
server that serves TLS. The package needs only ``grpcio`` and ``protobuf``.
"""

from cruzflow.client._client import Client, InstanceHandle, NewInstance, WorkflowBinding
from cruzflow.client._retry import RetryPolicy
from cruzflow.client._sync import SyncClient, SyncInstanceHandle, SyncWorkflowBinding
from cruzflow.client._tls import tls_credentials
from cruzflow.client._types import (
    CallerInfo,
    ErrorInfo,
    EventKind,
    InstanceCount,
    InstanceCounts,
    InstancePage,
    InstanceStatus,
    InstanceStatusInfo,
    PayloadSizes,
    RepairInfo,
    ScheduleInfo,
    StepInfo,
    StepKind,
    StepRef,
    StepStatus,
    WatchEvent,
    WorkflowInfo,
)
from cruzflow.client.errors import (
    CruzflowError,
    DeadlineExceeded,
    FailedPrecondition,
    InstanceAlreadyExists,
    InstanceNotFound,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ResultTimeout,
    Unauthenticated,
    Unavailable,
    WorkflowFailed,
    WorkflowNotFound,
    WorkflowTerminated,
)

__all__ = [
    "CallerInfo",
    "Client",
    "CruzflowError",
    "DeadlineExceeded",
    "ErrorInfo",
    "EventKind",
    "FailedPrecondition",
    "InstanceAlreadyExists",
    "InstanceCount",
    "InstanceCounts",
    "InstanceHandle",
    "InstanceNotFound",
    "InstancePage",
    "InstanceStatus",
    "InstanceStatusInfo",
    "InvalidArgument",
    "NewInstance",
    "NotFound",
    "PayloadSizes",
    "PermissionDenied",
    "RepairInfo",
    "ResourceExhausted",
    "ResultTimeout",
    "RetryPolicy",
    "ScheduleInfo",
    "StepInfo",
    "StepKind",
    "StepRef",
    "StepStatus",
    "SyncClient",
    "SyncInstanceHandle",
    "SyncWorkflowBinding",
    "Unauthenticated",
    "Unavailable",
    "WatchEvent",
    "WorkflowBinding",
    "WorkflowFailed",
    "WorkflowInfo",
    "WorkflowNotFound",
    "WorkflowTerminated",
    "tls_credentials",
]
