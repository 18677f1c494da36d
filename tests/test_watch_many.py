"""WatchInstances through a real server: several instances followed in one
stream, each event once and in order per instance, the events ready together
in one message; cursors, the limits, refusals, lag; and the client's
``watch_many`` (async and sync)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc
import pytest

from cruzflow.client import Client, InstanceStatus, SyncClient, WatchEvent
from cruzflow.client.errors import InstanceNotFound, InvalidArgument
from cruzflow.server.engine import reads
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import BOTH, Server, ServerFactory, eventually

TRANSPORTS = BOTH

TIMEOUT = 30.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
THREE_STEPS = [
    "status_changed",
    "step_started",
    "step_succeeded",
    "step_started",
    "step_succeeded",
    "step_started",
    "step_succeeded",
    "status_changed",
]


def request(cursors: Sequence[tuple[str, int]]) -> pb.WatchInstancesRequest:
    return pb.WatchInstancesRequest(
        instances=[pb.WatchCursor(instance_id=i, after_sequence=a) for i, a in cursors]
    )


async def watch_many(
    server: Server, cursors: Sequence[tuple[str, int]]
) -> list[pb.WatchInstancesResponse]:
    """Every message of a WatchInstances stream, until it ends."""
    async with asyncio.timeout(TIMEOUT):
        return [m async for m in server.stub.WatchInstances(request(cursors), timeout=TIMEOUT)]


async def refusal(server: Server, cursors: Sequence[tuple[str, int]], code: grpc.StatusCode) -> str:
    """The message of a WatchInstances call refused with ``code``, which sent no event."""
    got: list[pb.WatchInstancesResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(TIMEOUT):
            async for message in server.stub.WatchInstances(request(cursors), timeout=TIMEOUT):
                got.append(message)
    assert info.value.code() == code, info.value.details()
    assert got == []
    return info.value.details() or ""


async def rest(stream: Any) -> list[pb.WatchInstancesResponse]:
    """The messages left on a stream already read from (with ``read``), to its end."""
    out = []
    async with asyncio.timeout(TIMEOUT):
        while (message := await stream.read()) is not grpc.aio.EOF:
            out.append(message)
    return out


def per_instance(
    messages: list[pb.WatchInstancesResponse],
) -> dict[str, list[pb.WatchInstanceResponse]]:
    out: dict[str, list[pb.WatchInstanceResponse]] = {}
    for message in messages:
        assert message.events, "a message without events"
        for event in message.events:
            out.setdefault(event.instance_id, []).append(event)
    return out


async def create(server: Server, workflow: str, instance_id: str = "") -> str:
    created = await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow=workflow, instance_id=instance_id), timeout=TIMEOUT
    )
    return created.instance_id


async def last_sequence(server: Server, instance_id: str) -> int:
    got = await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))
    return got.instance.last_sequence


async def full_watch(server: Server, instance_id: str) -> list[pb.WatchInstanceResponse]:
    call = server.stub.WatchInstance(pb.WatchInstanceRequest(instance_id=instance_id))
    async with asyncio.timeout(TIMEOUT):
        return [event async for event in call]


# ---------------------------------------------------------------- the stream
async def test_instances_watched_together_get_every_event_once_in_order_batched(
    server: Server, gate: asyncio.Event
) -> None:
    """Blocked instances: the stored events come in one message, those of the
    release that are ready together in few; each instance's are its whole log."""
    ids = [await create(server, "blocks", f"b{i}") for i in range(12)]

    async def blocked() -> bool:
        return all([await last_sequence(server, i) == 2 for i in ids])

    await eventually(blocked, TIMEOUT)
    stream = server.stub.WatchInstances(request([(i, 0) for i in ids]), timeout=TIMEOUT)
    first = await stream.read()
    # Caught up from the store: every stored event in the first message.
    assert isinstance(first, pb.WatchInstancesResponse)
    assert len(first.events) == 2 * len(ids)
    messages = [first]
    gate.set()
    messages += await rest(stream)
    got = per_instance(messages)
    assert set(got) == set(ids)
    for instance_id in ids:
        events = got[instance_id]
        assert [e.sequence for e in events] == [1, 2, 3, 4]
        assert events == await full_watch(server, instance_id)
        assert events[-1].status_changed.status == pb.INSTANCE_STATUS_COMPLETE
    # The release's 24 events came in fewer messages than events.
    assert len(messages) - 1 < 2 * len(ids)
    assert any(len(m.events) > 1 for m in messages[1:])


