"""What the ``cruzflow`` client commands print: for people, and as JSON.

Everything here is pure: it takes plain view objects (filled from the typed
client's answers by :mod:`cruzflow.server.commands`) and returns text, so the
formatting is testable without a server, and the live ``watch`` view is one
function of a folded state and the current time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

FINAL_STATUSES = frozenset({"complete", "errored", "terminated"})

# How each status is spelt for people: the model's camelCase label is fine
# for JSON (scripts match on it), but "waiting for pause" reads better.
_STATUS_WORDS = {"waitingForPause": "waiting for pause"}
# How a step of each kind is named in event lines ("step" for step.do).
_WHAT = {
    "sleep": "sleep",
    "waitForEvent": "wait",
    "child": "child",
    "rollback": "rollback",
    "version": "version",
}


@dataclass(frozen=True, slots=True)
class ErrorView:
    """An error as Python names it: the exception class and its text, and
    where it was raised (None when no code raised it)."""

    name: str
    message: str
    traceback: str | None = None

    def __str__(self) -> str:
        return f"{self.name}: {self.message}" if self.message else self.name

    def to_json(self) -> dict[str, str]:
        """``{"name": ..., "message": ...}``, with ``"traceback"`` when there is one."""
        out = {"name": self.name, "message": self.message}
        if self.traceback:
            out["traceback"] = self.traceback
        return out


def error_json(error: ErrorView | None) -> dict[str, str] | None:
    """An error as JSON, or None."""
    return None if error is None else error.to_json()


def traceback_lines(error: ErrorView | None, indent: str, style: Style) -> list[str]:
    """The error's traceback, indented under the line that names the error."""
    if error is None or not error.traceback:
        return []
    return [style.paint(indent + line, "2") for line in error.traceback.rstrip().splitlines()]


NEAR_LIMIT = 0.8
"""The share of limits.max_payload_bytes from which a payload is flagged: it
still fits, but one that keeps growing will soon be refused."""


@dataclass(frozen=True, slots=True)
class SizesView:
    """The stored size of an instance's payloads (bytes of JSON) against the
    limit that params, each step result and the output must each stay within."""

    params: int
    output: int
    largest_step: int
    total: int
    limit: int

    def to_json(self) -> dict[str, int]:
        """The sizes as a JSON object, named as in the proto's PayloadSizes."""
        return {
            "params_bytes": self.params,
            "output_bytes": self.output,
            "largest_step_bytes": self.largest_step,
            "total_bytes": self.total,
            "limit_bytes": self.limit,
        }


@dataclass(slots=True)
class StepView:
    """One step of an instance as the CLI shows it."""

    index: int
    name: str
    occurrence: int = 1
    kind: str = "do"  # "do", "sleep" or "waitForEvent", as the client spells them
    status: str = "running"  # "running", "succeeded" or "failed"
    attempts: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    output: Any = None
    has_output: bool = False
    error: ErrorView | None = None  # the last failed attempt's
    next_attempt_time: datetime | None = None
    event_type: str = ""
    output_bytes: int = 0  # the stored size of its result

    def to_json(self) -> dict[str, Any]:
        """The step as a JSON object (times as RFC 3339 UTC strings)."""
        out: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "occurrence": self.occurrence,
            "kind": self.kind,
            "status": self.status,
            "attempts": self.attempts,
            "start_time": iso(self.start_time),
            "end_time": iso(self.end_time),
            "output": self.output,
            "error": error_json(self.error),
            "next_attempt_time": iso(self.next_attempt_time),
            "output_bytes": self.output_bytes,
        }
        if self.event_type:
            out["event_type"] = self.event_type
        return out


