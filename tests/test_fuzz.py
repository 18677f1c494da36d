"""Hostile input is harmless: random and mutated requests to every RPC of a
real server (in-process, loopback port), with hypothesis.

Each example sends one request: either a message built from random field
values, or the bytes of such a message mutated (bits flipped, bytes cut,
inserted or replaced, or random bytes outright), which the server sees as
malformed protobuf. Every call must end with a status from ``ALLOWED`` (never
UNKNOWN or INTERNAL, the codes of an unhandled exception) and, when refused,
with a message; the server must keep answering; and the stored data of the
instances made before the fuzzing, read through a separate read-only SQLite
connection, must stay exactly as it was.

Requests are sent as bytes through generic multi-callables, so the same path
carries well-formed and malformed ones. Over HTTP (``TRANSPORTS``), the same
bytes go to the Connect endpoint as ``application/proto`` (in an envelope for
the stream), and a request that parses is also sent in the JSON mapping, so
the JSON decoder is fuzzed with every valid message the strategies make. Instances that a fuzzed create does
store (the fuzz can hit on a valid request) are tracked and left out of the
comparison; the fuzz only ever names the "three-steps" workflow, which
finishes at once, so none of them can keep a WaitInstance waiting.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cruzflow.server.engine import validate
from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import BOTH, Server, ServerFactory, eventually
from tests.connect_stub import END_STREAM, envelope, unframe

TRANSPORTS = BOTH

SERVICE = "/cruzflow.v1.WorkflowService/"
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES = 200
CALL_TIMEOUT = 10.0
# Instances made before the fuzzing; all final, so no control call can move them
# and every WaitInstance or WatchInstance on them ends at once.
KNOWN = ("done", "done-keyed", "gone")


# ------------------------------------------------------------- field values
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


def _sized(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Random text, or text of a length around the limits (100, 256, 1 KiB+)."""
    return st.one_of(
        strategy,
        st.builds(
            lambda ch, n: ch * n,
            st.sampled_from(["a", "-", "é", "\x00", "[", "😀"]),
            st.sampled_from([0, 1, 99, 100, 101, 255, 256, 257, 5000]),
        ),
    )


TEXT = _sized(st.text(max_size=40))
# Ids: the known ones, well-formed ones that do not exist, and anything.
MISSING = st.from_regex(r"missing-[a-z0-9]{1,8}", fullmatch=True)
IDS = st.one_of(st.sampled_from(KNOWN), MISSING, TEXT, st.just(""))
# For RestartInstance, which a known instance would obey.
IDS_NOT_KNOWN = st.one_of(MISSING, TEXT, st.just(""))
# For creates: new ids (the create may succeed), known ones (ALREADY_EXISTS), anything.
NEW_IDS = st.one_of(
    st.from_regex(r"new-[a-z0-9]{1,12}", fullmatch=True), st.sampled_from(KNOWN), TEXT
)
WORKFLOWS = st.one_of(st.just("three-steps"), st.just(""), st.just("no-such-workflow"), TEXT)
FILTER_WORKFLOWS = st.one_of(st.just(""), st.just("three-steps"), st.just("approval"), TEXT)

_JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
)  # fmt: skip
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


def _nested(depth: int, kind: str) -> str:
    return kind[0] * depth + kind[1] * depth


JSON_TEXT = st.one_of(
    st.just(""),
    _JSON_VALUES.map(json.dumps),
    st.builds(_nested, st.integers(0, 3000), st.sampled_from(["[]", "{}"])),
    st.builds(lambda d: '{"a":' * d + "1" + "}" * d, st.integers(60, 70)),
    st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "[1,]",
            "{'a': 1}",
            "9" * 5000,
            '"\\ud800"',
            '"\\',
            "[" * 100,
            "]" * 100,
            '["]"' + "]" * 80,
            "\x00",
            "\ufeff{}",
        ]
    ),
    TEXT,
)
SEQUENCES = st.one_of(st.integers(0, 20), INT64)
STATUSES = st.lists(st.one_of(st.integers(0, 10), INT32), max_size=5)


