"""The public surface: what authors import, and the parts that must agree."""

from __future__ import annotations

from datetime import timedelta

import pytest

import cruzflow.workflows as public
from cruzflow.sdk.durations import to_seconds
from cruzflow.sdk.retries import RetryConfig, StepConfig, resolve
from cruzflow.server import records as model
from cruzflow.v1 import workflows_pb2 as pb


def test_authoring_api_is_pinned() -> None:
    assert sorted(public.__all__) == [
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
    for name in public.__all__:
        if name != "Duration":
            assert getattr(public, name).__doc__, f"{name} has no docstring"


def test_engine_enums_match_the_proto() -> None:
    for status in model.InstanceStatus:
        assert pb.InstanceStatus.Value(f"INSTANCE_STATUS_{status.name}") == status.value
    for step in model.StepStatus:
        assert pb.StepStatus.Value(f"STEP_STATUS_{step.name}") == step.value
    assert len(pb.InstanceStatus.keys()) == len(model.InstanceStatus) + 1


def test_status_labels_are_the_models() -> None:
    assert [s.label for s in model.InstanceStatus] == [
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


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5 seconds", 5.0),
        ("1 second", 1.0),
        ("10 minutes", 600.0),
        ("1 day", 86400.0),
        ("2 weeks", 14 * 86400.0),
        ("250 milliseconds", 0.25),
        ("1.5 hours", 5400.0),
        ("1 month", 30 * 86400.0),
        ("1 year", 365 * 86400.0),
        (1500, 1.5),
        (timedelta(minutes=2), 120.0),
    ],
)
def test_durations(value: str | int | timedelta, seconds: float) -> None:
    assert to_seconds(value) == seconds


@pytest.mark.parametrize("bad", ["soon", "5 fortnights", "-1 seconds", -5, True, None])
def test_bad_durations_say_how_to_write_one(bad: object) -> None:
    with pytest.raises(ValueError, match="timeout"):
        to_seconds(bad, "timeout")  # type: ignore[arg-type]


def test_defaults_are_cloudflares() -> None:
    policy = resolve(None)
    assert (policy.max_attempts, policy.delay_s, policy.backoff, policy.timeout_s) == (
        6,
        10.0,
        "exponential",
        600.0,
    )
    assert [policy.retry_delay(n) for n in (1, 2, 3)] == [10.0, 20.0, 40.0]


def test_backoffs() -> None:
    linear = resolve({"retries": {"limit": 3, "delay": "2 seconds", "backoff": "linear"}})
    assert [linear.retry_delay(n) for n in (1, 2, 3)] == [2.0, 4.0, 6.0]
    constant = resolve(StepConfig(retries=RetryConfig(delay=500, backoff="constant")))
    assert [constant.retry_delay(n) for n in (1, 2)] == [0.5, 0.5]
    keywords = resolve(None, retries={"limit": 1}, timeout="30 seconds")
    assert (keywords.max_attempts, keywords.timeout_s, keywords.delay_s) == (2, 30.0, 10.0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"retry": {}}, "unknown option"),
        ({"retries": {"limit": -1}}, "retries.limit"),
        ({"retries": {"limit": 1.5}}, "retries.limit"),
        ({"retries": {"backoff": "fibonacci"}}, "retries.backoff"),
        ({"retries": {"tries": 3}}, "unknown option"),
        ({"timeout": 0}, "timeout"),
        ("30 seconds", "step config"),
    ],
)
def test_bad_step_config_is_named(config: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        resolve(config)  # type: ignore[arg-type]


def test_engine_imports_neither_grpc_nor_a_database_driver() -> None:
    import subprocess
    import sys

    code = (
        "import sys, cruzflow.server.engine.runtime;"
        "print(sorted(m for m in ('grpc', 'aiosqlite', 'sqlite3') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _imported_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` (or their submodules) a fresh interpreter has loaded
    after running ``statement``."""
    import subprocess
    import sys

    code = (
        f"import sys; {statement};"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {modules!r}"
        f" or any(m.startswith(p + '.') or m == p for p in {modules!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(eval(out.stdout))


def test_the_authoring_api_imports_nothing_of_the_server() -> None:
    loaded = _imported_after(
        "import cruzflow.workflows",
        ("grpc", "aiosqlite", "sqlite3", "cruzflow.server", "cruzflow.client", "opentelemetry"),
    )
    assert loaded == []
    # The database binding is there when it is named.
    named = _imported_after(
        "from cruzflow.workflows import SqliteDatabase", ("aiosqlite", "cruzflow.server.bindings")
    )
    assert {"aiosqlite", "cruzflow.server.bindings"} <= set(named)


def test_the_stores_do_not_import_the_engine() -> None:
    assert _imported_after("import cruzflow.server.store.sqlite", ("cruzflow.server.engine",)) == []