@dataclass(slots=True)
class InstanceView:
    """An instance (and, from GetStatus, its steps) as the CLI shows it."""

    instance_id: str
    workflow: str = ""
    status: str = "unknown"
    params: Any = None
    output: Any = None
    error: ErrorView | None = None  # set once errored
    create_time: datetime | None = None
    update_time: datetime | None = None
    end_time: datetime | None = None
    wake_time: datetime | None = None
    lookup_key: str = ""
    last_sequence: int = 0
    steps: list[StepView] = field(default_factory=list)
    start_time: datetime | None = None  # the current run's: the creation or the last restart
    priority: int = 0  # orders the instances waiting for a concurrency slot
    concurrency_key: str = ""  # the key whose slot it takes (a workflow limited per key)
    payloads: SizesView | None = None  # None when the server does not report them
    repairs: list[RepairView] = field(default_factory=list)  # audited, oldest first

    @property
    def final(self) -> bool:
        """Whether the instance has reached complete, errored or terminated."""
        return self.status in FINAL_STATUSES

    def to_json(self, *, with_steps: bool = True) -> dict[str, Any]:
        """The instance as a JSON object; ``with_steps`` adds its steps."""
        out: dict[str, Any] = {
            "instance_id": self.instance_id,
            "workflow": self.workflow,
            "status": self.status,
            "params": self.params,
            "output": self.output,
            "error": error_json(self.error),
            "create_time": iso(self.create_time),
            "update_time": iso(self.update_time),
            "end_time": iso(self.end_time),
            "wake_time": iso(self.wake_time),
            "start_time": iso(self.start_time),
            "lookup_key": self.lookup_key or None,
            "last_sequence": self.last_sequence,
        }
        if self.payloads is not None:
            out["payloads"] = self.payloads.to_json()
        if self.repairs:
            out["repairs"] = [r.to_json() for r in self.repairs]
        if with_steps:
            out["steps"] = [step.to_json() for step in self.steps]
        return out


@dataclass(frozen=True, slots=True)
class RepairView:
    """One audited change of an instance's steps (RepairInstance, or a restart
    from a step or with a reason)."""

    time: datetime | None
    actor: str
    reason: str
    action: str  # "set_output", "retry" or "restart"
    step: str | None  # the step's name (with #N past its first occurrence)
    output: Any = None

    def text(self) -> str:
        """``set the output of 'charge' (by ops): "wrong amount"``."""
        what = {
            "set_output": f"set the output of {self.step!r} to {compact_json(self.output, 80)}",
            "retry": f"retry {self.step!r}",
            "restart": f"restart from {self.step!r}" if self.step else "restart",
        }.get(self.action, self.action)
        return f"{what} (by {self.actor}): {json.dumps(self.reason, ensure_ascii=False)}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": iso(self.time), "actor": self.actor, "reason": self.reason,
            "action": self.action, "step": self.step,
        }  # fmt: skip
        if self.action == "set_output":
            out["output"] = self.output
        return out


