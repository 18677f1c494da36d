"""The narrow interface between the engine and a database.

SQLite (``store/sqlite.py``) is the embedded default. A PostgreSQL backend
fills the same protocol: ``apply`` is one transaction, ``claim_unfinished``
becomes a lease over rows that several replicas compete for.
"""

from __future__ import annotations

from typing import Protocol

from cruzflow.server.records import (
    Batch,
    EventRecord,
    InboxEvent,
    InstanceQuery,
    InstanceRecord,
    InstanceStatus,
    StepRecord,
)


class StoreError(Exception):
    """The store could not read or write (disk full, locked, unreachable).

    ``cause`` names the fault in a few words ("disk full", "database locked",
    "read-only", ...). ``transient`` is true when nothing of the failed write
    was applied and the same write may succeed once the fault is mended, so
    the journal holds it and tries again instead of dropping it.
    """

    def __init__(
        self, message: str, *, cause: str = "store error", transient: bool = False
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.transient = transient


class Store(Protocol):
    async def open(self) -> None:
        """Connect, apply migrations, and take what ownership the backend needs."""

    async def close(self) -> None:
        """Release connections and locks. Pending writes must be applied first."""

    def page_token_key(self) -> bytes:
        """A random secret made when the store was created and kept in it, that
        signs ListInstances page tokens; the same after every restart (and, on
        a shared database, the same for every replica). Read once by ``open``."""

    async def apply(self, batch: Batch) -> None:
        """Apply every write of the batch in one transaction, durably.

        Returns only when the transaction is durable; raises StoreError and
        applies nothing if it cannot. The batch is left as it was, so the
        journal may apply the same batch again after a transient error.
        """

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        """The instance with its ``last_seq``, or None. One indexed lookup."""

    async def get_steps(self, instance_id: str) -> list[StepRecord]:
        """The instance's steps in index order."""

    async def read_events(self, instance_id: str, after_seq: int, limit: int) -> list[EventRecord]:
        """Up to ``limit`` events with ``seq > after_seq``, in order."""

    async def take_events(self, instance_id: str, type: str, limit: int) -> list[InboxEvent]:
        """Up to ``limit`` unconsumed inbox events of that type, oldest first."""

    async def due_wakes(self, before: int, limit: int) -> list[tuple[str, int]]:
        """(id, wake_at) of waiting instances due before ``before`` (ms), soonest first."""

    async def claim_unfinished(self) -> list[InstanceRecord]:
        """Queued, running or pausing instances to resume, oldest first, with their
        ``last_seq`` (waiting ones come back through ``due_wakes``).

        On SQLite the server owns the whole file (a lock file keeps a second
        server out), so this is every unfinished instance.
        """

    async def count_unfinished(self) -> dict[InstanceStatus, int]:
        """How many instances are in each unfinished status (telemetry's
        baseline at start; it follows the changes after that)."""

    async def list_instances(
        self, query: InstanceQuery, limit: int
    ) -> list[tuple[int, InstanceRecord]]:
        """Up to ``limit`` instances matching ``query``, newest first, each with its
        position in creation order (the keyset cursor for the next page).

        Each page starts at its cursor with an index search, so page 1000
        costs what page 1 does. Records carry ``last_seq``.
        """

    async def ended_before(self, before: int, limit: int) -> list[str]:
        """Ids of up to ``limit`` finished instances that ended before ``before``
        (ms), the longest ended first: retention's candidates."""
