"""What is particular to the HTTP listener, over real HTTP on loopback ports.

The behaviour suites (test_grpc_api, test_hostile, test_auth) already run
every call through connectrpc's client; here the bytes are written by hand
(``http.client``, or the ``curl`` binary for HTTP/2), so that what a
browser, a shell script or another language's client sees is pinned: the
two ``/workflows/`` routes, the Connect wire format (compact JSON, binary
protobuf, stream envelopes, error bodies), HTTP/2, tokens, CORS, the size
and in-flight limits, TLS and mTLS, and spans.

The server runs in this event loop, so every request is made from a thread
(``asyncio.to_thread``) or a subprocess: a blocking call here would stall
the server it waits for.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from cruzflow.server.app import Service
from cruzflow.server.config import ConfigError, load_config
from cruzflow.server.telemetry import Providers
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.conftest import ALL_WORKFLOWS, ON_POSTGRES, Stores, eventually
from tests.connect_stub import END_STREAM, read_frame, unframe
from tests.connect_stub import envelope as enveloped
from tests.pki import Pki, make_pki, token_entry
from tests.procs import write_config

SERVICE_PATH = "/cruzflow.v1.WorkflowService/"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
FINISHED = ("complete", "errored", "terminated")


# ------------------------------------------------------------------ HTTP


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def _request(
    port: int,
    method: str,
    path: str,
    body: bytes | None,
    headers: Mapping[str, str],
    context: ssl.SSLContext | None,
) -> Reply:
    connection: http.client.HTTPConnection
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        connection.request(method, path, body=body, headers=dict(headers))
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


def frames(data: bytes) -> list[tuple[int, Any]]:
    """A Connect stream's envelopes: (flags, the JSON of each)."""
    return [(flags, json.loads(body)) for flags, body in unframe(data)]


def envelope(message: Mapping[str, Any]) -> bytes:
    return enveloped(json.dumps(message).encode())


class Http:
    """Requests to one HTTP listener, each on a fresh connection, from a thread."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.context = context

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return await asyncio.to_thread(
            _request, self.port, method, path, body, headers or {}, self.context
        )

    async def call(
        self, method: str, message: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> Reply:
        """A unary Connect call with a JSON body."""
        return await self.request(
            "POST",
            SERVICE_PATH + method,
            json.dumps(message).encode(),
            {"content-type": "application/json", **(headers or {})},
        )

    async def trigger(
        self,
        workflow: str,
        body: bytes = b"",
        query: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return await self.request("POST", f"/workflows/{workflow}/trigger{query}", body, headers)

    async def status(
        self, workflow: str, instance_id: str, headers: Mapping[str, str] | None = None
    ) -> Reply:
        return await self.request(
            "GET", f"/workflows/{workflow}/status/{instance_id}", None, headers
        )

    async def finished(self, workflow: str, instance_id: str) -> Any:
        """The status route's answer once the instance has finished."""

        async def done() -> Any:
            answer = (await self.status(workflow, instance_id)).json()
            return answer if answer["status"] in FINISHED else None

        return await eventually(done, timeout=20)

    async def watch(self, instance_id: str, after: int = 0) -> Reply:
        """WatchInstance as a Connect server stream of JSON envelopes."""
        return await self.request(
            "POST",
            SERVICE_PATH + "WatchInstance",
            envelope({"instanceId": instance_id, "afterSequence": str(after)}),
            {"content-type": "application/connect+json"},
        )


async def curl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", "20", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


# ---------------------------------------------------------------- servers


@dataclass
class Node:
    service: Service
    http: Http
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkflowServiceAsyncStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = pb_grpc.WorkflowServiceStub(self.channel)


Start = Callable[..., Awaitable[Node]]


