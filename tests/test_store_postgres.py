"""The PostgreSQL store as several servers share it: leases, fencing, notices,
migrations, faults and costs, on a real server (tests/postgres.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from cruzflow.server.engine.journal import Journal
from cruzflow.server.records import (
    Batch,
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
    StepStatus,
)
from cruzflow.server.store.base import StoreError
from cruzflow.server.store.postgres import (
    APPLY_ARGS,
    HOT_QUERIES,
    MIGRATIONS,
    PostgresStore,
    _apply_args,
)
from tests.conftest import eventually

if TYPE_CHECKING:
    from tests.postgres import PostgresServer

pytest_plugins = ["tests.postgres"]

Opener = Callable[..., Awaitable[PostgresStore]]

BRIEF = 0.8
"""The lease period of a server that is about to lose its lease: long enough
for a few statements on a busy machine, short enough to wait out."""


@pytest.fixture
async def open_store(postgres_url: str) -> AsyncIterator[Opener]:
    """Open stores on this test's database (each a server of its own); all are
    closed after the test."""
    opened: list[PostgresStore] = []

    async def open_(url: str = postgres_url, **options: Any) -> PostgresStore:
        store = PostgresStore(url, **options)
        await store.open()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


def _new(i: str, status: InstanceStatus = InstanceStatus.RUNNING) -> InstanceRecord:
    return InstanceRecord(i, "wf", status, b'{"p":1}', 10, 10)


def _created(*records: InstanceRecord) -> Batch:
    batch = Batch()
    batch.new_instances += records
    batch.events += [
        EventRecord(r.id, 1, 10, EventKind.STATUS_CHANGED, {"status": int(r.status)})
        for r in records
    ]
    return batch


def _update(i: str, status: InstanceStatus, at: int = 20) -> Batch:
    batch = Batch()
    batch.instance_updates[i] = InstanceUpdate(i, status, at)
    return batch


def _holder(server: PostgresServer, url: str, instance_id: str) -> str:
    """The instance row's owner and epoch, as psql prints them ("|" when free)."""
    database = url.rsplit("/", 1)[1]
    return server.psql(
        f"SELECT owner, epoch FROM instances WHERE id = '{instance_id}'", database
    ).strip()


async def _expire(store: PostgresStore, lease: Lease) -> None:
    """Wait until ``lease`` (of a store with a short lease period) is dead."""
    period = store.lease_period_s
    assert period is not None and period <= BRIEF
    await asyncio.sleep(period + 0.1)
    assert not await store.renew(lease)


# ------------------------------------------------------------------ ownership


async def test_two_leases_claim_disjoint_sets_concurrently(open_store: Opener) -> None:
    one, two = await open_store(), await open_store()
    maker = await one.acquire("maker")
    ids = [f"q{n:03d}" for n in range(300)]
    await one.apply(_created(*(_new(i, InstanceStatus.QUEUED) for i in ids)), maker)
    a, b = await one.acquire("a"), await two.acquire("b")

    async def drain(store: PostgresStore, lease: Lease) -> list[str]:
        taken: list[str] = []
        while chunk := await store.claim(lease, 7):
            taken += [r.id for r in chunk]
        return taken

    got_a, got_b = await asyncio.gather(drain(one, a), drain(two, b))
    # A claimer that met only rows the other had locked got none: once more.
    got_a += await drain(one, a)
    got_b += await drain(two, b)
    assert not set(got_a) & set(got_b)
    assert sorted(got_a + got_b) == ids
    assert got_a and got_b, "both claimed some"
    assert got_a == sorted(got_a) and got_b == sorted(got_b), "oldest first"


async def test_an_expired_lease_has_its_instances_taken_over(open_store: Opener) -> None:
    brief, steady = await open_store(lease_period_s=BRIEF), await open_store()
    a = await brief.acquire("server-a")
    await brief.apply(_created(_new("x"), _new("w", InstanceStatus.WAITING_FOR_PAUSE)), a)
    b = await steady.acquire("server-b")
    assert await steady.claim(b, 10) == [], "held by a live lease"
    assert await brief.renew(a)
    await _expire(brief, a)
    assert [r.id for r in await steady.claim(b, 10)] == ["x", "w"]
    assert await steady.claim(b, 10) == []