@st.composite
def durations(draw: st.DrawFn) -> dict[str, int]:
    return {
        "seconds": draw(st.one_of(st.integers(-5, 5), INT64)),
        "nanos": draw(st.one_of(st.integers(-5, 5), INT32)),
    }


@st.composite
def timestamps(draw: st.DrawFn) -> dict[str, int]:
    return {
        "seconds": draw(st.one_of(st.integers(0, 2_000_000_000), INT64)),
        "nanos": draw(st.one_of(st.integers(-2, 999_999_999), INT32)),
    }


# ------------------------------------------------------------------ requests
def _create(draw: st.DrawFn) -> pb.CreateInstanceRequest:
    return pb.CreateInstanceRequest(
        workflow=draw(WORKFLOWS),
        instance_id=draw(NEW_IDS),
        params_json=draw(JSON_TEXT),
        lookup_key=draw(TEXT),
    )


@st.composite
def create_instance(draw: st.DrawFn) -> Message:
    return _create(draw)


@st.composite
def create_instances(draw: st.DrawFn) -> Message:
    count = draw(st.one_of(st.integers(0, 4), st.sampled_from([100, 101, 150])))
    first = _create(draw)
    # Large batches repeat one item: random ones would make each example slow.
    items = [first] * count if count > 4 else [_create(draw) for _ in range(count)]
    return pb.CreateInstancesRequest(requests=items)


@st.composite
def by_id(draw: st.DrawFn, message: type[Message], ids: st.SearchStrategy[str] = IDS) -> Message:
    return message(instance_id=draw(ids))


@st.composite
def repair_instance(draw: st.DrawFn) -> Message:
    # Ids no instance has, as for RestartInstance: a repair is obeyed.
    return pb.RepairInstanceRequest(
        instance_id=draw(IDS_NOT_KNOWN),
        step=draw(st.one_of(st.just(""), st.just("step-1"), TEXT)),
        occurrence=draw(st.one_of(st.integers(-2, 3), INT32)),
        output_json=draw(JSON_TEXT),
        retry=draw(st.booleans()),
        reason=draw(st.one_of(st.just(""), TEXT)),
    )


@st.composite
def watch_instance(draw: st.DrawFn) -> Message:
    return pb.WatchInstanceRequest(instance_id=draw(IDS), after_sequence=draw(SEQUENCES))


@st.composite
def watch_instances(draw: st.DrawFn) -> Message:
    cursor = st.builds(
        lambda instance_id, after: pb.WatchCursor(instance_id=instance_id, after_sequence=after),
        IDS,
        SEQUENCES,
    )
    if draw(st.integers(0, 9)) == 0:  # past the limit of 1,000
        return pb.WatchInstancesRequest(instances=[draw(cursor)] * 1001)
    return pb.WatchInstancesRequest(instances=draw(st.lists(cursor, max_size=4)))


@st.composite
def wait_instance(draw: st.DrawFn) -> Message:
    request = pb.WaitInstanceRequest(instance_id=draw(IDS), include_steps=draw(st.booleans()))
    if draw(st.booleans()):
        duration = draw(durations())
        request.timeout.seconds = duration["seconds"]
        request.timeout.nanos = duration["nanos"]
    return request


@st.composite
def run_instance(draw: st.DrawFn) -> Message:
    request = pb.RunInstanceRequest(instance=_create(draw), include_steps=draw(st.booleans()))
    if draw(st.booleans()):
        duration = draw(durations())
        request.timeout.seconds = duration["seconds"]
        request.timeout.nanos = duration["nanos"]
    return request


def _created_bounds(
    draw: st.DrawFn, request: pb.ListInstancesRequest | pb.CountInstancesRequest
) -> None:
    for bound in ("create_time_min", "create_time_max"):
        if draw(st.booleans()):
            stamp = draw(timestamps())
            getattr(request, bound).seconds = stamp["seconds"]
            getattr(request, bound).nanos = stamp["nanos"]


