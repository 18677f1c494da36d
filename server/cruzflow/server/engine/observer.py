"""What the engine tells an observer (telemetry) at the edges of runs and steps.

The engine holds ``None`` when nothing observes it, so an unobserved engine
pays one ``is not None`` test at each edge and nothing else. The observer
gets plain values; it never sees the engine's internals, and it must not
raise or block: it is called on the engine's hot path.
"""

from __future__ import annotations

from typing import Any, Protocol

from cruzflow.server.records import InstanceStatus, StepKind


class Observer(Protocol):
    def creating(self) -> str | None:
        """The trace context to store with a new instance (a W3C traceparent)."""

    def sending(self) -> str | None:
        """The trace context to store with an event sent now (a W3C traceparent
        of the current span: the SendEvent call's), or None; the span of the
        wait that takes the event links to it."""

    def created(self, workflow: str, count: int) -> None:
        """``count`` instances of ``workflow`` were admitted."""

    def run_started(
        self, workflow: str, instance_id: str, trace_parent: str | None, created_at: int
    ) -> Any:
        """A run (one pass of ``run()`` in memory) starts; returns its token."""

    def run_ended(
        self,
        token: Any,
        status: InstanceStatus,
        replayed: int,
        error: tuple[str, str, str | None] | None,
    ) -> None:
        """The run left memory with the instance in ``status``; ``replayed`` steps
        were answered from their checkpoints. ``error`` is the name, message and
        traceback (or None) the run ended the instance with."""

    def attempt_started(
        self, run: Any, name: str, occurrence: int, index: int, attempt: int
    ) -> Any:
        """An attempt of a step starts; returns its token. The attempt's body runs
        inside it (user code sees it as the current span)."""

    def attempt_failed(self, token: Any, exc: BaseException) -> None:
        """The attempt's body raised ``exc`` (called before ``attempt_ended``)."""

    def attempt_ended(
        self, token: Any, outcome: str, error: tuple[str, str] | None, retry_delay_s: float | None
    ) -> None:
        """``outcome`` is succeeded, retrying or failed."""

    def waited(
        self,
        run: Any,
        kind: StepKind,
        name: str,
        occurrence: int,
        started_at: int,
        outcome: str,
        detail: str | None,
        sender: str | None = None,
    ) -> None:
        """A sleep or event wait ended (succeeded or timed_out), from ``started_at`` (ms).
        ``sender`` is the trace context stored with the event the wait took (see
        ``sending``)."""

    def parked(self, run: Any, wake_at: int) -> None:
        """The run leaves memory until ``wake_at`` (ms) or an event."""

    def status_changed(
        self, workflow: str, old: InstanceStatus | None, new: InstanceStatus
    ) -> None:
        """An instance moved from ``old`` (None: new) to ``new``."""

    def census(self, status: InstanceStatus, count: int) -> None:
        """At start: ``count`` stored instances are in the unfinished ``status``."""

    def committed(self, seconds: float, rows: int) -> None:
        """A group commit of ``rows`` rows took ``seconds``."""
