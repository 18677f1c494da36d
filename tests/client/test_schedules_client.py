"""The clients' schedule methods against a real in-process server: async and
sync, the ScheduleInfo they return, the schedule filter of listings and the
typed errors of bad input."""

from __future__ import annotations

import asyncio
import time

import pytest

from cruzflow.client import (
    Client,
    InstanceStatus,
    InvalidArgument,
    NotFound,
    ScheduleInfo,
    SyncClient,
)
from tests.conftest import Server


async def test_schedule_methods(client: Client) -> None:
    made = await client.create_schedule(
        "nightly",
        "three-steps",
        "0 3 * * *",
        params={"report": "daily"},
        timezone="Europe/Paris",
        catch_up="skip",
    )
    assert isinstance(made, ScheduleInfo)
    assert (made.id, made.workflow, made.cron, made.timezone) == (
        "nightly",
        "three-steps",
        "0 3 * * *",
        "Europe/Paris",
    )
    assert made.params == {"report": "daily"} and made.catch_up == "skip"
    assert made.origin == "api" and not made.paused and made.next_due_time is not None
    assert made.next_due_time.hour in (1, 2)  # 03:00 in Paris is 01:00 or 02:00 UTC
    assert [s.id for s in await client.list_schedules()] == ["nightly"]
    assert await client.list_schedules(workflow="sleepy") == []

    paused = await client.pause_schedule("nightly")
    assert paused.paused and paused.next_due_time is None
    assert (await client.get_schedule("nightly")).paused
    handle = await client.trigger_schedule("nightly")
    info = await handle.wait(timeout=30)
    assert info.status is InstanceStatus.COMPLETE and info.schedule_id == "nightly"
    listed = [i.id async for i in client.list_instances(schedule_id="nightly")]
    assert listed == [handle.id]
    assert not (await client.resume_schedule("nightly")).paused
    await client.delete_schedule("nightly")
    with pytest.raises(NotFound, match="no schedule 'nightly'"):
        await client.get_schedule("nightly")


async def test_schedule_errors(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="cron:"):
        await client.create_schedule("bad", "three-steps", "every monday")
    with pytest.raises(InvalidArgument, match="timezone:"):
        await client.create_schedule("bad", "three-steps", "0 9 * * MON", timezone="CET+1")
    with pytest.raises(InvalidArgument, match="catch_up"):
        await client.create_schedule("bad", "three-steps", "0 9 * * MON", catch_up="all")
    with pytest.raises(NotFound):
        await client.trigger_schedule("missing")
    assert await client.list_schedules() == []


async def test_sync_schedule_methods(server: Server) -> None:
    def script() -> None:
        with SyncClient(server.address) as client:
            client.create_schedule("tick", "three-steps", "* * * * * *")
            first = None
            for _ in range(3000):
                first = next(iter(client.list_instances(schedule_id="tick")), None)
                if first is not None:
                    break
                time.sleep(0.01)
            assert first is not None and first.id.startswith("sched-tick-")
            assert client.get_schedule("tick").last_instance_id is not None
            assert client.pause_schedule("tick").paused
            handle = client.trigger_schedule("tick")
            assert handle.id.startswith("sched-tick-now-")
            client.delete_schedule("tick")
            assert client.list_schedules() == []

    # The server runs on this loop: the blocking client in a thread.
    await asyncio.to_thread(script)