@dataclass(slots=True)
class EventView:
    """One event of an instance's log (a WatchInstance message).

    ``kind`` is one of ``status_changed``, ``step_started``,
    ``attempt_failed``, ``step_succeeded`` and ``step_failed``; the fields a
    kind does not carry keep their defaults.
    """

    instance_id: str
    sequence: int
    time: datetime | None
    kind: str
    status: str = ""  # status_changed
    output: Any = None  # status_changed (complete), step_succeeded
    has_output: bool = False
    error: ErrorView | None = None  # status_changed (errored), attempt_failed, step_failed
    step_index: int = 0
    step_name: str = ""
    step_occurrence: int = 1
    step_kind: str = "do"
    attempt: int = 0
    next_attempt_time: datetime | None = None
    retry_delay: float | None = None  # seconds
    repair: RepairView | None = None  # repaired

    @property
    def final(self) -> bool:
        """Whether this event ends the instance (and so the watch)."""
        return self.kind == "status_changed" and self.status in FINAL_STATUSES

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object: one line of ``watch --json``."""
        out: dict[str, Any] = {
            "instance_id": self.instance_id,
            "sequence": self.sequence,
            "time": iso(self.time),
            "kind": self.kind,
        }
        if self.kind == "status_changed":
            out["status"] = self.status
            if self.has_output:
                out["output"] = self.output
            if self.error is not None:
                out["error"] = self.error.to_json()
            return out
        if self.repair is not None:
            out["repair"] = self.repair.to_json()
            return out
        out["step"] = {
            "index": self.step_index,
            "name": self.step_name,
            "occurrence": self.step_occurrence,
            "kind": self.step_kind,
        }
        out["attempt"] = self.attempt
        if self.kind == "step_succeeded":
            out["output"] = self.output
        if self.error is not None:
            out["error"] = self.error.to_json()
        if self.kind == "attempt_failed":
            out["next_attempt_time"] = iso(self.next_attempt_time)
            out["retry_delay"] = self.retry_delay
        return out


@dataclass(slots=True)
class WorkflowView:
    """A workflow class the server hosts."""

    name: str
    binding: str = ""
    class_name: str = ""

    def to_json(self) -> dict[str, Any]:
        """The workflow as a JSON object."""
        return {"name": self.name, "binding": self.binding, "class_name": self.class_name}


# --- small formatters -------------------------------------------------------


def iso(when: datetime | None) -> str | None:
    """RFC 3339 in UTC with milliseconds, or None."""
    if when is None:
        return None
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def local_time(when: datetime | None) -> str:
    """A timestamp in the local zone, to the second, for people."""
    if when is None:
        return "-"
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def clock(when: datetime | None) -> str:
    """The local time of day with milliseconds: the column of event lines."""
    if when is None:
        return "--:--:--.---"
    return when.astimezone().strftime("%H:%M:%S.%f")[:-3]


def duration(seconds: float) -> str:
    """``850 ms``, ``4.2 s``, ``3 m 05 s``, ``2 h 10 m``, ``3 d 4 h``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} m"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def status_word(status: str) -> str:
    """A status as people read it (``waitingForPause`` becomes two words)."""
    return _STATUS_WORDS.get(status, status)


def compact_json(value: Any, limit: int = 0) -> str:
    """JSON on one line; cut to ``limit`` characters with an ellipsis if given."""
    text = json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
    if limit and len(text) > limit:
        return text[: max(1, limit - 1)] + "…"
    return text


def json_line(value: Any) -> str:
    """One line of JSON for scripts (``--json``): compact, stable key order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_doc(value: Any) -> str:
    """A JSON document for scripts, indented so people can read it too."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def size(n: int) -> str:
    """A byte count for people, in binary units: ``512 B``, ``1.2 KiB``, ``1 MiB``."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1023.95:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def near_limit(n: int, limit: int) -> bool:
    """Whether a payload of ``n`` bytes is within sight of ``limit`` (NEAR_LIMIT)."""
    return limit > 0 and n >= NEAR_LIMIT * limit


def attempts_word(n: int) -> str:
    """``1 attempt``, ``3 attempts``."""
    return f"{n} attempt" if n == 1 else f"{n} attempts"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


# --- colour and symbols -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Style:
    """How to decorate text: ANSI colours, and Unicode symbols or ASCII ones."""

    color: bool = False
    unicode: bool = True

    def paint(self, text: str, code: str) -> str:
        """Wrap ``text`` in an SGR ``code`` when colours are on."""
        return f"\x1b[{code}m{text}\x1b[0m" if self.color and text else text

    def status(self, status: str) -> str:
        """An instance status, coloured by how it is doing."""
        code = {
            "complete": "32",
            "errored": "31",
            "terminated": "31",
            "paused": "33",
            "waitingForPause": "33",
            "waiting": "36",
            "queued": "2",
            "running": "34",
        }.get(status, "0")
        return self.paint(status_word(status), code)

    def step_mark(self, step: StepView) -> str:
        """One symbol per step status: done, failed, retrying, waiting, running."""
        if step.status == "succeeded":
            return self.paint("✓" if self.unicode else "+", "32")
        if step.status == "failed":
            return self.paint("✗" if self.unicode else "x", "31")
        if step.next_attempt_time is not None and step.kind == "do":
            return self.paint("↻" if self.unicode else "r", "33")
        if step.kind != "do":
            return self.paint("…" if self.unicode else ".", "36")
        return self.paint("▸" if self.unicode else ">", "34")


PLAIN = Style()
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Text without ANSI escape sequences (what a terminal shows)."""
    return _ANSI.sub("", text)


