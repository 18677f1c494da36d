"""Reads: GetStatus, WaitInstance, WatchInstance(s), ListInstances and CountInstances.

Reads go to the store. A watcher follows an instance's durable event log:
it catches up from the store, then takes events from the hub as they are
committed (by this server; another server's are read back from the store
when the hub nudges it), so it never sees a gap or a repeat.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from cruzflow.server.engine import listing
from cruzflow.server.engine.core import Core, not_found_message
from cruzflow.server.engine.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from cruzflow.server.engine.hub import QUEUE_BOUND, MultiSubscription, Subscription
from cruzflow.server.records import (
    EventKind,
    EventRecord,
    InstanceRecord,
    InstanceStatus,
    StepRecord,
)
from cruzflow.server.store.base import READ_BATCH

if TYPE_CHECKING:
    from cruzflow.server.engine.run import Run

_READ_PAGE = 512
# Events of each instance read at once when catching up many (an instance with
# more is then read on its own, _READ_PAGE at a time).
_BATCH_EACH = 64
# The audit entries GetStatus shows (the newest); WatchInstance streams them all.
_AUDIT_SHOWN = 100
MAX_WATCHED = 1000
"""The instances one WatchInstances call may follow."""
# A WatchInstances message holds about this many bytes of events at most (one
# larger event goes alone): under the 4 MiB other gRPC clients receive by default.
_MESSAGE_BUDGET = 2 * 1024 * 1024
# A WatchInstances stream's queue holds this many events per instance it follows
# (at least QUEUE_BOUND): past it, the instances whose events were dropped are
# re-read from the store.
_QUEUE_PER_INSTANCE = 64


class Reads:
    def __init__(self, core: Core) -> None:
        self._core = core

    async def get(self, instance_id: str) -> tuple[InstanceRecord, list[StepRecord]]:
        """The durable status of an instance and its steps."""
        self._core.check_id(instance_id)
        return await self._core.record(instance_id), await self._core.store.get_steps(instance_id)

    async def repairs(self, record: InstanceRecord) -> list[EventRecord]:
        """The instance's audit entries (REPAIRED events), the newest
        ``_AUDIT_SHOWN``, oldest first: read only for an instance that has any
        (``get_instance`` tells, so GetStatus costs no read more without)."""
        if not record.audited:
            return []
        return await self._core.store.read_audit(record.id, _AUDIT_SHOWN)

    def _held(self, instance_id: str) -> Run | None:
        """The run of an instance held here and not finished, when this server
        alone writes the store: then it knows all a read would (on a shared
        store another server may have moved the instance on: read it)."""
        core = self._core
        run = None if core.shared else core.live.get(instance_id)
        return run if run is not None and not run.status.finished else None

    async def wait(
        self,
        instance_id: str,
        timeout: float | None = None,
        include_steps: bool = False,
        *,
        room_taken: bool = False,
    ) -> tuple[InstanceRecord, list[StepRecord]]:
        """The instance once it is final, or as it is when ``timeout`` s have passed.
        ``room_taken``: the caller checked ``room`` already (RunInstance, which
        must not refuse for want of room once it has created the instance)."""
        self._core.check_id(instance_id)
        check_timeout(timeout)
        if room_taken:
            sub = self._core.hub.subscribe(instance_id)
        else:
            sub = self.subscribe(instance_id, "WaitInstance")
        try:
            run = self._held(instance_id)
            if run is not None:
                # Its final event (published after this subscription, as it
                # is not even written yet) brings all that changes: the
                # run's record is the base, without a read.
                record = _as_held(run)
            else:
                record = await self._core.record(instance_id)
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
                            record = await self._core.store.get_instance(instance_id) or record
                        elif is_final(event):
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
                            if run is not None:  # a restart may have moved it
                                record.run_started_at = run.run_started_at
            except TimeoutError:
                record = await self._core.store.get_instance(instance_id) or record
        finally:
            self._core.hub.unsubscribe(sub)
        steps = await self._core.store.get_steps(instance_id) if include_steps else []
        return record, steps

    def subscribe(self, instance_id: str, what: str) -> Subscription:
        """The instance's live feed, unless limits.max_watchers feeds are open: each
        holds a bounded queue, so their number is what bounds their memory."""
        self.room(what)
        return self._core.hub.subscribe(instance_id)

    def room(self, what: str) -> None:
        """ResourceExhausted when limits.max_watchers feeds are open."""
        limit = self._core.limits.max_watchers
        if self._core.hub.count >= limit:
            raise ResourceExhausted(
                f"{what}: {limit} WatchInstance streams and WaitInstance calls are open on "
                f"this server, the most it serves at once (limits.max_watchers); close one "
                f"you no longer need, or retry later with backoff"
            )

    async def watch(self, instance_id: str, after_seq: int = 0) -> AsyncIterator[EventRecord]:
        """Every durable event of the instance after ``after_seq``, live, until its end."""
        self._core.check_id(instance_id)
        if after_seq < 0:
            raise InvalidArgument(f"after_sequence: must be 0 or more, got {after_seq}")
        sub = self.subscribe(instance_id, "WatchInstance")
        try:
            record = await self._core.record(instance_id)
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
                    events = await self._core.store.read_events(instance_id, last, _READ_PAGE)
                    for event in events:
                        yield event
                        last = event.seq
                        # A restart can follow an end: only the newest end ends the stream.
                        if is_final(event) and last >= record.last_seq:
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
                    if is_final(live):
                        return
                # Fell behind the queue bound: drop it and re-read from the store.
                sub.lagged = False
                while not sub.queue.empty():
                    sub.queue.get_nowait()
        finally:
            self._core.hub.unsubscribe(sub)

    async def watch_many(
        self, cursors: Sequence[tuple[str, int]]
    ) -> AsyncIterator[list[EventRecord]]:
        """Every durable event after each (instance id, after sequence) of
        ``cursors``, live, in lists of those ready together (in order per
        instance), until every instance has ended. Each instance counts as a
        watcher (limits.max_watchers) until its end; one queue, bounded by
        their number, feeds them all."""
        ids = self._check_cursors(cursors)
        limit = self._core.limits.max_watchers
        hub = self._core.hub
        if hub.count + len(ids) > limit:
            raise ResourceExhausted(
                f"WatchInstances: following {len(ids)} instances would pass "
                f"limits.max_watchers ({limit}, {hub.count} followed now by WatchInstance(s) "
                f"streams and WaitInstance calls); follow fewer, close streams you no longer "
                f"need, or retry later with backoff"
            )
        sub = hub.subscribe_many(ids, max(QUEUE_BOUND, _QUEUE_PER_INSTANCE * len(ids)))
        try:
            # Every id is checked before any event goes out: a refusal sends none.
            # As held now: a run may finish (and stop being held) during the read.
            held = {i: _as_held(run) for i in ids if (run := self._held(i)) is not None}
            stored = await self._records([i for i in ids if i not in held])
            records: list[InstanceRecord] = []
            for i, (instance_id, after_seq) in enumerate(cursors):
                record = held.get(instance_id) or stored.get(instance_id)
                if record is None:
                    raise NotFound(not_found_message(instance_id, f"instances[{i}].instance_id"))
                if after_seq > record.last_seq:
                    raise InvalidArgument(
                        f"instances[{i}].after_sequence: {after_seq} is past the newest event "
                        f"({record.last_seq}) of instance {instance_id!r}; pass the last "
                        f"sequence you received, or 0"
                    )
                records.append(record)
            # The cursor of each instance not yet ended.
            lasts: dict[str, int] = dict(cursors)
            out: list[EventRecord] = []
            weight = 0
            # Caught up READ_BATCH instances a query, the first _BATCH_EACH
            # events of each; an instance with more goes on alone.
            for at in range(0, len(cursors), READ_BATCH):
                chunk = list(
                    zip(cursors[at : at + READ_BATCH], records[at : at + READ_BATCH], strict=True)
                )
                events = await self._core.store.read_events_many(
                    [cursor for cursor, _ in chunk], _BATCH_EACH
                )
                caught = len(out)
                by_instance: dict[str, list[EventRecord]] = {}
                for read in events:
                    by_instance.setdefault(read.instance_id, []).append(read)
                for (instance_id, _), record in chunk:
                    mine = by_instance.get(instance_id, [])
                    # A restart can follow an end: only the newest end ends it here.
                    self._take(instance_id, mine, lasts, out, sub, record.last_seq)
                    if instance_id in lasts and len(mine) == _BATCH_EACH:
                        await self._catch_up(instance_id, lasts, out, sub, record.last_seq)
                    last = lasts.get(instance_id)
                    if last is not None and record.status.finished and last >= record.last_seq:
                        self._ended(instance_id, lasts, sub)
                weight += sum(_size(event) for event in out[caught:])
                if weight >= _MESSAGE_BUDGET:
                    for batch in _batches(out):
                        yield batch
                    out, weight = [], 0
            queue = sub.queue
            while lasts:
                if out:
                    for batch in _batches(out):
                        yield batch
                    out = []
                    if not lasts:
                        break
                ready = [await queue.get()]
                while not queue.empty():
                    ready.append(queue.get_nowait())
                if sub.closed:
                    raise Unavailable(
                        "the server is shutting down; watch again with each instance's "
                        "after_sequence the last sequence you received of it"
                    )
                missed = sub.missed
                assert missed is not None
                for event in ready:
                    assert event is not None  # only close() queues None, and sets closed
                    instance_id = event.instance_id
                    last = lasts.get(instance_id)
                    # None: ended, or a nudge (whose instance is in missed).
                    if last is None or event.seq <= last:
                        continue
                    if event.seq > last + 1:
                        missed.add(instance_id)  # a gap: the store has what was dropped
                        continue
                    out.append(event)
                    lasts[instance_id] = event.seq
                    if is_final(event):
                        self._ended(instance_id, lasts, sub)
                if missed:
                    behind = [instance_id for instance_id in missed if instance_id in lasts]
                    missed.clear()
                    for instance_id in behind:
                        await self._catch_up(instance_id, lasts, out, sub, 0)
            if out:
                for batch in _batches(out):
                    yield batch
        finally:
            hub.unsubscribe(sub)

    def _check_cursors(self, cursors: Sequence[tuple[str, int]]) -> list[str]:
        if not cursors:
            raise InvalidArgument(
                "instances: required; list the instances to follow, each with the "
                "after_sequence to resume after (0: from the first event)"
            )
        if len(cursors) > MAX_WATCHED:
            raise InvalidArgument(
                f"instances: {len(cursors)} listed, at most {MAX_WATCHED} per call; split them "
                f"over several WatchInstances calls"
            )
        seen: dict[str, int] = {}
        for i, (instance_id, after_seq) in enumerate(cursors):
            try:
                self._core.check_id(instance_id)
            except InvalidArgument as exc:
                problem = str(exc).partition(": ")[2]
                raise InvalidArgument(f"instances[{i}].instance_id: {problem}") from None
            if after_seq < 0:
                raise InvalidArgument(
                    f"instances[{i}].after_sequence: must be 0 or more, got {after_seq}"
                )
            first = seen.setdefault(instance_id, i)
            if first != i:
                raise InvalidArgument(
                    f"instances[{i}].instance_id: {instance_id!r} is listed already "
                    f"(instances[{first}]); list each instance once"
                )
        return list(seen)

    async def _catch_up(
        self,
        instance_id: str,
        lasts: dict[str, int],
        out: list[EventRecord],
        sub: MultiSubscription,
        newest: int,
    ) -> None:
        """Append the stored events of an instance after its cursor to ``out``,
        up to its end: a final event at or past ``newest`` (the newest sequence
        when the watch began; 0 when catching up on events the feed dropped)."""
        while instance_id in lasts:
            events = await self._core.store.read_events(instance_id, lasts[instance_id], _READ_PAGE)
            self._take(instance_id, events, lasts, out, sub, newest)
            if len(events) < _READ_PAGE:
                return

    def _take(
        self,
        instance_id: str,
        events: list[EventRecord],
        lasts: dict[str, int],
        out: list[EventRecord],
        sub: MultiSubscription,
        newest: int,
    ) -> None:
        """Append ``events`` (read from the store, after the instance's cursor)
        to ``out`` up to its end: a final event at or past ``newest``."""
        for event in events:
            out.append(event)
            lasts[instance_id] = event.seq
            if is_final(event) and event.seq >= newest:
                self._ended(instance_id, lasts, sub)
                return

    async def _records(self, instance_ids: list[str]) -> dict[str, InstanceRecord]:
        """The stored records of ``instance_ids``, READ_BATCH a query."""
        found: dict[str, InstanceRecord] = {}
        for at in range(0, len(instance_ids), READ_BATCH):
            found.update(await self._core.store.get_instances(instance_ids[at : at + READ_BATCH]))
        return found

    def _ended(self, instance_id: str, lasts: dict[str, int], sub: MultiSubscription) -> None:
        del lasts[instance_id]
        # Its feed no longer counts against max_watchers, nor fills the queue.
        self._core.hub.drop(sub, instance_id)

    async def list_instances(
        self,
        workflow: str = "",
        statuses: list[int] | None = None,
        created_min: int | None = None,
        created_max: int | None = None,
        lookup_key: str = "",
        page_size: int = 0,
        page_token: str = "",
        parent_id: str = "",
        schedule_id: str = "",
    ) -> tuple[list[InstanceRecord], str]:
        """A page of instances, newest first, and the token of the next page ("" on
        the last). Times are ms since the epoch; records come without steps."""
        query = listing.query(
            workflow,
            statuses or [],
            created_min,
            created_max,
            lookup_key,
            self._core.limits.max_lookup_key_length,
            schedule_id,
        )
        if parent_id:
            try:
                self._core.check_id(parent_id)
            except InvalidArgument as exc:
                raise InvalidArgument(f"parent_id: {str(exc).partition(': ')[2]}") from None
            query = dataclasses.replace(query, parent_id=parent_id)
        size = listing.page_size(page_size)
        # The store's own secret: a token survives restarts, and one altered or
        # made up by a caller fails its signature.
        key = self._core.store.page_token_key()
        if page_token:
            query = listing.after(query, listing.decode_token(page_token, query, key))
        rows = await self._core.store.list_instances(query, size + 1)
        # Half the gRPC send limit the service sets (64 payloads).
        page, last = listing.trim(rows, size, 32 * self._core.limits.max_payload_bytes)
        return page, "" if last is None else listing.encode_token(query, last, key)

    async def count_instances(
        self,
        workflow: str = "",
        created_min: int | None = None,
        created_max: int | None = None,
        lookup_key: str = "",
    ) -> list[tuple[str, InstanceStatus, int]]:
        """(workflow, status, count) per workflow and status that has instances
        matching ListInstances' filters (but statuses), by workflow then status."""
        query = listing.query(
            workflow,
            [],
            created_min,
            created_max,
            lookup_key,
            self._core.limits.max_lookup_key_length,
        )
        return sorted(await self._core.store.count_instances(query))


def _size(event: EventRecord) -> int:
    """About the bytes of the event's message."""
    size = 200 if event.payload is None else 200 + len(event.payload)
    err = event.data.get("err")
    if err:
        size += sum(len(part) for part in err if isinstance(part, str))
    return size


def _batches(events: list[EventRecord]) -> list[list[EventRecord]]:
    """``events`` cut into messages of about _MESSAGE_BUDGET bytes at most."""
    batches: list[list[EventRecord]] = []
    batch: list[EventRecord] = []
    size = 0
    for event in events:
        weight = _size(event)
        if batch and size + weight > _MESSAGE_BUDGET:
            batches.append(batch)
            batch, size = [], 0
        batch.append(event)
        size += weight
    if batch:
        batches.append(batch)
    return batches


def is_final(event: EventRecord) -> bool:
    return event.kind == EventKind.STATUS_CHANGED and InstanceStatus(event.data["status"]).finished


def check_timeout(timeout: float | None) -> None:
    """InvalidArgument for a negative wait timeout."""
    if timeout is not None and timeout < 0:
        raise InvalidArgument(f"timeout: must not be negative, got {timeout:g} s")


def _as_held(run: Run) -> InstanceRecord:
    """The record of an instance held here as its run knows it: what it was
    loaded with, and its status, last sequence and current run's start."""
    return dataclasses.replace(
        run.record, status=run.status, last_seq=run.seq, run_started_at=run.run_started_at
    )