def config_text(
    directory: Path,
    *,
    store_url: str | None,
    limits: Mapping[str, int] | None = None,
    server: Mapping[str, object] | None = None,
    http: Mapping[str, object] | None = None,
    extra: str = "",
    http_listen: str = "127.0.0.1:0",
) -> Path:
    """write_config's file, with more [server] and [http] keys and ``extra``
    (TOML text: [[auth.tokens]]) at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    path = write_config(
        directory, ALL_WORKFLOWS, limits=limits, http=http_listen, store_url=store_url
    )
    text = path.read_text()

    def keys(values: Mapping[str, object] | None) -> str:
        return "".join(
            f"{key} = {json.dumps(str(v) if isinstance(v, Path) else v)}\n"
            for key, v in (values or {}).items()
        )

    text = text.replace("[http]\n", keys(server) + "[http]\n", 1)
    text = text.replace("[store]\n", keys(http) + "[store]\n", 1)
    path.write_text(text + extra)
    return path


@pytest.fixture
async def start(tmp_path: Path, stores: Stores) -> AsyncIterator[Start]:
    """Start in-process servers with an HTTP listener; all stopped after."""
    nodes: list[Node] = []

    async def make(
        *,
        telemetry: Providers | None = None,
        context: ssl.SSLContext | None = None,
        **settings: Any,
    ) -> Node:
        name = f"server{len(nodes)}"
        path = config_text(
            tmp_path / name, store_url=stores.url(name) if ON_POSTGRES else None, **settings
        )
        service = Service(load_config(path), telemetry)
        await service.start()
        assert service.http_port is not None
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        node = Node(service, Http(service.http_port, context), channel)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.channel.close()
        await node.service.stop(0.1)


@pytest.fixture
async def node(start: Start) -> Node:
    return await start()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def instance(http: Http, instance_id: str) -> Any:
    reply = await http.call("GetStatus", {"instanceId": instance_id})
    assert reply.status == 200, reply.body
    return reply.json()["instance"]


# ------------------------------------------------------- the two routes


async def test_trigger_creates_an_instance_with_the_body_as_params(node: Node) -> None:
    params = {"order": 7, "note": "déjà vu", "items": [1, 2]}
    reply = await node.http.trigger("three-steps", json.dumps(params).encode())
    assert reply.status == 200, reply.body
    assert reply.header("content-type") == "application/json"
    answer = reply.json()
    assert set(answer) == {"id", "status"}
    assert answer["status"] in ("queued", "running")
    created = await instance(node.http, answer["id"])
    assert created["workflow"] == "three-steps"
    assert json.loads(created["paramsJson"]) == params
    done = await node.http.finished("three-steps", answer["id"])
    assert done == {
        "id": answer["id"],
        "status": "complete",
        "output": {"sum": 6, "params": params},
        "error": None,
    }


async def test_trigger_honours_id_and_lookup_key(node: Node) -> None:
    reply = await node.http.trigger("three-steps", b"{}", "?id=order-1&lookupKey=cust%2F9")
    assert reply.status == 200, reply.body
    assert reply.json()["id"] == "order-1"
    await node.http.trigger("three-steps", b"{}", "?id=order-2&lookupKey=cust-other")
    listed = await node.http.call("ListInstances", {"lookupKey": "cust/9"})
    assert [i["instanceId"] for i in listed.json()["instances"]] == ["order-1"]
    assert (await instance(node.http, "order-1"))["lookupKey"] == "cust/9"

    again = await node.http.trigger("three-steps", b"{}", "?id=order-1")
    assert again.status == 409
    assert again.json()["code"] == "already_exists"
    assert "'order-1' exists already" in again.json()["message"]


async def test_an_empty_trigger_body_is_null_params(node: Node) -> None:
    reply = await node.http.trigger("three-steps", query="?id=empty")
    assert reply.status == 200, reply.body
    assert (await instance(node.http, "empty"))["paramsJson"] == "null"
    done = await node.http.finished("three-steps", "empty")
    assert done["output"] == {"sum": 6, "params": None}


async def test_a_trigger_body_that_is_not_json_is_refused(node: Node) -> None:
    for body in (b"{not json", b"\xff\xfe{}"):
        reply = await node.http.trigger("three-steps", body)
        assert reply.status == 400, reply.body
        answer = reply.json()
        assert answer["code"] == "invalid_argument"
        assert answer["message"].startswith("params"), answer
    listed = await node.http.call("ListInstances", {})
    assert listed.json().get("instances", []) == []


async def test_trigger_of_an_unknown_workflow_names_the_registered_ones(node: Node) -> None:
    reply = await node.http.trigger("no-such-flow", b"{}")
    assert reply.status == 404
    answer = reply.json()
    assert answer["code"] == "not_found"
    assert "'no-such-flow' is not registered" in answer["message"]
    for name in ("three-steps", "raises", "approval"):
        assert name in answer["message"]


async def test_each_route_answers_one_method(node: Node) -> None:
    for method, path, allowed in (
        ("GET", "/workflows/three-steps/trigger", "POST"),
        ("PUT", "/workflows/three-steps/trigger", "POST"),
        ("POST", "/workflows/three-steps/status/x", "GET"),
        ("DELETE", "/workflows/three-steps/status/x", "GET"),
    ):
        reply = await node.http.request(method, path)
        assert reply.status == 405, (method, path)
        assert reply.header("allow") == allowed
        assert reply.json()["code"] == "unimplemented"
        assert f"answers {allowed} only" in reply.json()["message"]


async def test_the_status_route_follows_an_instance(node: Node, gate: asyncio.Event) -> None:
    await node.http.trigger("blocks", query="?id=held")

    async def running() -> bool:
        return bool((await node.http.status("blocks", "held")).json()["status"] == "running")

    await eventually(running)
    assert (await node.http.status("blocks", "held")).json() == {
        "id": "held",
        "status": "running",
        "output": None,
        "error": None,
    }
    gate.set()
    done = await node.http.finished("blocks", "held")
    assert done["status"] == "complete" and done["error"] is None

    await node.http.trigger("approval", query="?id=asks")

    async def waiting() -> bool:
        return bool((await node.http.status("approval", "asks")).json()["status"] == "waiting")

    await eventually(waiting)

    await node.http.trigger("raises", query="?id=fails")
    assert await node.http.finished("raises", "fails") == {
        "id": "fails",
        "status": "errored",
        "output": None,
        "error": {"name": "ValueError", "message": "bad input row 7"},
    }


async def test_status_of_another_workflows_instance_is_not_found(node: Node) -> None:
    await node.http.trigger("three-steps", query="?id=mine")
    await node.http.finished("three-steps", "mine")
    reply = await node.http.status("raises", "mine")
    assert reply.status == 404
    assert reply.json() == {
        "code": "not_found",
        "message": "workflow 'raises' has no instance 'mine'",
    }
    missing = await node.http.status("three-steps", "nobody")
    assert missing.status == 404
    assert missing.json()["code"] == "not_found"
    assert "'nobody'" in missing.json()["message"]


async def test_an_unknown_path_is_a_json_404(node: Node) -> None:
    for method, path in (
        ("GET", "/index.html"),  # the console is at / only
        ("GET", "/workflows/three-steps"),
        ("POST", "/workflows/three-steps/trigger/more"),
        ("GET", "/workflows/three-steps/status/a/b"),
        ("POST", "/cruzflow.v1.Other/GetStatus"),
    ):
        reply = await node.http.request(method, path)
        assert reply.status == 404, (method, path)
        assert reply.header("content-type") == "application/json"
        assert reply.json()["code"] == "not_found"
        assert f"no route {path}" in reply.json()["message"]


async def test_healthz_is_open_and_follows_the_health_service(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /healthz needs no token (probes carry none) and says what gRPC's
    health service says: SERVING, or 503 once the store cannot commit."""
    monkeypatch.setenv("CRUZFLOW_TEST_HEALTH_TOKEN", secrets.token_urlsafe(24))
    node = await start(extra=token_entry("admin", env="CRUZFLOW_TEST_HEALTH_TOKEN"))
    reply = await node.http.request("GET", "/healthz")
    assert (reply.status, reply.json()) == (200, {"status": "SERVING"})
    assert (await node.http.status("three-steps", "x")).status == 401
    # What the engine's store listener does on a fault (see Service._store_health).
    await node.service._set_health(False)
    reply = await node.http.request("GET", "/healthz")
    assert (reply.status, reply.json()) == (503, {"status": "NOT_SERVING"})
    await node.service._set_health(True)
    assert (await node.http.request("GET", "/healthz")).status == 200


