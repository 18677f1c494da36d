"""Bearer tokens: who may call, which methods, which workflows, and that no secret leaks.

Real in-process servers on loopback ports; raw stubs where the exact status
code and message matter, the typed client where its errors do. The leak test
runs a server with DEBUG logs and in-memory spans, makes good and bad calls,
and looks for every token and private key in all it recorded.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cruzflow.client import (
    CallerInfo,
    Client,
    PermissionDenied,
    Unauthenticated,
    tls_credentials,
)
from cruzflow.server.app import Service
from cruzflow.server.auth import (
    INTERNAL_NAME,
    TOKEN_ATTRIBUTE,
    UNAUTHENTICATED_MESSAGE,
    Gate,
    TokenRule,
    digest,
)
from cruzflow.server.config import ConfigError, load_config
from cruzflow.server.telemetry import Providers
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.conftest import BOTH, eventually
from tests.connect_stub import ConnectStub
from tests.pki import Pki, make_pki, secure_config, token_entry

TRANSPORTS = BOTH
"""Every test here runs over gRPC and over HTTP/JSON (Connect), unless grpc_only."""

WORKFLOWS = {
    "three-steps": "tests.workflows:ThreeSteps",
    "approval": "tests.workflows:Approval",
    "child-workflow": "tests.workflows:Doubles",
    "spawns-child": "tests.workflows:SpawnsChild",
}
Metadata = Sequence[tuple[str, str]]


class Tokens:
    """Fresh secrets for one test, in the environment or in files."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.admin = "adm-" + secrets.token_urlsafe(24)
        self.reader = "rd-" + secrets.token_urlsafe(24)
        self.approver = "apv-" + secrets.token_urlsafe(24)
        self.watcher = "wch-" + secrets.token_urlsafe(24)
        monkeypatch.setenv("CRUZFLOW_TEST_ADMIN", self.admin)
        monkeypatch.setenv("CRUZFLOW_TEST_APPROVER", self.approver)
        self.reader_file = folder / "reader.token"
        self.reader_file.write_text(f"  {self.reader}\n")
        self.reader_file.chmod(0o600)
        self.watcher_file = folder / "watcher.token"
        self.watcher_file.write_text(self.watcher)
        self.watcher_file.chmod(0o600)

    def entries(self) -> str:
        return "".join(
            [
                token_entry("admin", env="CRUZFLOW_TEST_ADMIN"),
                token_entry("reader", file=self.reader_file, access="read"),
                token_entry("approver", env="CRUZFLOW_TEST_APPROVER", workflows=["approval"]),
                token_entry("watcher", file="watcher.token", access="read", workflows=["approval"]),
            ]
        )

    def all(self) -> list[str]:
        return [self.admin, self.reader, self.approver, self.watcher]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tokens:
    folder = tmp_path / "server"
    folder.mkdir()
    return Tokens(folder, monkeypatch)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Node:
    """A server, its gRPC channel, and the stub of the test's transport."""

    def __init__(
        self,
        service: Service,
        channel: grpc.aio.Channel,
        transport: str = "grpc",
        ca: Path | None = None,
    ) -> None:
        self.service = service
        self.channel = channel
        self.connect: ConnectStub | None = None
        if transport == "http":
            scheme = "http" if ca is None else "https"
            url = f"{scheme}://127.0.0.1:{service.http_port}"
            self.connect = ConnectStub(url, ca=None if ca is None else ca.read_bytes())
        # The same calls either way: typed as the gRPC stub.
        self.stub = (
            cast("pb_grpc.WorkflowServiceAsyncStub", self.connect)
            if self.connect is not None
            else pb_grpc.WorkflowServiceStub(channel)
        )
        self.address = f"127.0.0.1:{service.port}"

    async def close(self) -> None:
        await self.channel.close()
        if self.connect is not None:
            await self.connect.close()

    async def code(self, method: str, request: Any, metadata: Metadata = ()) -> tuple[Any, str]:
        """(status code, details) of a unary call; (OK, "") when it succeeds."""
        try:
            await getattr(self.stub, method)(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    async def watch_code(self, instance_id: str, metadata: Metadata) -> Any:
        try:
            call = self.stub.WatchInstance(
                pb.WatchInstanceRequest(instance_id=instance_id), metadata=metadata, timeout=30
            )
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


Start = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start(tmp_path: Path, tokens: Tokens, transport: str) -> AsyncIterator[Start]:
    nodes: list[Node] = []

    async def make(
        auth: str | None = None,
        *,
        telemetry: Providers | None = None,
        ca: Path | None = None,
        **server: object,
    ) -> Node:
        text = tokens.entries() if auth is None else auth
        if transport == "http":
            text = '[http]\nlisten = "127.0.0.1:0"\n' + text
        path = secure_config(tmp_path / "server", WORKFLOWS, server=server, auth=text)
        service = Service(load_config(path), telemetry)
        await service.start()
        port = service.port
        if ca is not None:
            channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", tls_credentials(ca))
        else:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        node = Node(service, channel, transport, ca)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.close()
        await node.service.stop(0.1)


def create(workflow: str, instance_id: str = "", params: str = "") -> pb.CreateInstanceRequest:
    return pb.CreateInstanceRequest(workflow=workflow, instance_id=instance_id, params_json=params)


def wait(instance_id: str) -> pb.WaitInstanceRequest:
    """A WaitInstance that answers at once (the instance waits for an event)."""
    request = pb.WaitInstanceRequest(instance_id=instance_id)
    request.timeout.FromMilliseconds(1)
    return request


def span_status(span: Any) -> grpc.StatusCode:
    """The status a server span recorded: the gRPC instrumentation's number,
    or (over HTTP) connectrpc-otel's Connect code name."""
    attributes = span.attributes or {}
    if "rpc.grpc.status_code" in attributes:
        number = attributes["rpc.grpc.status_code"]
        return next(code for code in grpc.StatusCode if code.value[0] == number)
    return grpc.StatusCode[str(attributes["rpc.response.status_code"]).upper()]


OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- tokens


async def test_every_call_needs_a_valid_bearer_token(start: Start, tokens: Tokens) -> None:
    node = await start()
    request = pb.ListWorkflowsRequest()
    for metadata in (
        (),
        bearer("not-a-token-at-all-0123456789"),
        bearer(tokens.admin[:-1]),  # all but one character right
        bearer(tokens.admin + "x"),
        (("authorization", tokens.admin),),  # no scheme
        (("authorization", f"Basic {tokens.admin}"),),
        (("authorization", "Bearer "),),
    ):
        assert await node.code("ListWorkflows", request, metadata) == (
            UNAUTHENTICATED,
            UNAUTHENTICATED_MESSAGE,
        ), metadata
    assert await node.watch_code("anything", ()) == UNAUTHENTICATED
    # An unknown method is refused the same way, not shown to be unknown.
    unknown: Any = node.channel.unary_unary("/cruzflow.v1.WorkflowService/NoSuchMethod")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unknown(b"", timeout=10)
    assert caught.value.code() == UNAUTHENTICATED
    for token in tokens.all():
        assert await node.code("ListWorkflows", request, bearer(token)) == (OK, "")
    lower = (("authorization", f"bearer {tokens.admin}"),)
    assert await node.code("ListWorkflows", request, lower) == (OK, "")
    # The typed client sends the token, and raises Unauthenticated without one.
    async with Client(node.address, token=tokens.admin) as client:
        handle = await client.workflow("child-workflow").create({"n": 4})
        assert (await handle.result(timeout=30))["doubled"] == 8
    async with Client(node.address, retry=None) as client:
        with pytest.raises(Unauthenticated, match="missing or invalid bearer token"):
            await client.list_workflows()


@pytest.mark.grpc_only
async def test_health_is_open_and_reflection_as_configured(start: Start, tokens: Tokens) -> None:
    async def reflect(node: Node, metadata: Metadata = ()) -> Any:
        stub = reflection_pb2_grpc.ServerReflectionStub(node.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            async for answer in stub.ServerReflectionInfo(
                iter([request]), metadata=metadata, timeout=30
            ):
                return sorted(s.name for s in answer.list_services_response.service)
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    for open_reflection in (True, False):
        auth = f"[auth]\nopen_reflection = {str(open_reflection).lower()}\n" + tokens.entries()
        node = await start(auth)
        health = health_pb2_grpc.HealthStub(node.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        services = await reflect(node, bearer(tokens.watcher))
        assert "cruzflow.v1.WorkflowService" in services
        assert (await reflect(node)) == (services if open_reflection else UNAUTHENTICATED)
        await node.close()
        await node.service.stop(0.1)


async def test_a_read_only_token_reads_but_cannot_change_anything(
    start: Start, tokens: Tokens, side_file: Path
) -> None:
    node = await start()
    admin, reader = bearer(tokens.admin), bearer(tokens.reader)
    assert (await node.code("CreateInstance", create("approval", "ro-1"), admin)) == (OK, "")
    instance = "ro-1"
    for method, request in (
        ("GetStatus", pb.GetStatusRequest(instance_id=instance)),
        ("WaitInstance", wait(instance)),
        ("ListInstances", pb.ListInstancesRequest()),
        ("ListWorkflows", pb.ListWorkflowsRequest()),
        ("CountInstances", pb.CountInstancesRequest()),
        ("GetCaller", pb.GetCallerRequest()),
    ):
        assert await node.code(method, request, reader) == (OK, ""), method
    for method, change in (
        ("CreateInstance", create("approval")),
        ("CreateInstances", pb.CreateInstancesRequest(requests=[create("approval")])),
        ("RunInstance", pb.RunInstanceRequest(instance=create("three-steps", "ro-2"))),
        ("PauseInstance", pb.PauseInstanceRequest(instance_id=instance)),
        ("ResumeInstance", pb.ResumeInstanceRequest(instance_id=instance)),
        ("TerminateInstance", pb.TerminateInstanceRequest(instance_id=instance)),
        ("RestartInstance", pb.RestartInstanceRequest(instance_id=instance)),
        ("SendEvent", pb.SendEventRequest(instance_id=instance, type="approval")),
        (
            "RepairInstance",
            pb.RepairInstanceRequest(instance_id=instance, step="x", retry=True, reason="r"),
        ),
    ):
        code, details = await node.code(method, change, reader)
        assert code == DENIED, method
        assert details.startswith(f"token 'reader' is read-only; {method} changes instances")
    # Nothing changed: the instance still waits for its approval.
    status = await node.stub.GetStatus(pb.GetStatusRequest(instance_id=instance), metadata=reader)
    assert status.instance.status != pb.INSTANCE_STATUS_TERMINATED
    assert not status.instance.repairs
    async with Client(node.address, token=tokens.reader, retry=None) as client:
        with pytest.raises(PermissionDenied, match="read-only"):
            await client.instance(instance).terminate()
        assert (await client.instance(instance).status()).id == instance


async def test_a_workflow_token_watches_many_of_its_workflows_only(
    start: Start, tokens: Tokens
) -> None:
    """WatchInstances is a read: a read-only token may call it; a token limited
    to workflows gets another workflow's instance as not found, in the words of
    an id that does not exist, and none of the events of its own."""
    node = await start()
    admin, approver, watcher = (
        bearer(tokens.admin),
        bearer(tokens.approver),
        bearer(tokens.watcher),
    )
    await node.stub.CreateInstance(create("three-steps", "other-1"), metadata=admin)
    await node.stub.CreateInstance(create("approval", "mine-1"), metadata=approver)
    await node.stub.CreateInstance(create("approval", "mine-2"), metadata=approver)

    async def watch_many(ids: list[str], metadata: Metadata) -> tuple[Any, str, int]:
        request = pb.WatchInstancesRequest(instances=[pb.WatchCursor(instance_id=i) for i in ids])
        events = 0
        try:
            call = node.stub.WatchInstances(request, metadata=metadata, timeout=30)
            async for message in call:
                events += len(message.events)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", events
        return grpc.StatusCode.OK, "", events

    hidden = await watch_many(["mine-1", "other-1"], watcher)
    missing = await watch_many(["mine-1", "no-such"], watcher)
    assert hidden == (NOT_FOUND, missing[1].replace("no-such", "other-1"), 0)
    assert missing[1] == (
        "instances[1].instance_id: no instance 'no-such'; check the id CreateInstance returned"
    )
    # The engine's own words for an id that does not exist, through an unlimited token.
    assert await watch_many(["mine-1", "no-such"], admin) == missing
    bad = await watch_many(["mine-1", "bad id!"], watcher)
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert bad[1].startswith("instances[1].instance_id: ")
    # Its own: the read-only watcher token follows both to their end.
    for instance_id in ("mine-1", "mine-2"):
        event = pb.SendEventRequest(instance_id=instance_id, type="approval")
        assert await node.code("SendEvent", event, approver) == (OK, "")
    code, _, events = await watch_many(["mine-1", "mine-2"], watcher)
    assert code == OK and events > 2


async def test_a_workflow_token_sees_and_changes_only_its_workflows(
    start: Start, tokens: Tokens, side_file: Path
) -> None:
    node = await start()
    admin, approver, watcher = (
        bearer(tokens.admin),
        bearer(tokens.approver),
        bearer(tokens.watcher),
    )
    await node.stub.CreateInstance(create("three-steps", "other-1"), metadata=admin)
    # Creates: its workflow only.
    assert await node.code("CreateInstance", create("approval", "mine-1"), approver) == (OK, "")
    code, details = await node.code("CreateInstance", create("three-steps"), approver)
    assert code == DENIED
    assert details == "token 'approver' may only create instances of approval; not of 'three-steps'"
    ran = pb.RunInstanceRequest(instance=create("three-steps", "not-run"))
    code, details = await node.code("RunInstance", ran, approver)
    assert code == DENIED
    assert details == "token 'approver' may only create instances of approval; not of 'three-steps'"
    missing_run = await node.code("GetStatus", pb.GetStatusRequest(instance_id="not-run"), admin)
    assert missing_run[0] == NOT_FOUND
    batch = pb.CreateInstancesRequest(requests=[create("approval"), create("three-steps")])
    code, details = await node.code("CreateInstances", batch, approver)
    assert code == DENIED and "not requests[1] ('three-steps')" in details
    # Another workflow's instance looks exactly like one that does not exist.
    missing = await node.code("GetStatus", pb.GetStatusRequest(instance_id="no-such"), approver)
    assert missing[0] == NOT_FOUND
    other = await node.code("GetStatus", pb.GetStatusRequest(instance_id="other-1"), approver)
    assert other == (NOT_FOUND, missing[1].replace("no-such", "other-1"))
    engine_words = await node.code("GetStatus", pb.GetStatusRequest(instance_id="no-such"), admin)
    assert engine_words == missing  # the same words as the engine's own NOT_FOUND
    for method, request in (
        ("TerminateInstance", pb.TerminateInstanceRequest(instance_id="other-1")),
        ("RestartInstance", pb.RestartInstanceRequest(instance_id="other-1")),
        (
            "RestartInstance",
            pb.RestartInstanceRequest(instance_id="other-1", from_step="one", reason="r"),
        ),
        (
            "RepairInstance",
            pb.RepairInstanceRequest(instance_id="other-1", step="one", retry=True, reason="r"),
        ),
        ("SendEvent", pb.SendEventRequest(instance_id="other-1", type="approval")),
        ("WaitInstance", wait("other-1")),
    ):
        assert (await node.code(method, request, approver))[0] == NOT_FOUND, method
    assert await node.watch_code("other-1", approver) == NOT_FOUND
    status = await node.stub.GetStatus(pb.GetStatusRequest(instance_id="other-1"), metadata=admin)
    assert status.instance.status != pb.INSTANCE_STATUS_TERMINATED
    assert not status.instance.repairs  # no refused repair or restart left a trace
    bad_id = await node.code("GetStatus", pb.GetStatusRequest(instance_id="bad id!"), approver)
    assert bad_id[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Its own instances: every method.
    event = pb.SendEventRequest(instance_id="mine-1", type="approval", payload_json='{"ok": 1}')
    assert await node.code("SendEvent", event, approver) == (OK, "")
    assert await node.watch_code("mine-1", approver) == OK  # ends once the instance is final
    final = await node.stub.GetStatus(pb.GetStatusRequest(instance_id="mine-1"), metadata=approver)
    assert final.instance.status == pb.INSTANCE_STATUS_COMPLETE
    # Lists: the workflow must be named, and be one of its own.
    code, details = await node.code("ListInstances", pb.ListInstancesRequest(), approver)
    assert (code, details) == (
        DENIED,
        "token 'approver' may only list instances of approval; set workflow to one of them",
    )
    other_list = pb.ListInstancesRequest(workflow="three-steps")
    assert (await node.code("ListInstances", other_list, approver))[0] == DENIED
    await node.stub.CreateInstance(create("approval", "mine-2"), metadata=approver)
    seen: list[str] = []
    page_token = ""
    while True:  # pages of one: a page token goes with the same filters
        page = await node.stub.ListInstances(
            pb.ListInstancesRequest(workflow="approval", page_size=1, page_token=page_token),
            metadata=watcher,
        )
        seen += [i.instance_id for i in page.instances]
        page_token = page.next_page_token
        if not page_token:
            break
    assert seen == ["mine-2", "mine-1"]
    workflows = await node.stub.ListWorkflows(pb.ListWorkflowsRequest(), metadata=approver)
    assert [w.name for w in workflows.workflows] == ["approval"]
    everything = await node.stub.ListWorkflows(pb.ListWorkflowsRequest(), metadata=admin)
    assert len(everything.workflows) == len(WORKFLOWS)
    # A read-only workflow token: reads of its workflow, no writes at all.
    assert await node.code("GetStatus", pb.GetStatusRequest(instance_id="mine-2"), watcher) == (
        OK,
        "",
    )
    terminate = pb.TerminateInstanceRequest(instance_id="mine-2")
    assert (await node.code("TerminateInstance", terminate, watcher))[0] == DENIED


async def test_a_workflow_token_counts_only_its_workflows_instances(
    start: Start, tokens: Tokens, side_file: Path
) -> None:
    node = await start()
    admin, approver, watcher = (
        bearer(tokens.admin),
        bearer(tokens.approver),
        bearer(tokens.watcher),
    )
    for workflow in ("three-steps", "three-steps", "approval"):
        await node.stub.CreateInstance(create(workflow), metadata=admin)

    async def counted(metadata: Metadata, workflow: str = "") -> tuple[list[tuple[str, int]], int]:
        async def settled() -> pb.CountInstancesResponse | None:
            answer = await node.stub.CountInstances(
                pb.CountInstancesRequest(workflow=workflow), metadata=metadata, timeout=30
            )
            # Once the three-steps instances are complete, the approval one waiting.
            done = {pb.INSTANCE_STATUS_COMPLETE, pb.INSTANCE_STATUS_WAITING}
            return answer if all(c.status in done for c in answer.counts) else None

        answer = await eventually(settled)
        return [(c.workflow, c.count) for c in answer.counts], answer.total

    assert await counted(admin) == ([("approval", 1), ("three-steps", 2)], 3)
    # Without a workflow: its workflows' counts only, and their total.
    assert await counted(approver) == ([("approval", 1)], 1)
    assert await counted(watcher) == ([("approval", 1)], 1)
    assert await counted(approver, workflow="approval") == ([("approval", 1)], 1)
    # Another workflow, named: refused, in the words of ListInstances'.
    other = pb.CountInstancesRequest(workflow="three-steps")
    assert await node.code("CountInstances", other, approver) == (
        DENIED,
        "token 'approver' may only count instances of approval; not 'three-steps'",
    )
    async with Client(node.address, token=tokens.approver, retry=None) as client:
        assert (await client.count_instances()).total == 1
        with pytest.raises(PermissionDenied, match="may only count instances of approval"):
            await client.count_instances(workflow="three-steps")


async def test_get_caller_says_what_the_token_may_do(
    start: Start, tokens: Tokens, side_file: Path
) -> None:
    async def caller(node: Node, metadata: Metadata = ()) -> tuple[bool, str, bool, list[str]]:
        answer = await node.stub.GetCaller(pb.GetCallerRequest(), metadata=metadata, timeout=30)
        return answer.auth_required, answer.token_name, answer.read_only, list(answer.workflows)

    open_node = await start("")
    assert await caller(open_node) == (False, "", False, [])
    # A token sent to a server that asks for none changes nothing.
    assert await caller(open_node, bearer(tokens.admin)) == (False, "", False, [])
    await open_node.close()
    await open_node.service.stop(0.1)  # the next server takes its store

    node = await start()
    assert await caller(node, bearer(tokens.admin)) == (True, "admin", False, [])
    assert await caller(node, bearer(tokens.reader)) == (True, "reader", True, [])
    assert await caller(node, bearer(tokens.approver)) == (True, "approver", False, ["approval"])
    assert await caller(node, bearer(tokens.watcher)) == (True, "watcher", True, ["approval"])
    assert await node.code("GetCaller", pb.GetCallerRequest()) == (
        UNAUTHENTICATED,
        UNAUTHENTICATED_MESSAGE,
    )
    # The token the server's own bindings call it with: every method, every workflow.
    own = await node.service.own_link.client(10)
    assert await own.caller() == CallerInfo(
        auth_required=True, token_name=INTERNAL_NAME, read_only=False, workflows=()
    )
    async with Client(node.address, token=tokens.watcher) as client:
        assert await client.caller() == CallerInfo(
            auth_required=True, token_name="watcher", read_only=True, workflows=("approval",)
        )
    await node.close()
    await node.service.stop(0.1)
    several = token_entry(
        "several",
        env="CRUZFLOW_TEST_ADMIN",
        workflows=["three-steps", "approval", "child-workflow"],
    )
    limited = await start(several)
    assert await caller(limited, bearer(tokens.admin)) == (
        True,
        "several",
        False,
        ["approval", "child-workflow", "three-steps"],  # sorted
    )


async def test_hosted_bindings_call_the_server_with_its_own_token(
    start: Start, tokens: Tokens, side_file: Path
) -> None:
    """A workflow that creates a child through self.env, on a server that wants
    tokens: its calls carry the server's own token, which no config names."""
    node = await start()
    async with Client(node.address, token=tokens.approver, retry=None) as limited:
        with pytest.raises(PermissionDenied):
            await limited.workflow("spawns-child").create({"n": 1})
    async with Client(node.address, token=tokens.admin) as client:
        handle = await client.workflow("spawns-child").create({"n": 3})
        output = await handle.result(timeout=60)
    assert output["children"] == [{"doubled": 6, "id": output["child_ids"][0]}]


# ---------------------------------------------------------------- config


def test_tokens_are_read_from_the_environment_or_files_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokens: Tokens
) -> None:
    def load(auth: str) -> Any:
        return load_config(secure_config(tmp_path / "server", WORKFLOWS, auth=auth))

    def error(auth: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load(auth)
        message = str(caught.value)
        for token in [*tokens.all(), "short-secret"]:
            assert token not in message
        return message

    config = load(tokens.entries())
    rules = {rule.name: rule for rule in config.tokens}
    assert list(rules) == ["admin", "reader", "approver", "watcher"]
    assert rules["reader"].digest == digest(tokens.reader)  # read, and stripped
    assert rules["reader"].read_only and not rules["admin"].read_only
    assert rules["approver"].workflows == frozenset({"approval"})
    assert config.warnings == []
    assert tokens.admin not in repr(config.tokens)

    monkeypatch.delenv("CRUZFLOW_TEST_UNSET", raising=False)
    message = error(token_entry("ci", env="CRUZFLOW_TEST_UNSET"))
    assert "auth.tokens[0].env: the environment variable CRUZFLOW_TEST_UNSET is not set" in message
    assert "'ci'" in message
    both = error(token_entry("ci", env="CRUZFLOW_TEST_ADMIN", file=tokens.reader_file))
    assert "auth.tokens[0]: give exactly one of env" in both
    assert "give exactly one of env" in error(token_entry("ci"))
    missing = error(token_entry("ci", file="nope.token"))
    assert "auth.tokens[0].file: cannot read" in missing and "nope.token" in missing
    (tmp_path / "server" / "empty.token").write_text("\n")
    assert "is empty" in error(token_entry("ci", file="empty.token"))
    monkeypatch.setenv("CRUZFLOW_TEST_SHORT", "short-secret")
    short = error(token_entry("ci", env="CRUZFLOW_TEST_SHORT"))
    assert "must be at least 16 printable ASCII characters" in short
    monkeypatch.setenv("CRUZFLOW_TEST_SAME", tokens.admin)
    same = error(tokens.entries() + token_entry("again", env="CRUZFLOW_TEST_SAME"))
    assert "auth.tokens[4]: token 'again' is the same token as auth.tokens[0]" in same
    twice = error(tokens.entries() + token_entry("admin", env="CRUZFLOW_TEST_APPROVER"))
    assert "auth.tokens[4].name: 'admin' is used twice" in twice
    unknown = error(token_entry("ci", env="CRUZFLOW_TEST_ADMIN", workflows=["billing"]))
    assert "auth.tokens[0].workflows[0]: 'billing' is not a workflow hosted here" in unknown
    # There is no key for a token itself, and access must be stated.
    literal = error(
        '[[auth.tokens]]\nname = "ci"\naccess = "write"\ntoken = "abcdefghijklmnopqrstuvwxyz"\n'
    )
    assert "auth.tokens[0].token: unknown key" in literal
    assert "abcdefghijklmnopqrstuvwxyz" not in literal
    assert "auth.tokens[0].access: Field required" in error(
        '[[auth.tokens]]\nname = "ci"\nenv = "CRUZFLOW_TEST_ADMIN"\n'
    )
    tokens.reader_file.chmod(0o644)
    warnings = load(tokens.entries()).warnings
    assert len(warnings) == 1 and "can be read by other users" in warnings[0]


def test_the_token_check_compares_every_token() -> None:
    rules = [TokenRule(f"t{i}", digest(f"token-number-{i:04d}-padding")) for i in range(50)]
    gate = Gate(rules, _no_lookup)
    for i in (0, 17, 49):
        found = gate.match(f"Bearer token-number-{i:04d}-padding")
        assert found is not None and found.name == f"t{i}"
    assert gate.match("Bearer token-number-0050-padding") is None
    assert gate.match("bearer  token-number-0003-padding ") is not None
    assert gate.match("Basic token-number-0003-padding") is None
    assert gate.match(None) is None


async def _no_lookup(instance_id: str) -> str | None:
    return None


# ----------------------------------------------------------------- leaks


async def test_no_secret_reaches_logs_spans_or_error_messages(
    start: Start,
    tokens: Tokens,
    pki: Pki,
    side_file: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    details: list[str] = []
    with caplog.at_level(logging.DEBUG):
        node = await start(
            telemetry=Providers.of(provider, rpc_spans="all"),
            tls_cert_file=pki.server_cert,
            tls_key_file=pki.server_key,
            ca=pki.ca,
        )
        near_miss = tokens.admin[:-1] + ("A" if tokens.admin[-1] != "A" else "B")
        for token, method, request in (
            (tokens.admin, "CreateInstance", create("approval", "leak-1")),
            (tokens.admin, "GetStatus", pb.GetStatusRequest(instance_id="leak-1")),
            (near_miss, "GetStatus", pb.GetStatusRequest(instance_id="leak-1")),
            (tokens.reader, "TerminateInstance", pb.TerminateInstanceRequest(instance_id="x")),
            (tokens.approver, "CreateInstance", create("three-steps")),
            (tokens.approver, "ListInstances", pb.ListInstancesRequest()),
            (tokens.watcher, "GetStatus", pb.GetStatusRequest(instance_id="nope")),
            (tokens.approver, "CreateInstance", create("approval", "", "not json")),
        ):
            _, detail = await node.code(method, request, bearer(token))
            details.append(detail)
        assert await node.code("ListWorkflows", pb.ListWorkflowsRequest()) == (
            UNAUTHENTICATED,
            UNAUTHENTICATED_MESSAGE,
        )
        # A token passed where a param goes is the caller's data, not ours to hide:
        # it is not tested here. The config error of a too-short token is.
        async with Client(node.address, credentials=tls_credentials(pki.ca)) as client:
            try:
                await client.list_workflows()
            except Unauthenticated as exc:
                details.append(str(exc))
        own_token = node.service._own_token
        await node.close()
        await node.service.stop(0.1)
        nodes_stopped = True
    assert nodes_stopped
    finished = spans.get_finished_spans()
    served = [s for s in finished if "cruzflow.v1.WorkflowService/" in s.name]
    by_method = {s.name.rsplit("/", 1)[-1]: s for s in served}
    # Telemetry runs before auth: refused calls have spans with their status,
    # and every authenticated call names its token (never its value).
    list_span = [s for s in served if s.name.endswith("/ListWorkflows")][-1]
    assert list_span.attributes is not None
    assert span_status(list_span) == UNAUTHENTICATED
    assert TOKEN_ATTRIBUTE not in list_span.attributes
    terminate = by_method["TerminateInstance"]
    assert terminate.attributes is not None
    assert span_status(terminate) == DENIED
    assert terminate.attributes[TOKEN_ATTRIBUTE] == "reader"
    creates = [s for s in finished if s.name.endswith("/CreateInstance")]
    assert {s.attributes.get(TOKEN_ATTRIBUTE) for s in creates if s.attributes} == {
        "admin",
        "approver",
    }
    recorded: list[str] = [caplog.text]
    for record in caplog.records:
        recorded += [record.getMessage(), repr(record.args), repr(record.__dict__)]
    for span in finished:
        recorded += [span.to_json(), repr(dict(span.attributes or {}))]
        recorded += [repr(dict(e.attributes or {})) for e in span.events]
        recorded.append(span.status.description or "")
    out, err = capfd.readouterr()
    recorded += [out, err, *details]
    haystack = "\n".join(recorded)
    assert "refused" in haystack  # the refusals were logged, by token name
    assert own_token is not None
    secrets_ = [*tokens.all(), near_miss, own_token, *pki.key_texts()]
    secrets_ += [digest(t).hex() for t in tokens.all()]
    leaked = [s[:6] + "..." for s in secrets_ if s in haystack]
    assert leaked == []


# ------------------------------------------------------------- schedules


def _schedule(schedule_id: str, workflow: str) -> pb.CreateScheduleRequest:
    return pb.CreateScheduleRequest(
        schedule=pb.Schedule(
            schedule_id=schedule_id, workflow=workflow, cron="0 9 * * MON", paused=True
        )
    )


async def test_schedules_under_tokens(start: Start, tokens: Tokens) -> None:
    """Read tokens get and list; writes need a write token; a workflow token
    sees and changes only its workflows' schedules (another's is not found)."""
    node = await start()
    admin, reader = bearer(tokens.admin), bearer(tokens.reader)
    approver, watcher = bearer(tokens.approver), bearer(tokens.watcher)
    assert await node.code("CreateSchedule", _schedule("theirs", "three-steps"), admin) == (OK, "")
    assert await node.code("CreateSchedule", _schedule("mine", "approval"), approver) == (OK, "")
    code, details = await node.code("CreateSchedule", _schedule("nope", "three-steps"), approver)
    assert code == DENIED and "may only schedule instances of approval" in details

    # The read-only token reads, and changes nothing.
    assert (await node.code("GetSchedule", pb.GetScheduleRequest(schedule_id="theirs"), reader))[
        0
    ] == OK
    assert (await node.code("ListSchedules", pb.ListSchedulesRequest(), reader))[0] == OK
    for method, request in (
        ("CreateSchedule", _schedule("ro", "approval")),
        ("PauseSchedule", pb.PauseScheduleRequest(schedule_id="theirs")),
        ("ResumeSchedule", pb.ResumeScheduleRequest(schedule_id="theirs")),
        ("DeleteSchedule", pb.DeleteScheduleRequest(schedule_id="theirs")),
        ("TriggerSchedule", pb.TriggerScheduleRequest(schedule_id="theirs")),
    ):
        code, details = await node.code(method, request, reader)
        assert code == DENIED, method
        assert details.startswith(f"token 'reader' is read-only; {method}")

    # The workflow tokens: their own schedules, and nothing of the others'.
    for token in (approver, watcher):
        ok = await node.code("GetSchedule", pb.GetScheduleRequest(schedule_id="mine"), token)
        assert ok == (OK, "")
        hidden = await node.code("GetSchedule", pb.GetScheduleRequest(schedule_id="theirs"), token)
        missing = await node.code("GetSchedule", pb.GetScheduleRequest(schedule_id="ghost"), token)
        assert hidden[0] == missing[0] == NOT_FOUND
        assert hidden[1].replace("theirs", "ghost") == missing[1]
        code, details = await node.code("ListSchedules", pb.ListSchedulesRequest(), token)
        assert code == DENIED and "set workflow to one of them" in details
        listed = await node.stub.ListSchedules(
            pb.ListSchedulesRequest(workflow="approval"), metadata=token
        )
        assert [s.schedule_id for s in listed.schedules] == ["mine"]
    for method, request in (
        ("PauseSchedule", pb.PauseScheduleRequest(schedule_id="theirs")),
        ("DeleteSchedule", pb.DeleteScheduleRequest(schedule_id="theirs")),
        ("TriggerSchedule", pb.TriggerScheduleRequest(schedule_id="theirs")),
    ):
        assert (await node.code(method, request, approver))[0] == NOT_FOUND, method
    triggered = await node.stub.TriggerSchedule(
        pb.TriggerScheduleRequest(schedule_id="mine"), metadata=approver
    )
    assert triggered.instance_id.startswith("sched-mine-now-")
    assert await node.code(
        "DeleteSchedule", pb.DeleteScheduleRequest(schedule_id="mine"), approver
    ) == (
        OK,
        "",
    )
    # Nothing of the other workflow's schedule changed.
    theirs = await node.stub.GetSchedule(
        pb.GetScheduleRequest(schedule_id="theirs"), metadata=admin
    )
    assert theirs.schedule.paused and not theirs.schedule.last_instance_id


async def test_a_repair_records_the_token_that_made_it(start: Start, tokens: Tokens) -> None:
    node = await start()
    approver = bearer(tokens.approver)
    await node.stub.CreateInstance(create("approval", "stuck-1"), metadata=approver)

    async def waiting() -> bool:
        reply = await node.stub.GetStatus(
            pb.GetStatusRequest(instance_id="stuck-1"), metadata=approver
        )
        return reply.instance.status == pb.INSTANCE_STATUS_WAITING

    await eventually(waiting)
    # A stuck wait, answered by hand: the event never came.
    answer = json.dumps({"type": "approval", "payload": "by hand", "timestamp": ""})
    request = pb.RepairInstanceRequest(
        instance_id="stuck-1", step="approval", output_json=answer, reason="mail approval"
    )
    reply = await node.stub.RepairInstance(request, metadata=approver)
    assert (reply.repair.actor, reply.repair.reason) == ("approver", "mail approval")
    done = await node.stub.WaitInstance(
        pb.WaitInstanceRequest(instance_id="stuck-1"), metadata=approver, timeout=30
    )
    assert json.loads(done.instance.output_json) == {"approved": "by hand", "type": "approval"}
    status = await node.stub.GetStatus(
        pb.GetStatusRequest(instance_id="stuck-1"), metadata=approver
    )
    assert [r.actor for r in status.instance.repairs] == ["approver"]
