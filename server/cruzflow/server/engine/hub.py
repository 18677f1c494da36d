"""Fan-out of durable events to the watchers of each instance."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from cruzflow.server.records import EventKind, EventRecord

# A watcher that falls this far behind is told to re-read from the store
# instead of holding an ever longer queue in memory.
QUEUE_BOUND = 1024

# Wakes a watcher to re-read the store; older than any event, so never shown.
_NUDGE = EventRecord("", 0, 0, EventKind.STEP_STARTED, {})


class Subscription:
    __slots__ = ("closed", "instance_id", "lagged", "queue")

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.queue: asyncio.Queue[EventRecord | None] = asyncio.Queue(QUEUE_BOUND)
        self.lagged = False
        self.closed = False


class Hub:
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        # Open subscriptions over all instances, for the engine's max_watchers.
        self.count = 0

    def close(self) -> None:
        """Wake every watcher with None: the server is stopping."""
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                if sub.queue.full():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    def subscribe(self, instance_id: str) -> Subscription:
        sub = Subscription(instance_id)
        self._subs.setdefault(instance_id, set()).add(sub)
        self.count += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.instance_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self.count -= 1
            if not subs:
                del self._subs[sub.instance_id]

    def nudge(self, instance_id: str) -> None:
        """Another server stored events of the instance: its watchers read them
        from the store (as a watcher that fell behind does)."""
        for sub in self._subs.get(instance_id, ()):
            sub.lagged = True
            if sub.queue.empty():
                sub.queue.put_nowait(_NUDGE)

    def publish(self, events: Iterable[EventRecord]) -> None:
        subs_by_id = self._subs
        if not subs_by_id:
            return
        for event in events:
            subs = subs_by_id.get(event.instance_id)
            if not subs:
                continue
            for sub in subs:
                if sub.lagged:
                    continue
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    # Dropped here, but durable: the watcher re-reads the store.
                    sub.lagged = True