# --- one instance, for people -----------------------------------------------


def payloads_text(sizes: SizesView, style: Style = PLAIN, *, steps: bool = True) -> str:
    """``params 22 B, output 41 B, largest step 7 B; limit 1 MiB each``; a part
    near the limit is marked with its share of it (``params 900 KiB (88%)``). ``steps`` adds the largest
    step result; the output shows once there is one."""
    parts = [("params", sizes.params)]
    if sizes.output:
        parts.append(("output", sizes.output))
    if steps and sizes.largest_step:
        parts.append(("largest step", sizes.largest_step))
    shown = []
    for label, n in parts:
        text = f"{label} {size(n)}"
        if near_limit(n, sizes.limit):
            text = style.paint(f"{text} ({n / sizes.limit:.0%})", "33")
        shown.append(text)
    return f"{', '.join(shown)}; limit {size(sizes.limit)} each"


def step_line(
    step: StepView,
    now: datetime,
    style: Style = PLAIN,
    name_width: int = 0,
    instance_status: str = "running",
    payload_limit: int = 0,
) -> str:
    """One step: mark, name, status, attempts, how long, and what it waits on or
    failed with. ``instance_status`` tells a step that is still going from one
    whose instance was paused or has ended meanwhile; a result near
    ``payload_limit`` (limits.max_payload_bytes) is flagged with its size."""
    name = step.name if step.occurrence <= 1 else f"{step.name} #{step.occurrence}"
    ended = instance_status in FINAL_STATUSES and step.status == "running"
    paused = instance_status in ("paused", "waitingForPause") and step.status == "running"
    parts = [step.status]
    if step.kind == "do":
        parts.append(attempts_word(step.attempts))
    elif step.kind == "sleep":
        parts[0] = "sleeping" if step.status == "running" else step.status
    elif step.kind == "waitForEvent":
        what = f"event {step.event_type!r}" if step.event_type else "an event"
        parts[0] = f"waiting for {what}" if step.status == "running" else step.status
    if ended:
        # The instance ended (terminated) while this step was under way.
        parts[0] = f"stopped: the instance is {instance_status}"
    if step.start_time is not None:
        end = step.end_time or (step.start_time if ended else now)
        if not ended:
            parts.append(duration((end - step.start_time).total_seconds()))
    if step.status == "running" and step.next_attempt_time is not None and not ended:
        left = (step.next_attempt_time - now).total_seconds()
        if step.kind == "do":
            text = f"next attempt in {duration(left)}" if left > 0 else "next attempt due"
        elif step.kind == "sleep":
            text = f"wakes in {duration(left)}" if left > 0 else "wakes now"
        else:
            text = f"times out in {duration(left)}" if left > 0 else "times out now"
        # A paused instance does nothing until resumed; then the same times hold.
        parts.append(f"{text}, once resumed" if paused else text)
    if near_limit(step.output_bytes, payload_limit):
        share = step.output_bytes / payload_limit
        parts.append(
            style.paint(
                f"result {size(step.output_bytes)} ({share:.0%} of the {size(payload_limit)} limit)",
                "33",
            )
        )
    text = f"{style.step_mark(step)} {name.ljust(name_width)}  {'  '.join(parts)}"
    if step.error is not None:
        label = "error" if step.status == "failed" else "last error"
        text += "  " + style.paint(f"{label}: {step.error}", "31")
    return text


