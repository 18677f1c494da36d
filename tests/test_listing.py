"""ListInstances through a real server: every filter alone and combined, keyset
pagination under concurrent creates, checked page tokens; and what a page
costs the store however deep it is and however long the history."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cruzflow.server.records import InstanceQuery, InstanceStatus
from cruzflow.server.store.sqlite import _POSITION_AT, MIGRATIONS, SqliteStore, _page_query
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import Server

TIMEOUT = 20.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
RUNNING = pb.INSTANCE_STATUS_RUNNING
COMPLETE = pb.INSTANCE_STATUS_COMPLETE
ERRORED = pb.INSTANCE_STATUS_ERRORED


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(TIMEOUT):
            await call
    return info.value


async def create_many(server: Server, *requests: pb.CreateInstanceRequest) -> list[str]:
    response = await server.stub.CreateInstances(
        pb.CreateInstancesRequest(requests=requests), timeout=TIMEOUT
    )
    return [r.instance_id for r in response.instances]


async def listing(server: Server, **fields: Any) -> list[pb.Instance]:
    """Every page of a listing, followed to its end."""
    out: list[pb.Instance] = []
    token = ""
    async with asyncio.timeout(TIMEOUT):
        while True:
            page = await server.stub.ListInstances(
                pb.ListInstancesRequest(page_token=token, **fields)
            )
            out += page.instances
            token = page.next_page_token
            if not token:
                return out


async def ids(server: Server, **fields: Any) -> list[str]:
    return [i.instance_id for i in await listing(server, **fields)]


async def wait_final(server: Server, instance_id: str) -> pb.Instance:
    response = await server.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id=instance_id), timeout=TIMEOUT
    )
    return response.instance


def ms(ts: Timestamp) -> int:
    return ts.ToMilliseconds()


def at(milliseconds: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(milliseconds)
    return ts


# ------------------------------------------------------------------ filters
async def test_every_filter_alone_and_combined(server: Server, gate: Any) -> None:
    def new(workflow: str, key: str = "") -> pb.CreateInstanceRequest:
        return pb.CreateInstanceRequest(workflow=workflow, lookup_key=key, params_json="{}")

    # Created one call at a time, so creation order is the order of this list.
    plan = [
        new("three-steps", "user:1"),
        new("raises", "user:2"),
        new("blocks", "user:1"),
        new("three-steps"),
        new("raises", "user:1"),
        new("blocks"),
        new("three-steps", "user:2"),
    ]
    created = [(await create_many(server, r))[0] for r in plan]
    for instance_id, request in zip(created, plan, strict=True):
        if request.workflow != "blocks":
            await wait_final(server, instance_id)
    everything = await listing(server)
    newest_first = created[::-1]
    assert [i.instance_id for i in everything] == newest_first
    assert all(not i.steps for i in everything)
    assert {i.instance_id: i.lookup_key for i in everything} == {
        c: r.lookup_key for c, r in zip(created, plan, strict=True)
    }
    kinds = {c: r.workflow for c, r in zip(created, plan, strict=True)}
    keys = {c: r.lookup_key for c, r in zip(created, plan, strict=True)}
    status = {i.instance_id: i.status for i in everything}
    assert {kinds[c]: status[c] for c in created} == {
        "three-steps": COMPLETE,
        "raises": ERRORED,
        "blocks": RUNNING,
    }

    def expect(predicate: Any) -> list[str]:
        return [c for c in newest_first if predicate(c)]

    assert await ids(server, workflow="raises") == expect(lambda c: kinds[c] == "raises")
    assert await ids(server, workflow="no-such") == []
    assert await ids(server, statuses=[COMPLETE]) == expect(lambda c: status[c] == COMPLETE)
    assert await ids(server, statuses=[ERRORED, COMPLETE]) == expect(
        lambda c: status[c] in (COMPLETE, ERRORED)
    )
    assert await ids(server, statuses=[RUNNING]) == expect(lambda c: status[c] == RUNNING)
    assert await ids(server, lookup_key="user:1") == expect(lambda c: keys[c] == "user:1")
    assert await ids(server, lookup_key="user:9") == []

    # Times: the create_time of the third and the sixth instance as bounds.
    times = {i.instance_id: ms(i.create_time) for i in everything}
    low, high = times[created[2]], times[created[5]]
    assert await ids(server, create_time_min=at(low)) == expect(lambda c: times[c] >= low)
    assert await ids(server, create_time_max=at(high)) == expect(lambda c: times[c] < high)
    assert await ids(server, create_time_min=at(low), create_time_max=at(high)) == expect(
        lambda c: low <= times[c] < high
    )
    assert await ids(server, create_time_min=at(times[created[-1]] + 1)) == []

    # Combined, on each index the store may pick for them.
    assert await ids(server, workflow="three-steps", statuses=[COMPLETE]) == expect(
        lambda c: kinds[c] == "three-steps"
    )
    assert await ids(server, workflow="blocks", statuses=[RUNNING, COMPLETE]) == expect(
        lambda c: kinds[c] == "blocks"
    )
    assert await ids(server, workflow="blocks", statuses=[pb.INSTANCE_STATUS_QUEUED]) == []
    assert await ids(server, lookup_key="user:1", workflow="raises", statuses=[ERRORED]) == expect(
        lambda c: keys[c] == "user:1" and kinds[c] == "raises"
    )
    assert await ids(
        server, lookup_key="user:1", statuses=[COMPLETE, RUNNING], create_time_min=at(low)
    ) == expect(lambda c: keys[c] == "user:1" and status[c] != ERRORED and times[c] >= low)
    assert await ids(
        server,
        workflow="three-steps",
        statuses=[COMPLETE],
        lookup_key="user:2",
        create_time_max=at(times[created[-1]] + 1),
    ) == expect(lambda c: kinds[c] == "three-steps" and keys[c] == "user:2")
    # Small pages of a combined filter carry the same result.
    assert await ids(server, statuses=[COMPLETE, ERRORED], page_size=1) == expect(
        lambda c: status[c] in (COMPLETE, ERRORED)
    )
    gate.set()


async def test_find_the_onboarding_instance_of_user_42(server: Server) -> None:
    requests = [
        pb.CreateInstanceRequest(
            workflow="three-steps",
            instance_id=f"onboarding-{user}",
            params_json=json.dumps({"userId": str(user)}),
            lookup_key=f"user:{user}",
        )
        for user in range(40, 45)
    ]
    await create_many(server, *requests)
    found = await listing(server, lookup_key="user:42", workflow="three-steps")
    assert [(i.instance_id, i.lookup_key, json.loads(i.params_json)) for i in found] == [
        ("onboarding-42", "user:42", {"userId": "42"})
    ]


# --------------------------------------------------------------- pagination
async def test_pages_hold_each_instance_once_while_others_are_created(server: Server) -> None:
    def batch(n: int) -> list[pb.CreateInstanceRequest]:
        return [pb.CreateInstanceRequest(workflow="three-steps") for _ in range(n)]

    original: list[str] = []
    for size in (100, 100, 50):
        original += await create_many(server, *batch(size))
    # Instances created by calls sent after the first page came back: newer than
    # every instance the listing started from, so on no page.
    after_first: list[str] = []
    paging = asyncio.Event()
    stop = asyncio.Event()

    async def keep_creating() -> None:
        while not stop.is_set():
            sent_after_first = paging.is_set()
            created = await create_many(server, *batch(3))
            if sent_after_first:
                after_first.extend(created)
            await asyncio.sleep(0.002)

    creator = asyncio.create_task(keep_creating())
    seen: list[str] = []
    pages = 0
    try:
        token = ""
        async with asyncio.timeout(TIMEOUT):
            while True:
                page = await server.stub.ListInstances(
                    pb.ListInstancesRequest(page_size=40, page_token=token)
                )
                paging.set()
                assert 0 < len(page.instances) <= 40
                seen += [i.instance_id for i in page.instances]
                token = page.next_page_token
                pages += 1
                if not token:
                    break
                await asyncio.sleep(0.01)  # more instances are created between pages
    finally:
        stop.set()
        await creator
    assert len(after_first) >= 6
    assert len(seen) == len(set(seen))  # none repeated
    assert not set(after_first) & set(seen)
    assert [i for i in seen if i in set(original)] == original[::-1]  # none missing, in order
    assert seen[-250:] == original[::-1]  # only instances older than the listing came later
    assert pages >= 7


async def test_last_page_has_no_token_and_exact_pages_end(server: Server) -> None:
    await create_many(server, *[pb.CreateInstanceRequest(workflow="three-steps") for _ in range(6)])
    page = await server.stub.ListInstances(pb.ListInstancesRequest(page_size=6))
    assert len(page.instances) == 6 and page.next_page_token == ""
    page = await server.stub.ListInstances(pb.ListInstancesRequest(page_size=3))
    page = await server.stub.ListInstances(
        pb.ListInstancesRequest(page_size=3, page_token=page.next_page_token)
    )
    assert len(page.instances) == 3 and page.next_page_token == ""
    # A different page_size between pages is fine: it is not a filter.
    empty = await server.stub.ListInstances(pb.ListInstancesRequest(workflow="raises"))
    assert list(empty.instances) == [] and empty.next_page_token == ""


# ---------------------------------------------------------------- bad input
async def test_bad_requests_get_invalid_argument(server: Server) -> None:
    await create_many(server, *[pb.CreateInstanceRequest(workflow="three-steps") for _ in range(3)])
    first = await server.stub.ListInstances(
        pb.ListInstancesRequest(workflow="three-steps", page_size=1)
    )
    token = first.next_page_token
    assert token

    async def refused(**fields: Any) -> str:
        error = await rpc_error(server.stub.ListInstances(pb.ListInstancesRequest(**fields)))
        assert error.code() == INVALID, (fields, error.details())
        return error.details() or ""

    forged = base64.urlsafe_b64encode(b'{"v":1,"after":2,"f":"0000000000000000"}').decode()
    for bad in ("garbage!", "e30", token[:-3], forged, token + "x" * 300, "AAAA"):
        message = await refused(workflow="three-steps", page_token=bad)
        assert message.startswith("page_token:") and "first page" in message, message
    for changed in (
        {"workflow": "raises"},
        {"workflow": "three-steps", "statuses": [COMPLETE]},
        {"workflow": "three-steps", "lookup_key": "k"},
        {"workflow": "three-steps", "create_time_min": at(1)},
        {},
    ):
        message = await refused(page_token=token, **changed)
        assert "other filters" in message and "first page" in message, message
    # The same filters (statuses in another order) and another page_size are fine.
    await server.stub.ListInstances(
        pb.ListInstancesRequest(workflow="three-steps", page_size=5, page_token=token)
    )

    for size in (-1, 1001):
        assert "page_size" in await refused(page_size=size)
    message = await refused(statuses=[COMPLETE, pb.INSTANCE_STATUS_UNSPECIFIED])
    assert message.startswith("statuses[1]: 0 (UNSPECIFIED)"), message
    assert (await refused(statuses=[42])).startswith("statuses[0]: 42")
    message = await refused(create_time_min=at(2000), create_time_max=at(1000))
    assert "create_time_min" in message and "before create_time_max" in message
    assert "lookup_key" in await refused(lookup_key="k" * 257)
    far = Timestamp(seconds=10**15)
    assert "create_time_max: out of range" in await refused(create_time_max=far)


async def test_same_filters_in_another_order_keep_the_token(server: Server) -> None:
    await create_many(server, *[pb.CreateInstanceRequest(workflow="three-steps") for _ in range(3)])
    first = await server.stub.ListInstances(
        pb.ListInstancesRequest(statuses=[RUNNING, COMPLETE], page_size=1)
    )
    again = await server.stub.ListInstances(
        pb.ListInstancesRequest(
            statuses=[COMPLETE, RUNNING, COMPLETE], page_size=1, page_token=first.next_page_token
        )
    )
    assert len(again.instances) == 1


# ------------------------------------------------------------------- costs
def _fill(path: Path, count: int) -> None:
    """``count`` finished instances of two workflows, keyed, then 3 live ones."""
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO instances (id, workflow, status, params, created_at, updated_at, lookup_key)"
        " VALUES (?, ?, ?, x'6e756c6c', ?, ?, ?)",
        ((f"i{n:07d}", f"wf{n % 2}", 6 + n % 2, n, n, f"user:{n % 10}") for n in range(count)),
    )
    conn.executemany(
        "INSERT INTO instances (id, workflow, status, params, created_at, updated_at)"
        " VALUES (?, 'wf0', 2, x'6e756c6c', ?, ?)",
        ((f"live{n}", count + n, count + n) for n in range(3)),
    )
    conn.commit()
    conn.close()


def _vm_steps(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> tuple[int, int]:
    counter = [0]

    def tick() -> int:
        counter[0] += 1
        return 0

    conn.set_progress_handler(tick, 1)
    rows = conn.execute(sql, params).fetchall()
    conn.set_progress_handler(None, 1)
    return counter[0], len(rows)


QUERIES = {
    "all": InstanceQuery(),
    "workflow": InstanceQuery(workflow="wf1"),
    "statuses": InstanceQuery(statuses=(InstanceStatus.COMPLETE, InstanceStatus.ERRORED)),
    "workflow+status": InstanceQuery(workflow="wf0", statuses=(InstanceStatus.COMPLETE,)),
    "lookup": InstanceQuery(lookup_key="user:3", statuses=(InstanceStatus.ERRORED,)),
}


@pytest.fixture(scope="module")
def histories(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Store files holding 1,000 and 100,000 finished instances (built once)."""
    folder = tmp_path_factory.mktemp("histories")
    paths = {}
    for count in (1_000, 100_000):
        path = paths[count] = folder / f"h{count}.db"
        conn = sqlite3.connect(path)
        for migration in MIGRATIONS:
            conn.executescript(migration)
        conn.close()
        _fill(path, count)
    return paths


