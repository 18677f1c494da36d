"""Hostile input is harmless: each fix of issue 6 (part 3) through a real
server, and the checks behind them.

Malformed protobuf, JSON nested past ``limits.max_json_depth``, values that
are not valid Durations or Timestamps, control characters in keys, huge
values echoed in messages, tampered page tokens, and more watchers or calls
than the server takes at once: each gets its status code and a message
naming the field, and nothing stored changes. Bursts are checked by counting
outcomes, never by timing them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from cruzflow.server.app import Service
from cruzflow.server.config import load_config
from cruzflow.server.engine import listing, validate
from cruzflow.server.engine.errors import InvalidArgument
from cruzflow.server.records import InstanceQuery, InstanceStatus
from cruzflow.server.store.sqlite import SqliteStore
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import (
    ALL_WORKFLOWS,
    BOTH,
    EngineFactory,
    Server,
    ServerFactory,
    eventually,
    finished,
)
from tests.procs import write_config

TRANSPORTS = BOTH
"""Every test here runs over gRPC and over HTTP/JSON (Connect), unless grpc_only."""

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
TIMEOUT = 20.0


async def refused(call: Any, code: grpc.StatusCode = INVALID) -> str:
    """Await a call that must fail with ``code``; its message."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(TIMEOUT):
            await call
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    assert details
    return details


async def stored(server: Server) -> list[Any]:
    """Every row of the store, read through a connection of its own."""
    url = server.service.config.store_url
    tables = ("instances", "steps", "events", "inbox", "meta")
    if url is not None:
        pg = await asyncpg.connect(url)
        try:
            return [
                [tuple(row) for row in await pg.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")]
                for table in tables
            ]
        finally:
            await pg.close()
    path = server.service.config.store_path
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in tables]
    finally:
        conn.close()


async def waiting(server: Server, instance_id: str) -> None:
    """An "approval" instance, waiting for its event (24 hours)."""
    await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="approval", instance_id=instance_id)
    )

    async def reached() -> bool:
        got = await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))
        return got.instance.status == pb.INSTANCE_STATUS_WAITING

    await eventually(reached)


# --------------------------------------------------------- malformed protobuf
def raw(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize(
    "data",
    [b"\xff\xff\xff", b"\x0a\x03\xff\xfe\xfd", b"\x12\x05abc", b"\x0a\x7f"],
    ids=["corrupt", "bad-utf8", "truncated", "overlong-length"],
)
async def test_malformed_protobuf_gets_invalid_argument_on_every_rpc(
    server: Server, data: bytes
) -> None:
    """gRPC answers a request its deserializer cannot parse with UNKNOWN (a
    server fault); the service answers INVALID_ARGUMENT naming the message."""
    await waiting(server, "w1")
    before = await stored(server)
    service = pb.DESCRIPTOR.services_by_name["WorkflowService"]
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        if not method.input_type.fields and data.startswith(b"\x0a\x03"):
            # A well-framed unknown field: kept as unknown, as protobuf does.
            await server.channel.unary_unary(path, raw, raw)(data)
            continue
        if method.server_streaming:
            call: Any = server.channel.unary_stream(path, raw, raw)(data)
            message = await refused(call.read())
        else:
            message = await refused(server.channel.unary_unary(path, raw, raw)(data))
        assert message.startswith(
            f"request: not a valid {method.input_type.full_name} message ("
        ), message
    assert await stored(server) == before


# ----------------------------------------------------------------- JSON depth
def test_depth_scan_counts_brackets_outside_strings_only() -> None:
    over = validate.json_depth_over
    assert not over(b"[" * 64 + b"]" * 64, 64)
    assert over(b"[" * 65 + b"]" * 65, 64)
    assert over(b'{"a":' * 65 + b"1" + b"}" * 65, 64)
    # Brackets in strings are text, escaped quotes and backslashes included.
    text = b'["' + b"[" * 500 + b'"]'
    assert not over(text, 64)
    assert not over(b'["\\"' + b"[" * 500 + b'"]', 64)
    assert not over(b'["\\\\", "' + b"{" * 500 + b'"]', 64)
    assert over(b'["\\\\"' + b",[" * 70 + b"]" * 71, 64)
    # Linear and without recursion, whatever the input: a MiB of openings.
    assert over(b"[" * (1 << 20), 64)
    assert over(b"{" * (1 << 20), 1)
    assert not over(b'"' + b"\\" * 10_000, 64)


async def test_params_nested_past_the_limit_are_refused(make_server: ServerFactory) -> None:
    server = await make_server(limits={"max_json_depth": 8})
    fine = "[" * 8 + "]" * 8
    created = await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="three-steps", params_json=fine)
    )
    assert created.instance_id
    before = await stored(server)
    for deep in ("[" * 9 + "]" * 9, '{"a":' * 9 + "1" + "}" * 9, "[" * 100_000):
        message = await refused(
            server.stub.CreateInstance(
                pb.CreateInstanceRequest(workflow="three-steps", params_json=deep)
            )
        )
        assert message.startswith("params_json: arrays and objects nest more than 8 deep")
        assert "limits.max_json_depth" in message
    await waiting(server, "w1")
    before = await stored(server)
    message = await refused(
        server.stub.SendEvent(
            pb.SendEventRequest(instance_id="w1", type="approval", payload_json="[" * 9 + "]" * 9)
        )
    )
    assert message.startswith("payload_json: arrays and objects nest more than 8 deep")
    assert await stored(server) == before