async def test_a_write_under_a_lost_lease_is_fenced_and_the_rest_lands(
    open_store: Opener,
) -> None:
    brief, steady = await open_store(lease_period_s=BRIEF), await open_store()
    a = await brief.acquire("server-a")
    created = _created(_new("x"), _new("y"))
    created.inbox.append(InboxEvent("x", "go", b"{}", 11))
    await brief.apply(created, a)
    (event,) = await brief.take_events("x", "go", 1)
    await _expire(brief, a)
    b = await steady.acquire("server-b")
    assert [r.id for r in await steady.claim(b, 10)] == ["x", "y"]
    # Server a, paused past its lease, writes on as if nothing happened.
    stale = Batch()
    stale.instance_updates["x"] = InstanceUpdate(
        "x", InstanceStatus.COMPLETE, 30, b"1", ended_at=30
    )
    stale.events.append(EventRecord("x", 2, 30, EventKind.STATUS_CHANGED, {"status": 6}))
    stale.steps[("y", 0)] = StepRecord("y", 0, "s", 1, StepStatus.RUNNING, 1, 30)
    stale.consumed[event.id] = ("x", 0)
    stale.new_instances += [_new("r"), _new("q", InstanceStatus.QUEUED)]
    stale.events.append(EventRecord("q", 1, 30, EventKind.STATUS_CHANGED, {"status": 1}))
    stale.inbox.append(InboxEvent("y", "go", b'{"n":2}', 30))
    refused = await brief.apply(stale, a)
    assert refused == {"x": Refusal.FENCED, "y": Refusal.FENCED, "r": Refusal.FENCED}
    x = await steady.get_instance("x")
    assert x is not None and (x.status, x.last_seq) == (InstanceStatus.RUNNING, 1)
    assert await steady.get_steps("y") == []
    assert [e.id for e in await steady.take_events("x", "go", 10)] == [event.id]
    assert await steady.get_instance("r") is None
    # Not held by anyone, so not fenced: a queued create, and an event sent.
    q = await steady.get_instance("q")
    assert q is not None and q.last_seq == 1
    assert [e.payload for e in await steady.take_events("y", "go", 10)] == [b'{"n":2}']
    # The new holder's writes land.
    assert await steady.apply(_update("x", InstanceStatus.COMPLETE), b) == {}


async def test_an_instance_another_live_lease_holds_is_fenced_alone(
    postgres_server: PostgresServer, postgres_url: str, open_store: Opener
) -> None:
    one, two = await open_store(), await open_store()
    a, b = await one.acquire("server-a"), await two.acquire("server-b")
    await one.apply(_created(_new("x"), _new("y")), a)
    # x waits (a lets go of it), then b wakes it: b holds it now.
    await one.apply(_update("x", InstanceStatus.WAITING), a)
    assert _holder(postgres_server, postgres_url, "x") == "|"
    assert await two.claim_one(b, "x") is not None
    both = Batch()
    both.instance_updates["x"] = InstanceUpdate("x", InstanceStatus.ERRORED, 40)
    both.instance_updates["y"] = InstanceUpdate("y", InstanceStatus.COMPLETE, 40)
    both.events += [
        EventRecord("x", 2, 40, EventKind.STATUS_CHANGED, {"status": 7}),
        EventRecord("y", 2, 40, EventKind.STATUS_CHANGED, {"status": 6}),
    ]
    assert await one.apply(both, a) == {"x": Refusal.FENCED}
    y = await one.get_instance("y")
    assert y is not None and (y.status, y.last_seq) == (InstanceStatus.COMPLETE, 2)
    x = await one.get_instance("x")
    assert x is not None and (x.status, x.last_seq) == (InstanceStatus.WAITING, 1)


async def test_release_frees_the_instances_at_once(open_store: Opener) -> None:
    one, two = await open_store(), await open_store()
    a = await one.acquire("server-a")
    await one.apply(_created(_new("x"), _new("w", InstanceStatus.WAITING)), a)
    b = await two.acquire("server-b")
    assert await two.claim(b, 10) == []
    await one.release(a)
    assert [r.id for r in await two.claim(b, 10)] == ["x"]
    assert not await one.renew(a)
    assert await one.apply(_update("x", InstanceStatus.COMPLETE), a) == {"x": Refusal.FENCED}


