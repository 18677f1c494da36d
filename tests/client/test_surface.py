"""The client's public surface: what ``cruzflow.client`` exports, all of it documented."""

from __future__ import annotations

import inspect

import cruzflow.client as public
from cruzflow.client import InstanceStatus, StepKind, StepStatus
from cruzflow.v1 import workflows_pb2 as pb


def test_exports_are_pinned_and_documented() -> None:
    assert sorted(public.__all__) == [
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
    assert public.__doc__
    undocumented = []
    for name in public.__all__:
        exported = getattr(public, name)
        if not exported.__doc__:
            undocumented.append(name)
        for member, value in vars(exported).items():
            if member.startswith("_") or not (
                inspect.isfunction(value) or isinstance(value, property | classmethod)
            ):
                continue
            if not getattr(value, "__doc__", None):
                undocumented.append(f"{name}.{member}")
    assert undocumented == []


def test_enums_cover_the_proto() -> None:
    for enum, proto, prefix in (
        (InstanceStatus, pb.InstanceStatus, "INSTANCE_STATUS_"),
        (StepStatus, pb.StepStatus, "STEP_STATUS_"),
        (StepKind, pb.StepKind, "STEP_KIND_"),
    ):
        names = {n.removeprefix(prefix) for n, _ in proto.items()} - {"UNSPECIFIED"}
        assert names <= set(enum.__members__), enum
    assert [s.value for s in InstanceStatus] == [
        "queued",
        "running",
        "paused",
        "waiting",
        "waitingForPause",
        "complete",
        "errored",
        "terminated",
        "unknown",
    ]
    assert {s for s in InstanceStatus if s.finished} == {
        InstanceStatus.COMPLETE,
        InstanceStatus.ERRORED,
        InstanceStatus.TERMINATED,
    }
