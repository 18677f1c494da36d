"""Cron schedules on a real store (SQLite, or PostgreSQL with
CRUZFLOW_TEST_STORE=postgres): validation, firing, pause, trigger, delete,
the catch-up policies after a restart, the config's schedules, DST, and
two engines on one PostgreSQL; then the RPCs over gRPC and HTTP.

Due times come from schedules with a seconds field ("* * * * * *"), so a
test waits for a count of fires, never for a span of time; "nothing fired"
is checked against another schedule's fires, the test's clock.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from cruzflow.server.engine.core import ms
from cruzflow.server.engine.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from cruzflow.server.engine.runtime import Engine
from cruzflow.server.engine.schedules import Cron, ScheduleSpec, due_instance_id, plan
from cruzflow.server.records import CatchUp, ScheduleOrigin, ScheduleRecord
from cruzflow.server.store.base import Store
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import ON_POSTGRES, Server, eventually, finished

TRANSPORTS = ("grpc", "http")

EVERY_SECOND = "* * * * * *"

Factory = Callable[..., Awaitable[Engine]]


@pytest.fixture
def engines(make_engine: Factory) -> Factory:
    """Engines with schedules on the test's stores (conftest's make_engine,
    with ``schedules=`` and ``before=``); all stopped afterwards."""
    return make_engine


async def stop(engine: Engine) -> None:
    await engine.shutdown(0.1)
    await engine.store.close()


async def fired(engine: Engine, schedule_id: str) -> list[str]:
    """The ids of the instances the schedule created, oldest first."""
    out: list[str] = []
    token = ""
    while True:
        page, token = await engine.list_instances(
            schedule_id=schedule_id, page_size=1000, page_token=token
        )
        out += [r.id for r in page]
        if not token:
            return sorted(out)


def spec(schedule_id: str = "tick", **kwargs: Any) -> ScheduleSpec:
    fields: dict[str, Any] = {"workflow": "three-steps", "cron": EVERY_SECOND, **kwargs}
    return ScheduleSpec(id=schedule_id, **fields)


# ------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("fields", "kind", "words"),
    [
        ({"cron": "0 9 * *"}, InvalidArgument, "cron: '0 9 * *' has 4 fields"),
        ({"cron": "61 * * * *"}, InvalidArgument, "cron: '61 * * * *' is not a valid cron"),
        ({"cron": "0 9 * * FUNDAY"}, InvalidArgument, "is not a valid cron expression"),
        ({"cron": "0 0 30 2 *"}, InvalidArgument, "matches no date"),
        ({"timezone": "Mars/Olympus"}, InvalidArgument, "timezone: 'Mars/Olympus' is not an IANA"),
        ({"timezone": "../etc/passwd"}, InvalidArgument, "timezone:"),
        ({"workflow": "nope"}, NotFound, "workflow: 'nope' is not registered"),
        ({"params": b"{oops"}, InvalidArgument, "params_json"),
        ({"workflow": "typed-params", "params": b'{"orderId": 1}'}, InvalidArgument, "params"),
    ],
)
async def test_bad_schedules_are_refused_and_nothing_is_stored(
    engines: Factory, fields: dict[str, Any], kind: type[Exception], words: str
) -> None:
    engine = await engines()
    with pytest.raises(kind, match=words.replace("*", r"\*").replace("(", r"\(")):
        await engine.create_schedule(spec(**fields))
    assert (await engine.list_schedules())[0] == []


async def test_bad_schedule_ids_are_refused(engines: Factory) -> None:
    engine = await engines()
    for bad in ("", "-dash", "has space", "x" * 65):
        with pytest.raises(InvalidArgument, match="schedule_id"):
            await engine.create_schedule(spec(bad))
    await engine.create_schedule(spec("ok", paused=True))
    with pytest.raises(AlreadyExists, match="exists already"):
        await engine.create_schedule(spec("ok"))
    with pytest.raises(NotFound, match="no schedule 'missing'"):
        await engine.get_schedule("missing")


# ---------------------------------------------------------------- firing


async def test_each_due_time_fires_once_with_a_derived_id(engines: Factory) -> None:
    engine = await engines()
    created = await engine.create_schedule(spec(params=b'{"from": "cron"}'))
    assert created.origin is ScheduleOrigin.API and created.catch_up is CatchUp.ONCE
    ids = await eventually(lambda: _at_least(engine, "tick", 3))
    dues = [_due_of(i) for i in ids]
    # Consecutive seconds, each once, all after the schedule was made.
    assert dues == list(range(dues[0], dues[0] + 1000 * len(dues), 1000))
    assert dues[0] > created.created_at
    record = await finished(engine, ids[0])
    assert record.schedule_id == "tick"
    assert json.loads(record.output)["params"] == {"from": "cron"}
    schedule = await engine.get_schedule("tick")
    assert schedule.last_due_at is not None and schedule.last_due_at >= dues[-1]
    assert schedule.last_instance_id == due_instance_id("tick", schedule.last_due_at)
    next_due = engine.next_due(schedule)
    assert next_due is not None and next_due > schedule.last_due_at


async def test_pause_stops_firing_and_resume_skips_what_passed(engines: Factory) -> None:
    engine = await engines()
    await engine.create_schedule(spec("paused"))
    await engine.create_schedule(spec("clock"))
    await eventually(lambda: _at_least(engine, "paused", 1))
    paused = await engine.pause_schedule("paused")
    assert paused.paused and engine.next_due(paused) is None
    before = await fired(engine, "paused")
    # Three more seconds on the clock schedule: the paused one fires none.
    start = len(await fired(engine, "clock"))
    await eventually(lambda: _at_least(engine, "clock", start + 3))
    assert await fired(engine, "paused") == before
    resumed = await engine.resume_schedule("paused")
    assert not resumed.paused and resumed.cursor_at >= paused.updated_at
    after = await eventually(lambda: _at_least(engine, "paused", len(before) + 1))
    # The first fire after the resume is a due time after it: none caught up.
    new = [_due_of(i) for i in after if i not in before]
    assert min(new) > resumed.updated_at - 1000


async def test_trigger_fires_now_even_when_paused(engines: Factory) -> None:
    engine = await engines()
    await engine.create_schedule(spec("manual", paused=True, params=b"[1, 2]"))
    instance_id, _ = await engine.trigger_schedule("manual")
    assert instance_id.startswith("sched-manual-now-")
    record = await finished(engine, instance_id)
    assert record.schedule_id == "manual"
    assert json.loads(record.output)["params"] == [1, 2]
    second, _ = await engine.trigger_schedule("manual")
    assert second != instance_id
    assert await fired(engine, "manual") == sorted([instance_id, second])
    with pytest.raises(NotFound):
        await engine.trigger_schedule("nope")


async def test_delete_stops_it_and_keeps_its_instances(engines: Factory) -> None:
    engine = await engines()
    await engine.create_schedule(spec("gone"))
    await engine.create_schedule(spec("clock"))
    await eventually(lambda: _at_least(engine, "gone", 1))
    await engine.delete_schedule("gone")
    with pytest.raises(NotFound):
        await engine.get_schedule("gone")
    kept = await fired(engine, "gone")
    start = len(await fired(engine, "clock"))
    await eventually(lambda: _at_least(engine, "clock", start + 3))
    assert await fired(engine, "gone") == kept
    with pytest.raises(NotFound):
        await engine.delete_schedule("gone")
    # The id is free again.
    await engine.create_schedule(spec("gone", paused=True))


# ------------------------------------------------------- across restarts


def _old(schedule_id: str, cron: str, catch_up: CatchUp, cursor_at: int) -> ScheduleRecord:
    return ScheduleRecord(
        id=schedule_id,
        workflow="three-steps",
        cron=cron,
        timezone="UTC",
        params=b"null",
        catch_up=catch_up,
        paused=False,
        origin=ScheduleOrigin.API,
        created_at=cursor_at,
        updated_at=cursor_at,
        cursor_at=cursor_at,
    )


async def test_catch_up_after_downtime_follows_the_policy(engines: Factory) -> None:
    """A store whose schedules last fired two years ago (the server was down):
    ``once`` fires the latest missed due time, once; ``skip`` fires none."""
    now = datetime.now(UTC)
    two_years_ago = round(datetime(now.year - 2, 6, 1, tzinfo=UTC).timestamp() * 1000)

    async def before(store: Store) -> None:
        for schedule_id, policy in (("once", CatchUp.ONCE), ("skip", CatchUp.SKIP)):
            # New Year's midnight: years apart from any run of this test.
            record = _old(schedule_id, "0 0 1 1 *", policy, two_years_ago)
            assert await store.put_schedule(record)

    engine = await engines(before=before)
    new_year = round(datetime(now.year, 1, 1, tzinfo=UTC).timestamp() * 1000)
    ids = await eventually(lambda: _at_least(engine, "once", 1))
    assert ids == [due_instance_id("once", new_year)]
    skipped = await eventually(lambda: _cursor_at_least(engine, "skip", new_year))
    assert skipped.last_due_at is None
    assert await fired(engine, "skip") == []
    # A restart fires nothing more: the cursors hold.
    await stop(engine)
    engine = await engines()
    await engine.create_schedule(spec("clock"))
    await eventually(lambda: _at_least(engine, "clock", 2))
    assert await fired(engine, "once") == ids
    assert await fired(engine, "skip") == []


async def test_a_fire_cut_short_by_a_crash_is_not_fired_twice(engines: Factory) -> None:
    """The instance of a due time exists but the cursor was not moved (the
    server died in between): the next server counts it as fired."""
    now = ms()

    async def before(store: Store) -> None:
        assert await store.put_schedule(_old("cut", EVERY_SECOND, CatchUp.ONCE, now - 3000))

    engine = await engines(before=before)
    ids = await eventually(lambda: _at_least(engine, "cut", 4))
    dues = [_due_of(i) for i in ids]
    # The grace covers the three seconds of "downtime": each fires, once.
    assert dues == list(range(dues[0], dues[0] + 1000 * len(dues), 1000))
    assert dues[0] <= now - 1000
    # Move its cursor back to before those fires (as a crash before the
    # mark would leave it), restart: the fired due times stay once each.
    await stop(engine)

    async def rewind(store: Store) -> None:
        await store.delete_schedule("cut")
        assert await store.put_schedule(_old("cut", EVERY_SECOND, CatchUp.ONCE, now - 3000))

    engine = await engines(before=rewind)
    later = await eventually(lambda: _at_least(engine, "cut", len(ids) + 2))
    dues = [_due_of(i) for i in later]
    assert len(set(dues)) == len(dues)
    assert all(i in later for i in ids)


async def test_a_stored_schedule_this_server_cannot_read_does_not_stop_the_others(
    engines: Factory,
) -> None:
    """A row whose cron this server does not know (written by another version,
    say) is left out; the other schedules fire."""

    async def before(store: Store) -> None:
        assert await store.put_schedule(_old("odd", "every full moon", CatchUp.ONCE, ms()))

    engine = await engines(before=before)
    await engine.create_schedule(spec("fine"))
    await eventually(lambda: _at_least(engine, "fine", 2))
    assert await fired(engine, "odd") == []
    # Still listed, with no next due time here.
    listed = {r.id: r for r in (await engine.list_schedules())[0]}
    assert engine.next_due(listed["odd"]) is None


def test_plan_fires_on_time_dues_and_applies_the_policy_to_missed_ones() -> None:
    """The rule itself, at a chosen now: on time within the grace, missed before."""
    cron = Cron("*/10 * * * * *", "UTC")
    now = 1_800_000_005_000  # 5 s past a due time
    on_time = [now - 55_000 + 10_000 * k for k in range(6)]
    for policy, missed in ((CatchUp.SKIP, []), (CatchUp.ONCE, [now - 65_000])):
        record = _old("p", cron.expression, policy, now - 3_600_000)
        fires, cursor = plan(record, cron, now, 60_000)
        assert fires == missed + on_time
        assert cursor == now - 5_000
    # Nothing missed: the cursor is within the grace.
    record = _old("p", cron.expression, CatchUp.ONCE, now - 20_000)
    assert plan(record, cron, now, 60_000) == ([now - 15_000, now - 5_000], now - 5_000)
    # Missed, and nothing due since: skip only moves the cursor.
    record = _old("p", "0 0 1 1 *", CatchUp.SKIP, now - 2 * 366 * 86_400_000)
    fires, cursor = plan(record, Cron("0 0 1 1 *", "UTC"), now, 60_000)
    assert fires == [] and cursor == _utc("2027-01-01T00:00:00+00:00")


# --------------------------------------------------------------- config


async def test_config_schedules_are_upserted_and_owned_by_the_config(engines: Factory) -> None:
    configured = [spec("nightly", cron="0 3 * * *", timezone="Europe/Paris", params=b"{}")]
    engine = await engines(schedules=configured)
    stored = await engine.get_schedule("nightly")
    assert stored.origin is ScheduleOrigin.CONFIG and stored.timezone == "Europe/Paris"
    with pytest.raises(AlreadyExists, match="config"):
        await engine.create_schedule(spec("nightly"))
    with pytest.raises(FailedPrecondition, match=r"\[\[schedules\]\]"):
        await engine.delete_schedule("nightly")
    # Pausing one is an operation, kept across restarts; the config's edit wins.
    await engine.pause_schedule("nightly")
    await stop(engine)
    engine = await engines(schedules=[spec("nightly", cron="0 4 * * *")])
    stored = await engine.get_schedule("nightly")
    assert stored.cron == "0 4 * * *" and stored.timezone == "UTC" and stored.paused
    # Gone from the config: gone from the store; API schedules stay.
    await engine.create_schedule(spec("mine", paused=True))
    await stop(engine)
    engine = await engines()
    with pytest.raises(NotFound):
        await engine.get_schedule("nightly")
    assert (await engine.get_schedule("mine")).origin is ScheduleOrigin.API


# ------------------------------------------------------------------ DST


def _utc(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def test_dst_spring_gap_fires_after_it_and_autumn_repeat_fires_once() -> None:
    daily = Cron("30 2 * * *", "Europe/Paris")
    # 2026-03-29: 02:00 -> 03:00 local; 02:30 does not exist: 03:00 (01:00Z).
    assert daily.next_after(_utc("2026-03-28T12:00:00+00:00")) == _utc("2026-03-29T01:00:00+00:00")
    # 2026-10-25: 03:00 -> 02:00 local; 02:30 happens twice: the first only.
    first = daily.next_after(_utc("2026-10-24T12:00:00+00:00"))
    assert first == _utc("2026-10-25T00:30:00+00:00")
    assert daily.next_after(first) == _utc("2026-10-26T01:30:00+00:00")
    # An hourly schedule runs every elapsed hour, the repeated one too.
    hourly = Cron("0 * * * *", "Europe/Paris")
    at = _utc("2026-10-24T23:30:00+00:00")
    dues = []
    for _ in range(4):
        at = hourly.next_after(at)
        dues.append(at)
    assert dues == [_utc(f"2026-10-25T0{h}:00:00+00:00") for h in range(4)]
    # New York's own change (2026-03-08): 09:00 local is 13:00Z after it.
    ny = Cron("0 9 * * *", "America/New_York")
    assert ny.next_after(_utc("2026-03-07T15:00:00+00:00")) == _utc("2026-03-08T13:00:00+00:00")


# --------------------------------------------------------------- replicas


@pytest.mark.skipif(not ON_POSTGRES, reason="two servers share a PostgreSQL store only")
async def test_two_engines_on_one_postgres_fire_each_due_time_once(engines: Factory) -> None:
    configured = [spec("shared")]
    one = await engines("shared", schedules=configured)
    two = await engines("shared", schedules=configured)
    ids = await eventually(lambda: _at_least(one, "shared", 6))
    dues = [_due_of(i) for i in ids]
    assert dues == list(range(dues[0], dues[0] + 1000 * len(dues), 1000))
    assert await fired(two, "shared") == await fired(one, "shared")


# ---------------------------------------------------------------- helpers


async def _at_least(engine: Engine, schedule_id: str, count: int) -> list[str] | None:
    ids = await fired(engine, schedule_id)
    return ids if len(ids) >= count else None


async def _cursor_at_least(engine: Engine, schedule_id: str, at: int) -> ScheduleRecord | None:
    record = await engine.get_schedule(schedule_id)
    return record if record.cursor_at >= at else None


def _due_of(instance_id: str) -> int:
    stamp = instance_id.rsplit("-", 1)[1]
    when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return round(when.timestamp() * 1000)


# ------------------------------------------------------------------ RPCs


def _schedule(schedule_id: str = "api", **kwargs: Any) -> pb.Schedule:
    fields: dict[str, Any] = {"workflow": "three-steps", "cron": EVERY_SECOND, **kwargs}
    return pb.Schedule(schedule_id=schedule_id, **fields)


async def test_rpcs_create_get_list_pause_resume_trigger_delete(server: Server) -> None:
    stub = server.stub
    created = await stub.CreateSchedule(
        pb.CreateScheduleRequest(
            schedule=_schedule(params_json='{"a": 1}', timezone="Europe/Paris", paused=True)
        )
    )
    s = created.schedule
    assert s.origin == pb.SCHEDULE_ORIGIN_API and s.catch_up == pb.CATCH_UP_POLICY_ONCE
    assert s.paused and not s.HasField("next_due_time") and s.timezone == "Europe/Paris"
    await stub.CreateSchedule(
        pb.CreateScheduleRequest(schedule=_schedule("other", catch_up=pb.CATCH_UP_POLICY_SKIP))
    )
    listed = await stub.ListSchedules(pb.ListSchedulesRequest(page_size=1))
    assert [x.schedule_id for x in listed.schedules] == ["api"] and listed.next_page_token
    rest = await stub.ListSchedules(
        pb.ListSchedulesRequest(page_size=1, page_token=listed.next_page_token)
    )
    assert [x.schedule_id for x in rest.schedules] == ["other"] and not rest.next_page_token
    other = (await stub.GetSchedule(pb.GetScheduleRequest(schedule_id="other"))).schedule
    assert other.catch_up == pb.CATCH_UP_POLICY_SKIP and other.HasField("next_due_time")

    triggered = await stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id="api"))
    assert triggered.instance_id.startswith("sched-api-now-")
    listed_instances = await stub.ListInstances(pb.ListInstancesRequest(schedule_id="api"))
    assert [i.instance_id for i in listed_instances.instances] == [triggered.instance_id]
    assert listed_instances.instances[0].schedule_id == "api"
    assert listed_instances.instances[0].params_json == '{"a": 1}'

    resumed = await stub.ResumeSchedule(pb.ResumeScheduleRequest(schedule_id="api"))
    assert not resumed.schedule.paused and resumed.schedule.HasField("next_due_time")

    async def fired_by_cron() -> Any:
        page = await stub.ListInstances(pb.ListInstancesRequest(schedule_id="api"))
        due = [i for i in page.instances if "-now-" not in i.instance_id]
        return due or None

    first = (await eventually(fired_by_cron))[0]
    status = await stub.GetStatus(pb.GetStatusRequest(instance_id=first.instance_id))
    assert status.instance.schedule_id == "api"
    paused = await stub.PauseSchedule(pb.PauseScheduleRequest(schedule_id="api"))
    assert paused.schedule.paused and paused.schedule.last_instance_id

    await stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id="api"))
    await stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id="other"))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetSchedule(pb.GetScheduleRequest(schedule_id="api"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("schedule", "code", "words"),
    [
        (_schedule(cron="every day"), grpc.StatusCode.INVALID_ARGUMENT, "cron:"),
        (_schedule(timezone="Paris"), grpc.StatusCode.INVALID_ARGUMENT, "timezone:"),
        (_schedule(workflow="nope"), grpc.StatusCode.NOT_FOUND, "workflow:"),
        (_schedule(""), grpc.StatusCode.INVALID_ARGUMENT, "schedule_id: required"),
        (
            _schedule(catch_up=7),
            grpc.StatusCode.INVALID_ARGUMENT,
            "catch_up",
        ),
    ],
)
async def test_rpc_refusals(server: Server, schedule: pb.Schedule, code: Any, words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.stub.CreateSchedule(pb.CreateScheduleRequest(schedule=schedule))
    assert refused.value.code() == code
    assert words in (refused.value.details() or "")
    listed = await server.stub.ListSchedules(pb.ListSchedulesRequest())
    assert list(listed.schedules) == []


async def test_list_instances_rejects_a_malformed_schedule_filter(server: Server) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await server.stub.ListInstances(pb.ListInstancesRequest(schedule_id="bad id"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "schedule_id" in (refused.value.details() or "")