@pytest.mark.parametrize("name", list(QUERIES))
def test_a_deep_page_costs_what_the_first_does(histories: dict[int, Path], name: str) -> None:
    """SQLite VM steps for a page of 100: the first page of 1,000 instances, the
    first of 100,000, and one near the oldest of 100,000; all alike."""
    query = QUERIES[name]
    costs = []
    for history, cursor in ((1_000, None), (100_000, None), (100_000, 2_000)):
        conn = sqlite3.connect(histories[history])
        high = 2**63 - 1 if cursor is None else cursor
        steps, rows = _vm_steps(conn, *_page_query(query, 0, high, 100))
        conn.close()
        assert rows == 100, (name, history, cursor, rows)
        costs.append(steps)
    small, large, deep = costs
    assert large <= small * 1.5 + 50, (name, costs)
    assert deep <= small * 1.5 + 50, (name, costs)


def test_time_bounds_cost_a_bisection(histories: dict[int, Path]) -> None:
    """Finding the position of a creation time is ~log2(rows) point lookups."""
    costs = []
    for history, path in histories.items():
        conn = sqlite3.connect(path)
        # created_at is n for the n-th instance, whose position is n + 1.
        target = history // 3
        assert conn.execute(_POSITION_AT, (target,)).fetchone() == (target + 1,)
        costs.append(_vm_steps(conn, _POSITION_AT, (target,))[0])
        conn.close()
    small, large = costs
    assert large <= small * 2, costs  # log2: 10 -> 17 halvings


async def test_time_bounds_through_the_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    _fill(path, 30_000)
    await store.open()
    try:
        # The store gives a bisected bound 10 s of room; rows are filtered exactly.
        page = await store.list_instances(
            InstanceQuery(workflow="wf1", created_min=20_000, created_max=20_010), 100
        )
        assert [r.created_at for _, r in page] == [20_009, 20_007, 20_005, 20_003, 20_001]
        assert await store.list_instances(InstanceQuery(created_min=50_000), 10) == []
        page = await store.list_instances(InstanceQuery(created_max=3, older_than=3), 10)
        assert [r.id for _, r in page] == ["i0000001", "i0000000"]
    finally:
        await store.close()
