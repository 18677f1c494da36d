"""Watchers and waiters of the typed client across real server restarts.

A real ``cruzflow serve`` process listens on a fixed port; it is killed with
SIGKILL (or stopped with SIGTERM) and a new one is started on the same port
and store. The client's watch and result calls, started before, reconnect by
themselves: the watcher must see every sequence number exactly once, 1..N,
ending with the final event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from cruzflow.client import Client, EventKind, InstanceStatus, WatchEvent
from tests.conftest import ALL_WORKFLOWS, eventually
from tests.procs import Restarts

TIMEOUT = 60.0


@pytest.fixture
def restarts(tmp_path: Path) -> Iterator[Restarts]:
    made = Restarts(tmp_path, ALL_WORKFLOWS)
    yield made
    made.close()


def assert_exactly_once(events: list[WatchEvent]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].is_final
    assert not any(e.is_final for e in events[:-1])


async def test_watch_survives_sigkill_and_restart(restarts: Restarts) -> None:
    await restarts.start()
    async with Client(restarts.address) as client:
        handle = await client.workflow("sleepy").create({"seconds": 2, "tag": "k"}, id="killed")
        seen: list[WatchEvent] = []

        async def follow() -> None:
            async for event in handle.watch():
                seen.append(event)

        watcher = asyncio.create_task(follow())
        outcome = asyncio.create_task(handle.result())

        async def in_slow_step() -> bool:
            return any(
                e.kind is EventKind.STEP_STARTED and e.step is not None and e.step.name == "slow"
                for e in seen
            )

        await eventually(in_slow_step, TIMEOUT)
        cut_after = seen[-1].sequence
        restarts.current.kill()
        await restarts.start()

        await asyncio.wait_for(watcher, TIMEOUT)
        output = await asyncio.wait_for(outcome, TIMEOUT)

        assert_exactly_once(seen)
        assert len(seen) > cut_after  # events of both server processes
        assert seen[-1].status is InstanceStatus.COMPLETE
        assert seen[-1].output == output == {"slow_attempt": 2, "tag": "k"}
        slow_attempts = [
            e.attempt
            for e in seen
            if e.kind is EventKind.STEP_STARTED and e.step is not None and e.step.name == "slow"
        ]
        assert slow_attempts == [1, 2]  # the attempt the kill cut short ran again
        # Nothing was missed: a watch from the start now gives the same events.
        assert [e async for e in handle.watch()] == seen
        assert (await handle.status()).last_sequence == len(seen)


async def test_watch_and_result_survive_a_graceful_restart(restarts: Restarts) -> None:
    await restarts.start()
    async with Client(restarts.address) as client:
        handle = await client.workflow("approval").create(id="graceful")
        seen: list[WatchEvent] = []

        async def follow() -> None:
            async for event in handle.watch():
                seen.append(event)

        watcher = asyncio.create_task(follow())
        outcome = asyncio.create_task(handle.result())

        async def waiting() -> bool:
            return any(e.status is InstanceStatus.WAITING for e in seen)

        await eventually(waiting, TIMEOUT)
        before = len(seen)
        # SIGTERM ends the watch and the long-poll with UNAVAILABLE; both come back.
        assert await asyncio.to_thread(restarts.current.terminate) == 0
        await restarts.start()
        assert not watcher.done() and not outcome.done()

        await handle.send_event("approval", {"by": "restart"})
        output = await asyncio.wait_for(outcome, TIMEOUT)
        await asyncio.wait_for(watcher, TIMEOUT)

        assert output == {"approved": {"by": "restart"}, "type": "approval"}
        assert_exactly_once(seen)
        assert len(seen) > before
        assert seen[-1].output == output
        assert [e async for e in handle.watch()] == seen