async def test_claim_one_of_an_instance_another_live_lease_holds_raises(
    open_store: Opener,
) -> None:
    brief, steady = await open_store(lease_period_s=BRIEF), await open_store()
    a = await brief.acquire("server-a")
    await brief.apply(_created(_new("x")), a)
    b = await steady.acquire("server-b")
    with pytest.raises(StoreError) as caught:
        await steady.claim_one(b, "x")
    assert "server-a" in str(caught.value)
    assert not caught.value.transient
    mine = await brief.claim_one(a, "x")
    assert mine is not None and mine.id == "x"
    assert await steady.claim_one(b, "nobody") is None
    await _expire(brief, a)
    taken = await steady.claim_one(b, "x")
    assert taken is not None and taken.status is InstanceStatus.RUNNING
    # A server whose lease is lost claims nothing more.
    with pytest.raises(StoreError, match=r"lease .* was lost") as lost:
        await brief.claim_one(a, "x")
    assert not lost.value.transient
    assert await brief.claim(a, 10) == []


@pytest.mark.parametrize(
    ("status", "free"),
    [
        (InstanceStatus.WAITING, True),
        (InstanceStatus.PAUSED, True),
        (InstanceStatus.COMPLETE, True),
        (InstanceStatus.ERRORED, True),
        (InstanceStatus.TERMINATED, True),
        (InstanceStatus.WAITING_FOR_PAUSE, False),
        (InstanceStatus.QUEUED, False),
    ],
)
async def test_a_write_that_parks_or_ends_an_instance_frees_it(
    postgres_server: PostgresServer,
    postgres_url: str,
    open_store: Opener,
    status: InstanceStatus,
    free: bool,
) -> None:
    store = await open_store()
    lease = await store.acquire("server-a")
    await store.apply(_created(_new("x"), _new("q", InstanceStatus.QUEUED)), lease)
    assert _holder(postgres_server, postgres_url, "x") == f"server-a|{lease.epoch}"
    assert _holder(postgres_server, postgres_url, "q") == "|", "created queued: anyone's"
    assert await store.apply(_update("x", status), lease) == {}
    expected = "|" if free else f"server-a|{lease.epoch}"
    assert _holder(postgres_server, postgres_url, "x") == expected


# ---------------------------------------------------------------- notification


async def test_notices_reach_the_other_servers(open_store: Opener) -> None:
    one, two = await open_store(), await open_store()
    heard_one: list[Notice] = []
    heard_two: list[Notice] = []
    one.subscribe(heard_one.extend)
    two.subscribe(heard_two.extend)
    await asyncio.wait_for(one.listening.wait(), 10)
    await asyncio.wait_for(two.listening.wait(), 10)
    a, b = await one.acquire("server-a"), await two.acquire("server-b")

    created = _created(_new("x"), _new("q", InstanceStatus.QUEUED))
    created.events.append(EventRecord("x", 2, 11, EventKind.STEP_STARTED, {"name": "s"}))
    await one.apply(created, a)
    expected = {
        Notice("x", NoticeKind.EVENTS, 2),
        Notice("q", NoticeKind.EVENTS, 1),
        Notice("q", NoticeKind.RUNNABLE, 0),
    }
    await eventually(lambda: _async(set(heard_two) >= expected), timeout=10)
    assert set(heard_two) == expected

    # x waits for an event; b accepts one for it: a (any server) may run it.
    parked = _update("x", InstanceStatus.WAITING)
    parked.events.append(EventRecord("x", 3, 20, EventKind.STATUS_CHANGED, {"status": 4}))
    await one.apply(parked, a)
    sent = Batch()
    sent.inbox.append(InboxEvent("x", "go", b"{}", 21))
    await two.apply(sent, b)
    await eventually(lambda: _async(Notice("x", NoticeKind.RUNNABLE) in heard_one), timeout=10)
    # Sent to a running instance, an event is told too: it may be about to park.
    heard_one.clear()
    assert await two.claim_one(b, "x") is not None
    running = _update("x", InstanceStatus.RUNNING, 30)
    running.inbox.append(InboxEvent("x", "go", b"{}", 31))
    await two.apply(running, b)
    await eventually(lambda: _async(Notice("x", NoticeKind.RUNNABLE) in heard_one), timeout=10)
    # Not so one sent to a finished or paused instance.
    heard_one.clear()
    ended = _created(_new("done", InstanceStatus.COMPLETE), _new("p", InstanceStatus.PAUSED))
    await two.apply(ended, b)
    late = Batch()
    late.inbox += [InboxEvent("done", "go", b"{}", 40), InboxEvent("p", "go", b"{}", 40)]
    await two.apply(late, b)
    await eventually(lambda: _async(Notice("p", NoticeKind.EVENTS, 1) in heard_one), timeout=10)
    await asyncio.sleep(0.2)
    assert not [n for n in heard_one if n.kind is NoticeKind.RUNNABLE], heard_one
    # A server does not hear its own commits.
    assert all(n.instance_id != "q" for n in heard_one)
    assert Notice("x", NoticeKind.EVENTS, 3) in heard_two

    # A large batch: its notices span several notifications, none lost.
    heard_two.clear()
    ids = [f"n{n:04d}-{'x' * 40}" for n in range(1000)]
    await one.apply(_created(*(_new(i, InstanceStatus.QUEUED) for i in ids)), a)
    await eventually(lambda: _async(len(heard_two) >= 2000), timeout=10)
    assert {n.instance_id for n in heard_two if n.kind is NoticeKind.RUNNABLE} == set(ids)
    assert {n.instance_id for n in heard_two if n.kind is NoticeKind.EVENTS} == set(ids)


