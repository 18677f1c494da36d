"""When sleeping and waiting instances wake.

The store's wake index holds every wake-up; the ones due within the next
minute are kept in a heap in memory, refilled from the index every half
minute, so a hundred thousand sleepers cost nothing until they are due.
A due wake-up is handed to ``on_due`` (Controls.wake), which loads the
instance and queues it for a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from cruzflow.server.engine.core import Core, ms
from cruzflow.server.store.base import StoreError

log = logging.getLogger("cruzflow.engine")

# Wake-ups due within this horizon are kept in memory; the rest are read
# from the store's wake index as they come into it.
HORIZON_MS = 60_000


class Timers:
    def __init__(self, core: Core) -> None:
        self._core = core
        self._heap: list[tuple[int, str]] = []
        self._due: dict[str, int] = {}
        self._kick = asyncio.Event()
        # Set by the engine: wake an instance whose time has come.
        self.on_due: Callable[[str], Coroutine[Any, Any, None]] | None = None

    def schedule(self, instance_id: str, at: int) -> None:
        """Remember a wake-up if it is due within the horizon (else the store has it)."""
        if at <= ms() + HORIZON_MS and self._due.get(instance_id) != at:
            self._due[instance_id] = at
            heapq.heappush(self._heap, (at, instance_id))
            self._kick.set()

    def cancel(self, instance_id: str) -> None:
        """Forget the instance's wake-up (it was paused, ended, or woken otherwise)."""
        self._due.pop(instance_id, None)

    async def loop(self) -> None:
        refill_at = 0
        while True:
            now = ms()
            if now >= refill_at:
                try:
                    due = await self._core.store.due_wakes(now + HORIZON_MS, 100_000)
                except StoreError as exc:
                    # A store that cannot be read now must not end the timers for good.
                    log.warning("reading the wake-ups failed (%s); trying again in 1 s", exc)
                    refill_at = now + 1000
                    due = []
                else:
                    refill_at = now + HORIZON_MS // 2
                for instance_id, at in due:
                    self.schedule(instance_id, at)
            while self._heap and self._heap[0][0] <= ms():
                at, instance_id = heapq.heappop(self._heap)
                if self._due.get(instance_id) == at:
                    del self._due[instance_id]
                    assert self.on_due is not None
                    self._core.spawn(self.on_due(instance_id))
            until = min(refill_at, self._heap[0][0]) if self._heap else refill_at
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(until - ms(), 0) / 1000)
