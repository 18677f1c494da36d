"""What the parts of the engine share: the store and its lease, the journal,
the instances in memory, the limits, and a few checks every part makes.

The parts (admission, scheduler, controls, timers, reads, retention) each
hold the one ``Core`` of their engine; ``runtime.Engine`` wires them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cruzflow.sdk.api import WorkflowEntrypoint
from cruzflow.server.engine.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Suspend,
    Unavailable,
)
from cruzflow.server.engine.hooks import EngineHooks
from cruzflow.server.engine.hub import Hub
from cruzflow.server.engine.journal import Durable, Journal
from cruzflow.server.engine.observer import Observer
from cruzflow.server.records import Gate, InboxEvent, InstanceRecord, Lease, Refusal
from cruzflow.server.store.base import Store, StoreError

if TYPE_CHECKING:
    from cruzflow.server.engine.admission import Admission
    from cruzflow.server.engine.run import Run

_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep one instance from hurting the others (SEMANTICS.md)."""

    max_instance_id_length: int = 100
    """Longest instance id a caller may choose."""
    max_step_name_length: int = 256
    """Longest step name."""
    max_payload_bytes: int = 1024 * 1024
    """Largest params, step result or output, as JSON bytes."""
    max_steps_per_instance: int = 10_000
    """Steps one run may take; past it the instance errors."""
    max_running_instances: int = 10_000
    """Instances that run at once; the rest wait ``queued``, oldest first."""
    max_lookup_key_length: int = 256
    """Longest lookup key given at creation."""
    max_event_type_length: int = 100
    """Longest event type (SendEvent, wait_for_event)."""
    max_sleep_s: float = 365 * 86400.0
    """Longest sleep or event wait, in seconds."""
    max_batch_size: int = 100
    """Most instances one CreateInstances may create."""
    retention_s: float = 30 * 86400.0
    """Finished instances older than this (by end time) are purged."""
    purge_interval_s: float = 60.0
    """How often the retention purge looks for finished instances to delete."""
    purge_chunk: int = 500
    """Most instances one purge transaction deletes, so live writes wait little."""
    max_json_depth: int = 64
    """Deepest nesting of arrays and objects in params and event payloads."""
    max_watchers: int = 10_000
    """WatchInstance streams and WaitInstance calls open at once; more are refused
    with RESOURCE_EXHAUSTED, so many watchers cannot take unbounded memory."""
    max_concurrent_rpcs: int = 20_000
    """RPCs the gRPC server handles at once (watchers included); past it a call
    gets RESOURCE_EXHAUSTED at once instead of queueing without bound."""
    schedule_grace_s: float = 60.0
    """A schedule's due time fired up to this late is on time; one later was
    missed, and its schedule's catch-up policy applies (engine/schedules.py)."""


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """A workflow class the engine hosts."""

    name: str
    binding: str
    class_name: str
    cls: type[WorkflowEntrypoint[Any]]
    gate: Gate | None = None
    """Its concurrency and rate limits (config), or None: it has none."""


def ms() -> int:
    """Now, in ms since the epoch: the unit of every time the engine stores."""
    return int(time.time() * 1000)


def exists_message(instance_id: str) -> str:
    return (
        f"instance_id: an instance {instance_id!r} exists already; choose another id, or "
        f"leave it empty to get a generated one"
    )


def not_found_message(instance_id: str, field: str = "instance_id") -> str:
    return f"{field}: no instance {instance_id!r}; check the id CreateInstance returned"


