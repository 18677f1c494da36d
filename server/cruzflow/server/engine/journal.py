"""Group commit: the one path by which the engine's writes reach the store.

Every instance adds its checkpoints to the open batch and gets back the
future of that batch. A single writer task applies the batch in one
transaction, publishes its events to watchers, and only then resolves the
future. While one batch commits the next one fills, so under load many
instances share one fsync, and a lone instance pays one commit per step.

A commit that fails for a passing reason (disk full, database locked or
read-only: ``StoreError.transient``) is held, not dropped: the writer applies
the same batch again with back-off until it lands, and no later batch
commits before it, so writes stay in order. Meanwhile ``fault`` is set (the
engine refuses new work, so what waits stays bounded) and the futures of the
held writes stay pending; they resolve once the batch lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cruzflow.server.records import (
    Batch,
    EventRecord,
    Gate,
    InboxEvent,
    InstanceRecord,
    InstanceUpdate,
    Lease,
    Refusal,
    StepRecord,
)
from cruzflow.server.store.base import Store, StoreError

if TYPE_CHECKING:
    from cruzflow.server.engine.observer import Observer

log = logging.getLogger("cruzflow.journal")

Durable = asyncio.Future[dict[str, Refusal]]
"""Resolves once the batch holding a write is durable, with the instances the
store refused (their writes did not land: see ``Store.apply``), usually none."""

# Back-off between attempts at a held batch: short at first, so a brief lock
# costs little, then at most once a second (each try is cheap when the disk
# is full; a locked store already waits its busy timeout inside the try).
_RETRY_FIRST_S = 0.05
_RETRY_MAX_S = 1.0


class Journal:
    def __init__(
        self,
        store: Store,
        lease: Lease,
        on_durable: Callable[[list[EventRecord]], None],
        observer: Observer | None = None,
        on_fault: Callable[[StoreError | None], None] | None = None,
        on_gates: Callable[[list[str], list[tuple[str, str, int]]], None] | None = None,
    ) -> None:
        self._store = store
        # The lease every batch is written under (fencing).
        self.lease = lease
        # Told when the store starts failing (the error) and when it is back (None).
        self._on_fault = on_fault
        # The transient error the held batch last failed with, while it fails.
        self.fault: StoreError | None = None
        self._closed = asyncio.Event()
        # How long close() keeps trying a held batch before giving it up.
        self._give_up_after = 0.0
        self._closing_at = 0.0
        # Set once close() gave up: every later write fails too, in order.
        self._dropping: StoreError | None = None
        self._observer = observer
        self._on_durable = on_durable
        # Told, once a batch that opened concurrency gates is durable, which
        # instances they let through and which keys a rate limit holds back.
        self._on_gates = on_gates
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

    def consume(self, instance_id: str, inbox_id: int, step_index: int) -> Durable:
        self._batch.consumed[inbox_id] = (instance_id, step_index)
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

    def gate(self, instance_id: str, workflow: str, gate: Gate) -> Durable:
        """Open the gate of the instance's (workflow, key) as far as its limits
        allow, in this batch's transaction (after its other writes)."""
        batch = self._batch
        batch.gates[workflow] = gate
        batch.gate_ids.add(instance_id)
        return self._touch()

    def gate_key(self, workflow: str, key: str, gate: Gate) -> Durable:
        """Open the gate of (workflow, key) as far as its limits allow."""
        batch = self._batch
        batch.gates[workflow] = gate
        batch.gate_keys.add((workflow, key))
        return self._touch()

    def gate_hold(self, instance_id: str, workflow: str, gate: Gate) -> Durable:
        """Store an existing instance as waiting for a slot again (it holds none),
        and open its gate as far as the limits allow."""
        self._batch.gate_hold.add(instance_id)
        return self.gate(instance_id, workflow, gate)

    def gate_sweep(self, gates: Mapping[str, Gate]) -> Durable:
        """Open every gate that has instances waiting (at start: the commit that
        would have let them through may have been lost with the server)."""
        batch = self._batch
        batch.gates.update(gates)
        batch.gate_sweep = True
        return self._touch()

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
            began, refused = await self._commit(batch)
            if isinstance(began, BaseException):
                future.set_exception(began)
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
            if refused:
                log.warning(
                    "the store refused the writes of %d instance(s): %s",
                    len(refused),
                    ", ".join(f"{i} ({why.value})" for i, why in sorted(refused.items())[:10]),
                )
            events = batch.events
            if refused and events:
                events = [e for e in events if e.instance_id not in refused]
            if events:
                self._on_durable(events)
            if (batch.promoted or batch.gate_retry) and self._on_gates is not None:
                try:
                    self._on_gates(batch.promoted, batch.gate_retry)
                except Exception:  # a listener's bug must not stop the writer
                    log.exception("concurrency gate listener failed")
            future.set_result(refused)

    async def _commit(self, batch: Batch) -> tuple[float | BaseException, dict[str, Refusal]]:
        """Apply ``batch``, holding and retrying it while the store's fault is
        transient; returns when the commit began (perf_counter) and the
        instances the store refused, or the error to fail the batch's writes
        with."""
        if self._dropping is not None:
            return self._dropping, {}
        delay = _RETRY_FIRST_S
        failed_at = 0.0
        tries = 0
        while True:
            began = time.perf_counter()
            tried_at = time.monotonic()
            try:
                refused = await self._store.apply(batch, self.lease)
            except StoreError as exc:
                if not exc.transient:
                    # Retrying cannot help (a constraint, a corrupt file): fail
                    # these writes; their instances resume after a restart.
                    log.error("commit of %d events failed: %s", len(batch.events), exc)
                    return exc, {}
                tries += 1
                if self.fault is None:
                    failed_at = tried_at
                changed = self.fault is None or self.fault.cause != exc.cause
                self.fault = exc
                if changed:
                    # Once per fault (and again if its cause changes), not per try.
                    log.error(
                        "store cannot commit: %s; holding the writes and retrying until it "
                        "can; new instances and control calls get UNAVAILABLE meanwhile",
                        exc,
                    )
                    self._set_fault(exc)
                if self._closing and time.monotonic() - self._closing_at >= self._give_up_after:
                    self._dropping = exc
                    log.error(
                        "stopping while the store still fails (%s): writes not stored are "
                        "dropped; their instances resume from their last stored checkpoint "
                        "at the next start",
                        exc.cause,
                    )
                    return exc, {}
                if self._closing:
                    await asyncio.sleep(delay)
                else:
                    # close() cuts the wait short, to start its countdown at once.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closed.wait(), delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                continue
            except Exception as exc:  # the store already said what failed
                log.error("commit of %d events failed: %s", len(batch.events), exc)
                return exc, {}
            if self.fault is not None:
                log.warning(
                    "store commits again after %.1f s and %d failed attempt(s) (%s); the held "
                    "writes are stored and new work is taken again",
                    time.monotonic() - failed_at,
                    tries,
                    self.fault.cause,
                )
                self.fault = None
                self._set_fault(None)
            return began, refused

    def _set_fault(self, fault: StoreError | None) -> None:
        if self._on_fault is not None:
            try:
                self._on_fault(fault)
            except Exception:  # a listener's bug must not stop the writer
                log.exception("store fault listener failed")

    async def close(self, give_up_after: float = 5.0) -> None:
        """Commit what is pending, then stop the writer.

        A batch the store keeps refusing is tried for ``give_up_after`` s
        more, then it and every write after it fail (not stored).
        """
        self._closing = True
        self._closing_at = time.monotonic()
        self._give_up_after = give_up_after
        self._closed.set()
        self._wake.set()
        if self._task is not None:
            await self._task