async def test_default_depth_is_64(server: Server) -> None:
    ok = await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="three-steps", params_json="[" * 64 + "]" * 64)
    )
    assert ok.instance_id
    message = await refused(
        server.stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="three-steps", params_json="[" * 65 + "]" * 65)
        )
    )
    assert "more than 64 deep" in message


# ---------------------------------------------------- sizes, names and keys
async def test_huge_values_are_refused_with_a_short_message(server: Server) -> None:
    """A value is quoted back clipped: a 100,000-character workflow name used
    to come back whole, past what a client takes in a trailer, and the caller
    saw RESOURCE_EXHAUSTED without a word of why."""
    before = await stored(server)
    huge = "x" * 100_000
    calls = [
        server.stub.CreateInstance(pb.CreateInstanceRequest(workflow=huge)),
        server.stub.ListInstances(pb.ListInstancesRequest(workflow=huge)),
        server.stub.GetStatus(pb.GetStatusRequest(instance_id=huge)),
        server.stub.SendEvent(pb.SendEventRequest(instance_id="w1", type=huge)),
        server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="approval", lookup_key=huge)),
    ]
    for call in calls:
        message = await refused(call)
        assert len(message.encode()) <= validate.MAX_MESSAGE_BYTES, message[:200]
    message = await refused(
        server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="x" * 101))
    )
    assert message.startswith("workflow: 'xxx") and "(101 characters) is not a workflow" in message
    assert await stored(server) == before


async def test_workflow_names_are_checked_before_looking_them_up(server: Server) -> None:
    message = await refused(
        server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="no such\nworkflow"))
    )
    assert message.startswith("workflow: 'no such\\nworkflow' is not a workflow name")
    message = await refused(
        server.stub.CreateInstance(pb.CreateInstanceRequest(workflow="not-hosted")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert message.startswith("workflow: 'not-hosted' is not registered")
    message = await refused(server.stub.ListInstances(pb.ListInstancesRequest(workflow="a b")))
    assert message.startswith("workflow: 'a b' is not a workflow name")


async def test_control_characters_in_keys_and_event_types_are_refused(server: Server) -> None:
    await waiting(server, "w1")
    before = await stored(server)
    message = await refused(
        server.stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="three-steps", lookup_key="user:\x0042")
        )
    )
    assert message.startswith("lookup_key: 'user:\\x0042' holds the control character U+0000")
    message = await refused(server.stub.ListInstances(pb.ListInstancesRequest(lookup_key="a\tb")))
    assert message.startswith("lookup_key: ") and "U+0009" in message
    message = await refused(
        server.stub.SendEvent(pb.SendEventRequest(instance_id="w1", type="appro\x85val"))
    )
    assert message.startswith("type: ") and "U+0085" in message
    assert await stored(server) == before
    # Other characters are fine, the non-ASCII included.
    await server.stub.CreateInstance(
        pb.CreateInstanceRequest(workflow="three-steps", lookup_key="utilisateur:é 42 😀")
    )


async def test_a_batch_of_bad_items_names_each_within_a_trailer(server: Server) -> None:
    """100 bad items once made a message too large for a trailer: the detail of
    the first ones, then every other bad index."""
    before = await stored(server)
    bad = pb.CreateInstanceRequest(workflow="three-steps", params_json="{oops", instance_id="-x")
    message = await refused(
        server.stub.CreateInstances(pb.CreateInstancesRequest(requests=[bad] * 100))
    )
    assert len(message.encode()) <= validate.MAX_MESSAGE_BYTES
    assert message.startswith("requests[0].params_json: not valid JSON")
    assert message.endswith("(send again once these are mended to see why)")
    named = {f"requests[{i}]" for i in range(100) if f"requests[{i}]." in message}
    tail = message.rsplit("and requests ", 1)[1].split(" (")[0]
    named |= {f"requests[{i}]" for i in tail.split(", ")}
    assert named == {f"requests[{i}]" for i in range(100)}
    assert await stored(server) == before


