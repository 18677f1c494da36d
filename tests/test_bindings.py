"""Workflow bindings: ``self.env.X`` calls a workflow of another cruzflow server, or of this one.

Real servers on loopback ports: a parent server whose config binds a child
workflow hosted by a second server (or by itself), and, for deadlines, a gRPC
server that accepts calls and never answers (a hung peer).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from cruzflow.client import Client, InstanceStatus, InstanceStatusInfo, Unavailable, WorkflowFailed
from cruzflow.server.app import Service
from cruzflow.server.bindings import (
    BoundWorkflow,
    ServerLink,
    SqliteDatabase,
    derived_id,
    local_address,
)
from cruzflow.server.config import ConfigError, load_config
from cruzflow.server.engine.scope import StepScope
from tests.procs import ROOT, write_config

CHILD = "tests.workflows:Doubles"
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def remote_entry(binding: str, name: str, address: str, **keys: str | int) -> str:
    """A ``[[workflows]]`` entry hosted by the server at ``address``."""
    lines = [
        "[[workflows]]",
        f'binding = "{binding}"',
        f'name = "{name}"',
        f'address = "{address}"',
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def config_with(
    directory: Path,
    hosted: dict[str, str],
    *remote: str,
    databases: dict[str, str] | None = None,
) -> Path:
    """write_config's file, with remote ``[[workflows]]`` entries appended."""
    path = write_config(directory, hosted, databases=databases)
    with path.open("a") as config:
        config.write("".join(remote))
    return path


@dataclass
class Node:
    """An in-process server and a typed client to it."""

    service: Service
    client: Client

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    async def instances(self, workflow: str) -> list[InstanceStatusInfo]:
        return [info async for info in self.client.list_instances(workflow=workflow)]

    async def steps(self, instance_id: str) -> dict[str, int]:
        """Attempts per step name."""
        info = await self.client.instance(instance_id).status()
        return {step.name: step.attempts for step in info.steps}


