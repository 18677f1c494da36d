"""A client's ``watch_many`` (one WatchInstances stream) across a SIGKILL and a
graceful stop of the real server.

``cruzflow serve`` runs on a fixed port and the run's store (a SQLite file, or
a PostgreSQL database); it is killed with SIGKILL (or stopped with SIGTERM, which
ends the stream with UNAVAILABLE) and a new one is started on the same port and
store. The watch, started before, reopens by itself with each instance's last
sequence: every instance's events must come exactly once, 1..N, in order,
ending with its final event, as a fresh watch of each shows them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cruzflow.client import Client, EventKind, InstanceStatus, WatchEvent
from tests.conftest import ALL_WORKFLOWS, ON_POSTGRES, Stores, eventually
from tests.procs import Restarts

TIMEOUT = 60.0


@pytest.fixture
def restarts(tmp_path: Path, stores: Stores) -> Iterator[Restarts]:
    made = Restarts(tmp_path, ALL_WORKFLOWS, stores.url("watchmany") if ON_POSTGRES else None)
    yield made
    made.close()


def by_instance(events: list[WatchEvent]) -> dict[str, list[WatchEvent]]:
    out: dict[str, list[WatchEvent]] = {}
    for event in events:
        out.setdefault(event.instance_id, []).append(event)
    return out


async def assert_each_exactly_once(client: Client, seen: list[WatchEvent], ids: list[str]) -> None:
    """Every instance's events 1..N once, in order, its final event last, and
    the same events a fresh watch of it gives now."""
    got = by_instance(seen)
    assert set(got) == set(ids)
    for instance_id in ids:
        events = got[instance_id]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1)), instance_id
        assert events[-1].is_final
        assert not any(e.is_final for e in events[:-1])
        assert [e async for e in client.instance(instance_id).watch()] == events
        assert (await client.instance(instance_id).status()).last_sequence == len(events)


async def test_watch_many_survives_sigkill_and_restart(restarts: Restarts) -> None:
    await restarts.start()
    async with Client(restarts.address) as client:
        done = await client.workflow("three-steps").create()
        await done.result(timeout=TIMEOUT)
        sleepy = client.workflow("sleepy")
        slow = [
            await sleepy.create({"seconds": 2, "tag": f"k{i}"}, id=f"killed-{i}") for i in range(6)
        ]
        ids = [done.id, *(h.id for h in slow)]
        seen: list[WatchEvent] = []

        async def follow() -> None:
            async for event in client.watch_many(ids, timeout=TIMEOUT * 2):
                seen.append(event)

        watcher = asyncio.create_task(follow())

        async def all_in_slow_step() -> bool:
            started = {
                e.instance_id
                for e in seen
                if e.kind is EventKind.STEP_STARTED and e.step is not None and e.step.name == "slow"
            }
            return started == {h.id for h in slow}

        await eventually(all_in_slow_step, TIMEOUT)
        before = len(seen)
        restarts.current.kill()
        await restarts.start()
        await asyncio.wait_for(watcher, TIMEOUT * 2)

        assert len(seen) > before  # events of both server processes
        await assert_each_exactly_once(client, seen, ids)
        got = by_instance(seen)
        for handle in slow:
            events = got[handle.id]
            assert events[-1].status is InstanceStatus.COMPLETE
            attempts = [
                e.attempt
                for e in events
                if e.kind is EventKind.STEP_STARTED and e.step is not None and e.step.name == "slow"
            ]
            assert attempts == [1, 2]  # the attempt the kill cut short ran again


async def test_watch_many_resumes_after_a_graceful_stop(restarts: Restarts) -> None:
    """SIGTERM ends the stream with UNAVAILABLE; the watch comes back with its cursors."""
    await restarts.start()
    async with Client(restarts.address) as client:
        approvals = [await client.workflow("approval").create(id=f"graceful-{i}") for i in range(5)]
        ids = [h.id for h in approvals]
        seen: list[WatchEvent] = []

        async def follow() -> None:
            async for event in client.watch_many(ids, timeout=TIMEOUT * 2):
                seen.append(event)

        watcher = asyncio.create_task(follow())

        async def all_waiting() -> bool:
            waiting = {e.instance_id for e in seen if e.status is InstanceStatus.WAITING}
            return waiting == set(ids)

        await eventually(all_waiting, TIMEOUT)
        before = len(seen)
        assert await asyncio.to_thread(restarts.current.terminate) == 0
        await restarts.start()
        assert not watcher.done()
        for handle in approvals:
            await handle.send_event("approval", {"by": handle.id})
        await asyncio.wait_for(watcher, TIMEOUT * 2)

        assert len(seen) > before
        await assert_each_exactly_once(client, seen, ids)
        for handle in approvals:
            final = by_instance(seen)[handle.id][-1]
            assert final.output == {"approved": {"by": handle.id}, "type": "approval"}