# ------------------------------------------------- durations and timestamps
@pytest.mark.parametrize(
    ("seconds", "nanos", "says"),
    [
        (-1, 0, "timeout: must not be negative"),
        (0, -1, "timeout: must not be negative"),
        (1, -5, "timeout: seconds (1) and nanos (-5) have opposite signs"),
        (0, 1_000_000_000, "timeout: seconds must be within"),
        (2**62, 0, "timeout: seconds must be within"),
    ],
)
async def test_wait_timeouts_must_be_valid_durations(
    server: Server, seconds: int, nanos: int, says: str
) -> None:
    """2**62 seconds used to overflow timedelta: an unhandled OverflowError, UNKNOWN.
    (Over HTTP in binary protobuf: the JSON mapping cannot spell most of these.)"""
    await server.run("three-steps", instance_id="done")
    request = pb.WaitInstanceRequest(
        instance_id="done", timeout=Duration(seconds=seconds, nanos=nanos)
    )
    assert (await refused(server.binary.WaitInstance(request))).startswith(says)


async def test_the_longest_valid_timeout_is_fine(server: Server) -> None:
    await server.run("three-steps", instance_id="done")
    request = pb.WaitInstanceRequest(
        instance_id="done", timeout=Duration(seconds=315_576_000_000, nanos=999_999_999)
    )
    got = await server.stub.WaitInstance(request, timeout=TIMEOUT)
    assert got.instance.status == pb.INSTANCE_STATUS_COMPLETE


@pytest.mark.parametrize(
    ("stamp", "says"),
    [
        (Timestamp(seconds=1, nanos=-1), "create_time_min: nanos -1 is out of range"),
        (Timestamp(seconds=1, nanos=10**9), "create_time_min: nanos 1000000000 is out of range"),
        (Timestamp(seconds=-(2**62)), "create_time_min: out of range"),
    ],
)
async def test_list_times_must_be_valid_timestamps(
    server: Server, stamp: Timestamp, says: str
) -> None:
    request = pb.ListInstancesRequest(create_time_min=stamp)
    assert (await refused(server.binary.ListInstances(request))).startswith(says)


async def test_unknown_enum_numbers_and_odd_page_sizes(server: Server) -> None:
    for statuses, index in (([2**31 - 1], 0), ([1, -7], 1)):
        message = await refused(
            server.stub.ListInstances(
                pb.ListInstancesRequest(statuses=[pb.InstanceStatus.ValueType(s) for s in statuses])
            )
        )
        assert message.startswith(f"statuses[{index}]: {statuses[index]} is not a status")
    for size in (-(2**31), -1, 1001, 2**31 - 1):
        message = await refused(server.stub.ListInstances(pb.ListInstancesRequest(page_size=size)))
        assert message.startswith(f"page_size: {size} is out of range")


# ----------------------------------------------------------------- page tokens
def test_tokens_are_signed_with_the_key() -> None:
    query = InstanceQuery(workflow="wf")
    key, other = b"k" * 32, b"o" * 32
    token = listing.encode_token(query, 42, key)
    assert listing.decode_token(token, query, key) == 42
    with pytest.raises(InvalidArgument, match="not a token this service issued"):
        listing.decode_token(token, query, other)
    # Every one-character change is caught, in the body and in the signature.
    for at in range(len(token)):
        changed = token[:at] + ("A" if token[at] != "A" else "B") + token[at + 1 :]
        with pytest.raises(InvalidArgument, match=r"^page_token: "):
            listing.decode_token(changed, query, key)
    # A signed token with other filters is told apart from a forged one.
    with pytest.raises(InvalidArgument, match="issued for other filters"):
        listing.decode_token(token, InstanceQuery(workflow="other"), key)


async def test_the_token_key_is_made_once_and_kept(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "a.db")
    await store.open()
    key = store.page_token_key()
    await store.close()
    again = SqliteStore(tmp_path / "a.db")
    await again.open()
    assert again.page_token_key() == key and len(key) == 32
    await again.close()
    other = SqliteStore(tmp_path / "b.db")
    await other.open()
    assert other.page_token_key() != key
    await other.close()