def instance_lines(view: InstanceView, now: datetime, style: Style = PLAIN) -> list[str]:
    """``cruzflow status``: the instance's fields, then one line per step."""
    rows: list[tuple[str, str]] = [
        ("instance", view.instance_id),
        ("workflow", view.workflow),
        ("status", style.status(view.status)),
    ]
    if view.lookup_key:
        rows.append(("lookup key", view.lookup_key))
    if view.concurrency_key:
        rows.append(("concurrency key", view.concurrency_key))
    if view.priority:
        rows.append(("priority", str(view.priority)))
    rows.append(("created", local_time(view.create_time)))
    began = view.start_time or view.create_time
    if view.start_time is not None and view.start_time != view.create_time:
        rows.append(("restarted", local_time(view.start_time)))
    if view.end_time is not None:
        took = ""
        if began is not None:
            # The current run's time: from its creation or its last restart.
            took = f" (took {duration((view.end_time - began).total_seconds())})"
        rows.append(("ended", local_time(view.end_time) + took))
    elif view.update_time is not None:
        rows.append(("updated", local_time(view.update_time)))
    if view.wake_time is not None and not view.final:
        left = (view.wake_time - now).total_seconds()
        rows.append(("wakes", f"{local_time(view.wake_time)} (in {duration(left)})"))
    rows.append(("params", compact_json(view.params, 200)))
    if view.status == "complete":
        rows.append(("output", compact_json(view.output, 400)))
    if view.payloads is not None:
        rows.append(("payloads", payloads_text(view.payloads, style, steps=bool(view.steps))))
    if view.error is not None:
        rows.append(("error", style.paint(str(view.error), "31")))
    rows += [("repaired", f"{local_time(r.time)}  {r.text()}") for r in view.repairs]
    width = max(len(key) for key, _ in rows)
    lines = []
    for key, value in rows:
        lines.append(f"{key.ljust(width)}  {value}")
        if key == "error":
            lines += traceback_lines(view.error, " " * (width + 2), style)
    shown = view.error.traceback if view.error is not None else None
    if view.steps:
        lines.append(f"steps ({len(view.steps)})")
        name_width = max(len(_step_name(s)) for s in view.steps)
        for s in view.steps:
            limit = view.payloads.limit if view.payloads is not None else 0
            lines.append("  " + step_line(s, now, style, name_width, view.status, limit))
            # A step's traceback, unless it is the one shown with the instance's error.
            if s.error is not None and s.error.traceback != shown:
                lines += traceback_lines(s.error, "      ", style)
    else:
        lines.append(f"{'steps'.ljust(width)}  none yet")
    return lines


def _step_name(step: StepView) -> str:
    return step.name if step.occurrence <= 1 else f"{step.name} #{step.occurrence}"


def instances_table(views: Sequence[InstanceView], now: datetime) -> str:
    """``cruzflow list``: one row per instance, newest first as the server sends them."""
    rows = []
    for v in views:
        age = "-"
        if v.create_time is not None:
            age = duration((now - v.create_time).total_seconds()) + " ago"
        rows.append(
            [v.instance_id, v.workflow, status_word(v.status), local_time(v.create_time), age]
            + ([v.lookup_key] if any(x.lookup_key for x in views) else [])
        )
    headers = ["ID", "WORKFLOW", "STATUS", "CREATED", "AGE"]
    if any(x.lookup_key for x in views):
        headers.append("LOOKUP KEY")
    return table(headers, rows)


def workflows_table(views: Sequence[WorkflowView]) -> str:
    """``cruzflow workflows``: the hosted workflows."""
    return table(["NAME", "BINDING", "CLASS"], [[w.name, w.binding, w.class_name] for w in views])


# --- the event log, one line per event --------------------------------------


