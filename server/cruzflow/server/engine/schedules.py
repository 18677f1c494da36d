"""Cron schedules: an instance of a workflow at each due time.

A schedule fires a due time by creating an instance whose id is derived
from the schedule and the due time (``sched-<id>-<UTC time>``), so that a
due time fires once however many servers try, and however often a server
is killed between creating the instance and recording that it did: the
store refuses a second instance of that id, and the refusal counts as
fired. The schedule's row keeps a cursor (every due time up to it is done
with) so that a restart knows what it missed; the catch-up policy says what
happens to due times that no server fired within the grace
(``limits.schedule_grace_s``): ``skip`` passes over them, ``once`` fires
the most recent of them.

Cron expressions are croniter's (five fields, or six with seconds first),
read in the schedule's IANA time zone through ``zoneinfo``. In autumn, a
wall-clock time that occurs twice fires at its first occurrence only
(unless the hour field is ``*``: such a schedule runs by the elapsed
hour); in spring, a time the clocks skip fires at the first time after the
gap. Both as cron (cronie) does.

One task sleeps until the earliest due time of all schedules, woken early
when a schedule changes here; on a store several servers share it also
reloads the schedules every few seconds, to learn of the ones made
elsewhere. A server with no schedule wakes only for that reload.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from cruzflow.server.engine import validate
from cruzflow.server.engine.admission import Admission
from cruzflow.server.engine.core import Core, ms
from cruzflow.server.engine.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from cruzflow.server.records import CatchUp, InstanceStatus, ScheduleOrigin, ScheduleRecord
from cruzflow.server.store.base import StoreError

log = logging.getLogger("cruzflow.schedules")

MAX_SCHEDULE_ID_LENGTH = 64
"""Longest schedule id: with ``sched-`` and the trigger suffix its instance
ids stay within the default 100 characters."""
_ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_EXAMPLES = (
    "e.g. '0 9 * * MON' (09:00 on Mondays), or six with seconds first, e.g. '*/10 * * * * *'"
)
# The longest suffix of a derived instance id: "-now-" and a time to the ms.
_SUFFIX = len("-now-20260101T000000000Z")
# On a store several servers share: how often the schedules are read again,
# to learn of those made (or changed) on another server.
RELOAD_MS = 10_000
# At most this many due times fire at one look at a schedule (a schedule
# every second with a grace of a day would fire 86,400 otherwise).
MAX_FIRES_PER_LOOK = 100
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A schedule as a caller or the config gives it."""

    id: str
    workflow: str
    cron: str
    timezone: str = "UTC"
    params: bytes = b""
    """JSON text; empty means null."""
    catch_up: CatchUp = CatchUp.ONCE
    paused: bool = False