async def test_tokens_outlive_a_restart_and_not_another_store(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    first = await make_server()
    for _ in range(3):
        await first.run("three-steps")
    page = await first.stub.ListInstances(pb.ListInstancesRequest(page_size=1))
    token = page.next_page_token
    # Another server with its own store: its secret differs.
    second = await make_server()
    message = await refused(
        second.stub.ListInstances(pb.ListInstancesRequest(page_size=1, page_token=token))
    )
    assert message.startswith("page_token: not a token this service issued")
    # The first store, served again after a restart: the token still works.
    config = first.service.config
    await first.channel.close()
    await first.service.stop(0.1)
    again = Service(load_config(config.path))
    await again.start()
    try:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{again.port}")
        restarted = Server(again, channel)
        rest = await restarted.stub.ListInstances(
            pb.ListInstancesRequest(page_size=5, page_token=token), timeout=TIMEOUT
        )
        assert len(rest.instances) == 2
        await channel.close()
    finally:
        await again.stop(0.1)


# ------------------------------------------------------ watchers and bursts
async def test_watchers_past_the_cap_get_resource_exhausted(make_server: ServerFactory) -> None:
    """2,000 watch streams at once on a server that takes 50: 50 are served,
    1,950 refused; the open ones never pass the cap; closing frees room."""
    server = await make_server(limits={"max_watchers": 50})
    await waiting(server, "w1")
    hub = server.service.engine.core.hub
    calls = [
        server.stub.WatchInstance(pb.WatchInstanceRequest(instance_id="w1")) for _ in range(2000)
    ]

    async def first(call: Any) -> str:
        try:
            await call.read()
            return "served"
        except grpc.aio.AioRpcError as error:
            assert error.code() == EXHAUSTED, error.details()
            assert "(limits.max_watchers)" in (error.details() or "")
            return "refused"

    async with asyncio.timeout(60):
        outcomes = Counter(await asyncio.gather(*(first(c) for c in calls)))
    assert outcomes == {"served": 50, "refused": 1950}
    assert hub.count == 50
    # A WaitInstance is a watcher too.
    message = await refused(
        server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id="w1")), EXHAUSTED
    )
    assert message.startswith("WaitInstance: 50 WatchInstance streams and WaitInstance calls")
    for call in calls:
        call.cancel()

    async def released() -> bool:
        return hub.count == 0

    await eventually(released)
    stream = server.stub.WatchInstance(pb.WatchInstanceRequest(instance_id="w1"))
    event = await stream.read()
    assert isinstance(event, pb.WatchInstanceResponse) and event.sequence == 1
    stream.cancel()


async def test_a_burst_past_the_rpc_cap_is_refused_not_queued(make_server: ServerFactory) -> None:
    """With every slot held by a long WaitInstance, a burst of 5,000 calls is
    refused at once with RESOURCE_EXHAUSTED; freed, the server serves again."""
    server = await make_server(limits={"max_concurrent_rpcs": 40})
    await waiting(server, "w1")
    held = [server.stub.WaitInstance(pb.WaitInstanceRequest(instance_id="w1")) for _ in range(40)]

    async def subscribed() -> bool:
        return server.service.engine.core.hub.count == 40

    await eventually(subscribed)
    before = await stored(server)

    async def status() -> grpc.StatusCode:
        try:
            await server.stub.GetStatus(pb.GetStatusRequest(instance_id="w1"), timeout=TIMEOUT)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            return error.code()

    outcomes = Counter(await asyncio.gather(*(status() for _ in range(5000))))
    assert outcomes == {EXHAUSTED: 5000}
    assert await stored(server) == before
    for call in held:
        call.cancel()

    async def served() -> bool:
        return await status() == grpc.StatusCode.OK

    await eventually(served)
    # Unheld, a burst is served or refused, never failed otherwise.
    outcomes = Counter(await asyncio.gather(*(status() for _ in range(5000))))
    assert set(outcomes) <= {grpc.StatusCode.OK, EXHAUSTED}, outcomes
    assert outcomes[grpc.StatusCode.OK] > 0
    assert await status() == grpc.StatusCode.OK


def test_the_limits_have_config_keys(tmp_path: Path) -> None:
    limits = {"max_json_depth": 10, "max_watchers": 7, "max_concurrent_rpcs": 99}
    config = load_config(write_config(tmp_path, ALL_WORKFLOWS, limits=limits))
    assert config.limits.max_json_depth == 10
    assert config.limits.max_watchers == 7
    assert config.limits.max_concurrent_rpcs == 99
    defaults = load_config(write_config(tmp_path, ALL_WORKFLOWS)).limits
    assert (defaults.max_json_depth, defaults.max_watchers, defaults.max_concurrent_rpcs) == (
        64,
        10_000,
        20_000,
    )


async def test_a_wait_for_an_event_type_sendevent_refuses_fails_the_instance(
    make_engine: EngineFactory,
) -> None:
    """SendEvent refuses control characters, so such a wait could never be answered."""
    engine = await make_engine()
    instance_id, _ = await engine.create("waits-for-type", params='{"type": "a\\u0000b"}')
    record = await finished(engine, instance_id)
    assert record.status == InstanceStatus.ERRORED
    assert record.error_message is not None and "control character" in record.error_message