class Core:
    """The state the engine's parts share."""

    def __init__(
        self,
        store: Store,
        workflows: Mapping[str, WorkflowSpec],
        env: Any,
        limits: Limits,
        observer: Observer | None,
        hooks: EngineHooks | None,
    ) -> None:
        self.store = store
        self.workflows = dict(workflows)
        self.env = env
        self.limits = limits
        # Telemetry, or None: every edge it watches tests for None first.
        self.observer = observer
        # A test kit's seam (engine/hooks.py), or None: the step code tests for None.
        self.hooks = hooks
        # This server's name in the store's leases, and its lease (Engine.start).
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease: Lease
        self.journal: Journal
        self.hub = Hub()
        # Every instance in memory (running, queued, or held by a control
        # call), one handle each; ``runs`` is the running subset, ``queue``
        # the ones waiting for a slot.
        self.live: dict[str, Run] = {}
        self.runs: dict[str, Run] = {}
        self.queue: deque[Run] = deque()
        # Instances of limited workflows waiting for their key's slot (one
        # server per store only: on a shared store they wait in the store).
        self.gated: dict[str, Run] = {}
        # The limits of the workflows that have them.
        self.gates = {n: s.gate for n, s in self.workflows.items() if s.gate is not None}
        # Per instance, the lock control calls hold it with and its users
        # (see Controls.hold); retention fences idle instances with it too.
        self.locks: dict[str, tuple[asyncio.Lock, int]] = {}
        # Several servers share the store (its leases expire): queued
        # instances are left to whichever server has a slot, and runs may
        # be taken over (see Scheduler).
        self.shared = store.lease_period_s is not None
        self.stopping = False
        self.stopped = asyncio.Event()
        self.spawned: set[asyncio.Task[None]] = set()
        # Set by the engine: remember that an instance wakes at a time (ms).
        self.wake_at: Callable[[str, int], None] = lambda _id, _at: None
        # Set by the engine: an event came for an instance (a child of it
        # ended): its run looks at its inbox again, or it is woken.
        self.poke: Callable[[str], None] = lambda _id: None
        # Set by the engine: creates instances (step.child creates children).
        self.admission: Admission
        # The error the last lease renewal failed with, while the store cannot
        # be reached (a shared store), so that an idle server reports it too.
        self.lease_fault: StoreError | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; shutdown cancels it."""
        task = asyncio.create_task(coro)
        self.spawned.add(task)
        task.add_done_callback(self.spawned.discard)

    async def wait_or_suspend(self, delay: float) -> None:
        """Sleep for a retry delay, or unwind at once if the server stops."""
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), delay)
        if self.stopping:
            raise Suspend()

    def refuse_while_store_fails(self) -> None:
        """New work waits for a store that cannot commit: refuse it instead, so
        memory stays bounded and the caller learns why at once."""
        fault = self.journal.fault or self.lease_fault
        if fault is not None:
            raise Unavailable(
                f"the store cannot commit, so new work is refused: {fault}. The server "
                f"retries by itself and takes work again once the store commits (its health "
                f"turns SERVING); retry this call then"
            )

    def check_id(self, instance_id: str, creating: bool = False) -> None:
        if not instance_id:
            raise InvalidArgument("instance_id: required; pass the id CreateInstance returned")
        limit = self.limits.max_instance_id_length
        if len(instance_id) > limit or not _ID_PATTERN.fullmatch(instance_id):
            hint = ", or leave it empty to get a generated id" if creating else ""
            raise InvalidArgument(
                f"instance_id: {instance_id[:120]!r} is not a valid id; use 1 to {limit} characters "
                f"of A-Z, a-z, 0-9, '_' and '-', not starting with '-'{hint}"
            )

    async def durable(self, future: Durable, what: str, *instance_ids: str) -> None:
        """Wait for a write to commit; a store failure becomes Unavailable, and the
        store's refusal of one of ``instance_ids`` AlreadyExists (a new id was
        taken meanwhile) or Unavailable (another server holds the instance)."""
        try:
            refused = await asyncio.shield(future)
        except Exception as exc:
            raise Unavailable(f"{what} ({exc}); retry later") from exc
        for instance_id in instance_ids:
            why = refused.get(instance_id)
            if why is Refusal.CONFLICT:
                raise AlreadyExists(exists_message(instance_id))
            if why is Refusal.FENCED:
                raise Unavailable(
                    f"{what}: another server holds instance {instance_id!r} now; retry"
                )

    async def record(self, instance_id: str) -> InstanceRecord:
        """The stored instance, or NotFound."""
        record = await self.store.get_instance(instance_id)
        if record is None:
            raise NotFound(not_found_message(instance_id))
        return record

    async def take_event(self, run: Run, type: str) -> InboxEvent | None:
        """The oldest event of ``type`` sent to the instance and not yet taken."""
        events = await self.store.take_events(run.id, type, len(run.claimed) + 1)
        for event in events:
            if event.id not in run.claimed:
                run.claimed.add(event.id)
                return event
        return None