async def test_many_instances_created_and_watched_at_once(server: Server) -> None:
    """Watches racing fresh creates: no NOT_FOUND, no gap, no repeat."""

    async def batch() -> dict[str, list[int]]:
        ids = [await create(server, "three-steps") for _ in range(20)]
        messages = await watch_many(server, [(i, 0) for i in ids])
        return {i: [e.sequence for e in events] for i, events in per_instance(messages).items()}

    results = await asyncio.gather(*(batch() for _ in range(10)))
    for result in results:
        assert len(result) == 20
        assert all(seqs == list(range(1, 9)) for seqs in result.values()), result


async def test_catching_up_many_instances_reads_the_store_a_few_times(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 ended instances (none held in memory) from their first event: their
    records and events come in batched reads, not two reads per instance, and
    one with a long history (restarted 9 times: 80 events) comes whole."""
    ids: list[str] = []
    for _ in range(6):
        created = await server.stub.CreateInstances(
            pb.CreateInstancesRequest(
                requests=[pb.CreateInstanceRequest(workflow="three-steps")] * 100
            ),
            timeout=TIMEOUT,
        )
        ids += [c.instance_id for c in created.instances]
    for instance_id in ids:
        await server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id=instance_id))
    long = ids[300]
    for _ in range(9):
        await server.stub.RestartInstance(pb.RestartInstanceRequest(instance_id=long))
        await server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id=long))
    newest = await last_sequence(server, long)
    assert newest == 80
    store = server.service.store
    reads: Counter[str] = Counter()

    def counting(name: str, read: Any) -> Any:
        async def counted(*args: Any) -> Any:
            reads[name] += 1
            return await read(*args)

        return counted

    for name in ("get_instance", "get_instances", "read_events", "read_events_many"):
        monkeypatch.setattr(store, name, counting(name, getattr(store, name)))
    got = per_instance(await watch_many(server, [(i, 0) for i in ids]))
    assert set(got) == set(ids)
    for instance_id, events in got.items():
        want = list(range(1, (newest if instance_id == long else 8) + 1))
        assert [e.sequence for e in events] == want, instance_id
    # 250 instances a query; the long history goes on alone past its first 64 events.
    assert reads == {"get_instances": 3, "read_events_many": 3, "read_events": 1}, reads


async def test_each_cursor_resumes_exactly(server: Server) -> None:
    ids = [(await server.run("three-steps")).instance_id for _ in range(3)]
    full = {i: await full_watch(server, i) for i in ids}
    assert all(len(events) == 8 for events in full.values())
    for after in range(9):
        # Each instance from its own place: after, after-1 and 8 (its end: nothing more).
        cursors = [(ids[0], after), (ids[1], max(0, after - 1)), (ids[2], 8)]
        got = per_instance(await watch_many(server, cursors))
        for instance_id, resume in cursors:
            assert got.get(instance_id, []) == full[instance_id][resume:], (instance_id, resume)


async def test_an_instance_already_ended_and_one_running_end_the_stream_together(
    server: Server, gate: asyncio.Event
) -> None:
    done = (await server.run("three-steps")).instance_id
    running = await create(server, "blocks", "later")
    stream = server.stub.WatchInstances(request([(done, 0), (running, 0)]), timeout=TIMEOUT)
    first = await stream.read()
    assert isinstance(first, pb.WatchInstancesResponse)
    assert [e.instance_id for e in first.events].count(done) == 8
    gate.set()
    got = per_instance([first, *await rest(stream)])
    assert [e.sequence for e in got[running]] == [1, 2, 3, 4]
    assert [e.WhichOneof("event") for e in got[done]] == THREE_STEPS


async def test_events_dropped_by_a_full_queue_are_read_from_the_store(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue of one event: nearly every live event is dropped, and each
    instance that lost some is re-read from the store, without gap or repeat."""
    monkeypatch.setattr(reads, "QUEUE_BOUND", 1)
    monkeypatch.setattr(reads, "_QUEUE_PER_INSTANCE", 0)
    ids = [await create(server, "three-steps") for _ in range(15)]
    got = per_instance(await watch_many(server, [(i, 0) for i in ids]))
    assert {i: [e.sequence for e in got[i]] for i in ids} == {i: list(range(1, 9)) for i in ids}


# ---------------------------------------------------------------- refusals
async def test_bad_requests_are_refused_before_any_event(server: Server) -> None:
    done = (await server.run("three-steps")).instance_id
    message = await refusal(server, [], INVALID)
    assert message.startswith("instances: required")
    message = await refusal(server, [(done, 0)] * 1001, INVALID)
    assert message.startswith("instances: 1001 listed, at most 1000 per call")
    message = await refusal(server, [(done, 0), ("other", 0), (done, 3)], INVALID)
    assert message.startswith(f"instances[2].instance_id: {done!r} is listed already")
    for bad in ("", "a b", "x" * 101):
        message = await refusal(server, [(done, 0), (bad, 0)], INVALID)
        assert message.startswith("instances[1].instance_id: "), message
    message = await refusal(server, [(done, -1)], INVALID)
    assert message.startswith("instances[0].after_sequence: must be 0 or more")
    message = await refusal(server, [(done, 9)], INVALID)
    assert message.startswith("instances[0].after_sequence: 9 is past the newest event (8)")
    # An unknown id: NOT_FOUND naming it, and no event of the others.
    message = await refusal(server, [(done, 0), ("no-such", 0)], NOT_FOUND)
    assert message == (
        "instances[1].instance_id: no instance 'no-such'; check the id CreateInstance returned"
    )


async def test_each_instance_counts_against_max_watchers_until_its_end(
    make_server: ServerFactory, gate: asyncio.Event
) -> None:
    server = await make_server(limits={"max_watchers": 3})
    hub = server.service.engine.core.hub
    ids = [await create(server, "blocks", f"w{i}") for i in range(4)]
    message = await refusal(server, [(i, 0) for i in ids], EXHAUSTED)
    assert "limits.max_watchers (3" in message
    stream = server.stub.WatchInstances(request([(i, 0) for i in ids[:3]]), timeout=TIMEOUT)
    await stream.read()
    assert hub.count == 3
    one = server.stub.WatchInstance(pb.WatchInstanceRequest(instance_id=ids[3]), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await one.read()
    assert info.value.code() == EXHAUSTED
    gate.set()
    await rest(stream)

    async def released() -> bool:
        return hub.count == 0

    await eventually(released, TIMEOUT)


async def test_a_cancelled_stream_releases_its_feeds(server: Server) -> None:
    hub = server.service.engine.core.hub
    ids = [await create(server, "approval", f"a{i}") for i in range(5)]
    stream = server.stub.WatchInstances(request([(i, 0) for i in ids]), timeout=TIMEOUT)
    await stream.read()
    assert hub.count == 5
    stream.cancel()

    async def released() -> bool:
        return hub.count == 0

    await eventually(released, TIMEOUT)


# ---------------------------------------------------------------- the client
@pytest.mark.grpc_only
async def test_client_watch_many_follows_ids_handles_and_cursors(
    server: Server, gate: asyncio.Event
) -> None:
    async with Client(server.address) as client:
        done = await client.workflow("three-steps").create()
        await done.result(timeout=TIMEOUT)
        blocked = await client.workflow("blocks").create(id="cb")
        seen: list[WatchEvent] = []

        async def follow() -> None:
            async for event in client.watch_many([done, ("cb", 1)], timeout=TIMEOUT):
                seen.append(event)
                if event.instance_id == "cb" and event.sequence == 2:
                    gate.set()

        await asyncio.wait_for(follow(), TIMEOUT)
        mine = [e.sequence for e in seen if e.instance_id == done.id]
        theirs = [e.sequence for e in seen if e.instance_id == blocked.id]
        assert mine == list(range(1, 9)) and theirs == [2, 3, 4]
        assert sum(e.is_final for e in seen) == 2
        again = [e async for e in client.watch_many({done.id: 6, blocked.id: 3})]
        assert [e.sequence for e in again if e.instance_id == done.id] == [7, 8]
        assert [e.sequence for e in again if e.instance_id == blocked.id] == [4]
        assert {e.status for e in again if e.is_final} == {InstanceStatus.COMPLETE}
        with pytest.raises(InvalidArgument, match="listed already"):
            client.watch_many(["x", "x"])
        with pytest.raises(InvalidArgument, match="not one string"):
            client.watch_many("x")
        with pytest.raises(InvalidArgument, match="after_sequence"):
            client.watch_many({"x": -1})
        with pytest.raises(InstanceNotFound):
            async with contextlib.aclosing(client.watch_many([done.id, "nope"])) as events:
                async for _ in events:
                    pass


@pytest.mark.grpc_only
async def test_sync_client_watch_many_from_a_thread(server: Server) -> None:
    def run() -> dict[str, list[int]]:
        with SyncClient(server.address) as client:
            handles = [client.workflow("three-steps").create() for _ in range(3)]
            out: dict[str, list[int]] = {}
            for event in client.watch_many(handles, timeout=TIMEOUT):
                out.setdefault(event.instance_id, []).append(event.sequence)
            return out

    got = await asyncio.to_thread(run)
    assert len(got) == 3
    assert all(seqs == list(range(1, 9)) for seqs in got.values())
