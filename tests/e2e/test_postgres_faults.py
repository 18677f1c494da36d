"""A real server on a real PostgreSQL that goes away and comes back, and one
that cannot reach its database at start. A password never shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc
from tests.conftest import ALL_WORKFLOWS
from tests.pgcluster import PostgresServer
from tests.postgres import postgres_server  # noqa: F401
from tests.procs import ServerProcess, wait_for, write_config

SECRET = "hunter2-not-in-any-message"


def test_a_database_out_of_reach_at_start_stops_the_server_and_hides_the_password(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path, ALL_WORKFLOWS, store_url=f"postgresql://cruzflow:{SECRET}@127.0.0.1:1/nowhere"
    )
    result = subprocess.run(
        [sys.executable, "-m", "cruzflow.server.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "postgresql://cruzflow:***@127.0.0.1:1/nowhere" in result.stderr
    assert "cannot connect" in result.stderr
    assert SECRET not in result.stderr + result.stdout


def _health(stub: health_pb2_grpc.HealthStub) -> int:
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_the_database_lost_while_serving_is_reported_and_survived(
    tmp_path: Path,
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    database = postgres_server.create_database()
    config = write_config(
        tmp_path,
        ALL_WORKFLOWS,
        store_url=postgres_server.url(database),
        lease_period="1 second",
    )
    server = ServerProcess(config).start()
    channel = grpc.insecure_channel(server.address)
    stub = workflows_pb2_grpc.WorkflowServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        # An instance whose step runs across the outage.
        stub.CreateInstance(
            pb.CreateInstanceRequest(
                workflow="sleepy", instance_id="across", params_json=json.dumps({"seconds": 3})
            ),
            timeout=30,
        )
        assert _health(health) == health_pb2.HealthCheckResponse.SERVING
        postgres_server.stop()
        try:
            # Idle, the server still notices: its lease cannot be renewed.
            wait_for(lambda: _health(health) == health_pb2.HealthCheckResponse.NOT_SERVING, 30)
            try:
                stub.CreateInstance(
                    pb.CreateInstanceRequest(workflow="three-steps", instance_id="refused"),
                    timeout=30,
                )
                raise AssertionError("a create during the outage was accepted")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert "the store cannot commit" in (exc.details() or "")
                assert "***" in (exc.details() or "")
                assert postgres_server.password not in (exc.details() or "")
        finally:
            postgres_server.start()
        # Back by itself: serving, taking work, and the sleeper completes.
        wait_for(lambda: _health(health) == health_pb2.HealthCheckResponse.SERVING, 60)
        stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="three-steps", instance_id="after"), timeout=30
        )
        for instance_id in ("across", "after"):
            done = stub.WaitInstance(
                pb.WaitInstanceRequest(instance_id=instance_id), timeout=60
            ).instance
            assert done.status == pb.INSTANCE_STATUS_COMPLETE, (instance_id, done)
        refused = stub.ListInstances(pb.ListInstancesRequest(), timeout=30).instances
        assert "refused" not in {i.instance_id for i in refused}
        assert postgres_server.password not in server.log()
    finally:
        channel.close()
        server.stop()
