"""The example approval workflow (examples/approval), on the real engine.

The README drives it with the CLI's controls; these tests pin what those
controls rely on: a durable cool-off sleep, a wait for an "approval" event
whose payload decides the output, and a restart that runs it from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cruzflow.server.config import load_config
from cruzflow.testing import WorkflowTestEnv, sqlite_database
from tests.procs import ROOT

APPROVAL = load_config(ROOT / "examples" / "cruzflow.toml").workflows["approval-workflow"].cls
EXPENSE = {"requestId": "expense-7", "requester": "ada@example.com", "amount": 1200}
STEPS = ["record-request", "cool-off", "notify-approver", "approval", "record-decision"]


def _env(tmp_path: Path, cool_off: str = "5 seconds") -> dict[str, Any]:
    return {
        "DB": sqlite_database(tmp_path / "app.db"),
        "APPROVER": "grace@example.com",
        "COOL_OFF": cool_off,
    }


async def _rows(env: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    requests = await env["DB"].execute("SELECT id, status, decidedBy FROM ExpenseRequest")
    tasks = await env["DB"].execute("SELECT requestId, approver FROM ApprovalTask")
    return requests, tasks


async def test_an_approval_event_approves(tmp_path: Path) -> None:
    env = _env(tmp_path)
    async with WorkflowTestEnv(APPROVAL, env=env) as t:
        t.mock_event("approval", {"approved": True, "by": "grace@example.com"})
        run = await t.run(EXPENSE)
        requests, tasks = await _rows(env)
    assert run.status == "complete", run.error
    assert run.output == {"requestId": "expense-7", "approved": True, "by": "grace@example.com"}
    assert [(s.name, s.kind) for s in run.steps] == [
        ("record-request", "do"),
        ("cool-off", "sleep"),
        ("notify-approver", "do"),
        ("approval", "wait_for_event"),
        ("record-decision", "do"),
    ]
    assert run.step("cool-off").skipped_seconds == 5.0
    assert run.step("notify-approver").output == {"approver": "grace@example.com"}
    assert run.step("approval").event_type == "approval"
    assert requests == [("expense-7", "approved", "grace@example.com")]
    assert tasks == []


async def test_a_rejection_or_a_malformed_answer_rejects(tmp_path: Path) -> None:
    env = _env(tmp_path)
    async with WorkflowTestEnv(APPROVAL, env=env) as t:
        t.mock_event("approval", {"approved": False, "by": "grace@example.com"})
        no = await t.run(EXPENSE)
        t.clear_mocks()
        t.mock_event("approval", "yes please")
        odd = await t.run({**EXPENSE, "requestId": "expense-8"})
        requests, _ = await _rows(env)
    assert no.output == {"requestId": "expense-7", "approved": False, "by": "grace@example.com"}
    assert odd.output == {"requestId": "expense-8", "approved": False, "by": None}
    assert sorted(requests) == [
        ("expense-7", "rejected", "grace@example.com"),
        ("expense-8", "rejected", None),
    ]


async def test_an_amount_that_is_not_positive_fails_at_once(tmp_path: Path) -> None:
    env = _env(tmp_path)
    async with WorkflowTestEnv(APPROVAL, env=env) as t:
        run = await t.run({**EXPENSE, "amount": -5})
        requests, _ = await _rows_if_any(env)
    assert run.status == "errored"
    assert run.error is not None
    assert (run.error.name, run.error.message) == (
        "NonRetryableError",
        "amount must be a positive number of cents, got -5",
    )
    # Not retried, and the traceback names the line that refused it.
    assert run.step("record-request").attempts == 1
    assert run.error.traceback is not None
    assert 'raise NonRetryableError(f"amount must be a positive' in run.error.traceback
    assert [s.name for s in run.steps] == ["record-request"]
    assert requests == []


async def _rows_if_any(env: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The tables' rows, or nothing if no step ever made the tables."""
    tables = await env["DB"].execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    if not tables:
        return [], []
    return await _rows(env)


async def test_no_decision_within_a_day_rejects(tmp_path: Path) -> None:
    env = _env(tmp_path)
    async with WorkflowTestEnv(APPROVAL, env=env, skip_event_timeouts=True) as t:
        run = await t.run(EXPENSE)
        requests, _ = await _rows(env)
    assert run.status == "complete", run.error
    assert run.output == {
        "requestId": "expense-7",
        "approved": False,
        "by": None,
        "reason": "no decision within 1 day",
    }
    approval = run.step("approval")
    assert (approval.outcome, approval.error and approval.error.name) == (
        "failed",
        "EventTimeoutError",
    )
    assert requests == [("expense-7", "rejected", None)]


async def test_the_cool_off_is_durable_and_an_early_event_is_kept(tmp_path: Path) -> None:
    """Sleeping for real: the instance waits, survives a server restart in its
    sleep, and takes an event sent before its wait started."""
    env = _env(tmp_path, cool_off="1 second")
    async with WorkflowTestEnv(APPROVAL, env=env, skip_sleeps=False) as t:
        handle = await t.start(EXPENSE, id="expense-7")
        await handle.wait_for_status("waiting")
        asleep = await handle.snapshot()
        await t.restart_engine()
        await handle.send_event("approval", {"approved": True, "by": "grace@example.com"})
        run = await handle.result(timeout=30)
    assert [s.name for s in asleep.steps] == ["record-request", "cool-off"]
    assert asleep.step("cool-off").outcome == "running"
    assert run.status == "complete", run.error
    assert run.output["approved"] is True
    assert [s.name for s in run.steps] == STEPS
    assert run.step("record-request").attempts == 1  # replayed, not run again


async def test_pause_resume_terminate_and_restart(tmp_path: Path) -> None:
    """The README's controls, in its order, on the engine the server runs."""
    env = _env(tmp_path, cool_off="1 second")
    async with WorkflowTestEnv(APPROVAL, env=env, skip_sleeps=False) as t:
        seven = await t.start(EXPENSE, id="expense-7")
        await seven.wait_for_status("waiting")
        # Paused at once, or once the sleep has left memory.
        assert await seven.pause() in ("paused", "waitingForPause")
        await seven.wait_for_status("paused")
        await seven.resume()
        await seven.send_event("approval", {"approved": True, "by": "grace@example.com"})
        approved = await seven.result(timeout=30)

        eight = await t.start({**EXPENSE, "requestId": "expense-8", "amount": 90}, id="expense-8")
        await eight.wait_for_status("waiting")
        assert await eight.terminate() == "terminated"
        await eight.restart()
        await eight.send_event("approval", {"approved": False, "by": "grace@example.com"})
        # The run since the restart: the first run's termination does not count.
        rejected = await eight.result(timeout=30)
        requests, tasks = await _rows(env)
    assert approved.output == {
        "requestId": "expense-7",
        "approved": True,
        "by": "grace@example.com",
    }
    # The restart ran it from scratch: its steps are those of the second run only.
    assert [s.name for s in rejected.steps] == STEPS
    assert rejected.output == {
        "requestId": "expense-8",
        "approved": False,
        "by": "grace@example.com",
    }
    assert sorted(requests) == [
        ("expense-7", "approved", "grace@example.com"),
        ("expense-8", "rejected", "grace@example.com"),
    ]
    assert tasks == []