class Cron:
    """A cron expression read in a time zone; times in ms since the epoch."""

    def __init__(self, expression: str, timezone: str) -> None:
        self.expression = expression
        self.zone = zone(timezone)
        fields = expression.split()
        if not expression.startswith("@") and len(fields) not in (5, 6):
            raise InvalidArgument(
                f"cron: {expression!r} has {len(fields)} fields; give five (minute hour "
                f"day-of-month month day-of-week), {_EXAMPLES}"
            )
        self._seconds = len(fields) == 6
        hour = fields[2 if self._seconds else 1] if len(fields) >= 5 else ""
        self._wild_hour = hour == "*"
        try:
            croniter(expression, datetime.now(self.zone), second_at_beginning=self._seconds)
        except (CroniterError, ValueError, KeyError) as exc:
            raise InvalidArgument(
                f"cron: {expression!r} is not a valid cron expression ({exc}); {_EXAMPLES}"
            ) from None
        try:
            self.next_after(ms())
        except CroniterBadDateError:
            raise InvalidArgument(
                f"cron: {expression!r} matches no date (such as the 30th of February); {_EXAMPLES}"
            ) from None

    def _iter(self, at_ms: int) -> croniter:
        start = datetime.fromtimestamp(at_ms / 1000, self.zone)
        return croniter(self.expression, start, second_at_beginning=self._seconds)

    def _kept(self, when: datetime) -> bool:
        # The second occurrence of a wall-clock time that occurs twice
        # (autumn's change) is left out. croniter may set fold on times that
        # occur once, so the zone is asked whether the time is ambiguous.
        if self._wild_hour or when.fold == 0:
            return True
        return when.replace(fold=0).utcoffset() == when.utcoffset()

    def next_after(self, at_ms: int) -> int:
        """The first due time after ``at_ms``."""
        it = self._iter(at_ms)
        while True:
            when: datetime = it.get_next(datetime)
            if self._kept(when):
                return round(when.timestamp() * 1000)

    def last_until(self, at_ms: int) -> int:
        """The last due time at or before ``at_ms``."""
        it = self._iter(at_ms + 1)
        while True:
            when: datetime = it.get_prev(datetime)
            if self._kept(when):
                return round(when.timestamp() * 1000)


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``, or InvalidArgument."""
    try:
        if not name or name != name.strip() or ".." in name or name.startswith("/"):
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument(
            f"timezone: {name[:100]!r} is not an IANA time zone; use a name such as "
            f"'Europe/Paris' or 'America/New_York', or 'UTC' (the default when empty)"
        ) from None


def check_schedule_id(schedule_id: str, field: str = "schedule_id") -> None:
    if not schedule_id:
        raise InvalidArgument(f"{field}: required; name the schedule, e.g. 'weekly-report'")
    if len(schedule_id) > MAX_SCHEDULE_ID_LENGTH or not _ID_PATTERN.fullmatch(schedule_id):
        raise InvalidArgument(
            f"{field}: {schedule_id[:100]!r} is not a valid schedule id; use 1 to "
            f"{MAX_SCHEDULE_ID_LENGTH} characters of A-Z, a-z, 0-9, '_' and '-', not starting "
            f"with '-'"
        )


def _compact(at_ms: int, millis: bool = False) -> str:
    when = datetime.fromtimestamp(at_ms / 1000, UTC)
    text = when.strftime("%Y%m%dT%H%M%S")
    return f"{text}{at_ms % 1000:03d}Z" if millis else f"{text}Z"


def due_instance_id(schedule_id: str, due_ms: int) -> str:
    """The id of the instance a schedule creates at a due time: the same on
    every server, so that the due time fires once."""
    return f"sched-{schedule_id}-{_compact(due_ms)}"


def trigger_instance_id(schedule_id: str, at_ms: int) -> str:
    """The id of an instance TriggerSchedule creates (never a due time's)."""
    return f"sched-{schedule_id}-now-{_compact(at_ms, millis=True)}"


def plan(record: ScheduleRecord, cron: Cron, now: int, grace_ms: int) -> tuple[list[int], int]:
    """The due times to fire at ``now``, in order, and the new cursor.

    Due times within ``grace_ms`` before ``now`` are on time and fire; the
    ones before that were missed: ``once`` fires the most recent of them,
    ``skip`` none.
    """
    late = now - grace_ms
    fires: list[int] = []
    if record.catch_up is CatchUp.ONCE and record.cursor_at < late:
        missed = cron.last_until(late)
        if missed > record.cursor_at:
            fires.append(missed)
    due = cron.next_after(max(record.cursor_at, late))
    while due <= now:
        fires.append(due)
        due = cron.next_after(due)
    if len(fires) > MAX_FIRES_PER_LOOK:
        log.warning(
            "schedule %r: %d due times at once; the oldest %d are passed over",
            record.id,
            len(fires),
            len(fires) - MAX_FIRES_PER_LOOK,
        )
        fires = fires[-MAX_FIRES_PER_LOOK:]
    cursor = max(record.cursor_at, fires[-1] if fires else cron.last_until(now))
    return fires, cursor


class Schedules:
    def __init__(
        self, core: Core, admission: Admission, configured: Sequence[ScheduleSpec]
    ) -> None:
        self._core = core
        self._admission = admission
        self._configured = list(configured)
        self._config_ids = frozenset(s.id for s in configured)
        # The schedules known here, with their cron and next due time (None
        # while paused).
        self._known: dict[str, tuple[ScheduleRecord, Cron, int | None]] = {}
        self._kick = asyncio.Event()

    # ------------------------------------------------------------- checks
    def check(self, spec: ScheduleSpec) -> tuple[Cron, bytes]:
        """Validate a schedule's fields; raises a ServiceError naming the field."""
        check_schedule_id(spec.id)
        room = self._core.limits.max_instance_id_length - len("sched-") - _SUFFIX
        if len(spec.id) > room:
            raise InvalidArgument(
                f"schedule_id: {len(spec.id)} characters; its instance ids would pass "
                f"limits.max_instance_id_length ({self._core.limits.max_instance_id_length}), "
                f"so use at most {max(room, 0)}"
            )
        cron = Cron(spec.cron, spec.timezone or "UTC")
        # The workflow and params as CreateInstance checks them (with an id of
        # the schedule's, so that the id is checked too).
        _, params, _ = self._admission.check_new(
            spec.workflow, trigger_instance_id(spec.id, ms()), spec.params, ""
        )
        return cron, params

    # ---------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Store the config's schedules (the config wins over what the store
        holds under their ids) and drop the config's former ones."""
        now = ms()
        for spec in self._configured:
            try:
                _, params = self.check(spec)
            except ServiceError as exc:
                raise InvalidArgument(f"[[schedules]] {spec.id!r}: {exc}") from None
            await self._core.store.put_schedule(
                self._record(spec, params, ScheduleOrigin.CONFIG, now), replace=True
            )
        for gone in await self._core.store.drop_config_schedules(sorted(self._config_ids)):
            log.info("schedule %r is no longer in the config: deleted", gone)

    async def loop(self) -> None:
        reload_at = 0
        while not self._core.stopping:
            now = ms()
            # After a failure, nothing is tried again for a second (a store
            # that is down must not make this loop spin).
            calm_until = 0
            try:
                if now >= reload_at:
                    await self._reload()
                    reload_at = now + RELOAD_MS if self._core.shared else 2**62
                for schedule_id, (_, _, due) in list(self._known.items()):
                    if due is not None and due <= ms():
                        await self._fire_due(schedule_id)
            except (StoreError, ServiceError) as exc:
                # A store that cannot be reached now must not end the schedules.
                log.warning("schedules: %s; trying again in 1 s", exc)
                reload_at = min(reload_at, ms() + 1000)
                calm_until = ms() + 1000
            except Exception:
                log.exception("schedules: unexpected error; trying again in 1 s")
                reload_at = min(reload_at, ms() + 1000)
                calm_until = ms() + 1000
            dues = [due for _, _, due in self._known.values() if due is not None]
            until = max(min([reload_at, *dues]), calm_until)
            self._kick.clear()
            # At least a millisecond: a wait of 0 would not yield to the loop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(until - ms(), 1) / 1000)

    async def _reload(self) -> None:
        after = ""
        seen: dict[str, tuple[ScheduleRecord, Cron, int | None]] = {}
        while True:
            page = await self._core.store.list_schedules(None, after, 1000)
            for record in page:
                try:
                    seen[record.id] = self._entry(record)
                except ServiceError as exc:
                    # One schedule this server cannot read (a cron or zone it
                    # does not know) must not stop the others.
                    log.warning("schedule %r is left out: %s", record.id, exc)
            if len(page) < 1000:
                break
            after = page[-1].id
        self._known = seen

    def _entry(self, record: ScheduleRecord) -> tuple[ScheduleRecord, Cron, int | None]:
        cron = Cron(record.cron, record.timezone)
        return record, cron, None if record.paused else cron.next_after(record.cursor_at)

    def _changed(self, record: ScheduleRecord | None, schedule_id: str) -> None:
        if record is None:
            self._known.pop(schedule_id, None)
        else:
            self._known[schedule_id] = self._entry(record)
        self._kick.set()

    # ------------------------------------------------------------- firing
    async def _fire_due(self, schedule_id: str) -> None:
        # Read afresh: another server may have paused, deleted or fired it.
        record = await self._core.store.get_schedule(schedule_id)
        if record is None or record.paused:
            self._changed(record, schedule_id)
            return
        cron = Cron(record.cron, record.timezone)
        grace_ms = round(self._core.limits.schedule_grace_s * 1000)
        fires, cursor = plan(record, cron, ms(), grace_ms)
        for due in fires:
            instance_id = due_instance_id(record.id, due)
            await self._create(record, instance_id)
            await self._core.store.mark_schedule(record.id, due, instance_id)
            record.cursor_at = max(record.cursor_at, due)
            record.last_due_at, record.last_instance_id = due, instance_id
        if cursor > record.cursor_at:
            await self._core.store.mark_schedule(record.id, cursor)
            record.cursor_at = cursor
        self._known[schedule_id] = (record, cron, cron.next_after(record.cursor_at))

    async def _create(self, record: ScheduleRecord, instance_id: str) -> InstanceStatus | None:
        """Create the instance of a due time; None if it exists (fired already)."""
        try:
            _, status = await self._admission.create(
                record.workflow, instance_id, record.params, schedule_id=record.id
            )
        except AlreadyExists:
            return None
        except (InvalidArgument, NotFound) as exc:
            # The schedule no longer fits this server (its workflow is gone, or
            # its params no longer pass the workflow's check): said, not retried.
            log.warning("schedule %r cannot fire %s: %s", record.id, instance_id, exc)
            return None
        log.debug("schedule %r fired %s", record.id, instance_id)
        return status

    # -------------------------------------------------------------- calls
    def _record(
        self, spec: ScheduleSpec, params: bytes, origin: ScheduleOrigin, now: int
    ) -> ScheduleRecord:
        return ScheduleRecord(
            id=spec.id,
            workflow=spec.workflow,
            cron=spec.cron,
            timezone=spec.timezone or "UTC",
            params=params,
            catch_up=spec.catch_up,
            paused=spec.paused,
            origin=origin,
            created_at=now,
            updated_at=now,
            # Nothing before its creation fires.
            cursor_at=now,
        )

    def next_due(self, record: ScheduleRecord) -> int | None:
        """When the schedule fires next; None while paused."""
        if record.paused:
            return None
        try:
            return Cron(record.cron, record.timezone).next_after(max(record.cursor_at, ms()))
        except ServiceError:
            return None  # a cron this server cannot read: it does not fire here

    async def create(self, spec: ScheduleSpec) -> ScheduleRecord:
        self._core.refuse_while_store_fails()
        _, params = self.check(spec)
        if spec.id in self._config_ids:
            raise AlreadyExists(
                f"schedule_id: {spec.id!r} is a schedule of the server's config; choose "
                f"another id (the config's schedules are changed in the config)"
            )
        record = self._record(spec, params, ScheduleOrigin.API, ms())
        if not await self._core.store.put_schedule(record):
            raise AlreadyExists(
                f"schedule_id: a schedule {spec.id!r} exists already; choose another id, or "
                f"delete that one first"
            )
        self._changed(record, record.id)
        return record

    async def get(self, schedule_id: str) -> ScheduleRecord:
        check_schedule_id(schedule_id)
        record = await self._core.store.get_schedule(schedule_id)
        if record is None:
            raise NotFound(
                f"schedule_id: no schedule {schedule_id!r}; see ListSchedules for those there are"
            )
        return record

    async def list(
        self, workflow: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ScheduleRecord], str]:
        if workflow:
            validate.check_workflow(workflow)
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size: {page_size} is out of range; use 1 to {MAX_PAGE_SIZE}, or 0 for "
                f"{DEFAULT_PAGE_SIZE}"
            )
        after = _decode_token(page_token, workflow) if page_token else ""
        page = await self._core.store.list_schedules(workflow or None, after, size + 1)
        more = len(page) > size
        page = page[:size]
        return page, _encode_token(page[-1].id, workflow) if more else ""

    async def pause(self, schedule_id: str, paused: bool) -> ScheduleRecord:
        self._core.refuse_while_store_fails()
        await self.get(schedule_id)
        if not await self._core.store.pause_schedule(schedule_id, paused, ms()):
            raise NotFound(f"schedule_id: no schedule {schedule_id!r}; it was deleted meanwhile")
        record = await self.get(schedule_id)
        self._changed(record, schedule_id)
        return record

    async def delete(self, schedule_id: str) -> None:
        self._core.refuse_while_store_fails()
        record = await self.get(schedule_id)
        if record.origin is ScheduleOrigin.CONFIG:
            raise FailedPrecondition(
                f"schedule_id: {schedule_id!r} is a schedule of the server's config; remove its "
                f"[[schedules]] entry from the config and restart the server (or pause it now)"
            )
        await self._core.store.delete_schedule(schedule_id)
        self._changed(None, schedule_id)

    async def trigger(self, schedule_id: str) -> tuple[str, InstanceStatus]:
        """Create an instance of the schedule now, apart from its due times."""
        record = await self.get(schedule_id)
        at = ms()
        for attempt in range(3):
            # Two triggers in one millisecond: the second takes the next one.
            instance_id = trigger_instance_id(schedule_id, at + attempt)
            try:
                return await self._admission.create(
                    record.workflow, instance_id, record.params, schedule_id=record.id
                )
            except AlreadyExists:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


def _encode_token(after: str, workflow: str) -> str:
    body = json.dumps({"after": after, "workflow": workflow}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_token(token: str, workflow: str) -> str:
    try:
        if len(token) > 1000:
            raise ValueError("too long")
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, issued_for = body["after"], body["workflow"]
        if type(after) is not str or type(issued_for) is not str:
            raise ValueError("bad fields")
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise InvalidArgument(
            "page_token: not a token ListSchedules issued; send the next_page_token of the "
            "previous page, or none for the first page"
        ) from None
    if issued_for != workflow:
        raise InvalidArgument(
            "page_token: issued for another workflow filter; send the same workflow as the "
            "call that returned it, or no page_token to start again"
        )
    return after