async def test_answers_are_not_held_for_a_delayed_ack(node: Node) -> None:
    """The listening socket has TCP_NODELAY, which its connections inherit:
    without it, on asyncio's own loop (uvloop = false, and the tests), every
    call on a kept-alive connection waited 40 ms for the client's delayed ACK
    of the answer's first part."""
    listener = node.service._http
    assert listener is not None
    sock = listener._sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# ------------------------------------------------- Connect over raw HTTP


async def test_unary_json_is_the_compact_camel_case_mapping(node: Node) -> None:
    reply = await node.http.call(
        "CreateInstance",
        {"workflow": "three-steps", "paramsJson": '{"a": 1}', "instanceId": "c1"},
        {"connect-protocol-version": "1"},
    )
    assert reply.status == 200, reply.body
    assert reply.header("content-type") == "application/json"
    assert reply.json() == {"instanceId": "c1", "status": reply.json()["status"]}
    assert reply.json()["status"].startswith("INSTANCE_STATUS_")
    assert reply.body == json.dumps(reply.json(), separators=(",", ":")).encode()
    await node.http.finished("three-steps", "c1")
    status = await node.http.call("GetStatus", {"instanceId": "c1"})
    assert status.body == json.dumps(status.json(), separators=(",", ":")).encode()
    got = status.json()["instance"]
    assert got["status"] == "INSTANCE_STATUS_COMPLETE"
    assert json.loads(got["outputJson"]) == {"sum": 6, "params": {"a": 1}}
    assert [s["name"] for s in got["steps"]] == ["one", "two", "three"]


async def test_binary_protobuf_works(node: Node) -> None:
    request = pb.CreateInstanceRequest(workflow="three-steps", instance_id="p1", params_json="[1]")
    reply = await node.http.request(
        "POST",
        SERVICE_PATH + "CreateInstance",
        request.SerializeToString(),
        {"content-type": "application/proto"},
    )
    assert reply.status == 200, reply.body
    assert reply.header("content-type") == "application/proto"
    created = pb.CreateInstanceResponse.FromString(reply.body)
    assert created.instance_id == "p1"
    await node.http.finished("three-steps", "p1")
    reply = await node.http.request(
        "POST",
        SERVICE_PATH + "GetStatus",
        pb.GetStatusRequest(instance_id="p1").SerializeToString(),
        {"content-type": "application/proto"},
    )
    got = pb.GetStatusResponse.FromString(reply.body).instance
    assert got.status == pb.INSTANCE_STATUS_COMPLETE
    assert json.loads(got.output_json) == {"sum": 6, "params": [1]}


