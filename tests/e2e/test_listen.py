"""A server refuses an address another process listens on.

gRPC sets SO_REUSEPORT by default: without turning it off, a second
``cruzflow serve`` on a taken port started and took every other call, so a
client's calls alternated between two stores.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import grpc

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc
from tests.conftest import ALL_WORKFLOWS
from tests.procs import ServerProcess, write_config


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cruzflow.server.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
    )


def test_a_second_server_on_a_taken_address_exits_and_touches_nothing(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    first = ServerProcess(write_config(first_dir, ALL_WORKFLOWS)).start()
    try:
        second_config = write_config(second_dir, ALL_WORKFLOWS, listen=first.address)
        result = _serve(second_config)
        assert result.returncode == 1, result.stderr
        assert f"cruzflow: cannot listen on {first.address}: the address is in use" in result.stderr
        assert "choose another address with --listen or [server] listen" in result.stderr
        # It stopped before opening its store, let alone resuming anything.
        assert not (second_dir / "store.db").exists()

        # Every call still reaches the first server and its store.
        with grpc.insecure_channel(first.address) as channel:
            stub = workflows_pb2_grpc.WorkflowServiceStub(channel)
            stub.CreateInstance(
                pb.CreateInstanceRequest(workflow="three-steps", instance_id="only-here"),
                timeout=30,
            )
            for _ in range(6):
                listed = stub.ListInstances(pb.ListInstancesRequest(), timeout=30)
                assert [i.instance_id for i in listed.instances] == ["only-here"]
    finally:
        first.stop()


def test_an_address_held_by_another_program_is_refused(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        result = _serve(write_config(tmp_path, ALL_WORKFLOWS, listen=address))
    assert result.returncode == 1
    assert f"cannot listen on {address}: the address is in use" in result.stderr
    assert not (tmp_path / "store.db").exists()
