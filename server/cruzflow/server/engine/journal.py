"""Group commit: the one path by which the engine's writes reach the store.

Every instance adds its checkpoints to the open batch and gets back the
future of that batch. A single writer task applies the batch in one
transaction, publishes its events to watchers, and only then resolves the
future. While one batch commits the next one fills, so under load many
instances share one fsync, and a lone instance pays one commit per step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cruzflow.server.engine.model import (
    Batch,
    EventRecord,
    InboxEvent,
    InstanceRecord,
    InstanceUpdate,
    StepRecord,
)
from cruzflow.server.store.base import Store

if TYPE_CHECKING:
    from cruzflow.server.engine.observer import Observer

log = logging.getLogger("cruzflow.journal")

Durable = asyncio.Future[None]


class Journal:
    def __init__(
        self,
        store: Store,
        on_durable: Callable[[list[EventRecord]], None],
        observer: Observer | None = None,
    ) -> None:
        self._store = store
        self._observer = observer
        self._on_durable = on_durable
        self._loop = asyncio.get_running_loop()
        self._batch = Batch()
        self._future: Durable = self._loop.create_future()
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.rows = 0
        self.purged = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cruzflow-journal")

    # Each add returns the future that resolves once the write is durable.
    def insert_instance(self, record: InstanceRecord) -> Durable:
        self._batch.new_instances.append(record)
        return self._touch()

    def update_instance(self, update: InstanceUpdate) -> Durable:
        self._batch.instance_updates[update.id] = update
        return self._touch()

    def put_step(self, record: StepRecord) -> Durable:
        self._batch.steps[(record.instance_id, record.index)] = record
        return self._touch()

    def add_inbox(self, event: InboxEvent) -> Durable:
        self._batch.inbox.append(event)
        return self._touch()

    def consume(self, inbox_id: int, step_index: int) -> Durable:
        self._batch.consumed[inbox_id] = step_index
        return self._touch()

    def clear_steps(self, instance_id: str) -> Durable:
        """Delete the instance's steps; its step writes still pending go too."""
        batch = self._batch
        for key in [k for k in batch.steps if k[0] == instance_id]:
            del batch.steps[key]
        batch.cleared_steps.add(instance_id)
        return self._touch()

    def append(self, event: EventRecord) -> Durable:
        self._batch.events.append(event)
        return self._touch()

    def purge(self, ended_before: Mapping[str, int]) -> asyncio.Future[int]:
        """Delete finished instances with their steps, events and inbox rows, each
        only if it still ended before its time (ms) when the batch commits.

        The future gives how many instances went: all the purges of its batch.
        """
        batch = self._batch
        batch.purge.update(ended_before)
        durable = self._touch()
        count: asyncio.Future[int] = self._loop.create_future()

        def done(fut: Durable) -> None:
            exc = fut.exception()
            if count.done():  # its waiter was cancelled
                return
            if exc is not None:
                count.set_exception(exc)
            else:
                count.set_result(batch.purged)

        durable.add_done_callback(done)
        return count

    def _touch(self) -> Durable:
        self._wake.set()
        return self._future

    async def _run(self) -> None:
        while True:
            if not self._batch:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch, future = self._batch, self._future
            self._batch, self._future = Batch(), self._loop.create_future()
            began = time.perf_counter()
            try:
                await self._store.apply(batch)
            except Exception as exc:  # the store already said what failed
                log.error("commit of %d events failed: %s", len(batch.events), exc)
                future.set_exception(exc)
                # Nobody may be awaiting this batch; don't warn about that.
                future.exception()
                continue
            rows = (
                len(batch.new_instances)
                + len(batch.instance_updates)
                + len(batch.steps)
                + len(batch.events)
            )
            self.batches += 1
            self.purged += batch.purged
            self.rows += rows
            if self._observer is not None:
                self._observer.committed(time.perf_counter() - began, rows)
            if batch.events:
                self._on_durable(batch.events)
            future.set_result(None)

    async def close(self) -> None:
        """Commit what is pending, then stop the writer."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
