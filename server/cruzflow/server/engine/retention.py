"""Retention: finished instances are purged once ``limits.retention_s`` has
passed since they ended, in bounded chunks, through the journal."""

from __future__ import annotations

import asyncio
import logging

from cruzflow.server.engine.core import Core, ms

log = logging.getLogger("cruzflow.engine")


class Retention:
    def __init__(self, core: Core) -> None:
        self._core = core

    async def loop(self) -> None:
        interval = self._core.limits.purge_interval_s
        while True:
            try:
                purged = await self.purge_finished()
                if purged:
                    log.info("purged %d finished instance(s) past their retention", purged)
            except Exception as exc:  # the store said what failed; try again later
                log.error("retention purge failed (%s); retrying in %g s", exc, interval)
            await asyncio.sleep(interval)

    async def purge_finished(self) -> int:
        """Delete the finished instances that ended more than ``retention_s`` ago,
        with their steps, events and inbox; returns how many went.

        One transaction per ``purge_chunk`` instances, each through the journal,
        so live writes queue behind one bounded delete at a time.
        """
        chunk = self._core.limits.purge_chunk
        total = 0
        # A failing store would hold the purge (and its fenced instances) until it recovers.
        while not self._core.stopping and self._core.journal.fault is None:
            before = ms() - int(self._core.limits.retention_s * 1000)
            candidates = await self._core.store.ended_before(before, chunk)
            fenced = await self.fence_idle(candidates)
            if not fenced:
                break
            try:
                purged = await self._core.journal.purge(
                    dict.fromkeys((i for i, _ in fenced), before)
                )
            finally:
                self.unfence(fenced)
            total += purged
            if len(candidates) < chunk or purged == 0:
                break
        return total

    async def fence_idle(self, ids: list[str]) -> list[tuple[str, asyncio.Lock]]:
        """Take the control lock (see ``Controls.hold``) of each instance that nobody has in
        memory, so that no control call loads one while its purge commits (it
        gets NotFound after); skip the others, they go in a later round."""
        fenced: list[tuple[str, asyncio.Lock]] = []
        for instance_id in ids:
            lock = asyncio.Lock()
            await lock.acquire()  # a new lock: taken at once
            # No await from this check to the entry, so no control call slips between.
            if instance_id in self._core.live or instance_id in self._core.locks:
                continue
            self._core.locks[instance_id] = (lock, 1)
            fenced.append((instance_id, lock))
        return fenced

    def unfence(self, fenced: list[tuple[str, asyncio.Lock]]) -> None:
        for instance_id, lock in fenced:
            lock.release()
            _, users = self._core.locks[instance_id]
            if users <= 1:
                del self._core.locks[instance_id]
            else:
                self._core.locks[instance_id] = (lock, users - 1)
