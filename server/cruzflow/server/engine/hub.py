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
    __slots__ = ("closed", "instance_id", "lagged", "missed", "queue")

    def __init__(self, instance_id: str, bound: int = QUEUE_BOUND) -> None:
        self.instance_id = instance_id
        self.queue: asyncio.Queue[EventRecord | None] = asyncio.Queue(bound)
        self.lagged = False
        self.closed = False
        # A feed of several instances (MultiSubscription) marks which of them
        # lost events instead of giving up the whole queue.
        self.missed: set[str] | None = None


class MultiSubscription(Subscription):
    """One queue fed by the feeds of several instances (WatchInstances), so the
    stream wakes once for all that is ready. An event that does not fit puts
    its instance in ``missed``: the watcher re-reads that one from the store."""

    __slots__ = ("ids",)

    def __init__(self, instance_ids: Iterable[str], bound: int) -> None:
        super().__init__("", bound)
        self.ids = set(instance_ids)
        self.missed = set()


class Hub:
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = {}
        # Open subscriptions over all instances, for the engine's max_watchers.
        self.count = 0

    def close(self) -> None:
        """Wake every watcher with None: the server is stopping."""
        for subs in self._subs.values():
            for sub in subs:
                if sub.closed:
                    continue  # a MultiSubscription, met under another of its ids
                sub.closed = True
                if sub.queue.full():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    def subscribe(self, instance_id: str) -> Subscription:
        sub = Subscription(instance_id)
        self._subs.setdefault(instance_id, set()).add(sub)
        self.count += 1
        return sub

    def subscribe_many(self, instance_ids: Iterable[str], bound: int) -> MultiSubscription:
        """One feed of the instances' events; each counts as a subscription."""
        sub = MultiSubscription(instance_ids, bound)
        for instance_id in sub.ids:
            self._subs.setdefault(instance_id, set()).add(sub)
        self.count += len(sub.ids)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if isinstance(sub, MultiSubscription):
            for instance_id in list(sub.ids):
                self.drop(sub, instance_id)
            return
        self._remove(sub, sub.instance_id)

    def drop(self, sub: MultiSubscription, instance_id: str) -> None:
        """Stop feeding ``sub`` the events of one of its instances (it ended)."""
        if instance_id in sub.ids:
            sub.ids.discard(instance_id)
            self._remove(sub, instance_id)

    def _remove(self, sub: Subscription, instance_id: str) -> None:
        subs = self._subs.get(instance_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self.count -= 1
            if not subs:
                del self._subs[instance_id]

    def nudge(self, instance_id: str) -> None:
        """Another server stored events of the instance: its watchers read them
        from the store (as a watcher that fell behind does)."""
        for sub in self._subs.get(instance_id, ()):
            if sub.missed is None:
                sub.lagged = True
            else:
                sub.missed.add(instance_id)
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
                    if sub.missed is None:
                        sub.lagged = True
                    else:
                        sub.missed.add(event.instance_id)
