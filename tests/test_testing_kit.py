"""cruzflow.testing: workflows run in-process on the real engine, with mocks and skipped waits."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

import cruzflow.testing as kit
from cruzflow.server.config import load_config
from cruzflow.server.records import EventKind
from cruzflow.testing import WorkflowTestEnv, sqlite_database
from cruzflow.workflows import (
    EventTimeoutError,
    NonRetryableError,
    StepContext,
    StepFailedError,
    WorkflowEntrypoint,
    WorkflowEvent,
    WorkflowStep,
)
from tests.procs import ROOT

DAY = 86400.0


def test_public_names_are_pinned() -> None:
    assert sorted(kit.__all__) == [
        "Divergence",
        "ErrorInfo",
        "InstanceHandle",
        "ReplayResult",
        "StepResult",
        "WorkflowRun",
        "WorkflowTestEnv",
        "sqlite_database",
    ]
    for name in kit.__all__:
        assert getattr(kit, name).__doc__, f"{name} has no docstring"
    for cls in (kit.WorkflowTestEnv, kit.InstanceHandle, kit.WorkflowRun, kit.StepResult):
        for name in dir(cls):
            if not name.startswith("_") and callable(getattr(cls, name)):
                assert getattr(cls, name).__doc__, f"{cls.__name__}.{name} has no docstring"


class Checkout(WorkflowEntrypoint):
    """Reserve, charge (retried), ship; every real body appends to env.calls."""

    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        calls: list[str] = self.env.calls

        def reserve() -> dict[str, Any]:
            calls.append("reserve")
            return {"reserved": event.payload["items"]}

        def charge(ctx: StepContext) -> dict[str, Any]:
            calls.append(f"charge:{ctx.attempt}")
            return {"charged": True, "attempt": ctx.attempt}

        def ship(ctx: StepContext) -> str:
            calls.append("ship")
            return f"shipped {reservation['reserved']} after charge attempt {paid['attempt']}"

        reservation = await step.do("reserve", reserve)
        paid = await step.do(
            "charge",
            {"retries": {"limit": 3, "delay": "5 seconds", "backoff": "exponential"}},
            charge,
        )
        return await step.do("ship", ship)


async def test_real_bodies_run_and_every_step_is_recorded() -> None:
    calls: list[str] = []
    async with WorkflowTestEnv(Checkout, env={"calls": calls}) as t:
        run = await t.run({"items": 2}, id="order-1")
    assert (run.id, run.status, run.error) == ("order-1", "complete", None)
    assert run.output == "shipped 2 after charge attempt 1"
    assert calls == ["reserve", "charge:1", "ship"]
    assert [(s.name, s.kind, s.outcome, s.attempts, s.mocked) for s in run.steps] == [
        ("reserve", "do", "succeeded", 1, False),
        ("charge", "do", "succeeded", 1, False),
        ("ship", "do", "succeeded", 1, False),
    ]
    assert run.step("charge").output == {"charged": True, "attempt": 1}
    with pytest.raises(KeyError, match=r"'refund'.*steps taken: 'reserve'#1"):
        run.step("refund")


async def test_a_mocked_result_replaces_the_body_and_is_checkpointed() -> None:
    calls: list[str] = []
    async with WorkflowTestEnv(Checkout, env={"calls": calls}) as t:
        t.mock_step_result("charge", {"charged": True, "attempt": 99})
        run = await t.run({"items": 1})
        _, stored = await t.engine.get(run.id)
    assert run.status == "complete"
    assert calls == ["reserve", "ship"]
    assert run.output == "shipped 1 after charge attempt 99"
    charge = run.step("charge")
    assert (charge.mocked_attempts, charge.attempts, charge.outcome) == ((1,), 1, "succeeded")
    # In the store as a real result is: a replay returns it from there.
    assert json.loads(stored[1].output or b"") == {"charged": True, "attempt": 99}


async def test_a_mocked_error_is_retried_by_the_steps_policy_then_the_body_runs() -> None:
    calls: list[str] = []
    async with WorkflowTestEnv(Checkout, env={"calls": calls}) as t:
        t.mock_step_error("charge", ConnectionError("card network down"), times=2)
        run = await t.run({"items": 1})
        events = await t.engine.store.read_events(run.id, 0, 100)
    assert run.status == "complete"
    assert calls == ["reserve", "charge:3", "ship"]
    charge = run.step("charge")
    assert (charge.attempts, charge.mocked_attempts, charge.error) == (3, (1, 2), None)
    assert charge.attempt_errors == (kit.ErrorInfo("ConnectionError", "card network down"),) * 2
    # Exponential back-off from 5 s: 5 s, then 10 s, both skipped.
    assert charge.skipped_seconds == 15.0
    failed = [e for e in events if e.kind is EventKind.ATTEMPT_FAILED]
    assert [(e.data["att"], e.data["delay"]) for e in failed] == [(1, 0), (2, 0)]


async def test_a_step_that_runs_out_of_retries_errors_the_instance() -> None:
    async with WorkflowTestEnv(Checkout, env={"calls": []}) as t:
        t.mock_step_error("charge", RuntimeError("declined"))
        run = await t.run({"items": 1})
    assert run.status == "errored"
    assert run.error == kit.ErrorInfo("RuntimeError", "declined")
    assert run.output is None
    charge = run.step("charge")
    assert (charge.outcome, charge.attempts, charge.mocked_attempts) == ("failed", 4, (1, 2, 3, 4))
    assert charge.error == kit.ErrorInfo("RuntimeError", "declined")
    assert len(charge.attempt_errors) == 4
    assert [s.name for s in run.steps] == ["reserve", "charge"]


class Refunds(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        try:
            await step.do("charge", lambda: "charged")
        except StepFailedError as exc:
            return {"refund": await step.do("refund", lambda: "refunded"), "why": exc.error_name}
        return {"refund": None}


async def test_a_non_retryable_mock_fails_at_once_and_run_may_catch_it() -> None:
    async with WorkflowTestEnv(Refunds) as t:
        t.mock_step_error("charge", NonRetryableError("card declined"))
        run = await t.run()
    assert run.output == {"refund": "refunded", "why": "NonRetryableError"}
    assert run.step("charge").attempts == 1
    assert run.step("charge").outcome == "failed"


async def test_a_mocked_error_class_and_a_later_result_mock_combine() -> None:
    async with WorkflowTestEnv(Refunds) as t:
        t.mock_step_result("charge", "mocked")
        t.mock_step_error("charge", TimeoutError, times=1)
        run = await t.run()
    assert run.output == {"refund": None}
    charge = run.step("charge")
    assert (charge.output, charge.attempts, charge.mocked_attempts) == ("mocked", 2, (1, 2))
    assert charge.attempt_errors == (kit.ErrorInfo("TimeoutError", ""),)


class Patient(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        retries = {"limit": 2, "delay": "200 milliseconds", "backoff": "linear"}
        return await step.do("call", lambda: "answered", retries=retries)


async def test_retry_delays_are_waited_when_not_skipped() -> None:
    async with WorkflowTestEnv(Patient, skip_retry_delays=False) as t:
        t.mock_step_error("call", ConnectionError("busy"), times=2)
        began = time.monotonic()
        run = await t.run()
        elapsed = time.monotonic() - began
        events = await t.engine.store.read_events(run.id, 0, 100)
    assert run.output == "answered"
    assert [e.data["delay"] for e in events if e.kind is EventKind.ATTEMPT_FAILED] == [200, 400]
    assert run.step("call").skipped_seconds == 0.0
    assert elapsed >= 0.6


class Repeats(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        return [await step.do("poll", lambda i=i: i) for i in range(3)]


async def test_a_mock_can_target_one_occurrence_of_a_step_name() -> None:
    async with WorkflowTestEnv(Repeats) as t:
        t.mock_step_result("poll", "second", occurrence=2)
        run = await t.run()
    assert run.output == [0, "second", 2]
    assert [s.mocked for s in run.steps] == [False, True, False]


def test_mocks_refuse_what_the_engine_would_refuse() -> None:
    t = WorkflowTestEnv(Refunds)
    with pytest.raises(TypeError, match="mocked result of 'charge': not JSON"):
        t.mock_step_result("charge", {1, 2})
    with pytest.raises(TypeError, match="expected an exception"):
        t.mock_step_error("charge", "declined")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times must be 1 or more"):
        t.mock_step_error("charge", RuntimeError(), times=0)
    with pytest.raises(ValueError, match="event type"):
        t.mock_event("")
    with pytest.raises(TypeError, match=r"subclass of cruzflow\.workflows\.WorkflowEntrypoint"):
        WorkflowTestEnv(dict)  # type: ignore[arg-type]


class Naps(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        await step.sleep("cool-off", event.payload.get("sleep", "3 days"))
        renewal = event.payload.get("until", event.timestamp.timestamp() + 30 * DAY)
        await step.sleep_until("renewal", renewal)
        return await step.do("after", lambda: "awake")


async def test_sleeps_are_skipped_and_say_how_long_they_were() -> None:
    async with WorkflowTestEnv(Naps) as t:
        run = await t.run({})
    assert run.output == "awake"
    cool_off, renewal, _ = run.steps
    assert (cool_off.kind, cool_off.outcome) == ("sleep", "succeeded")
    assert cool_off.skipped_seconds == pytest.approx(3 * DAY, abs=1)
    assert renewal.skipped_seconds == pytest.approx(30 * DAY, abs=5)


async def test_a_sleep_over_the_limit_still_fails_when_sleeps_are_skipped() -> None:
    async with WorkflowTestEnv(Naps) as t:
        run = await t.run({"sleep": "400 days"})
    assert run.status == "errored"
    assert run.error is not None and run.error.name == "ValueError"
    assert "limits.max_sleep" in run.error.message


async def test_sleeps_are_real_when_not_skipped() -> None:
    async with WorkflowTestEnv(Naps, skip_sleeps=False) as t:
        # Past the sleep_until, so only the short sleep waits.
        handle = await t.start({"sleep": "300 milliseconds", "until": 0})
        assert await handle.wait_for_status("waiting") == "waiting"
        run = await handle.result()
    assert run.output == "awake"
    assert run.step("cool-off").skipped_seconds == 0.0


class Approval(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        draft = await step.do("draft", lambda: {"doc": 7})
        decisions = []
        for _ in range(event.payload.get("reviews", 1)):
            try:
                got = await step.wait_for_event("review", type="approval", timeout="24 hours")
                decisions.append(got["payload"])
            except EventTimeoutError as exc:
                decisions.append(exc.error_name)
        return {"doc": draft["doc"], "decisions": decisions}


async def test_mocked_events_are_taken_by_the_waits_of_their_type_in_order() -> None:
    async with WorkflowTestEnv(Approval) as t:
        t.mock_event("approval", {"ok": True})
        t.mock_event("approval", {"ok": False})
        t.mock_event("unrelated", None)
        run = await t.run({"reviews": 2})
    assert run.output == {"doc": 7, "decisions": [{"ok": True}, {"ok": False}]}
    first = run.step("review")
    assert (first.kind, first.event_type, first.outcome) == (
        "wait_for_event",
        "approval",
        "succeeded",
    )
    assert first.output["type"] == "approval"
    assert first.output["payload"] == {"ok": True}


async def test_skipped_event_timeouts_raise_event_timeout_at_once() -> None:
    async with WorkflowTestEnv(Approval, skip_event_timeouts=True) as t:
        t.mock_event("approval", "yes")
        run = await t.run({"reviews": 2})
    # The mocked event is stored with the instance, so the first wait still gets it.
    assert run.output == {"doc": 7, "decisions": ["yes", "EventTimeoutError"]}
    second = run.step("review", occurrence=2)
    assert (second.outcome, second.error and second.error.name) == ("failed", "EventTimeoutError")
    assert second.skipped_seconds == pytest.approx(DAY, abs=1)


async def test_a_started_instance_is_observed_and_sent_events() -> None:
    async with WorkflowTestEnv(Approval) as t:
        handle = await t.start({"reviews": 1}, id="doc-7")
        draft = await handle.wait_for_step("draft")
        assert (draft.output, draft.outcome) == ({"doc": 7}, "succeeded")
        assert await handle.wait_for_status("waiting") == "waiting"
        assert await handle.status() == "waiting"
        snapshot = await handle.snapshot()
        assert [(s.name, s.outcome) for s in snapshot.steps] == [
            ("draft", "succeeded"),
            ("review", "running"),
        ]
        await handle.send_event("approval", {"by": "ada"})
        review = await handle.wait_for_step("review")
        run = await handle.result()
        with pytest.raises(ValueError, match="exists already"):
            await t.start({}, id="doc-7")
    assert review.output["payload"] == {"by": "ada"}
    assert run.output == {"doc": 7, "decisions": [{"by": "ada"}]}


async def test_waits_say_what_went_otherwise() -> None:
    async with WorkflowTestEnv(Approval) as t:
        handle = await t.start({"reviews": 0})
        with pytest.raises(AssertionError, match="ended complete without being paused"):
            await handle.wait_for_status("paused")
        with pytest.raises(AssertionError, match=r"without finishing step 'review'.*'draft'"):
            await handle.wait_for_step("review")
        with pytest.raises(ValueError, match="unknown status 'done'"):
            await handle.wait_for_status("done")


async def test_a_timeout_tells_where_the_instance_waits_and_how_to_go_on() -> None:
    async with WorkflowTestEnv(Approval) as t:
        with pytest.raises(TimeoutError) as caught:
            await t.run({"reviews": 1}, timeout=0.5)
    message = str(caught.value)
    assert "did not end within 0.5 s: it is waiting" in message
    assert "step 'review' waits for a 'approval' event" in message
    assert "mock_event('approval', ...)" in message


class Broken(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        await step.do("fine", lambda: 1)
        if event.payload == "bad-output":
            return {1, 2}
        raise KeyError("missing-key")


async def test_a_failing_workflow_ends_errored_with_its_error() -> None:
    async with WorkflowTestEnv(Broken) as t:
        raised = await t.run("raise")
        bad_output = await t.run("bad-output")
    assert raised.status == "errored"
    assert raised.error == kit.ErrorInfo("KeyError", "'missing-key'")
    assert [s.outcome for s in raised.steps] == ["succeeded"]
    assert bad_output.error is not None and bad_output.error.name == "WorkflowOutputError"


class Resumable(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        calls: list[str] = self.env.calls

        def fetch() -> Any:
            calls.append("fetch")
            raise AssertionError("the real fetch must not run: its mocked result is stored")

        def count() -> int:
            calls.append("count")
            return 41

        fetched = await step.do("fetch", fetch)
        counted = await step.do("count", count)
        go = await step.wait_for_event("go", type="go")
        return {"fetched": fetched, "n": counted + go["payload"]}


async def test_mocked_and_real_results_replay_from_the_store_after_an_engine_restart(
    tmp_path: Path,
) -> None:
    calls: list[str] = []
    async with WorkflowTestEnv(Resumable, env={"calls": calls}, directory=tmp_path) as t:
        t.mock_step_result("fetch", {"rows": 3})
        handle = await t.start()
        await handle.wait_for_status("waiting")
        await t.restart_engine()
        t.clear_mocks()
        await handle.send_event("go", 1)
        run = await handle.result()
    assert run.output == {"fetched": {"rows": 3}, "n": 42}
    assert calls == ["count"]
    assert run.step("fetch").mocked_attempts == (1,)
    assert (tmp_path / "cruzflow.db").exists()


async def test_a_wait_follows_the_engine_across_a_restart() -> None:
    async with WorkflowTestEnv(Resumable, env={"calls": []}) as t:
        t.mock_step_result("fetch", None)
        handle = await t.start()
        await handle.wait_for_status("waiting")
        waiter = asyncio.create_task(handle.result())
        await t.restart_engine()
        await handle.send_event("go", 1)
        run = await waiter
    assert run.output == {"fetched": None, "n": 42}


async def test_controls_and_a_result_after_a_restart_is_the_new_runs() -> None:
    async with WorkflowTestEnv(Resumable, env={"calls": []}) as t:
        t.mock_step_result("fetch", None)
        handle = await t.start()
        await handle.wait_for_status("waiting")
        # Waiting, it may still be leaving memory: paused at once, or once it has.
        assert await handle.pause() in ("paused", "waitingForPause")
        await handle.wait_for_status("paused")
        with pytest.raises(ValueError, match="is paused; only queued, running or waiting"):
            await handle.pause()
        assert await handle.resume() in ("running", "waiting")
        assert await handle.terminate() == "terminated"
        assert (await handle.result()).status == "terminated"
        assert await handle.restart() in ("running", "queued")
        # The end before the restart does not count: result() waits for this run's.
        waiter = asyncio.create_task(handle.result())
        await handle.wait_for_status("waiting")
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await handle.send_event("go", 1)
        run = await waiter
    assert run.status == "complete"
    assert run.output == {"fetched": None, "n": 42}


class UsesEnv(WorkflowEntrypoint):
    async def run(self, event: WorkflowEvent[Any], step: WorkflowStep) -> Any:
        async def save() -> str:
            await self.env.DB.executescript("CREATE TABLE IF NOT EXISTS greeting (text TEXT)")
            await self.env.DB.execute("INSERT INTO greeting VALUES (?)", (self.env.GREETING,))
            return str(self.env.GREETING)

        return await step.do("save", save)


async def test_env_holds_vars_and_database_bindings(tmp_path: Path) -> None:
    db = sqlite_database(tmp_path / "app.db")
    async with WorkflowTestEnv(UsesEnv, env={"DB": db, "GREETING": "hello"}) as t:
        run = await t.run()
        rows = await db.execute("SELECT text FROM greeting")
    assert run.output == "hello"
    assert rows == [("hello",)]


# ----------------------------------------------------- the example workflow

ONBOARDING = load_config(ROOT / "examples" / "cruzflow.toml").workflows["onboarding-workflow"].cls
ADA = {"userId": "42", "email": "ada@example.com", "plan": "pro"}


def _onboarding_env(tmp_path: Path) -> dict[str, Any]:
    return {"DB": sqlite_database(tmp_path / "app.db"), "EMAIL_API_URL": "outbox:"}


async def test_the_example_onboarding_runs_every_step(tmp_path: Path) -> None:
    env = _onboarding_env(tmp_path)
    async with WorkflowTestEnv(ONBOARDING, env=env) as t:
        run = await t.run(ADA)
        outbox = await env["DB"].execute("SELECT recipient, subject FROM outbox")
        done = await env["DB"].execute("SELECT onboardingComplete FROM AuthIdentity")
        free = await t.run({**ADA, "userId": "43", "plan": "free"})
    assert run.status == "complete", run.error
    assert run.output["success"] is True
    assert [s.name for s in run.steps] == [
        "create-default-resources",
        "send-welcome-email",
        "setup-billing",
        "mark-complete",
    ]
    assert outbox == [("ada@example.com", "Welcome!")]
    assert done == [(1,)]
    assert "setup-billing" not in [s.name for s in free.steps]


async def test_the_example_onboarding_with_its_email_mocked_and_billing_flaky(
    tmp_path: Path,
) -> None:
    env = _onboarding_env(tmp_path)
    async with WorkflowTestEnv(ONBOARDING, env=env) as t:
        t.mock_step_result("send-welcome-email", {"queued": True, "via": "mock"})
        t.mock_step_error("setup-billing", ConnectionError("stripe is down"), times=2)
        run = await t.run(ADA)
        outbox = await env["DB"].execute("SELECT * FROM outbox")
        plans = await env["DB"].execute("SELECT userId, plan FROM Subscription")
    assert run.status == "complete", run.error
    assert run.step("send-welcome-email").output == {"queued": True, "via": "mock"}
    assert outbox == []
    billing = run.step("setup-billing")
    assert (billing.attempts, billing.mocked_attempts) == (3, (1, 2))
    # retries: {limit: 2, delay: "30 seconds"} and the default exponential back-off.
    assert billing.skipped_seconds == 90.0
    assert plans == [("42", "pro")]


async def test_the_example_onboarding_errors_when_email_fails_for_good(tmp_path: Path) -> None:
    async with WorkflowTestEnv(ONBOARDING, env=_onboarding_env(tmp_path)) as t:
        t.mock_step_error("send-welcome-email", ConnectionError("smtp refused"))
        run = await t.run(ADA)
    assert run.status == "errored"
    assert run.error == kit.ErrorInfo("ConnectionError", "smtp refused")
    assert run.step("send-welcome-email").attempts == 4
    assert [s.name for s in run.steps] == ["create-default-resources", "send-welcome-email"]