@st.composite
def list_instances(draw: st.DrawFn, tokens: list[str]) -> Message:
    request = pb.ListInstancesRequest(
        workflow=draw(FILTER_WORKFLOWS),
        statuses=[pb.InstanceStatus.ValueType(s) for s in draw(STATUSES)],
        lookup_key=draw(st.one_of(st.just(""), st.just("user:1"), TEXT)),
        page_size=draw(st.one_of(st.integers(-2, 1002), INT32)),
    )
    _created_bounds(draw, request)
    token = draw(st.sampled_from(tokens))
    request.page_token = draw(
        st.one_of(
            st.just(""),
            st.just(token),
            st.builds(_flip_char, st.just(token), st.integers(0, len(token) - 1)),
            st.builds(lambda t, n: t[:n], st.just(token), st.integers(0, len(token))),
            TEXT,
        )
    )
    return request


def _flip_char(token: str, at: int) -> str:
    """The token with one character changed to another base64 character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    replacement = alphabet[(alphabet.index(token[at]) + 1) % len(alphabet)]
    return token[:at] + replacement + token[at + 1 :]


@st.composite
def send_event(draw: st.DrawFn) -> Message:
    return pb.SendEventRequest(
        instance_id=draw(IDS),
        type=draw(st.one_of(st.just("approval"), TEXT)),
        payload_json=draw(JSON_TEXT),
    )


def list_workflows() -> st.SearchStrategy[Message]:
    # No fields: the mutated bytes (unknown fields, corrupt tags) are its fuzz.
    return st.just(pb.ListWorkflowsRequest())


@st.composite
def count_instances(draw: st.DrawFn) -> Message:
    request = pb.CountInstancesRequest(
        workflow=draw(FILTER_WORKFLOWS),
        lookup_key=draw(st.one_of(st.just(""), st.just("user:1"), TEXT)),
    )
    _created_bounds(draw, request)
    return request


def get_caller() -> st.SearchStrategy[Message]:
    # No fields, as ListWorkflows.
    return st.just(pb.GetCallerRequest())


# Schedules: a known one (made paused before the fuzzing), new ids, anything.
SCHEDULE_IDS = st.one_of(
    st.just("fuzz-paused"), st.from_regex(r"sched-[a-z0-9]{1,8}", fullmatch=True), TEXT, st.just("")
)
CRONS = st.one_of(
    st.sampled_from(["0 9 * * MON", "*/10 * * * * *", "@daily", "0 0 30 2 *", "61 * * * *"]),
    TEXT,
)
ZONES = st.one_of(st.sampled_from(["", "UTC", "Europe/Paris", "../etc", "Mars/Base"]), TEXT)


@st.composite
def create_schedule(draw: st.DrawFn) -> Message:
    # Paused, so that what the fuzzing creates never fires on its own.
    return pb.CreateScheduleRequest(
        schedule=pb.Schedule(
            schedule_id=draw(SCHEDULE_IDS),
            workflow=draw(WORKFLOWS),
            cron=draw(CRONS),
            timezone=draw(ZONES),
            params_json=draw(JSON_TEXT),
            catch_up=pb.CatchUpPolicy.ValueType(draw(st.integers(0, 5))),
            paused=True,
        )
    )


@st.composite
def list_schedules(draw: st.DrawFn) -> Message:
    return pb.ListSchedulesRequest(
        workflow=draw(FILTER_WORKFLOWS),
        page_size=draw(st.one_of(st.integers(-2, 1002), INT32)),
        page_token=draw(st.one_of(st.just(""), TEXT)),
    )


def by_schedule(kind: Callable[..., Message]) -> st.SearchStrategy[Message]:
    return SCHEDULE_IDS.map(lambda schedule_id: kind(schedule_id=schedule_id))


RequestStrategy = Callable[[list[str]], st.SearchStrategy[Message]]
RPCS: dict[str, RequestStrategy] = {
    "CreateInstance": lambda _: create_instance(),
    "CreateInstances": lambda _: create_instances(),
    "GetStatus": lambda _: by_id(pb.GetStatusRequest),
    "WatchInstance": lambda _: watch_instance(),
    "WatchInstances": lambda _: watch_instances(),
    "WaitInstance": lambda _: wait_instance(),
    "RunInstance": lambda _: run_instance(),
    "ListInstances": list_instances,
    "PauseInstance": lambda _: by_id(pb.PauseInstanceRequest),
    "ResumeInstance": lambda _: by_id(pb.ResumeInstanceRequest),
    "TerminateInstance": lambda _: by_id(pb.TerminateInstanceRequest),
    "RestartInstance": lambda _: by_id(pb.RestartInstanceRequest, IDS_NOT_KNOWN),
    "RepairInstance": lambda _: repair_instance(),
    "SendEvent": lambda _: send_event(),
    "ListWorkflows": lambda _: list_workflows(),
    "CountInstances": lambda _: count_instances(),
    "GetCaller": lambda _: get_caller(),
    "CreateSchedule": lambda _: create_schedule(),
    "GetSchedule": lambda _: by_schedule(pb.GetScheduleRequest),
    "ListSchedules": lambda _: list_schedules(),
    "PauseSchedule": lambda _: by_schedule(pb.PauseScheduleRequest),
    # Resuming would let a schedule fire: only ids that are not there.
    "ResumeSchedule": lambda _: st.one_of(MISSING, TEXT).map(
        lambda schedule_id: pb.ResumeScheduleRequest(schedule_id=schedule_id)
    ),
    "DeleteSchedule": lambda _: by_schedule(pb.DeleteScheduleRequest),
    "TriggerSchedule": lambda _: by_schedule(pb.TriggerScheduleRequest),
}
STREAMING = {"WatchInstance", "WatchInstances"}


def test_every_rpc_is_fuzzed() -> None:
    service = pb.DESCRIPTOR.services_by_name["WorkflowService"]
    assert set(RPCS) == {method.name for method in service.methods}


# ------------------------------------------------------------------ mutation
@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few random edits, or random bytes outright."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64))
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if action == "insert" or not out:
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            out[at] = draw(st.integers(0, 255))
        elif action == "delete":
            del out[at]
        else:
            del out[at:]
    return bytes(out)


@st.composite
def payloads(draw: st.DrawFn, strategy: st.SearchStrategy[Message]) -> bytes:
    data = draw(strategy).SerializeToString()
    return draw(mutated(data)) if draw(st.booleans()) else data


# -------------------------------------------------------------------- checks
@dataclass
class Fuzzed:
    server: Server
    store: Path
    baseline: list[Any]
    tokens: list[str]
    created: set[str] = field(default_factory=set)


def snapshot(store: Path, created: set[str]) -> list[Any]:
    """Every stored row of the known instances, every other instance id except
    the ones fuzzed creates stored, and the store's meta rows; read through a
    read-only connection of its own."""
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        marks = ", ".join("?" for _ in KNOWN)
        rows: list[Any] = []
        for table, key, order in (
            ("instances", "id", "id"),
            ("steps", "instance_id", "instance_id, idx"),
            ("events", "instance_id", "instance_id, seq"),
            ("inbox", "instance_id", "id"),
        ):
            sql = f"SELECT * FROM {table} WHERE {key} IN ({marks}) ORDER BY {order}"
            rows.append((table, conn.execute(sql, KNOWN).fetchall()))
        ids = {r[0] for r in conn.execute("SELECT id FROM instances")} - created
        rows.append(("ids", sorted(ids)))
        rows.append(("meta", conn.execute("SELECT * FROM meta ORDER BY key").fetchall()))
        return rows
    finally:
        conn.close()


def raw(data: bytes) -> bytes:
    """Bytes as they are, both ways: the fuzz sends what it made, unparsed."""
    return data


def _post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        connection.connect()
        # http.client writes the headers and the body apart: without this, each
        # call waits out a delayed ACK (40 ms).
        assert connection.sock is not None
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.request("POST", path, body, {"content-type": content_type})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _connect_error(body: bytes) -> tuple[grpc.StatusCode, str]:
    """A Connect error body's code, as gRPC names it, and its message."""
    error = json.loads(body)
    code = str(error["code"]).upper().replace("CANCELED", "CANCELLED")
    return grpc.StatusCode[code], str(error.get("message", ""))


