"""The engine: creates instances, runs them on one event loop, resumes them.

It imports neither grpc nor a database driver: it talks to a ``Store`` and
hands its writes to the ``Journal`` (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cruzflow.sdk.api import WorkflowEntrypoint, WorkflowEvent
from cruzflow.sdk.step import WorkflowStep
from cruzflow.server.engine import listing, validate
from cruzflow.server.engine.errors import (
    AlreadyExists,
    FailedPrecondition,
    FatalWorkflowError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StepFailedError,
    Suspend,
    Unavailable,
)
from cruzflow.server.engine.hooks import EngineHooks
from cruzflow.server.engine.hub import Hub, Subscription
from cruzflow.server.engine.journal import Durable, Journal
from cruzflow.server.engine.observer import Observer
from cruzflow.server.engine.params import checker as params_checker
from cruzflow.server.engine.steps import StepRunner, to_json
from cruzflow.server.engine.tracebacks import format_error
from cruzflow.server.records import (
    EventKind,
    EventRecord,
    InboxEvent,
    InstanceRecord,
    InstanceStatus,
    InstanceUpdate,
    Lease,
    Notice,
    NoticeKind,
    Refusal,
    StepRecord,
)
from cruzflow.server.store.base import Store, StoreError

log = logging.getLogger("cruzflow.engine")

_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_READ_PAGE = 512
# Wake-ups due within this horizon are kept in memory; the rest are read
# from the store's wake index as they come into it.
_TIMER_HORIZON_MS = 60_000


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


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """A workflow class the engine hosts."""

    name: str
    binding: str
    class_name: str
    cls: type[WorkflowEntrypoint[Any]]


def _ms() -> int:
    return int(time.time() * 1000)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not JSON")


def _finite(value: str) -> float:
    number = float(value)
    if math.isinf(number):
        raise ValueError(f"{value} is too large for a 64-bit float")
    return number


def parse_json_field(text: str | bytes, field: str, limit: int, max_depth: int = 64) -> bytes:
    """Check that a request field is JSON within the size and depth limits; return
    its bytes."""
    data = text.encode() if isinstance(text, str) else text
    if not data.strip():
        return b"null"
    if len(data) > limit:
        raise InvalidArgument(
            f"{field}: {len(data):,} bytes, over the limit of {limit:,} bytes "
            f"(limits.max_payload_bytes); pass a reference to large data instead"
        )
    # Checked first, by a linear scan: the parser recurses per level.
    validate.check_json_depth(data, field, max_depth)
    try:
        json.loads(data, parse_constant=_reject_constant, parse_float=_finite)
    except ValueError as exc:
        raise InvalidArgument(
            f'{field}: not valid JSON ({exc}); send JSON text such as {{"a": 1}}'
        ) from None
    return data


def _about(run: _Run, step: str | None = None, traceback: str | None = None) -> dict[str, Any]:
    """The fields a log record about an instance carries (see telemetry's formats)."""
    about = {"instance_id": run.id, "workflow": run.spec.name}
    if step is not None:
        about["step"] = step
    if traceback is not None:
        about["traceback"] = traceback
    return about


class _Run:
    """An instance while the engine holds it in memory (running, queued, or held
    by a control call). At most one exists per instance: see ``Engine._hold``."""

    __slots__ = (
        "claimed", "created_at", "engine", "error", "held", "id", "last_write", "next_index",
        "occurrences", "params", "pause_requested", "poked", "queued", "replay", "resumed",
        "run_started_at", "seq", "span", "spec", "status", "task", "trace_parent",
    )  # fmt: skip

    def __init__(
        self, engine: Engine, record: InstanceRecord, spec: WorkflowSpec, resumed: bool
    ) -> None:
        self.engine = engine
        self.id = record.id
        self.spec = spec
        self.params = record.params
        self.created_at = record.created_at
        self.run_started_at = record.run_started_at or record.created_at
        self.status = record.status
        self.seq = record.last_seq
        self.resumed = resumed
        self.next_index = 0
        self.occurrences: dict[str, int] = {}
        self.replay: dict[int, StepRecord] | None = None
        self.last_write: Durable | None = None
        self.task: asyncio.Task[None] | None = None
        # A pause asked for while running: taken at the next step boundary.
        self.pause_requested = record.status == InstanceStatus.WAITING_FOR_PAUSE
        # An event arrived for this instance while its run was in memory.
        self.poked = False
        # Inbox events this run has taken but whose taking is not yet durable.
        self.claimed: set[int] = set()
        self.queued = False
        self.held = 0
        self.trace_parent = record.trace_parent
        # The error this run ended the instance with, and its traceback, for the observer.
        self.error: tuple[str, str, str | None] | None = None
        # The observer's token for the run in memory (its span).
        self.span: Any = None

    @property
    def active(self) -> bool:
        return self.task is not None

    def reset_for_replay(self) -> None:
        """Run ``run`` from the top again, replaying what the store holds."""
        self.resumed = True
        self.next_index = 0
        self.occurrences = {}
        self.replay = None
        self.claimed = set()
        self.poked = False

    def emit(self, kind: EventKind, data: dict[str, Any], payload: bytes | None = None) -> Durable:
        self.seq += 1
        fut = self.engine.journal.append(EventRecord(self.id, self.seq, _ms(), kind, data, payload))
        self.last_write = fut
        return fut

    def put_step(self, record: StepRecord) -> None:
        self.last_write = self.engine.journal.put_step(record)

    def set_status(
        self,
        status: InstanceStatus,
        output: bytes | None = None,
        error: tuple[str, str] | None = None,
        wake_at: int | None = None,
        traceback: str | None = None,
    ) -> Durable:
        """Record a new status; ``error`` (name, message) and its ``traceback``
        with ERRORED."""
        now = _ms()
        observer = self.engine.observer
        if observer is not None:
            if status != self.status:
                observer.status_changed(self.spec.name, self.status, status)
            self.error = None if error is None else (*error, traceback)
        self.status = status
        finished = status.finished
        self.engine.journal.update_instance(
            InstanceUpdate(
                self.id, status, now, output,
                error[0] if error else None, error[1] if error else None,
                now if finished else None, wake_at, traceback, self.run_started_at,
            )
        )  # fmt: skip
        data: dict[str, Any] = {"status": int(status)}
        if error:
            data["err"] = [*error] if traceback is None else [*error, traceback]
        if wake_at is not None:
            data["wake"] = wake_at
        return self.emit(EventKind.STATUS_CHANGED, data, output)

    async def barrier(self) -> None:
        """Wait until every write of this instance so far is durable."""
        fut = self.last_write
        if fut is None:
            return
        if fut.done() and fut.exception() is None:
            refused = fut.result()
        else:
            try:
                refused = await asyncio.shield(fut)
            except Exception as exc:
                self._not_stored(exc)
                raise Suspend() from exc
        if refused and self.id in refused:
            # Another server holds the instance (this one lost its lease): its
            # run there goes on; this one stops without writing more.
            log.warning(
                "instance %s: the store refused its writes (%s); this server stops its run",
                self.id,
                refused[self.id].value,
                extra=_about(self),
            )
            raise Suspend()

    def _not_stored(self, exc: BaseException) -> None:
        # The journal logged the failure once; at a stop that gave up on a
        # failing store every instance gets here, so say it quietly then.
        log.log(
            logging.DEBUG if self.engine.stopping else logging.ERROR,
            "instance %s: checkpoint not stored (%s); it resumes after a restart",
            self.id,
            exc,
            extra=_about(self),
        )

    async def enter_step(self) -> None:
        """A step boundary: prior writes durable, and a stop or pause taken here."""
        await self.barrier()
        if self.engine.stopping:
            raise Suspend()
        if self.pause_requested:
            self.pause_requested = False
            self.set_status(InstanceStatus.PAUSED)
            await self.barrier()
            raise Suspend()

    async def park(self, wake_at: int) -> None:
        """Leave memory until ``wake_at`` (or an event); the run replays then.

        Returns instead if an event arrived meanwhile, so the caller re-checks.
        """
        self.set_status(InstanceStatus.WAITING, wake_at=wake_at)
        await self.barrier()
        if self.poked or (not self.engine.stopping and wake_at <= _ms()):
            self.set_status(InstanceStatus.RUNNING)
            return
        if self.engine.observer is not None:
            self.engine.observer.parked(self.span, wake_at)
        self.engine.schedule_wake(self.id, wake_at)
        raise Suspend()


class Engine:
    """Hosts workflow classes and runs their instances."""

    def __init__(
        self,
        store: Store,
        workflows: Mapping[str, WorkflowSpec],
        env: Any = None,
        limits: Limits | None = None,
        observer: Observer | None = None,
        hooks: EngineHooks | None = None,
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        # Telemetry, or None: every edge it watches tests for None first.
        self.observer = observer
        # A test kit's seam (engine/hooks.py), or None: the step code tests for None.
        self.hooks = hooks
        self.env = env
        self._workflows = dict(workflows)
        # This server's name in the store's leases, and its lease (see start).
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease: Lease
        # Workflows whose params are a TypedDict: their creates are checked.
        self._params_checks = {
            name: check
            for name, spec in self._workflows.items()
            if (check := params_checker(name, spec.cls)) is not None
        }
        self._hub = Hub()
        self.journal: Journal
        # Every instance in memory (running, queued, or held by a control
        # call), one handle each; _runs is the running subset.
        self._live: dict[str, _Run] = {}
        self._runs: dict[str, _Run] = {}
        self._queue: deque[_Run] = deque()
        self._creating: set[str] = set()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._stop = asyncio.Event()
        self.stopping = False
        self._background: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[None]] = set()
        # Wake-ups due within the timer horizon; later ones stay in the store.
        self._timers: list[tuple[int, str]] = []
        self._timer_due: dict[str, int] = {}
        self._timer_kick = asyncio.Event()
        # Told when the store starts failing to commit (the error) and when it
        # commits again (None); the service turns it into health.
        self.store_listeners: list[Callable[[StoreError | None], None]] = []

    # ----------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the writer and resume every unfinished instance."""
        self.lease = await self.store.acquire(self.owner)
        self.journal = Journal(
            self.store,
            self.lease,
            self._hub.publish,
            self.observer,
            on_fault=self._store_fault_changed,
        )
        self.journal.start()
        if self.observer is not None:
            for status, count in (await self.store.count_unfinished()).items():
                self.observer.census(status, count)
        self.store.subscribe(self._heard)
        await self._claim()
        self._background.append(asyncio.create_task(self._timer_loop(), name="cruzflow-timers"))
        self._start_background()

    async def _claim(self) -> None:
        """Take over the runnable instances no server runs (at start: every
        unfinished one this server's store holds) and queue them."""
        unfinished = await self.store.claim(self.lease, self.limits.max_running_instances)
        # Instances that were running go first, then the queue in creation order.
        unfinished.sort(key=lambda r: r.status != InstanceStatus.RUNNING)
        missing: dict[str, int] = {}
        resumed = 0
        for record in unfinished:
            spec = self._workflows.get(record.workflow)
            if spec is None:
                missing[record.workflow] = missing.get(record.workflow, 0) + 1
                continue
            if record.id in self._live:
                continue
            run = _Run(self, record, spec, resumed=True)
            run.queued = True
            self._live[run.id] = run
            self._queue.append(run)
            resumed += 1
        for name, count in missing.items():
            log.warning(
                "%d unfinished instance(s) of workflow %r wait: it is not in the config",
                count,
                name,
            )
        if resumed:
            log.info("resuming %d unfinished instance(s)", resumed)
        self._fill_slots()

    def _heard(self, notices: list[Notice]) -> None:
        """What other servers committed: their events reach this server's
        watchers through the store; runnable instances are claimed."""
        runnable = False
        for notice in notices:
            if notice.kind is NoticeKind.EVENTS:
                self._hub.nudge(notice.instance_id)
            elif notice.kind is NoticeKind.RUNNABLE:
                runnable = True
        if runnable and not self.stopping:
            self._spawn(self._claim())

    def _start_background(self) -> None:
        """Start the engine's housekeeping tasks; shutdown cancels them."""
        self._background.append(asyncio.create_task(self._purge_loop(), name="cruzflow-purge"))

    async def shutdown(self, grace: float) -> None:
        """Stop taking work, let attempts in flight finish for ``grace`` s, then stop."""
        self.stopping = True
        self._stop.set()
        for task in [*self._background, *self._spawned]:
            task.cancel()
        await asyncio.gather(*self._background, *self._spawned, return_exceptions=True)
        tasks = [r.task for r in self._runs.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "cancelled %d attempt(s) still running after %.1f s", len(pending), grace
                )
                await asyncio.wait(pending)
        await self.journal.close()
        # The other servers (if any) take this one's instances over at once.
        with contextlib.suppress(StoreError):
            await self.store.release(self.lease)
        # Everything is durable and published; end the watch streams.
        self._hub.close()

    async def wait_or_suspend(self, delay: float) -> None:
        """Sleep for a retry delay, or unwind at once if the server stops."""
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        if self.stopping:
            raise Suspend()

    # -------------------------------------------------------------- create
    def workflows(self) -> list[WorkflowSpec]:
        return sorted(self._workflows.values(), key=lambda w: w.name)

    @property
    def store_fault(self) -> StoreError | None:
        """The error the store fails commits with, while it does; else None."""
        return self.journal.fault

    def _store_fault_changed(self, fault: StoreError | None) -> None:
        for listener in self.store_listeners:
            listener(fault)

    def _refuse_while_store_fails(self) -> None:
        """New work waits for a store that cannot commit: refuse it instead, so
        memory stays bounded and the caller learns why at once."""
        fault = self.journal.fault
        if fault is not None:
            raise Unavailable(
                f"the store cannot commit, so new work is refused: {fault}. The server "
                f"retries by itself and takes work again once the store commits (its health "
                f"turns SERVING); retry this call then"
            )

    async def create(
        self,
        workflow: str,
        instance_id: str = "",
        params: str | bytes = b"",
        lookup_key: str = "",
    ) -> tuple[str, InstanceStatus]:
        """Store a new instance durably and schedule it; returns its id and status."""
        self._refuse_while_store_fails()
        spec, params_bytes = self.check_new(workflow, instance_id, params, lookup_key)
        if instance_id:
            await self.reserve_id(instance_id)
        else:
            instance_id = uuid.uuid4().hex
        try:
            status, durable = self.admit(spec, instance_id, params_bytes, lookup_key)
            await self.durable(durable, "the instance could not be stored", instance_id)
        finally:
            self._creating.discard(instance_id)
        return instance_id, status

    def check_new(
        self, workflow: str, instance_id: str, params: str | bytes, lookup_key: str
    ) -> tuple[WorkflowSpec, bytes]:
        """Validate a new instance's fields; raises a ServiceError naming the field."""
        if self.stopping:
            raise Unavailable("the server is shutting down; retry once it is back")
        if not workflow:
            raise InvalidArgument(
                "workflow: required; name a registered workflow (see ListWorkflows)"
            )
        validate.check_workflow(workflow)
        spec = self._workflows.get(workflow)
        if spec is None:
            known = ", ".join(sorted(self._workflows)) or "none"
            raise NotFound(
                f"workflow: {workflow!r} is not registered on this server (registered: {known}); "
                f"see ListWorkflows"
            )
        params_bytes = parse_json_field(
            params, "params_json", self.limits.max_payload_bytes, self.limits.max_json_depth
        )
        check = self._params_checks.get(workflow)
        if check is not None:
            check(params_bytes)
        if instance_id:
            self.check_id(instance_id, creating=True)
        validate.check_text(
            lookup_key,
            "lookup_key",
            self.limits.max_lookup_key_length,
            "max_lookup_key_length",
            required=False,
        )
        return spec, params_bytes

    async def reserve_id(self, instance_id: str) -> None:
        """Claim an id for creation, or raise AlreadyExists.

        The claim holds until the caller discards the id from ``_creating``
        (after the create is durable or has failed).
        """
        if instance_id in self._creating or instance_id in self._live:
            raise AlreadyExists(self._exists_message(instance_id))
        self._creating.add(instance_id)
        try:
            if await self.store.get_instance(instance_id) is not None:
                raise AlreadyExists(self._exists_message(instance_id))
        except BaseException:
            self._creating.discard(instance_id)
            raise

    def admit(
        self, spec: WorkflowSpec, instance_id: str, params: bytes, lookup_key: str = ""
    ) -> tuple[InstanceStatus, Durable]:
        """Add a validated instance to the open batch and start or queue it.

        Synchronous: instances admitted with no await in between commit in
        the same transaction.
        """
        start_now = not self._queue and len(self._runs) < self.limits.max_running_instances
        status = InstanceStatus.RUNNING if start_now else InstanceStatus.QUEUED
        now = _ms()
        observer = self.observer
        record = InstanceRecord(
            instance_id, spec.name, status, params, now, now, lookup_key=lookup_key or None,
            trace_parent=observer.creating() if observer is not None else None,
        )  # fmt: skip
        if observer is not None:
            observer.created(spec.name, 1)
            observer.status_changed(spec.name, None, status)
        run = _Run(self, record, spec, resumed=False)
        self.journal.insert_instance(record)
        durable = run.emit(EventKind.STATUS_CHANGED, {"status": int(status)})
        self._live[instance_id] = run
        if start_now:
            self._start(run)
        else:
            run.queued = True
            self._queue.append(run)
        return status, durable

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
                raise AlreadyExists(self._exists_message(instance_id))
            if why is Refusal.FENCED:
                raise Unavailable(
                    f"{what}: another server holds instance {instance_id!r} now; retry"
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

    @staticmethod
    def _exists_message(instance_id: str) -> str:
        return (
            f"instance_id: an instance {instance_id!r} exists already; choose another id, or "
            f"leave it empty to get a generated one"
        )

    # ------------------------------------------------------------- running
    def _start(self, run: _Run) -> None:
        self._runs[run.id] = run
        self._live[run.id] = run
        run.queued = False
        run.task = asyncio.create_task(self._drive(run), name=f"instance-{run.id}")

    def _fill_slots(self) -> None:
        limit = self.limits.max_running_instances
        while self._queue and len(self._runs) < limit and not self.stopping:
            run = self._queue.popleft()
            # A pending pause stays pending: the run takes it at its next step.
            if run.status not in (InstanceStatus.RUNNING, InstanceStatus.WAITING_FOR_PAUSE):
                run.set_status(InstanceStatus.RUNNING)
            self._start(run)

    def _enqueue(self, run: _Run, announce: bool = False) -> Durable | None:
        """Start a run now if a slot is free, else queue it; record the status."""
        start = not self._queue and len(self._runs) < self.limits.max_running_instances
        status = InstanceStatus.RUNNING if start else InstanceStatus.QUEUED
        durable = run.set_status(status) if announce or run.status != status else None
        self._live[run.id] = run
        if start:
            self._start(run)
        else:
            run.queued = True
            self._queue.append(run)
        return durable

    def _dequeue(self, run: _Run) -> None:
        if run.queued:
            self._queue.remove(run)
            run.queued = False

    def _settle(self, run: _Run) -> None:
        """A run's task has ended and nobody holds it: finish what it left open."""
        if run.active or run.held:
            return
        if not self.stopping:
            if run.status == InstanceStatus.WAITING_FOR_PAUSE:
                run.pause_requested = False
                run.set_status(InstanceStatus.PAUSED)
            elif run.poked and run.status == InstanceStatus.WAITING and not run.queued:
                # An event came while the run was leaving: go on at once.
                self._timer_due.pop(run.id, None)
                run.reset_for_replay()
                self._enqueue(run)
        self._release(run)

    def _release(self, run: _Run) -> None:
        """Drop an idle handle from memory once its writes are durable.

        Until then it stays, so nobody re-reads a stale sequence number.
        """
        if run.active or run.queued or run.held:
            return
        fut = run.last_write
        if fut is None or fut.done():
            self._forget(run)
        else:
            fut.add_done_callback(lambda _: self._forget(run))

    def _forget(self, run: _Run) -> None:
        if not (run.active or run.queued or run.held) and self._live.get(run.id) is run:
            del self._live[run.id]

    @contextlib.asynccontextmanager
    async def _hold(self, instance_id: str) -> AsyncIterator[_Run]:
        """The instance's one in-memory handle, loaded if need be, held exclusively
        against other control calls (not against its own running task)."""
        self.check_id(instance_id)
        if self.stopping:
            raise Unavailable("the server is shutting down; retry once it is back")
        # Every control call writes: refused like a create while the store fails.
        self._refuse_while_store_fails()
        lock, users = self._locks.get(instance_id) or (asyncio.Lock(), 0)
        self._locks[instance_id] = (lock, users + 1)
        try:
            async with lock:
                run = self._live.get(instance_id)
                if run is None:
                    record = await self.store.claim_one(self.lease, instance_id)
                    if record is None:
                        raise NotFound(_not_found(instance_id))
                    run = self._live.get(instance_id)
                    if run is None:
                        spec = self._workflows.get(record.workflow)
                        if spec is None:
                            raise FailedPrecondition(
                                f"instance {instance_id!r} is of workflow {record.workflow!r}, "
                                f"which this server's config does not host; add it back first"
                            )
                        run = _Run(self, record, spec, resumed=True)
                        self._live[instance_id] = run
                run.held += 1
                try:
                    yield run
                finally:
                    run.held -= 1
                    self._settle(run)
        finally:
            lock, users = self._locks[instance_id]
            if users <= 1:
                del self._locks[instance_id]
            else:
                self._locks[instance_id] = (lock, users - 1)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    async def _stop_task(self, run: _Run) -> None:
        """Take the run away from its task (cancelled), keeping the handle."""
        task = run.task
        if task is None:
            return
        run.task = None
        self._runs.pop(run.id, None)
        task.cancel()
        _, pending = await asyncio.wait([task], timeout=5)
        if pending:
            log.warning(
                "instance %s: its run ignored cancellation; it is abandoned",
                run.id,
                extra=_about(run),
            )

    # ----------------------------------------------------------- timers
    def schedule_wake(self, instance_id: str, at: int) -> None:
        """Remember a wake-up if it is due within the horizon (else the store has it)."""
        if at <= _ms() + _TIMER_HORIZON_MS and self._timer_due.get(instance_id) != at:
            self._timer_due[instance_id] = at
            heapq.heappush(self._timers, (at, instance_id))
            self._timer_kick.set()

    async def _timer_loop(self) -> None:
        refill_at = 0
        while True:
            now = _ms()
            if now >= refill_at:
                try:
                    due = await self.store.due_wakes(now + _TIMER_HORIZON_MS, 100_000)
                except StoreError as exc:
                    # A store that cannot be read now must not end the timers for good.
                    log.warning("reading the wake-ups failed (%s); trying again in 1 s", exc)
                    refill_at = now + 1000
                    due = []
                else:
                    refill_at = now + _TIMER_HORIZON_MS // 2
                for instance_id, at in due:
                    self.schedule_wake(instance_id, at)
            while self._timers and self._timers[0][0] <= _ms():
                at, instance_id = heapq.heappop(self._timers)
                if self._timer_due.get(instance_id) == at:
                    del self._timer_due[instance_id]
                    self._spawn(self._wake(instance_id))
            until = min(refill_at, self._timers[0][0]) if self._timers else refill_at
            self._timer_kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_kick.wait(), max(until - _ms(), 0) / 1000)

    async def _wake(self, instance_id: str) -> None:
        if self.journal.fault is not None:
            # Its replay could not commit anything: look again in a second.
            self.schedule_wake(instance_id, _ms() + 1000)
            return
        try:
            async with self._hold(instance_id) as run:
                if run.active or run.queued or run.status != InstanceStatus.WAITING:
                    return
                run.reset_for_replay()
                self._enqueue(run)
        except (NotFound, FailedPrecondition, Unavailable) as exc:
            log.debug(
                "instance %s not woken: %s", instance_id, exc, extra={"instance_id": instance_id}
            )

    async def take_event(self, run: _Run, type: str) -> InboxEvent | None:
        """The oldest event of ``type`` sent to the instance and not yet taken."""
        events = await self.store.take_events(run.id, type, len(run.claimed) + 1)
        for event in events:
            if event.id not in run.claimed:
                run.claimed.add(event.id)
                return event
        return None

    # ---------------------------------------------------------- controls
    def _refuse(self, verb: str, run: _Run, allowed: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"instance {run.id!r} is {run.status.label}; only {allowed} instances can be {verb}"
        )

    async def pause(self, instance_id: str) -> InstanceStatus:
        """Pause at the next step boundary (WAITING_FOR_PAUSE until then)."""
        async with self._hold(instance_id) as run:
            status = run.status
            if status == InstanceStatus.WAITING_FOR_PAUSE:
                return status
            if status.finished or status == InstanceStatus.PAUSED:
                raise self._refuse("paused", run, "queued, running or waiting")
            if run.active:
                run.pause_requested = True
                durable = run.set_status(InstanceStatus.WAITING_FOR_PAUSE)
            else:
                self._dequeue(run)
                self._timer_due.pop(run.id, None)
                durable = run.set_status(InstanceStatus.PAUSED)
            await self.durable(durable, "the pause could not be stored", run.id)
            return run.status

    async def resume(self, instance_id: str) -> InstanceStatus:
        async with self._hold(instance_id) as run:
            status = run.status
            if status not in (InstanceStatus.PAUSED, InstanceStatus.WAITING_FOR_PAUSE):
                raise self._refuse("resumed", run, "paused")
            run.pause_requested = False
            if run.active:
                durable: Durable | None = run.set_status(InstanceStatus.RUNNING)
            else:
                run.reset_for_replay()
                durable = self._enqueue(run, announce=True)
            if durable is not None:
                await self.durable(durable, "the resume could not be stored", run.id)
            return run.status

    async def terminate(self, instance_id: str) -> InstanceStatus:
        async with self._hold(instance_id) as run:
            if run.status.finished:
                raise self._refuse("terminated", run, "unfinished")
            await self._stop_task(run)
            self._dequeue(run)
            self._timer_due.pop(run.id, None)
            run.pause_requested = False
            durable = run.set_status(InstanceStatus.TERMINATED)
            await self.durable(durable, "the termination could not be stored", run.id)
            self._fill_slots()
            return run.status

    async def restart(self, instance_id: str) -> InstanceStatus:
        """Run again from scratch: same id and params, step results cleared."""
        async with self._hold(instance_id) as run:
            await self._stop_task(run)
            self._dequeue(run)
            self._timer_due.pop(run.id, None)
            self.journal.clear_steps(run.id)
            run.run_started_at = _ms()
            run.reset_for_replay()
            run.resumed = False  # nothing to replay: the steps are gone
            run.pause_requested = False
            durable = self._enqueue(run, announce=True)
            assert durable is not None
            await self.durable(durable, "the restart could not be stored", run.id)
            return run.status

    async def send_event(self, instance_id: str, type: str, payload: str | bytes) -> None:
        """Store an event for the instance's wait_for_event of that type."""
        limit = self.limits.max_event_type_length
        if not type or len(type) > limit:
            raise InvalidArgument(
                f"type: required, 1 to {limit} characters (limits.max_event_type_length)"
            )
        validate.check_text(type, "type", limit, "max_event_type_length", required=True)
        data = parse_json_field(
            payload, "payload_json", self.limits.max_payload_bytes, self.limits.max_json_depth
        )
        async with self._hold(instance_id) as run:
            if run.status.finished:
                raise self._refuse("sent events", run, "unfinished")
            now = _ms()
            # The sender's trace context, for the wait that takes the event to link to.
            sender = self.observer.sending() if self.observer is not None else None
            durable = self.journal.add_inbox(
                InboxEvent(run.id, type, data, now, trace_parent=sender)
            )
            if run.status == InstanceStatus.WAITING:
                # Due now, in the same commit as the event: a server killed before
                # the run takes it wakes the instance as soon as it starts again
                # (through the wake index), not at the wait's timeout.
                self.journal.update_instance(
                    InstanceUpdate(
                        run.id, run.status, now, wake_at=now, run_started_at=run.run_started_at
                    )
                )
            await self.durable(durable, "the event could not be stored", run.id)
            if run.active:
                run.poked = True
            elif run.status == InstanceStatus.WAITING and not run.queued:
                self._timer_due.pop(run.id, None)
                run.reset_for_replay()
                self._enqueue(run)

    def _finish(
        self,
        run: _Run,
        status: InstanceStatus,
        output: bytes | None = None,
        error: tuple[str, str] | None = None,
        traceback: str | None = None,
    ) -> None:
        # Only the run's own task may end it: after a terminate or restart
        # took the run away, a late ending of the old task is dropped.
        if run.task is asyncio.current_task():
            run.set_status(status, output, error, traceback=traceback)

    async def _drive(self, run: _Run) -> None:
        observer = self.observer
        if observer is not None:
            run.span = observer.run_started(run.spec.name, run.id, run.trace_parent, run.created_at)
        try:
            if run.resumed:
                run.replay = {s.index: s for s in await self.store.get_steps(run.id)}
            workflow = run.spec.cls(self.env)
            event = WorkflowEvent(
                payload=json.loads(run.params),
                timestamp=datetime.fromtimestamp(run.created_at / 1000, UTC),
                instance_id=run.id,
            )
            result = await workflow.run(event, WorkflowStep(StepRunner(self, run)))
            try:
                output = to_json(result)
            except (TypeError, ValueError, RecursionError) as exc:
                run.set_status(
                    InstanceStatus.ERRORED,
                    error=(
                        "WorkflowOutputError",
                        f"run() returned a value that is not JSON ({exc}); return dicts, lists, "
                        f"strings, numbers, booleans or None",
                    ),
                )
                return
            if len(output) > self.limits.max_payload_bytes:
                run.set_status(
                    InstanceStatus.ERRORED,
                    error=(
                        "WorkflowOutputError",
                        f"run() returned {len(output):,} bytes of JSON, over the limit of "
                        f"{self.limits.max_payload_bytes:,} bytes (limits.max_payload_bytes)",
                    ),
                )
                return
            self._finish(run, InstanceStatus.COMPLETE, output=output)
        except StepFailedError as exc:
            # run() let a failed step's error through: the step's own traceback
            # (where its body raised) says why; the step's log record has it.
            log.warning(
                "instance %s errored: step %r failed: %s: %s",
                run.id, exc.step_name, exc.error_name, exc.error_message, extra=_about(run),
            )  # fmt: skip
            self._finish(
                run,
                InstanceStatus.ERRORED,
                error=(exc.error_name, exc.error_message),
                traceback=exc.error_traceback,
            )
        except FatalWorkflowError as exc:
            where = format_error(exc)
            log.error("instance %s failed: %s", run.id, exc, extra=_about(run, traceback=where))
            self._finish(
                run,
                InstanceStatus.ERRORED,
                error=(exc.error_name, exc.error_message),
                traceback=where,
            )
        except (Suspend, asyncio.CancelledError):
            pass  # left as stored; resumed after a restart or a wake-up
        except (Exception, SystemExit) as exc:
            where = format_error(exc)
            log.warning(
                "instance %s errored: run() raised %s: %s",
                run.id, type(exc).__name__, exc, extra=_about(run, traceback=where),
            )  # fmt: skip
            self._finish(
                run, InstanceStatus.ERRORED, error=(type(exc).__name__, str(exc)), traceback=where
            )
        finally:
            if observer is not None:
                observer.run_ended(run.span, run.status, len(run.replay or ()), run.error)
                run.span = None
            if run.task is asyncio.current_task():
                self._runs.pop(run.id, None)
                run.task = None
                self._settle(run)
            self._fill_slots()

    # --------------------------------------------------------------- reads
    async def get(self, instance_id: str) -> tuple[InstanceRecord, list[StepRecord]]:
        """The durable status of an instance and its steps."""
        self.check_id(instance_id)
        return await self._record(instance_id), await self.store.get_steps(instance_id)

    async def wait(
        self, instance_id: str, timeout: float | None = None, include_steps: bool = False
    ) -> tuple[InstanceRecord, list[StepRecord]]:
        """The instance once it is final, or as it is when ``timeout`` s have passed."""
        self.check_id(instance_id)
        if timeout is not None and timeout < 0:
            raise InvalidArgument(f"timeout: must not be negative, got {timeout:g} s")
        sub = self._subscribe(instance_id, "WaitInstance")
        try:
            record = await self._record(instance_id)
            try:
                async with asyncio.timeout(timeout):
                    while not record.status.finished:
                        event = await sub.queue.get()
                        if event is None:
                            raise Unavailable(
                                "the server is shutting down; wait again once it is back"
                            )
                        if sub.lagged:
                            sub.lagged = False
                            while not sub.queue.empty():
                                sub.queue.get_nowait()
                            record = await self.store.get_instance(instance_id) or record
                        elif _is_final(event):
                            # The final event carries all that changed: no re-read.
                            err = event.data.get("err")
                            record = dataclasses.replace(
                                record,
                                status=InstanceStatus(event.data["status"]),
                                output=event.payload,
                                error_name=err[0] if err else None,
                                error_message=err[1] if err else None,
                                error_traceback=err[2] if err and len(err) > 2 else None,
                                updated_at=event.at,
                                ended_at=event.at,
                                wake_at=None,
                                last_seq=event.seq,
                            )
            except TimeoutError:
                record = await self.store.get_instance(instance_id) or record
        finally:
            self._hub.unsubscribe(sub)
        steps = await self.store.get_steps(instance_id) if include_steps else []
        return record, steps

    def _subscribe(self, instance_id: str, what: str) -> Subscription:
        """The instance's live feed, unless limits.max_watchers feeds are open: each
        holds a bounded queue, so their number is what bounds their memory."""
        limit = self.limits.max_watchers
        if self._hub.count >= limit:
            raise ResourceExhausted(
                f"{what}: {limit} WatchInstance streams and WaitInstance calls are open on "
                f"this server, the most it serves at once (limits.max_watchers); close one "
                f"you no longer need, or retry later with backoff"
            )
        return self._hub.subscribe(instance_id)

    async def _record(self, instance_id: str) -> InstanceRecord:
        record = await self.store.get_instance(instance_id)
        if record is None:
            raise NotFound(_not_found(instance_id))
        return record

    async def watch(self, instance_id: str, after_seq: int = 0) -> AsyncIterator[EventRecord]:
        """Every durable event of the instance after ``after_seq``, live, until its end."""
        self.check_id(instance_id)
        if after_seq < 0:
            raise InvalidArgument(f"after_sequence: must be 0 or more, got {after_seq}")
        sub = self._subscribe(instance_id, "WatchInstance")
        try:
            record = await self._record(instance_id)
            if after_seq > record.last_seq:
                raise InvalidArgument(
                    f"after_sequence: {after_seq} is past the newest event ({record.last_seq}) "
                    f"of instance {instance_id!r}; pass the last sequence you received, or 0"
                )
            last = after_seq
            while True:
                # Catch up from the store, then follow the live feed. Events are
                # published only once durable, so the two overlap but never gap.
                while True:
                    events = await self.store.read_events(instance_id, last, _READ_PAGE)
                    for event in events:
                        yield event
                        last = event.seq
                        # A restart can follow an end: only the newest end ends the stream.
                        if _is_final(event) and last >= record.last_seq:
                            return
                    if len(events) < _READ_PAGE:
                        break
                if record.status.finished and last >= record.last_seq:
                    return
                while not sub.lagged:
                    live = await sub.queue.get()
                    if live is None or sub.closed:
                        raise Unavailable(
                            f"the server is shutting down; watch again with after_sequence={last}"
                        )
                    if live.seq <= last:
                        continue
                    if live.seq > last + 1:
                        break  # a gap: the store has what we missed
                    yield live
                    last = live.seq
                    if _is_final(live):
                        return
                # Fell behind the queue bound: drop it and re-read from the store.
                sub.lagged = False
                while not sub.queue.empty():
                    sub.queue.get_nowait()
        finally:
            self._hub.unsubscribe(sub)

    # -------------------------------------------------- listing and batches
    async def list_instances(
        self,
        workflow: str = "",
        statuses: list[int] | None = None,
        created_min: int | None = None,
        created_max: int | None = None,
        lookup_key: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[InstanceRecord], str]:
        """A page of instances, newest first, and the token of the next page ("" on
        the last). Times are ms since the epoch; records come without steps."""
        query = listing.query(
            workflow,
            statuses or [],
            created_min,
            created_max,
            lookup_key,
            self.limits.max_lookup_key_length,
        )
        size = listing.page_size(page_size)
        # The store's own secret: a token survives restarts, and one altered or
        # made up by a caller fails its signature.
        key = self.store.page_token_key()
        if page_token:
            query = listing.after(query, listing.decode_token(page_token, query, key))
        rows = await self.store.list_instances(query, size + 1)
        # Half the gRPC send limit the service sets (64 payloads).
        page, last = listing.trim(rows, size, 32 * self.limits.max_payload_bytes)
        return page, "" if last is None else listing.encode_token(query, last, key)

    async def create_many(
        self, requests: list[tuple[str, str, str | bytes, str]]
    ) -> list[tuple[str, InstanceStatus]]:
        """Store new instances in one transaction, all of them or none; returns the
        id and status of each, in order.

        ``requests`` holds (workflow, instance_id, params, lookup_key) each. A
        refusal names every bad item: InvalidArgument if any is malformed (or
        repeats an id of the batch), else NotFound for unknown workflows, else
        AlreadyExists for ids taken.
        """
        if self.stopping:
            raise Unavailable("the server is shutting down; retry once it is back")
        self._refuse_while_store_fails()
        limit = self.limits.max_batch_size
        if not requests:
            raise InvalidArgument(f"requests: empty; send 1 to {limit} instances to create")
        if len(requests) > limit:
            raise InvalidArgument(
                f"requests: {len(requests)} instances, over the limit of {limit} per call "
                f"(limits.max_batch_size); split them over several calls"
            )
        problems: list[tuple[int, InvalidArgument | NotFound | AlreadyExists]] = []
        checked: list[tuple[WorkflowSpec, bytes] | None] = []
        first_use: dict[str, int] = {}
        for i, (workflow, instance_id, params, lookup_key) in enumerate(requests):
            try:
                checked.append(self.check_new(workflow, instance_id, params, lookup_key))
            except (InvalidArgument, NotFound) as exc:
                problems.append((i, exc))
                checked.append(None)
                continue
            if instance_id in first_use:
                problems.append(
                    (
                        i,
                        InvalidArgument(
                            f"instance_id: {instance_id!r} is also the id of "
                            f"requests[{first_use[instance_id]}]; ids in one batch must differ"
                        ),
                    )
                )
            elif instance_id:
                first_use[instance_id] = i
        reserved: list[str] = []
        try:
            # Each id is claimed until the batch is durable (or refused); a
            # taken one is one more problem to name.
            for instance_id, i in first_use.items():
                try:
                    await self.reserve_id(instance_id)
                except AlreadyExists as exc:
                    problems.append((i, exc))
                    continue
                reserved.append(instance_id)
            if problems:
                raise self._refusal(problems)
            if self.stopping:
                raise Unavailable("the server is shutting down; retry once it is back")
            # No await from here to the last admit: one batch, one transaction.
            created: list[tuple[str, InstanceStatus]] = []
            durables: list[Durable] = []
            for item, (_, instance_id, _, lookup_key) in zip(checked, requests, strict=True):
                assert item is not None
                new_id = instance_id or uuid.uuid4().hex
                status, durable = self.admit(item[0], new_id, item[1], lookup_key)
                created.append((new_id, status))
                if durable not in durables:
                    durables.append(durable)
            for durable in durables:
                await self.durable(
                    durable, "the instances could not be stored", *(i for i, _ in created)
                )
            return created
        finally:
            self._creating.difference_update(reserved)

    @staticmethod
    def _refusal(
        problems: list[tuple[int, InvalidArgument | NotFound | AlreadyExists]],
    ) -> InvalidArgument | NotFound | AlreadyExists:
        """One error naming every bad item, of the gravest kind among them."""
        ordered = sorted(problems, key=lambda p: p[0])
        parts = [f"requests[{i}].{exc}" for i, exc in ordered]
        message = "; ".join(parts)
        # A status message must fit a gRPC trailer (validate.MAX_MESSAGE_BYTES):
        # past a budget, the rest are named by index only.
        budget = validate.MAX_MESSAGE_BYTES // 2
        if len(message.encode()) > budget:
            shown: list[str] = []
            for part in parts:
                budget -= len(part.encode()) + 2
                if shown and budget < 0:
                    break
                shown.append(part)
            rest = ", ".join(str(i) for i, _ in ordered[len(shown) :])
            if rest:
                shown.append(f"and requests {rest} (send again once these are mended to see why)")
            message = "; ".join(shown)
        for kind in (InvalidArgument, NotFound):
            if any(isinstance(exc, kind) for _, exc in problems):
                return kind(message)
        return AlreadyExists(message)

    # ----------------------------------------------------------- retention
    async def _purge_loop(self) -> None:
        interval = self.limits.purge_interval_s
        while True:
            try:
                purged = await self.purge_finished()
                if purged:
                    log.info("purged %d finished instance(s) past their retention", purged)
            except Exception as exc:  # the store said what failed; try again later
                log.error("retention purge failed (%s); retrying in %g s", exc, interval)
            await asyncio.sleep(interval)

    @property
    def purged(self) -> int:
        """Finished instances purged after their retention since the engine started."""
        return self.journal.purged

    async def purge_finished(self) -> int:
        """Delete the finished instances that ended more than ``retention_s`` ago,
        with their steps, events and inbox; returns how many went.

        One transaction per ``purge_chunk`` instances, each through the journal,
        so live writes queue behind one bounded delete at a time.
        """
        chunk = self.limits.purge_chunk
        total = 0
        # A failing store would hold the purge (and its fenced instances) until it recovers.
        while not self.stopping and self.journal.fault is None:
            before = _ms() - int(self.limits.retention_s * 1000)
            candidates = await self.store.ended_before(before, chunk)
            fenced = await self._fence_idle(candidates)
            if not fenced:
                break
            try:
                purged = await self.journal.purge(dict.fromkeys((i for i, _ in fenced), before))
            finally:
                self._unfence(fenced)
            total += purged
            if len(candidates) < chunk or purged == 0:
                break
        return total

    async def _fence_idle(self, ids: list[str]) -> list[tuple[str, asyncio.Lock]]:
        """Take the control lock (see ``_hold``) of each instance that nobody has in
        memory, so that no control call loads one while its purge commits (it
        gets NotFound after); skip the others, they go in a later round."""
        fenced: list[tuple[str, asyncio.Lock]] = []
        for instance_id in ids:
            lock = asyncio.Lock()
            await lock.acquire()  # a new lock: taken at once
            # No await from this check to the entry, so no control call slips between.
            if instance_id in self._live or instance_id in self._locks:
                continue
            self._locks[instance_id] = (lock, 1)
            fenced.append((instance_id, lock))
        return fenced

    def _unfence(self, fenced: list[tuple[str, asyncio.Lock]]) -> None:
        for instance_id, lock in fenced:
            lock.release()
            _, users = self._locks[instance_id]
            if users <= 1:
                del self._locks[instance_id]
            else:
                self._locks[instance_id] = (lock, users - 1)


def _not_found(instance_id: str) -> str:
    return f"instance_id: no instance {instance_id!r}; check the id CreateInstance returned"


def _is_final(event: EventRecord) -> bool:
    return event.kind == EventKind.STATUS_CHANGED and InstanceStatus(event.data["status"]).finished