def event_line(event: EventView, took: float | None = None) -> str:
    """One event for people: ``#3  17:01:02.125  step one started (attempt 1)``.

    ``took`` is how long the step's attempt (or sleep, or wait) ran, in
    seconds, when the event ends one and its start is known (see
    :class:`EventLines`)."""
    head = f"#{event.sequence:<3} {clock(event.time)}  "
    if event.kind == "status_changed":
        text = f"status {status_word(event.status)}"
        if event.has_output and event.status == "complete":
            text += f"  output {compact_json(event.output, 200)}"
        if event.error is not None:
            text += f"  error {event.error}"
        return head + text
    name = (
        event.step_name
        if event.step_occurrence <= 1
        else (f"{event.step_name} #{event.step_occurrence}")
    )
    what = _WHAT.get(event.step_kind, "step")
    after = "" if took is None else f" after {duration(took)}"
    if event.kind == "step_started":
        attempt = f" (attempt {event.attempt})" if event.step_kind == "do" else ""
        return head + f"{what} {name} started{attempt}"
    if event.kind == "attempt_failed":
        retry = ""
        if event.retry_delay is not None:
            retry = f"; retry in {duration(event.retry_delay)}"
        return head + f"{what} {name} attempt {event.attempt} failed{after}: {event.error}{retry}"
    if event.kind == "step_succeeded":
        return head + f"{what} {name} succeeded{after}  output {compact_json(event.output, 200)}"
    if event.kind == "step_failed":
        return head + f"{what} {name} failed{after}: {event.error}"
    if event.repair is not None:
        return head + f"repaired: {event.repair.text()}"
    return head + event.kind


class EventLines:
    """``watch`` piped: the lines of each event, with how long each step's
    attempt took (from its start event) and the traceback of each failure."""

    def __init__(self, style: Style = PLAIN) -> None:
        self._style = style
        self._started: dict[int, datetime] = {}
        self._current = ""  # the step that started last, as "sleep NAME" or "wait NAME"

    def lines(self, event: EventView) -> list[str]:
        took = None
        line = ""
        if event.kind == "step_started":
            if event.time is not None:
                self._started[event.step_index] = event.time
            what = _WHAT.get(event.step_kind, "step")
            self._current = f"{what} {event.step_name}"
        elif event.kind in ("attempt_failed", "step_succeeded", "step_failed"):
            began = self._started.get(event.step_index)
            if began is not None and event.time is not None:
                took = (event.time - began).total_seconds()
        elif event.kind == "status_changed" and event.status == "waiting" and self._current:
            line = f"  in {self._current}"  # what it waits on
        first = event_line(event, took) + line
        return [first, *traceback_lines(event.error, "      ", self._style)]


# --- the live view of ``watch`` ----------------------------------------------


def apply_event(view: InstanceView, event: EventView) -> bool:
    """Fold one event into ``view``, so the live view follows the log.

    Events at or before ``view.last_sequence`` are already in the view (it
    came from a GetStatus read that saw them) and are skipped: folding an
    old event into a newer view would move it backwards. Returns whether the
    event was applied.
    """
    if event.sequence <= view.last_sequence:
        return False
    view.last_sequence = event.sequence
    if event.time is not None:
        view.update_time = event.time
    if event.kind == "status_changed":
        view.status = event.status
        if event.has_output:
            view.output = event.output
        if event.error is not None:
            view.error = event.error
        if event.final:
            view.end_time = event.time
        elif event.status in ("running", "queued"):
            # A restart or resume: whatever wake time was shown has passed.
            view.wake_time = None
            view.end_time = None
            view.error = None
        return True
    step = _step_for(view, event)
    if event.kind == "step_started":
        step.status = "running"
        step.attempts = max(step.attempts, event.attempt)
        step.next_attempt_time = None
        if step.start_time is None:
            step.start_time = event.time
    elif event.kind == "attempt_failed":
        step.error = event.error
        step.next_attempt_time = event.next_attempt_time
    elif event.kind == "step_succeeded":
        step.status = "succeeded"
        step.output = event.output
        step.has_output = True
        step.end_time = event.time
        step.next_attempt_time = None
    elif event.kind == "step_failed":
        step.status = "failed"
        step.error = event.error
        step.end_time = event.time
        step.next_attempt_time = None
    return True