async def test_a_malformed_request_says_how_to_mend_it(node: Node) -> None:
    bad_json = await node.http.request(
        "POST", SERVICE_PATH + "GetStatus", b'{"instanceId":', {"content-type": "application/json"}
    )
    assert bad_json.status == 400
    answer = bad_json.json()
    assert answer["code"] == "invalid_argument"
    assert "not a valid cruzflow.v1.GetStatusRequest message" in answer["message"]
    assert "camelCase, e.g." in answer["message"]
    assert "\n" not in answer["message"]

    unknown = await node.http.call("GetStatus", {"instance_idd": "x"})
    assert unknown.status == 400
    assert unknown.json()["code"] == "invalid_argument"
    assert "instance_idd" in unknown.json()["message"]

    snake = await node.http.call("CreateInstance", {"workflow": "three-steps", "params": "{}"})
    assert snake.json()["code"] == "invalid_argument"
    assert "paramsJson" in snake.json()["message"]

    bad_proto = await node.http.request(
        "POST", SERVICE_PATH + "GetStatus", b"\xff\xff\xff", {"content-type": "application/proto"}
    )
    assert bad_proto.status == 400
    assert bad_proto.json()["code"] == "invalid_argument"
    assert "encode it from proto/cruzflow/v1/workflows.proto" in bad_proto.json()["message"]

    wrong_type = await node.http.request(
        "POST", SERVICE_PATH + "GetStatus", b'{"instanceId":"x"}', {"content-type": "text/plain"}
    )
    assert wrong_type.status == 415
    assert "application/json" in (wrong_type.header("accept-post") or "")
    assert "send application/json" in wrong_type.json()["message"]
    # curl -d without -H sends a form: the answer says which header to add.
    form = await node.http.request(
        "POST",
        SERVICE_PATH + "GetStatus",
        b'{"instanceId":"x"}',
        {"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status == 415
    assert "-H 'Content-Type: application/json'" in form.json()["message"]

    misspelt = await node.http.call("GetStatuss", {"instanceId": "x"})
    assert misspelt.status == 404
    assert misspelt.json()["code"] == "not_found"
    assert "no method 'GetStatuss'" in misspelt.json()["message"]
    assert "GetStatus, WatchInstance" in misspelt.json()["message"]

    get = await node.http.request("GET", SERVICE_PATH + "GetStatus")
    assert get.status == 405
    assert get.header("allow") == "POST"
    assert "answers POST only" in get.json()["message"]
    # None of these reached the engine.
    assert (await node.http.call("ListInstances", {})).json().get("instances", []) == []


def _event_kind(event: Mapping[str, Any]) -> str:
    (kind,) = set(event) - {"instanceId", "sequence", "time"}
    return kind


async def test_watch_is_a_stream_of_envelopes_ending_with_end_of_stream(node: Node) -> None:
    await node.http.trigger("raises", query="?id=w1")
    await node.http.finished("raises", "w1")
    reply = await node.http.watch("w1")
    assert reply.status == 200
    assert reply.header("content-type") == "application/connect+json"
    got = frames(reply.body)
    *events, (end_flags, end) = got
    assert all(flags == 0 for flags, _ in events)
    assert end_flags == END_STREAM and "error" not in end
    sequences = [int(e["sequence"]) for _, e in events]
    assert sequences == list(range(1, len(events) + 1))
    kinds = [_event_kind(e) for _, e in events]
    assert kinds[0] == "statusChanged" and kinds[-1] == "statusChanged"
    assert events[-1][1]["statusChanged"]["status"] == "INSTANCE_STATUS_ERRORED"
    assert events[-1][1]["statusChanged"]["error"]["message"] == "bad input row 7"

    # The same events, in the same order, as over gRPC.
    over_grpc = [
        json_format.MessageToDict(e)
        async for e in node.stub.WatchInstance(pb.WatchInstanceRequest(instance_id="w1"))
    ]
    assert over_grpc == [e for _, e in events]

    rest = frames((await node.http.watch("w1", after=3)).body)
    assert [int(e["sequence"]) for _, e in rest[:-1]] == sequences[3:]
    assert rest[-1][0] == END_STREAM

    missing = frames((await node.http.watch("nobody")).body)
    ((flags, end),) = missing
    assert flags == END_STREAM
    assert end["error"]["code"] == "not_found"


def _watch_live(port: int, instance_id: str, seen: list[tuple[int, Any]]) -> None:
    """Read a watch stream envelope by envelope, appending each as it arrives."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST",
            SERVICE_PATH + "WatchInstance",
            envelope({"instanceId": instance_id}),
            {"content-type": "application/connect+json"},
        )
        response = connection.getresponse()
        while (frame := read_frame(response)) is not None:
            flags, body = frame
            seen.append((flags, json.loads(body)))
            if flags & END_STREAM:
                return
    finally:
        connection.close()


async def test_a_watch_delivers_events_as_they_happen(node: Node) -> None:
    await node.http.trigger("approval", query="?id=live")
    seen: list[tuple[int, Any]] = []
    watching = asyncio.create_task(asyncio.to_thread(_watch_live, node.http.port, "live", seen))

    async def arrived() -> bool:
        return any(
            e.get("statusChanged", {}).get("status") == "INSTANCE_STATUS_WAITING" for _, e in seen
        )

    # The stream is still open: the events so far arrived before its end.
    await eventually(arrived, timeout=20)
    assert not watching.done()
    assert all(flags == 0 for flags, _ in seen)
    await node.stub.SendEvent(
        pb.SendEventRequest(instance_id="live", type="approval", payload_json='{"by": "ann"}')
    )
    await asyncio.wait_for(watching, 20)
    assert seen[-1][0] == END_STREAM
    last = seen[-2][1]["statusChanged"]
    assert last["status"] == "INSTANCE_STATUS_COMPLETE"
    assert json.loads(last["outputJson"])["approved"] == {"by": "ann"}
    sequences = [int(e["sequence"]) for _, e in seen[:-1]]
    assert sequences == list(range(1, len(sequences) + 1))


async def test_refusals_carry_the_grpc_code_and_message(node: Node) -> None:
    await node.stub.CreateInstance(pb.CreateInstanceRequest(workflow="approval", instance_id="t"))
    cases: list[tuple[str, Any, dict[str, Any]]] = [
        ("GetStatus", pb.GetStatusRequest(instance_id="nope"), {"instanceId": "nope"}),
        (
            "CreateInstance",
            pb.CreateInstanceRequest(workflow="nope"),
            {"workflow": "nope"},
        ),
        (
            "CreateInstance",
            pb.CreateInstanceRequest(workflow="three-steps", params_json="{x"),
            {"workflow": "three-steps", "paramsJson": "{x"},
        ),
        (
            "CreateInstance",
            pb.CreateInstanceRequest(workflow="approval", instance_id="t"),
            {"workflow": "approval", "instanceId": "t"},
        ),
        (
            "SendEvent",
            pb.SendEventRequest(instance_id="t", type=""),
            {"instanceId": "t", "type": ""},
        ),
        ("ResumeInstance", pb.ResumeInstanceRequest(instance_id="t"), {"instanceId": "t"}),
    ]
    seen_codes = set()
    for method, message, body in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(node.stub, method)(message)
        reply = await node.http.call(method, body)
        answer = reply.json()
        assert answer["code"] == refused.value.code().name.lower(), (method, body)
        assert answer["message"] == refused.value.details(), (method, body)
        seen_codes.add(answer["code"])
    assert {"not_found", "invalid_argument", "already_exists"} <= seen_codes


# ---------------------------------------------------------------- HTTP/2


async def test_http2_by_prior_knowledge(node: Node) -> None:
    url = f"http://127.0.0.1:{node.http.port}"
    out = await curl(
        "--http2-prior-knowledge",
        "--write-out", "\n%{http_version} %{http_code}",
        "--header", "content-type: application/json",
        "--data", '{"workflow":"three-steps","instanceId":"h2","paramsJson":"{}"}',
        url + SERVICE_PATH + "CreateInstance",
    )  # fmt: skip
    body, _, tail = out.rpartition("\n")
    assert tail == "2 200", out
    assert json.loads(body)["instanceId"] == "h2"

    out = await curl(
        "--http2-prior-knowledge",
        "--write-out", "\n%{http_version} %{http_code}",
        "--data", "{}",
        url + "/workflows/three-steps/trigger?id=h2-route",
    )  # fmt: skip
    body, _, tail = out.rpartition("\n")
    assert tail == "2 200", out
    assert json.loads(body)["id"] == "h2-route"
    await node.http.finished("three-steps", "h2")
    done = await node.http.finished("three-steps", "h2-route")
    assert done["output"] == {"sum": 6, "params": {}}


# ------------------------------------------------------------------ auth


async def test_the_routes_need_a_token_with_the_right_access(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, reader, approver = (secrets.token_urlsafe(24) for _ in range(3))
    monkeypatch.setenv("CRUZFLOW_TEST_ADMIN", admin)
    monkeypatch.setenv("CRUZFLOW_TEST_READER", reader)
    monkeypatch.setenv("CRUZFLOW_TEST_APPROVER", approver)
    node = await start(
        extra=token_entry("admin", env="CRUZFLOW_TEST_ADMIN")
        + token_entry("reader", env="CRUZFLOW_TEST_READER", access="read")
        + token_entry("approver", env="CRUZFLOW_TEST_APPROVER", workflows=["approval"])
    )

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    for headers in ({}, bearer("wrong-" + admin)):
        refused = await node.http.trigger("three-steps", b"{}", headers=headers)
        assert refused.status == 401
        assert refused.json()["code"] == "unauthenticated"
        assert (await node.http.status("three-steps", "x", headers)).status == 401
        call = await node.http.call("ListInstances", {}, headers)
        assert call.status == 401 and call.json()["code"] == "unauthenticated"
        # Without a token, not even which methods exist (as over gRPC).
        unknown = await node.http.call("NoSuchMethod", {}, headers)
        assert unknown.status == 401 and unknown.json()["code"] == "unauthenticated"

    unknown = await node.http.call("NoSuchMethod", {}, bearer(reader))
    assert unknown.status == 404 and "its methods are" in unknown.json()["message"]

    made = await node.http.trigger("three-steps", b"{}", "?id=by-admin", bearer(admin))
    assert made.status == 200, made.body

    denied = await node.http.trigger("three-steps", b"{}", headers=bearer(reader))
    assert denied.status == 403
    assert denied.json()["code"] == "permission_denied"
    read = await node.http.status("three-steps", "by-admin", bearer(reader))
    assert read.status == 200 and read.json()["id"] == "by-admin"

    # A token for one workflow: that one only.
    assert (await node.http.trigger("approval", b"{}", "", bearer(approver))).status == 200
    other = await node.http.trigger("three-steps", b"{}", headers=bearer(approver))
    assert other.status == 403 and other.json()["code"] == "permission_denied"

    # Only what the admin and the approver made exists.
    listed = await node.http.call("ListInstances", {}, bearer(admin))
    workflows = sorted(i["workflow"] for i in listed.json()["instances"])
    assert workflows == ["approval", "three-steps"]

    # The gRPC side: health open, calls under the same tokens.
    health = health_pb2_grpc.HealthStub(node.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    got = await node.stub.GetStatus(
        pb.GetStatusRequest(instance_id="by-admin"),
        metadata=(("authorization", f"Bearer {reader}"),),
    )
    assert got.instance.workflow == "three-steps"


# ------------------------------------------------------------------ CORS

PREFLIGHT = {
    "access-control-request-method": "POST",
    "access-control-request-headers": "content-type, connect-protocol-version, authorization",
}


async def test_cors_is_off_by_default(node: Node) -> None:
    origin = {"origin": "https://app.example.com"}
    preflight = await node.http.request(
        "OPTIONS", SERVICE_PATH + "GetStatus", None, {**origin, **PREFLIGHT}
    )
    assert "access-control-allow-origin" not in preflight.headers
    call = await node.http.call("ListInstances", {}, origin)
    assert call.status == 200
    assert not [h for h in call.headers if h.startswith("access-control-")]
    route = await node.http.trigger("three-steps", b"{}", headers=origin)
    assert route.status == 200
    assert not [h for h in route.headers if h.startswith("access-control-")]


async def test_cors_answers_the_listed_origin_only(start: Start) -> None:
    node = await start(http={"cors_origins": ["https://app.example.com"]})
    allowed = {"origin": "https://app.example.com"}
    preflight = await node.http.request(
        "OPTIONS", SERVICE_PATH + "CreateInstance", None, {**allowed, **PREFLIGHT}
    )
    assert preflight.status == 200
    assert preflight.header("access-control-allow-origin") == "https://app.example.com"
    allow_headers = (preflight.header("access-control-allow-headers") or "").lower()
    for name in ("content-type", "connect-protocol-version", "authorization"):
        assert name in allow_headers
    assert "POST" in (preflight.header("access-control-allow-methods") or "")

    stranger = {"origin": "https://evil.example.com"}
    refused = await node.http.request(
        "OPTIONS", SERVICE_PATH + "CreateInstance", None, {**stranger, **PREFLIGHT}
    )
    assert refused.status != 200
    assert "access-control-allow-origin" not in refused.headers

    call = await node.http.call("CreateInstance", {"workflow": "three-steps"}, allowed)
    assert call.status == 200
    assert call.header("access-control-allow-origin") == "https://app.example.com"
    exposed = (call.header("access-control-expose-headers") or "").lower()
    assert "grpc-status" in exposed and "grpc-message" in exposed
    route = await node.http.trigger("three-steps", b"{}", headers=allowed)
    assert route.header("access-control-allow-origin") == "https://app.example.com"

    other = await node.http.call("ListInstances", {}, stranger)
    assert other.status == 200
    assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------- limits


async def test_a_body_over_read_max_bytes_is_refused_and_serving_goes_on(start: Start) -> None:
    node = await start(limits={"max_payload_bytes": 1024})
    read_max = 2 * 1024 + 64 * 1024
    big = json.dumps({"workflow": "three-steps", "paramsJson": json.dumps("x" * read_max)})
    reply = await node.http.request(
        "POST", SERVICE_PATH + "CreateInstance", big.encode(), {"content-type": "application/json"}
    )
    assert reply.status == 429
    assert reply.json()["code"] == "resource_exhausted"
    route = await node.http.trigger("three-steps", json.dumps("x" * read_max).encode())
    assert route.status == 429
    assert route.json()["code"] == "resource_exhausted"
    # Within read_max_bytes but over the payload limit: the engine's own refusal.
    over = await node.http.trigger("three-steps", json.dumps("x" * 2000).encode())
    assert over.status == 400
    assert "limits.max_payload_bytes" in over.json()["message"]
    fine = await node.http.trigger("three-steps", json.dumps("x" * 900).encode(), "?id=fits")
    assert fine.status == 200
    assert (await node.http.finished("three-steps", "fits"))["status"] == "complete"


async def test_trigger_accepts_non_ascii_params_within_the_payload_limit(start: Start) -> None:
    node = await start(limits={"max_payload_bytes": 100_000})
    params = json.dumps("é" * 49_000, ensure_ascii=False).encode()
    assert len(params) < 100_000
    direct = await node.http.request(
        "POST",
        SERVICE_PATH + "CreateInstance",
        json.dumps(
            {"workflow": "three-steps", "paramsJson": params.decode()}, ensure_ascii=False
        ).encode(),
        {"content-type": "application/json"},
    )
    assert direct.status == 200, direct.body
    route = await node.http.trigger("three-steps", params)
    assert route.status == 200, route.body


def _answer_to_an_endless_body(port: int, path: str, sent: int) -> bytes:
    """The first bytes answered to a POST that declares a gigabyte and sends
    ``sent`` bytes of it; b"" if no answer comes within 2 seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
            f"content-length: {10**9}\r\n\r\n".encode()
            + b"[" * sent
        )
        try:
            return connection.recv(100)
        except TimeoutError:
            return b""


async def test_a_body_past_read_max_bytes_is_refused_before_it_ends(start: Start) -> None:
    node = await start(limits={"max_payload_bytes": 1024})
    past = 2 * 1024 + 64 * 1024 + 100_000
    for path in (SERVICE_PATH + "CreateInstance", "/workflows/three-steps/trigger"):
        answer = await asyncio.to_thread(_answer_to_an_endless_body, node.http.port, path, past)
        assert answer.startswith(b"HTTP/1.1 429 "), (path, answer)


def _wait_call(port: int, instance_id: str) -> Reply:
    return _request(
        port,
        "POST",
        SERVICE_PATH + "WaitInstance",
        json.dumps({"instanceId": instance_id}).encode(),
        {"content-type": "application/json"},
        None,
    )


async def test_calls_past_max_concurrent_rpcs_are_refused_until_some_end(start: Start) -> None:
    node = await start(limits={"max_concurrent_rpcs": 2})
    for name in ("a", "b"):
        assert (await node.http.trigger("approval", b"{}", f"?id={name}")).status == 200

    def hold(instance_id: str) -> asyncio.Task[Reply]:
        return asyncio.create_task(asyncio.to_thread(_wait_call, node.http.port, instance_id))

    held = [hold(i) for i in "ab"]

    async def refused() -> Reply | None:
        # A probe in flight takes a slot too: a wait it crowded out is started again.
        for n, task in enumerate(held):
            if task.done():
                assert task.result().status == 429, task.result()
                held[n] = hold("ab"[n])
        reply = await node.http.call("GetStatus", {"instanceId": "a"})
        return reply if reply.status == 429 else None

    full = await eventually(refused, timeout=20)
    assert full.json()["code"] == "resource_exhausted"
    assert "limits.max_concurrent_rpcs" in full.json()["message"]
    route = await node.http.trigger("three-steps", b"{}")
    assert route.status == 429 and route.json()["code"] == "resource_exhausted"
    status = await node.http.status("approval", "a")
    assert status.status == 429
    assert not any(task.done() for task in held)

    for name in "ab":
        await node.stub.SendEvent(
            pb.SendEventRequest(instance_id=name, type="approval", payload_json="1")
        )
    for task in held:
        reply = await asyncio.wait_for(task, 20)
        assert reply.status == 200, reply.body
        assert reply.json()["instance"]["status"] == "INSTANCE_STATUS_COMPLETE"
    assert (await node.http.status("approval", "a")).json()["status"] == "complete"
    assert (await node.http.trigger("three-steps", b"{}")).status == 200


# ------------------------------------------------------------------- TLS


def _context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


async def test_https_with_the_servers_certificate(start: Start, pki: Pki) -> None:
    node = await start(
        server={"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key},
        context=_context(pki),
    )
    made = await node.http.trigger("three-steps", b"{}", "?id=tls")
    assert made.status == 200, made.body
    assert (await node.http.finished("three-steps", "tls"))["status"] == "complete"

    plain = Http(node.http.port)
    with pytest.raises((http.client.HTTPException, OSError)):
        await plain.status("three-steps", "tls")
    # A client that does not trust the CA refuses the server.
    with pytest.raises(ssl.SSLError):
        await Http(node.http.port, ssl.create_default_context()).status("three-steps", "tls")

    out = await curl(
        "--cacert", str(pki.ca),
        "--write-out", "\n%{http_version} %{http_code}",
        f"https://127.0.0.1:{node.http.port}/workflows/three-steps/status/tls",
    )  # fmt: skip
    body, _, tail = out.rpartition("\n")
    assert tail == "2 200", out  # HTTP/2 by ALPN
    assert json.loads(body)["status"] == "complete"


async def test_mtls_needs_a_client_certificate_from_the_ca(start: Start, pki: Pki) -> None:
    node = await start(
        server={
            "tls_cert_file": pki.server_cert,
            "tls_key_file": pki.server_key,
            "tls_client_ca_file": pki.ca,
        },
        context=_context(pki, pki.client_cert, pki.client_key),
    )
    made = await node.http.trigger("three-steps", b"{}", "?id=mtls")
    assert made.status == 200, made.body

    for context in (_context(pki), _context(pki, pki.stranger_cert, pki.stranger_key)):
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            await Http(node.http.port, context).status("three-steps", "mtls")
    assert (await node.http.status("three-steps", "mtls")).status == 200


# ------------------------------------------------------------- telemetry


def _recorder(rpc_spans: str) -> tuple[Providers, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return Providers.of(provider, None, rpc_spans=rpc_spans), spans


async def test_http_calls_make_server_spans(start: Start) -> None:
    providers, spans = _recorder("all")
    node = await start(telemetry=providers)
    created = await node.http.call(
        "CreateInstance", {"workflow": "three-steps", "instanceId": "s1"}
    )
    assert created.status == 200
    await node.http.finished("three-steps", "s1")

    def named(name: str) -> list[Any]:
        return [s for s in spans.get_finished_spans() if s.name == name]

    (server_span, *_) = named("cruzflow.v1.WorkflowService/CreateInstance")
    assert server_span.kind == SpanKind.SERVER
    runs = [
        s
        for s in named("run three-steps")
        if (s.attributes or {}).get("cruzflow.instance.id") == "s1"
    ]
    assert runs and runs[0].parent is not None
    assert runs[0].context.trace_id == server_span.context.trace_id
    assert runs[0].parent.span_id == server_span.context.span_id
    # The routes go through the same application: their calls get spans too.
    assert named("cruzflow.v1.WorkflowService/GetStatus")


async def test_a_callers_traceparent_holds_the_run_without_rpc_spans(start: Start) -> None:
    providers, spans = _recorder("none")
    node = await start(telemetry=providers)
    traceparent = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    await node.http.call(
        "CreateInstance", {"workflow": "three-steps", "instanceId": "traced"}, traceparent
    )
    await node.http.trigger("three-steps", b"{}", "?id=routed", traceparent)
    await node.http.trigger("three-steps", b"{}", "?id=untraced")
    for instance_id in ("traced", "routed", "untraced"):
        await node.http.finished("three-steps", instance_id)
    finished_spans = spans.get_finished_spans()
    assert not [s.name for s in finished_spans if "WorkflowService/" in s.name]
    runs = {
        (s.attributes or {}).get("cruzflow.instance.id"): s
        for s in finished_spans
        if s.name == "run three-steps"
    }
    for instance_id in ("traced", "routed"):
        run = runs[instance_id]
        assert format(run.context.trace_id, "032x") == CLIENT_TRACE, instance_id
        assert run.parent is not None and format(run.parent.span_id, "016x") == CLIENT_SPAN
    assert format(runs["untraced"].context.trace_id, "032x") != CLIENT_TRACE


# ---------------------------------------------------------------- config


def _load(tmp_path: Path, name: str, **settings: Any) -> Any:
    return load_config(config_text(tmp_path / name, store_url=None, **settings))


def test_http_listen_is_validated(tmp_path: Path) -> None:
    for n, address in enumerate(("8080", "localhost", "127.0.0.1:http", "127.0.0.1:70000")):
        with pytest.raises(ConfigError) as bad:
            _load(tmp_path, f"bad{n}", http_listen=address)
        assert "http.listen" in str(bad.value)
        assert "expected host:port" in str(bad.value)

    with pytest.raises(ConfigError) as plaintext:
        _load(tmp_path, "exposed", http_listen="0.0.0.0:8080")
    message = str(plaintext.value)
    assert "http.listen: 0.0.0.0:8080 is not a loopback address" in message
    assert "server.allow_plaintext" in message

    with pytest.raises(ConfigError) as open_to_all:
        _load(tmp_path, "no-tokens", http_listen="0.0.0.0:8080", server={"allow_plaintext": True})
    assert "http.listen" in str(open_to_all.value)
    assert "[[auth.tokens]]" in str(open_to_all.value)

    allowed = _load(
        tmp_path,
        "allowed",
        http_listen="0.0.0.0:8080",
        server={"allow_plaintext": True, "allow_unauthenticated": True},
    )
    assert allowed.http_listen == "0.0.0.0:8080"
    assert load_config(write_config(tmp_path, ALL_WORKFLOWS)).http_listen is None

    # The command line's --http-listen wins over the file.
    path = config_text(tmp_path / "override", store_url=None)
    assert load_config(path, http_listen="127.0.0.1:9999").http_listen == "127.0.0.1:9999"


def test_cors_origins_are_validated(tmp_path: Path) -> None:
    for n, origin in enumerate(
        ("app.example.com", "https://app.example.com/", "https://app.example.com/path", "ftp://x")
    ):
        with pytest.raises(ConfigError) as bad:
            _load(tmp_path, f"bad{n}", http={"cors_origins": [origin]})
        assert "http.cors_origins" in str(bad.value)
        assert f"{origin!r} is not an origin" in str(bad.value)
    good = ["https://app.example.com", "http://localhost:5173", "*"]
    assert _load(tmp_path, "good", http={"cors_origins": good}).file.http.cors_origins == good