async def _async(value: bool) -> bool:
    return value


async def test_release_tells_the_others_what_became_runnable(open_store: Opener) -> None:
    one, two = await open_store(), await open_store()
    heard: list[Notice] = []
    two.subscribe(heard.extend)
    await asyncio.wait_for(two.listening.wait(), 10)
    a = await one.acquire("server-a")
    await one.apply(_created(_new("x"), _new("w", InstanceStatus.WAITING)), a)
    await eventually(lambda: _async(Notice("w", NoticeKind.EVENTS, 1) in heard), timeout=10)
    await one.release(a)
    await eventually(lambda: _async(Notice("x", NoticeKind.RUNNABLE) in heard), timeout=10)
    assert Notice("w", NoticeKind.RUNNABLE) not in heard, "waiting: woken by its time or event"


# ----------------------------------------------------------------- migrations


async def test_two_servers_starting_at_once_both_migrate(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    stores = [PostgresStore(postgres_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        keys = {s.page_token_key() for s in stores}
        assert len(keys) == 1, "one secret for every server"
        lease = await stores[0].acquire("a")
        assert await stores[1].apply(_created(_new("x")), lease) == {}
    finally:
        for s in stores:
            await s.close()
    database = postgres_url.rsplit("/", 1)[1]
    version = postgres_server.psql("SELECT version FROM cruzflow_schema", database)
    assert version.split() == [str(len(MIGRATIONS))]
    # A database a newer cruzflow migrated is refused, not written.
    postgres_server.psql("UPDATE cruzflow_schema SET version = version + 1", database)
    newer = PostgresStore(postgres_url)
    with pytest.raises(StoreError, match="newer than this server knows"):
        await newer.open()
    await newer.close()


# ---------------------------------------------------------------------- faults


async def test_a_database_restart_holds_the_writes_and_loses_nothing(
    postgres_server: PostgresServer,
    postgres_url: str,
    open_store: Opener,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    store, other = await open_store(), await open_store()
    heard: list[Notice] = []
    other.subscribe(heard.extend)
    await asyncio.wait_for(other.listening.wait(), 10)
    lease = await store.acquire("server-a")
    durable: list[EventRecord] = []
    journal = Journal(store, lease, durable.extend)
    journal.start()
    errors: list[StoreError] = []
    try:
        journal.insert_instance(_new("x"))
        await journal.append(EventRecord("x", 1, 10, EventKind.STATUS_CHANGED, {"status": 2}))

        await asyncio.to_thread(postgres_server.stop)
        held = journal.append(EventRecord("x", 2, 11, EventKind.STEP_STARTED, {"name": "s"}))
        journal.put_step(StepRecord("x", 0, "s", 1, StepStatus.RUNNING, 1, 11))
        await eventually(lambda: _async(journal.fault is not None), timeout=10)
        assert journal.fault is not None
        errors.append(journal.fault)
        assert journal.fault.transient
        for read in (store.get_instance("x"), store.read_events("x", 0, 10)):
            with pytest.raises(StoreError) as caught:
                await read
            assert caught.value.transient
            errors.append(caught.value)
        assert not held.done(), "held, not dropped"

        await asyncio.to_thread(postgres_server.start)
        assert await asyncio.wait_for(held, 30) == {}
        assert journal.fault is None
    finally:
        await journal.close(give_up_after=1)
    assert [e.seq for e in await store.read_events("x", 0, 10)] == [1, 2], "once each"
    assert [s.name for s in await store.get_steps("x")] == ["s"]
    assert [e.seq for e in durable] == [1, 2]
    # The other server listens again by itself.
    await asyncio.wait_for(other.listening.wait(), 10)
    batch = Batch()
    batch.events.append(EventRecord("x", 3, 60, EventKind.STEP_SUCCEEDED, {"name": "s"}))
    assert await store.apply(batch, lease) == {}
    await eventually(lambda: _async(Notice("x", NoticeKind.EVENTS, 3) in heard), timeout=10)
    # Not a word of the password, in errors or logs.
    for error in errors:
        assert postgres_server.password not in str(error)
        assert "cruzflow:***@127.0.0.1" in str(error)
    assert postgres_server.password not in caplog.text


async def test_a_lost_reply_to_a_commit_applies_the_batch_once(
    open_store: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store()
    lease = await store.acquire("server-a")
    batch = _created(_new("x"))
    batch.inbox.append(InboxEvent("y", "go", b"{}", 10))
    call = store._call_apply

    async def committed_then_cut(args: list[Any]) -> asyncpg.Record:
        await call(args)
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(store, "_call_apply", committed_then_cut)
    with pytest.raises(StoreError) as caught:
        await store.apply(batch, lease)
    assert caught.value.transient
    monkeypatch.undo()
    # The journal tries the same batch again: it is known, not applied twice
    # (its new instance is not refused as a taken id either).
    assert await store.apply(batch, lease) == {}
    assert [e.seq for e in await store.read_events("x", 0, 10)] == [1]
    assert len(await store.take_events("y", "go", 10)) == 1
    # Another batch is another batch.
    again = _created(_new("x"))
    assert await store.apply(again, lease) == {"x": Refusal.CONFLICT}


async def test_a_password_never_reaches_an_error(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    secret = "Wr0ng-pass/word"
    quoted = "Wr0ng-pass%2Fword"
    port = postgres_server.port
    cases = [
        # wrong password
        (
            f"postgresql://cruzflow:{quoted}@127.0.0.1:{port}/{database}",
            "authentication failed",
            False,
        ),
        # nobody listens there
        (f"postgresql://cruzflow:{quoted}@127.0.0.1:1/{database}", "connection refused", True),
        # no such database
        (f"postgresql://cruzflow:{postgres_server.password}@127.0.0.1:{port}/nope", "", False),
        # the password as a parameter
        (f"postgresql://cruzflow@127.0.0.1:{port}/{database}?password={quoted}", "", False),
    ]
    for url, cause, transient in cases:
        store = PostgresStore(url, connect_timeout_s=5)
        assert secret not in repr(store) and quoted not in store.url
        with pytest.raises(StoreError) as caught:
            await store.open()
        message = str(caught.value)
        for hidden in (secret, quoted, postgres_server.password):
            assert hidden not in message, message
        assert "***" in message, message
        assert "check" in message, message
        assert caught.value.transient is transient
        if cause:
            assert caught.value.cause == cause
        await store.close()
    assert secret not in caplog.text and quoted not in caplog.text


async def test_commits_stay_synchronous_whatever_the_url_says(postgres_url: str) -> None:
    store = PostgresStore(postgres_url + "?synchronous_commit=off")
    await store.open()
    try:
        rows = await store._fetch("SHOW synchronous_commit")
        assert rows[0][0] == "on"
    finally:
        await store.close()


# ------------------------------------------------------------------------ costs


class _Counter:
    """A TCP relay between a client and PostgreSQL that counts round trips: each
    time the client speaks after the server did (or first) is one."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.round_trips = 0
        self._client_spoke_last = False
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_client: bool
        ) -> None:
            try:
                while data := await source.read(65536):
                    if from_client and not self._client_spoke_last:
                        self.round_trips += 1
                    self._client_spoke_last = from_client
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))


def _checkpoints(prefix: str, count: int) -> tuple[Batch, Batch]:
    """A batch creating ``count`` instances with a step and two events each, and
    the batch that finishes them."""
    start, finish = Batch(), Batch()
    for n in range(count):
        i = f"{prefix}-{n:05d}"
        start.new_instances.append(_new(i))
        start.steps[(i, 0)] = StepRecord(i, 0, "s", 1, StepStatus.RUNNING, 1, 11)
        start.events += [
            EventRecord(i, 1, 10, EventKind.STATUS_CHANGED, {"status": 2}),
            EventRecord(i, 2, 11, EventKind.STEP_STARTED, {"name": "s", "att": 1}),
        ]
        finish.steps[(i, 0)] = StepRecord(
            i, 0, "s", 1, StepStatus.SUCCEEDED, 1, 11, 12, output=b'{"ok":1}'
        )
        finish.instance_updates[i] = InstanceUpdate(
            i, InstanceStatus.COMPLETE, 13, b"1", ended_at=13
        )
        finish.events += [
            EventRecord(i, 3, 12, EventKind.STEP_SUCCEEDED, {"name": "s"}),
            EventRecord(i, 4, 13, EventKind.STATUS_CHANGED, {"status": 6}),
        ]
    return start, finish


async def test_one_apply_is_one_round_trip_and_one_commit_whatever_its_size(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    database = postgres_url.rsplit("/", 1)[1]
    relay = _Counter(postgres_server.port)
    await relay.start()
    url = postgres_url.replace(f":{postgres_server.port}/", f":{relay.port}/")
    store = PostgresStore(url, pool_size=1)
    await store.open()
    try:
        lease = await store.acquire("server-a")
        warm, _ = _checkpoints("warm", 1)
        await store.apply(warm, lease)  # the statement is prepared once per connection

        def statements() -> int:
            out = postgres_server.psql(
                "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s"
                f" JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '{database}'"
            )
            return int(out)

        def transactions() -> int:
            # Ids handed out so far: one per writing transaction, none per read.
            return int(postgres_server.psql("SELECT pg_snapshot_xmax(pg_current_snapshot())"))

        costs = {}
        for size in (1, 10, 1000):
            for n, batch in enumerate(_checkpoints(f"b{size}", size)):
                relay.round_trips = 0
                before = (statements(), transactions())
                assert await store.apply(batch, lease) == {}
                after = (statements(), transactions())
                costs[(size, n)] = (relay.round_trips, after[0] - before[0], after[1] - before[1])
        print("round trips, statements, commits per apply:", costs)
        assert set(costs.values()) == {(1, 1, 1)}, costs
        record = await store.get_instance("b1000-00999")
        assert record is not None and (record.status, record.last_seq) == (
            InstanceStatus.COMPLETE,
            4,
        )
    finally:
        await store.close()
        await relay.close()


def test_the_apply_statement_takes_every_column() -> None:
    batch, _ = _checkpoints("x", 2)
    assert len(_apply_args(Lease("a", 1), uuid.uuid4(), batch)) == APPLY_ARGS


# Plan nodes that read a whole table, and the tables that grow with history.
_GROWING = {"instances", "steps", "events", "inbox"}


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


async def _fill(server: PostgresServer, database: str, finished: int) -> None:
    """A long history: ``finished`` finished instances with steps, events and
    consumed inbox rows, and a few live ones; statistics made."""
    server.psql(
        "INSERT INTO instances (id, workflow, status, params, created_at, updated_at, ended_at,"
        " lookup_key)"
        f" SELECT 'done-' || n, 'wf' || (n % 7), 6, '\\x7b7d', n, n, n,"
        " CASE WHEN n % 10 = 0 THEN 'key-' || (n % 1000) END"
        f" FROM generate_series(1, {finished}) n;"
        "INSERT INTO steps (instance_id, idx, name, occurrence, status, attempts, started_at)"
        f" SELECT 'done-' || n, 0, 's', 1, 2, 1, n FROM generate_series(1, {finished}) n;"
        "INSERT INTO events (instance_id, seq, at, kind, data)"
        f" SELECT 'done-' || n, s, n, 1, '{{}}' FROM generate_series(1, {finished}) n,"
        " generate_series(1, 2) s;"
        "INSERT INTO inbox (instance_id, type, payload, at, consumed_by)"
        f" SELECT 'done-' || n, 't', '\\x7b7d', n, 0 FROM generate_series(1, {finished}) n;"
        "ANALYZE;",
        database,
    )


def _literal(value: Any) -> str:
    if isinstance(value, list):
        items = (f'"{v}"' if isinstance(v, str) else str(int(v)) for v in value)
        return "'{" + ",".join(items) + "}'"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


async def test_hot_queries_use_indexes(postgres_server: PostgresServer, postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    await store.open()
    await store.close()
    database = postgres_url.rsplit("/", 1)[1]
    await _fill(postgres_server, database, 20_000)
    conn = await asyncpg.connect(postgres_url)
    try:
        # The plans of the first executions, and the generic plan a prepared
        # statement settles on after them.
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            for name, (sql, args) in HOT_QUERIES.items():
                await conn.execute(f"PREPARE hot AS {sql}")
                given = f"({', '.join(_literal(a) for a in args)})" if args else ""
                text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE hot{given}")
                await conn.execute("DEALLOCATE hot")
                (plan,) = json.loads(text)
                for node in _nodes(plan["Plan"]):
                    kind = node["Node Type"]
                    where = (mode, name, kind, node.get("Relation Name"))
                    assert not (kind == "Seq Scan" and node["Relation Name"] in _GROWING), where
                    # A sort of many rows reads them all before the first: only
                    # a few, bounded by an index condition, are sorted.
                    if kind == "Sort":
                        assert node["Plans"][0]["Plan Rows"] <= 100, where
    finally:
        await conn.close()


async def test_writes_claims_and_reads_scan_no_table_with_a_long_history(
    postgres_server: PostgresServer, postgres_url: str, open_store: Opener
) -> None:
    one, two = await open_store(), await open_store()
    database = postgres_url.rsplit("/", 1)[1]
    await _fill(postgres_server, database, 20_000)

    def scans() -> dict[str, int]:
        out = postgres_server.psql(
            "SELECT relname, seq_scan FROM pg_stat_user_tables", database
        ).split()
        return {row.split("|")[0]: int(row.split("|")[1]) for row in out}

    async def flush(store: PostgresStore) -> None:
        await store._fetch("SELECT pg_stat_force_next_flush()")

    a, b = await one.acquire("server-a"), await two.acquire("server-b")
    await flush(one)
    await flush(two)
    before = scans()
    for round in range(8):  # past the five custom plans PL/pgSQL makes first
        start, finish = _checkpoints(f"r{round}", 20)
        start.inbox.append(InboxEvent(f"r{round}-00000", "go", b"{}", 10))
        start.new_instances.append(_new(f"q{round}", InstanceStatus.QUEUED))
        start.purge[f"done-{round + 1}"] = 10**9
        assert await one.apply(start, a) == {}
        (event,) = await one.take_events(f"r{round}-00000", "go", 1)
        finish.consumed[event.id] = (f"r{round}-00000", 0)
        assert await one.apply(finish, a) == {}
        assert [r.id for r in await two.claim(b, 5)] == [f"q{round}"]
        assert await two.claim_one(b, f"r{round}-00001") is not None
        await one.get_instance(f"r{round}-00002")
        await one.get_steps(f"r{round}-00002")
        await one.read_events(f"r{round}-00002", 0, 10)
        await one.due_wakes(10**9, 10)
        await one.ended_before(5, 10)
    await one.release(a)
    await flush(one)
    await flush(two)
    after = scans()
    grew = {t: after[t] - before[t] for t in _GROWING if after[t] != before[t]}
    assert not grew, f"whole-table reads: {grew}"