def _step_for(view: InstanceView, event: EventView) -> StepView:
    """The step an event is about, made if new.

    A restarted run starts again at index 0: a step starting at a position
    that already holds a finished step means the old run's steps from there
    on are gone, as they are on the server.
    """
    for i, step in enumerate(view.steps):
        if step.index != event.step_index:
            continue
        if event.kind != "step_started":
            return step
        same = step.name == event.step_name and step.occurrence == event.step_occurrence
        if same and step.status == "running":
            return step  # the next attempt of the same step
        del view.steps[i:]
        break
    step = StepView(
        index=event.step_index,
        name=event.step_name,
        occurrence=event.step_occurrence,
        kind=event.step_kind,
    )
    view.steps.append(step)
    view.steps.sort(key=lambda s: s.index)
    return step


def live_lines(
    view: InstanceView, now: datetime, style: Style = PLAIN, note: str = ""
) -> list[str]:
    """The compact live view: a status line, then one line per step."""
    head = f"{style.paint(view.instance_id, '1')}  {view.workflow}  {style.status(view.status)}"
    began = view.start_time or view.create_time
    if began is not None:
        end = view.end_time if view.final and view.end_time else now
        head += f"  {duration((end - began).total_seconds())}"
    if view.status == "waiting" and view.wake_time is not None:
        head += f"  wakes in {duration((view.wake_time - now).total_seconds())}"
    lines = [head]
    if view.steps:
        name_width = max(len(_step_name(s)) for s in view.steps)
        lines += ["  " + step_line(s, now, style, name_width, view.status) for s in view.steps]
    else:
        lines.append("  (no steps yet)")
    if view.status == "complete":
        lines.append("output " + compact_json(view.output, 400))
    if view.error is not None:
        lines.append(style.paint(f"error  {view.error}", "31"))
        lines += traceback_lines(view.error, "       ", style)
    if note:
        lines.append(style.paint(note, "2"))
    return lines


def clip(lines: Sequence[str], rows: int) -> list[str]:
    """At most ``rows`` lines: the first (the status line), a note of how many
    are left out, then the last ones (the newest steps)."""
    if rows <= 0 or len(lines) <= rows:
        return list(lines)
    if rows < 3:
        return list(lines[:rows])
    hidden = len(lines) - rows + 1
    return [lines[0], f"  ... {hidden} more lines above", *lines[hidden + 1 :]]


def fit(lines: Sequence[str], columns: int) -> list[str]:
    """Cut each line to the terminal's width so none wraps (a wrapped line
    would break the count of lines the next redraw moves up over)."""
    if columns <= 0:
        return list(lines)
    out = []
    for line in lines:
        visible = strip_ansi(line)
        if len(visible) <= columns:
            out.append(line)
            continue
        # Colours are dropped from a cut line: cutting inside an escape is worse.
        out.append(visible[: max(1, columns - 1)] + "…")
    return out


class LiveScreen:
    """Redraws a block of lines in place with ANSI cursor movement.

    Each frame moves the cursor up over the previous frame, clears to the end
    of the screen and writes the new lines; nothing else is needed (no
    curses), and what stays on the screen at the end is the last frame.
    """

    HIDE_CURSOR = "\x1b[?25l"
    SHOW_CURSOR = "\x1b[?25h"

    def __init__(self) -> None:
        self._shown: list[str] = []

    def frame(self, lines: Sequence[str]) -> str:
        """The text that replaces the previous frame with ``lines`` ("" if they are the same)."""
        if self._shown and list(lines) == self._shown:
            return ""
        up = f"\x1b[{len(self._shown)}F" if self._shown else "\r"
        self._shown = list(lines)
        return up + "\x1b[J" + "\n".join(lines) + "\n"