async def send_http(
    server: Server, rpc: str, data: bytes, codec: str
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """``send`` over HTTP: Connect, in ``codec`` ("proto", or "json": ``data``
    is then JSON text); the responses as binary protobuf either way."""
    port = server.service.http_port
    assert port is not None
    output = pb.DESCRIPTOR.services_by_name["WorkflowService"].methods_by_name[rpc].output_type
    parse = message_factory.GetMessageClass(output)

    def binary(answer: bytes) -> bytes:
        if codec == "proto":
            return answer
        message = parse()
        json_format.Parse(answer, message)
        return message.SerializeToString()

    if rpc not in STREAMING:
        status, body = await asyncio.to_thread(
            _post, port, SERVICE + rpc, data, f"application/{codec}"
        )
        if status == 200:
            return grpc.StatusCode.OK, "", [binary(body)]
        return (*_connect_error(body), [])
    status, body = await asyncio.to_thread(
        _post, port, SERVICE + rpc, envelope(data), f"application/connect+{codec}"
    )
    if status != 200:
        return (*_connect_error(body), [])
    responses: list[bytes] = []
    for flags, frame in unframe(body):
        if flags & END_STREAM:  # an error, or none
            ended = json.loads(frame)
            if "error" in ended:
                return (*_connect_error(json.dumps(ended["error"]).encode()), [])
            return grpc.StatusCode.OK, "", responses
        responses.append(binary(frame))
    raise AssertionError(f"{rpc}: a stream without its end-of-stream frame")


def as_json(rpc: str, data: bytes) -> bytes | None:
    """``data`` in the JSON mapping, if it is a valid message of ``rpc`` that
    the mapping can spell (not every Duration can be); else None."""
    method = pb.DESCRIPTOR.services_by_name["WorkflowService"].methods_by_name[rpc]
    try:
        message = message_factory.GetMessageClass(method.input_type).FromString(data)
        return json_format.MessageToJson(message).encode()
    except Exception:  # not a valid message, or not expressible in JSON
        return None


async def send(server: Server, rpc: str, data: bytes) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send raw request bytes; the status code, its message, and the raw responses."""
    if server.transport != "grpc":
        return await send_http(server, rpc, data, "proto")
    channel = server.channel
    try:
        if rpc in STREAMING:
            streaming = channel.unary_stream(
                SERVICE + rpc, request_serializer=raw, response_deserializer=raw
            )
            stream = streaming(data, timeout=CALL_TIMEOUT)
            return grpc.StatusCode.OK, "", [item async for item in stream]
        unary = channel.unary_unary(
            SERVICE + rpc, request_serializer=raw, response_deserializer=raw
        )
        response = await unary(data, timeout=CALL_TIMEOUT)
        return grpc.StatusCode.OK, "", [response]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", []


def stored_ids(rpc: str, responses: list[bytes]) -> set[str]:
    if rpc == "CreateInstance":
        return {pb.CreateInstanceResponse.FromString(r).instance_id for r in responses}
    if rpc == "CreateInstances":
        return {
            item.instance_id
            for r in responses
            for item in pb.CreateInstancesResponse.FromString(r).instances
        }
    if rpc == "TriggerSchedule":
        return {pb.TriggerScheduleResponse.FromString(r).instance_id for r in responses}
    if rpc == "RunInstance":
        return {pb.RunInstanceResponse.FromString(r).instance.instance_id for r in responses}
    return set()


async def check(fuzzed: Fuzzed, rpc: str, data: bytes) -> None:
    await checked(fuzzed, rpc, data, await send(fuzzed.server, rpc, data))
    text = as_json(rpc, data) if fuzzed.server.transport != "grpc" else None
    if text is not None:
        await checked(fuzzed, rpc, text, await send_http(fuzzed.server, rpc, text, "json"))


async def checked(
    fuzzed: Fuzzed, rpc: str, data: bytes, sent: tuple[grpc.StatusCode, str, list[bytes]]
) -> None:
    code, message, responses = sent
    assert code in ALLOWED, f"{rpc}({data[:200]!r}) -> {code}: {message}"
    if code != grpc.StatusCode.OK:
        assert message, f"{rpc}({data[:200]!r}) -> {code} without a message"
        # A message too large for a trailer reaches the client as its own
        # RESOURCE_EXHAUSTED ("metadata size exceeds"): the reason is lost.
        assert "metadata size" not in message, f"{rpc}({data[:200]!r}): {message}"
        assert len(message.encode()) <= validate.MAX_MESSAGE_BYTES, message[:300]
    fuzzed.created |= stored_ids(rpc, responses)
    # The server keeps serving ...
    asked = pb.GetStatusRequest(instance_id="done").SerializeToString()
    code, message, answer = await send(fuzzed.server, "GetStatus", asked)
    assert code == grpc.StatusCode.OK, message
    alive = pb.GetStatusResponse.FromString(answer[0])
    assert alive.instance.status == pb.INSTANCE_STATUS_COMPLETE
    # ... and what it stored before is as it was.
    now = snapshot(fuzzed.store, fuzzed.created)
    assert now == fuzzed.baseline, f"{rpc}({data[:200]!r}) -> {code} changed the store"


# ------------------------------------------------------------------- fixture
async def _settled(server: Server, instance_id: str, status: int) -> None:
    async def reached() -> bool:
        got = await server.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id))
        return got.instance.status == status

    await eventually(reached)


@pytest.fixture
async def fuzzed(make_server: ServerFactory) -> Fuzzed:
    server = await make_server()
    stub = server.stub
    await server.run("three-steps", instance_id="done")
    await stub.CreateInstance(
        pb.CreateInstanceRequest(
            workflow="three-steps", instance_id="done-keyed", params_json='{"a": [1, 2]}',
            lookup_key="user:1",
        )
    )  # fmt: skip
    await _settled(server, "done-keyed", pb.INSTANCE_STATUS_COMPLETE)
    # A waiting instance with an event it never took, then terminated.
    await stub.CreateInstance(pb.CreateInstanceRequest(workflow="approval", instance_id="gone"))
    await _settled(server, "gone", pb.INSTANCE_STATUS_WAITING)
    await stub.SendEvent(pb.SendEventRequest(instance_id="gone", type="other", payload_json="1"))
    await stub.TerminateInstance(pb.TerminateInstanceRequest(instance_id="gone"))
    await stub.CreateSchedule(
        pb.CreateScheduleRequest(
            schedule=pb.Schedule(
                schedule_id="fuzz-paused", workflow="three-steps", cron="0 9 * * MON", paused=True
            )
        )
    )
    first = await stub.ListInstances(pb.ListInstancesRequest(page_size=1))
    keyed = await stub.ListInstances(
        pb.ListInstancesRequest(
            page_size=1, workflow="three-steps", statuses=[pb.INSTANCE_STATUS_COMPLETE]
        )
    )
    tokens = [first.next_page_token, keyed.next_page_token]
    assert all(tokens)
    store = server.service.config.store_path
    return Fuzzed(server, store, snapshot(store, set()), tokens)


# --------------------------------------------------------------------- tests
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


# One server per RPC (the fixture runs once per test, not per example): the
# examples of one RPC share it, so each also checks what the earlier ones left.
@pytest.mark.parametrize("rpc", list(RPCS))
@FUZZ
@given(data=st.data())
async def test_random_and_mutated_requests_get_a_proper_status(
    fuzzed: Fuzzed, rpc: str, data: st.DataObject
) -> None:
    payload = data.draw(payloads(RPCS[rpc](fuzzed.tokens)), label="request bytes")
    await check(fuzzed, rpc, payload)


async def test_a_fuzzed_server_still_does_its_work(fuzzed: Fuzzed) -> None:
    """After a burst of malformed requests, ordinary calls behave as ever."""
    for data in (b"\xff" * 10, b"\x0a\x03\xff\xfe\xfd", b"\x12\x05abc", b"\x08" * 50):
        for rpc in RPCS:
            await check(fuzzed, rpc, data)
    done = await fuzzed.server.run("three-steps", '{"x": 1}', "after-fuzz")
    assert done.status == pb.INSTANCE_STATUS_COMPLETE
    assert json.loads(done.output_json) == {"sum": 6, "params": {"x": 1}}