NodeFactory = Callable[..., Awaitable[Node]]


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start servers on port 0, each on its own config and store; all stopped after."""
    started: list[Node] = []

    async def start(
        hosted: dict[str, str], *remote: str, databases: dict[str, str] | None = None
    ) -> Node:
        directory = tmp_path / f"node{len(started)}"
        directory.mkdir()
        service = Service(load_config(config_with(directory, hosted, *remote, databases=databases)))
        await service.start()
        node = Node(service, Client(f"127.0.0.1:{service.port}", timeout=30))
        started.append(node)
        return node

    yield start
    # Parents (started last) first: they call their children.
    for node in reversed(started):
        await node.client.close()
        await node.service.stop(0.1)


class HungServer(grpc.GenericRpcHandler):
    """A real gRPC server that takes every unary call and never answers.

    It notes the deadline (seconds left when the call arrived) and the
    metadata of each call.
    """

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((self,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.deadlines: list[float | None] = []
        self.metadata: list[dict[str, str | bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        async def hang(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self.deadlines.append(context.time_remaining())
            self.metadata.append(dict(context.invocation_metadata() or ()))
            await asyncio.Event().wait()
            return b""

        return grpc.unary_unary_rpc_method_handler(hang)


@pytest.fixture
async def hung() -> AsyncIterator[HungServer]:
    server = HungServer()
    await server.server.start()
    yield server
    await server.server.stop(0)


def spawn_marks(side_file: Path, parent_id: str) -> list[tuple[int, str]]:
    """(attempt, child id) of every "PARENT:spawn:ATTEMPT:CHILD" mark, in order."""
    if not side_file.exists():
        return []
    out = []
    for line in side_file.read_text().splitlines():
        parts = line.split(":")
        if len(parts) == 4 and parts[:2] == [parent_id, "spawn"]:
            out.append((int(parts[2]), parts[3]))
    return out


# ------------------------------------------------------- across servers


async def test_a_step_creates_a_child_on_another_server_and_a_later_step_awaits_it(
    nodes: NodeFactory, side_file: Path
) -> None:
    child = await nodes({"child-workflow": CHILD})
    parent = await nodes(
        {"spawns-child": "tests.workflows:SpawnsChild"},
        remote_entry("CHILD_WORKFLOW", "child-workflow", child.address),
    )
    handle = await parent.client.workflow("spawns-child").create({"n": 21}, id="order-1")
    output = await handle.result(timeout=60)
    [child_id] = output["child_ids"]
    assert output["children"] == [{"doubled": 42, "id": child_id}]
    # A derived id: readable (parent and step), and of the servers' id pattern.
    assert child_id.startswith("order-1-spawn-")
    assert ID_PATTERN.fullmatch(child_id)
    assert [info.id for info in await child.instances("child-workflow")] == [child_id]
    # The remote workflow is bound, not hosted.
    assert [w.name for w in await parent.client.list_workflows()] == ["spawns-child"]


async def test_a_retried_step_finds_the_child_it_created_and_makes_no_second(
    nodes: NodeFactory, side_file: Path
) -> None:
    child = await nodes({"child-workflow": CHILD})
    parent = await nodes(
        {"spawns-child": "tests.workflows:SpawnsChild"},
        remote_entry("CHILD_WORKFLOW", "child-workflow", child.address),
    )
    handle = await parent.client.workflow("spawns-child").create({"n": 5, "fail_first": True})
    output = await handle.result(timeout=60)
    [child_id] = output["child_ids"]
    # Both attempts created "the" child: the second found the first one's.
    assert spawn_marks(side_file, handle.id) == [(1, child_id), (2, child_id)]
    assert (await parent.steps(handle.id))["spawn"] == 2
    assert [info.id for info in await child.instances("child-workflow")] == [child_id]
    assert output["children"] == [{"doubled": 10, "id": child_id}]


async def test_a_retried_step_finds_the_batch_it_created(
    nodes: NodeFactory, side_file: Path
) -> None:
    child = await nodes({"child-workflow": CHILD})
    parent = await nodes(
        {"spawns-child": "tests.workflows:SpawnsChild"},
        remote_entry("CHILD_WORKFLOW", "child-workflow", child.address),
    )
    handle = await parent.client.workflow("spawns-child").create(
        {"n": 1, "count": 3, "fail_first": True}
    )
    output = await handle.result(timeout=60)
    ids = output["child_ids"]
    assert len(set(ids)) == 3
    marks = spawn_marks(side_file, handle.id)
    assert marks == [(1, i) for i in ids] + [(2, i) for i in ids]
    assert sorted(info.id for info in await child.instances("child-workflow")) == sorted(ids)
    assert [c["doubled"] for c in output["children"]] == [2, 4, 6]


async def test_a_hosted_workflow_is_bound_too(nodes: NodeFactory, side_file: Path) -> None:
    node = await nodes(
        {"spawns-child": "tests.workflows:SpawnsChild", "child-workflow": CHILD},
        databases={"DB": "app.db"},
    )
    env = node.service.env
    assert isinstance(env.CHILD_WORKFLOW, BoundWorkflow)
    assert isinstance(env.DB, SqliteDatabase)  # the [[sqlite_databases]] binding beside it
    handle = await node.client.workflow("spawns-child").create({"n": 4, "fail_first": True})
    output = await handle.result(timeout=60)
    [child_id] = output["child_ids"]
    assert output["children"] == [{"doubled": 8, "id": child_id}]
    assert [info.id for info in await node.instances("child-workflow")] == [child_id]


async def test_a_failed_child_fails_the_awaiting_step_without_retries(nodes: NodeFactory) -> None:
    node = await nodes(
        {"spawns-child": "tests.workflows:SpawnsChild", "child-workflow": "tests.workflows:Raises"}
    )
    handle = await node.client.workflow("spawns-child").create({"n": 1})
    with pytest.raises(WorkflowFailed) as failed:
        await handle.result(timeout=60)
    # A retry would find the same failed child: the step fails at once.
    assert failed.value.error_name == "ChildWorkflowFailed"
    assert "failed: ValueError: bad input row 7" in failed.value.error_message
    assert (await node.steps(handle.id))["await"] == 1


async def test_a_create_outside_a_step_is_refused(nodes: NodeFactory) -> None:
    node = await nodes(
        {"creates-outside": "tests.workflows:CreatesOutsideStep", "child-workflow": CHILD}
    )
    handle = await node.client.workflow("creates-outside").create()
    with pytest.raises(WorkflowFailed) as failed:
        await handle.result(timeout=60)
    assert failed.value.error_name == "OutsideStepError"
    assert "env.CHILD_WORKFLOW.create() was called outside a step" in failed.value.error_message
    assert "step.do" in failed.value.error_message
    assert await node.instances("child-workflow") == []


# ------------------------------------------------------------ deadlines


async def test_a_call_in_a_step_carries_the_attempts_remaining_time(
    nodes: NodeFactory, hung: HungServer
) -> None:
    parent = await nodes(
        {"calls-child": "tests.workflows:CallsChild"},
        remote_entry("HUNG", "child-workflow", hung.address, timeout="60 seconds"),
    )
    handle = await parent.client.workflow("calls-child").create(
        {"binding": "HUNG", "call": "create", "step_timeout": "3 seconds", "limit": 1}
    )
    output = await handle.result(timeout=60)
    # The call's own deadline ends it, a little before the attempt's timeout would.
    assert output["error"] == "DeadlineExceeded", output
    assert (await parent.steps(handle.id))["call"] == 2
    # Each attempt's create reached the server with at most the attempt's 3 s, not 60 s
    # (plus a little: the server reads the deadline off its own clock).
    assert len(hung.deadlines) == 2
    for deadline in hung.deadlines:
        assert deadline is not None and 0 < deadline <= 3.05


async def test_the_configured_timeout_bounds_each_call_and_the_token_is_sent(
    nodes: NodeFactory, hung: HungServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRUZFLOW_TEST_CHILD_TOKEN", "s3cret")
    parent = await nodes(
        {"calls-child": "tests.workflows:CallsChild"},
        remote_entry(
            "HUNG",
            "child-workflow",
            hung.address,
            timeout=300,  # ms
            token_env="CRUZFLOW_TEST_CHILD_TOKEN",
        ),
    )
    handle = await parent.client.workflow("calls-child").create(
        {"binding": "HUNG", "call": "create", "limit": 1}
    )
    output = await handle.result(timeout=60)
    assert output["error"] == "DeadlineExceeded", output
    assert (await parent.steps(handle.id))["call"] == 2
    assert len(hung.deadlines) == 2
    for deadline, metadata in zip(hung.deadlines, hung.metadata, strict=True):
        assert deadline is not None and 0 < deadline <= 0.35
        assert metadata["authorization"] == "Bearer s3cret"


@pytest.mark.parametrize(
    ("call", "error"), [("watch", "DeadlineExceeded"), ("result", "ResultTimeout")]
)
async def test_a_wait_in_a_step_ends_before_the_attempt(
    nodes: NodeFactory, call: str, error: str
) -> None:
    child = await nodes({"approval": "tests.workflows:Approval"})
    waits = await child.client.workflow("approval").create(id="waits-for-ever")
    parent = await nodes(
        {"calls-child": "tests.workflows:CallsChild"},
        remote_entry("APPROVALS", "approval", child.address),
    )
    handle = await parent.client.workflow("calls-child").create(
        {"binding": "APPROVALS", "call": call, "child_id": waits.id, "step_timeout": "2 seconds"}
    )
    output = await handle.result(timeout=60)
    assert output["error"] == error, output
    assert (await waits.status()).status is InstanceStatus.WAITING


# --------------------------------------------------------------- config


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cruzflow.toml"
    path.write_text(f"python_path = [{str(ROOT)!r}]\n" + text)
    return path


HOSTED = "[[workflows]]\nbinding = 'A'\nname = 'a'\nclass_name = 'tests.workflows:Doubles'\n"
REMOTE = "[[workflows]]\nbinding = 'B'\nname = 'a'\naddress = '127.0.0.1:50052'\n"


def test_remote_entries_are_bound_not_hosted(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, HOSTED + REMOTE + "timeout = '30 seconds'\n"))
    assert list(config.workflows) == ["a"]  # the same name may live on another server
    hosted, remote = config.workflow_bindings
    assert (hosted.binding, hosted.address, hosted.timeout) == ("A", None, 10.0)
    assert (remote.binding, remote.name, remote.address) == ("B", "a", "127.0.0.1:50052")
    assert remote.timeout == 30.0
    assert remote.token is None and remote.tls is None


def test_token_and_tls_settings_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_TOKEN", "t0ken")
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca", "client", "client-key"):
        (certs / f"{name}.pem").write_bytes(f"-- {name} --".encode())
    config = load_config(
        _config(
            tmp_path,
            REMOTE + "token_env = 'BILLING_TOKEN'\ntls_ca_file = 'certs/ca.pem'\n"
            "tls_cert_file = 'certs/client.pem'\ntls_key_file = 'certs/client-key.pem'\n",
        )
    )
    [target] = config.workflow_bindings
    assert target.token == "t0ken"
    assert target.tls is not None
    assert target.tls.root_certificates == b"-- ca --"
    assert target.tls.certificate_chain == b"-- client --"
    assert target.tls.private_key == b"-- client-key --"
    assert isinstance(target.tls.credentials(), grpc.ChannelCredentials)
    # Neither the token nor the key shows in logs of the settings.
    assert "t0ken" not in repr(target) and "client-key" not in repr(target)


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        (
            HOSTED.replace("class_name", "address = '127.0.0.1:1'\nclass_name"),
            "workflows[0]",
            "has both class_name and address",
        ),
        (
            "[[workflows]]\nbinding = 'A'\nname = 'a'\n",
            "workflows[0].class_name",
            "or address (host:port) for one hosted by another cruzflow server",
        ),
        (
            REMOTE + "token_env = 'CRUZFLOW_TEST_NO_SUCH_TOKEN'\n",
            "workflows[0].token_env",
            "CRUZFLOW_TEST_NO_SUCH_TOKEN is not set",
        ),
        (HOSTED + "token_env = 'T'\n", "workflows[0].token_env", "only for a workflow hosted by"),
        (
            HOSTED + "tls_ca_file = 'ca.pem'\n",
            "workflows[0].tls_ca_file",
            "only for a workflow hosted by",
        ),
        (REMOTE + "tls_cert_file = 'c.pem'\n", "workflows[0].tls_key_file", "go together"),
        (REMOTE + "tls_ca_file = 'absent.pem'\n", "workflows[0].tls_ca_file", "cannot read"),
        (REMOTE.replace("127.0.0.1:50052", "nowhere"), "workflows[0].address", "host:port"),
        (REMOTE + "timeout = 0\n", "workflows[0].timeout", "more than 0"),
        (HOSTED + REMOTE.replace("'B'", "'A'"), "workflows[1].binding", "used twice"),
        (HOSTED + HOSTED.replace("'A'", "'C'"), "workflows[1].name", "used twice"),
    ],
)
def test_bad_workflow_entries_name_file_key_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, where: str, reason: str
) -> None:
    monkeypatch.delenv("CRUZFLOW_TEST_NO_SUCH_TOKEN", raising=False)
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"{path}: {where}" in message
    assert reason in message


# ---------------------------------------------------------------- units


def test_derived_ids_are_stable_per_step_and_distinct_per_create() -> None:
    def scope(attempt: int, step: str = "spawn", occurrence: int = 1) -> StepScope:
        return StepScope("order-1", 1_700_000_000_000, step, occurrence, attempt, 0.0)

    first, retry = scope(1), scope(2)
    ids = [derived_id(first, "child"), derived_id(first, "child"), derived_id(first, "other")]
    assert [derived_id(retry, "child"), derived_id(retry, "child")] == ids[:2]
    assert derived_id(retry, "other") == ids[2]
    assert len(set(ids)) == 3
    assert derived_id(scope(1, occurrence=2), "child") != ids[0]
    again = StepScope("order-1", 1_700_000_000_001, "spawn", 1, 1, 0.0)  # a new "order-1"
    assert derived_id(again, "child") != ids[0]
    odd = derived_id(scope(1, step="spawn the child: é/€ " * 20), "child")
    for made in [*ids, odd]:
        assert ID_PATTERN.fullmatch(made) and len(made) <= 100, made


def test_local_address_reaches_a_wildcard_listener_on_loopback() -> None:
    assert local_address("0.0.0.0:0", 5051) == "127.0.0.1:5051"
    assert local_address("[::]:0", 5051) == "[::1]:5051"
    assert local_address("10.0.0.7:50051", 50051) == "10.0.0.7:50051"


async def test_the_own_link_waits_until_the_server_listens() -> None:
    link = ServerLink()
    waiting = asyncio.create_task(link.client(wait=30))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    link.listening("127.0.0.1:50099")
    client = await waiting
    assert repr(client) == "Client('127.0.0.1:50099')"
    await link.close()
    with pytest.raises(Unavailable, match="not listening yet"):
        await ServerLink().client(wait=0.01)
