"""End-to-end tests: the real ``cruzflow serve`` process, SIGKILL/SIGTERM, restarts.

The helpers here drive one store directory through a series of server
processes: start one, talk to it over a plain synchronous gRPC channel, kill
or stop it, check the SQLite file, start the next one on the same store.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_json_codec
from connectrpc.errors import ConnectError

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc
from cruzflow.v1.workflows_connect import WorkflowServiceClientSync
from tests import workflows as wf
from tests.conftest import ALL_WORKFLOWS
from tests.procs import ServerProcess, wait_for, write_config

WORKFLOWS: dict[str, str] = {
    **ALL_WORKFLOWS,
    "long-first-attempt": "tests.workflows:LongFirstAttempt",
    "fan-out-random": "tests.workflows:FanOutRandom",
}

FINISHED = (
    pb.INSTANCE_STATUS_COMPLETE,
    pb.INSTANCE_STATUS_ERRORED,
    pb.INSTANCE_STATUS_TERMINATED,
)


def integrity(store: Path) -> str:
    """``PRAGMA integrity_check`` of a copy of the store (the file and its WAL).

    A copy, so that the check neither checkpoints nor deletes the WAL that the
    next server has to recover from.
    """
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / store.name
        for suffix in ("", "-wal"):
            source = store.with_name(store.name + suffix)
            if source.exists():
                shutil.copyfile(source, copy.with_name(copy.name + suffix))
        connection = sqlite3.connect(copy)
        try:
            rows = connection.execute("PRAGMA integrity_check").fetchall()
        finally:
            connection.close()
    return "\n".join(str(row[0]) for row in rows)


class Cluster:
    """One config and store directory and the server processes run on it, one at a time."""

    def __init__(
        self,
        directory: Path,
        *,
        grace: str = "5 seconds",
        limits: Mapping[str, int] | None = None,
        store: Path | None = None,
        store_url: str | None = None,
        http: bool = False,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.side = directory / "side.txt"
        self.store = store or directory / "store.db"
        # On PostgreSQL (store_url): a short lease, as a restarted server takes
        # its predecessor's instances over once that one's lease has expired.
        self.store_url = store_url
        self.config = write_config(
            directory,
            WORKFLOWS,
            grace=grace,
            limits=limits,
            store=str(self.store),
            store_url=store_url,
            lease_period="1 second" if store_url is not None else None,
            http="127.0.0.1:0" if http else None,
        )
        self.servers: list[ServerProcess] = []
        self._channels: list[grpc.Channel] = []
        self._stub: workflows_pb2_grpc.WorkflowServiceStub | None = None
        self.address = ""
        self.http_address = ""  # with http=True: the running server's HTTP listener
        self.generation = 0  # grows by one with every server that has started
        self.watchers: list[Watcher] = []

    # ------------------------------------------------------------ processes
    def start(self, env: Mapping[str, str] | None = None) -> ServerProcess:
        """Start a server on the store; the stub then talks to it."""
        server = ServerProcess(
            self.config, {"CRUZFLOW_TEST_SIDE_FILE": str(self.side), **(env or {})}
        )
        self.servers.append(server)
        server.start()
        channel = grpc.insecure_channel(server.address)
        self._channels.append(channel)
        self._stub = workflows_pb2_grpc.WorkflowServiceStub(channel)
        self.address = server.address
        self.http_address = server.http_address
        self.generation += 1
        return server

    @property
    def server(self) -> ServerProcess:
        assert self.servers, "no server started"
        return self.servers[-1]

    @property
    def stub(self) -> workflows_pb2_grpc.WorkflowServiceStub:
        assert self._stub is not None, "no server started"
        return self._stub

    def kill(self) -> None:
        """SIGKILL the running server, then check that the store file is sound."""
        self.server.kill()
        self.check_integrity()

    def check_integrity(self) -> None:
        if self.store_url is None:  # PostgreSQL checks its own
            assert integrity(self.store) == "ok"

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        for channel in self._channels:
            channel.close()
        for server in self.servers:
            server.stop()

    def log(self) -> str:
        return self.server.log()

    # ------------------------------------------------------------------ rpc
    def create(self, workflow: str, params: Any = None, instance_id: str = "") -> str:
        response = self.stub.CreateInstance(
            pb.CreateInstanceRequest(
                workflow=workflow,
                instance_id=instance_id,
                params_json="" if params is None else json.dumps(params),
            ),
            timeout=10,
        )
        assert response.status in (pb.INSTANCE_STATUS_RUNNING, pb.INSTANCE_STATUS_QUEUED)
        return response.instance_id

    def status(self, instance_id: str) -> pb.Instance:
        response = self.stub.GetStatus(pb.GetStatusRequest(instance_id=instance_id), timeout=10)
        return response.instance

    def step(self, instance_id: str, name: str) -> pb.Step | None:
        for step in self.status(instance_id).steps:
            if step.name == name:
                return step
        return None

    def finished(
        self, instance_ids: Iterable[str], timeout: float = 30.0
    ) -> dict[str, pb.Instance]:
        """Poll GetStatus until every instance reached a final status; return them."""
        out: dict[str, pb.Instance] = {}
        pending = list(instance_ids)

        def poll() -> bool:
            for instance_id in list(pending):
                instance = self.status(instance_id)
                if instance.status in FINISHED:
                    out[instance_id] = instance
                    pending.remove(instance_id)
            return not pending

        try:
            wait_for(poll, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"not finished: {pending}; server log:\n{self.log()}") from None
        return out

    def in_attempt(self, instance_id: str, step: str, mark: str, attempt: int) -> bool:
        """The step body has started (side file) and the attempt is durable (GetStatus)."""
        if wf.count(str(self.side), mark) < 1:
            return False
        record = self.step(instance_id, step)
        return (
            record is not None
            and record.status == pb.STEP_STATUS_RUNNING
            and record.attempts == attempt
        )

    def count(self, mark: str) -> int:
        return wf.count(str(self.side), mark)


class Watcher(threading.Thread):
    """Follows one instance's WatchInstance stream across server restarts.

    When the stream is cut, it waits for the cluster to be on a new address and
    watches again with ``after_sequence`` = the last sequence it saw. It ends
    after the instance's final status_changed event.
    """

    def __init__(
        self, cluster: Cluster, instance_id: str, timeout: float = 40.0, *, http: bool = False
    ) -> None:
        super().__init__(daemon=True, name=f"watch-{instance_id}")
        self.cluster = cluster
        self.instance_id = instance_id
        self.http = http
        """Over HTTP (Connect JSON, the cluster needs http=True) instead of gRPC."""
        self.timeout = timeout
        self.events: list[pb.WatchInstanceResponse] = []
        self.cuts: list[tuple[grpc.StatusCode, int]] = []
        self.resumed_after: list[int] = []
        self.failure: BaseException | None = None
        self.done = False
        self._halt = threading.Event()
        cluster.watchers.append(self)  # stopped with the cluster

    @property
    def last(self) -> int:
        return self.events[-1].sequence if self.events else 0

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        generation = 0
        try:
            while not self.done and not self._halt.is_set():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"watch of {self.instance_id} did not end in time")
                if self.cluster.generation == generation:
                    time.sleep(0.02)  # wait for the next server
                    continue
                generation, address = self.cluster.generation, self.cluster.address
                if self.events:
                    self.resumed_after.append(self.last)
                if self.http:
                    self._follow_http(self.cluster.http_address, deadline)
                else:
                    self._follow(address, deadline)
        except BaseException as exc:
            self.failure = exc

    def _take(self, stream: Iterable[pb.WatchInstanceResponse]) -> None:
        """Keep the stream's events until the final status or a halt; a stream
        that ends before its final event without an error fails the watcher."""
        for event in stream:
            self.events.append(event)
            if event.WhichOneof("event") == "status_changed" and (
                event.status_changed.status in FINISHED
            ):
                self.done = True
                return
            if self._halt.is_set():
                return
        raise AssertionError(f"stream ended early after sequence {self.last}")

    def _follow(self, address: str, deadline: float) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = workflows_pb2_grpc.WorkflowServiceStub(channel)
            stream = stub.WatchInstance(
                pb.WatchInstanceRequest(instance_id=self.instance_id, after_sequence=self.last),
                timeout=max(0.1, deadline - time.monotonic()),
            )
            try:
                self._take(stream)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.cuts.append((code, self.last))
            if self._halt.is_set():
                stream.cancel()

    def _follow_http(self, address: str, deadline: float) -> None:
        """``_follow`` over HTTP: a Connect server stream, cut by a kill or a
        stop as ``unavailable`` (the server's shutdown answer, or the
        client's for a connection that broke)."""
        request = pb.WatchInstanceRequest(instance_id=self.instance_id, after_sequence=self.last)
        timeout_ms = max(100, int((deadline - time.monotonic()) * 1000))
        with WorkflowServiceClientSync(
            f"http://{address}", codec=google_protobuf_json_codec(), send_compression=None
        ) as client:
            try:
                self._take(client.watch_instance(request, timeout_ms=timeout_ms))
            except ConnectError as exc:
                if exc.code != Code.UNAVAILABLE:
                    raise
                self.cuts.append((grpc.StatusCode.UNAVAILABLE, self.last))

    def finish(self, timeout: float = 40.0) -> list[pb.WatchInstanceResponse]:
        self.join(timeout)
        if self.is_alive():
            self.stop()
            raise AssertionError(f"watcher of {self.instance_id} still running")
        if self.failure is not None:
            raise self.failure
        assert self.done, f"watcher of {self.instance_id} stopped before the final event"
        return self.events
