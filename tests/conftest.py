"""Shared fixtures: a real store per test (a SQLite file; with
CRUZFLOW_TEST_STORE=postgres, a database of its own on a real PostgreSQL
started by the session), a real server on port 0, called over gRPC or,
in the modules that say ``TRANSPORTS = BOTH``, over each transport in turn:
gRPC, and HTTP/JSON through the Connect protocol (tests/connect_stub.py)."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from cruzflow.server.app import Service
from cruzflow.server.config import load_config
from cruzflow.server.engine.runtime import Engine, Limits, WorkflowSpec
from cruzflow.server.engine.schedules import ScheduleSpec
from cruzflow.server.store.base import Store
from cruzflow.server.store.postgres import PostgresStore
from cruzflow.server.store.sqlite import SqliteStore
from cruzflow.server.telemetry import Providers
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests import workflows as wf
from tests.connect_stub import ConnectStub
from tests.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from tests.procs import write_config

TEST_STORE = os.environ.get("CRUZFLOW_TEST_STORE", "sqlite")
"""The backend of the engine and server fixtures: ``make test`` runs the suites
that hold on any store a second time with ``postgres``."""
ON_POSTGRES = TEST_STORE == "postgres"
sqlite_only = pytest.mark.skipif(
    ON_POSTGRES, reason="about the SQLite store itself (its file, its lock, its faults)"
)

BOTH = ("grpc", "http")
"""``TRANSPORTS = BOTH`` in a test module: each of its tests that uses a
server fixture runs over gRPC and over HTTP/1.1 (the same test, the same stub
calls; errors over HTTP arrive as the same ``grpc.aio.AioRpcError``); with
``"http2"`` too, over HTTP/2 as well. A test about gRPC itself (raw bytes on
the channel, gRPC's own limits) is marked ``grpc_only``."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport" not in metafunc.fixturenames:
        return
    both = getattr(metafunc.module, "TRANSPORTS", ("grpc",))
    if metafunc.definition.get_closest_marker("grpc_only") is not None:
        both = ("grpc",)
    metafunc.parametrize("transport", both, indirect=True)


@pytest.fixture
def transport(request: pytest.FixtureRequest) -> str:
    """How the test's server fixtures are called: "grpc" or "http"."""
    return str(getattr(request, "param", "grpc"))


ALL_WORKFLOWS: dict[str, str] = {
    "three-steps": "tests.workflows:ThreeSteps",
    "sleepy": "tests.workflows:Sleepy",
    "flaky": "tests.workflows:Flaky",
    "catches": "tests.workflows:CatchesFailure",
    "raises": "tests.workflows:Raises",
    "raises-outside": "tests.workflows:RaisesOutsideStep",
    "deep-raise": "tests.workflows:DeepRaise",
    "typed-params": "tests.workflows:TypedParams",
    "hangs": "tests.workflows:Hangs",
    "not-json": "tests.workflows:NotJson",
    "too-big": "tests.workflows:TooBig",
    "output-not-json": "tests.workflows:OutputNotJson",
    "repeats": "tests.workflows:Repeats",
    "blocks": "tests.workflows:Blocks",
    "uses-env": "tests.workflows:UsesEnv",
    "versioned": "tests.workflows:Versioned",
    "naps": "tests.workflows:Naps",
    "approval": "tests.workflows:Approval",
    "steps5": "tests.workflows:Steps5",
    "blocks-then-waits": "tests.workflows:BlocksThenWaits",
    "traced": "tests.workflows:Traced",
    "waits-for-type": "tests.workflows:WaitsForType",
    "kid": "tests.workflows:Kid",
    "parent": "tests.workflows:Parent",
    "waits-together": "tests.workflows:WaitsTogether",
    "booking": "tests.workflows:Booking",
    "mends": "tests.workflows:Mends",
}


def specs() -> dict[str, WorkflowSpec]:
    out = {}
    for name, target in ALL_WORKFLOWS.items():
        cls = getattr(wf, target.split(":")[1])
        out[name] = WorkflowSpec(name, name.upper().replace("-", "_"), target, cls)
    return out


@pytest.fixture
async def gate() -> AsyncIterator[asyncio.Event]:
    """Holds every "blocks" step until set (tests may swap in a new gate)."""
    wf.Blocks.gate = asyncio.Event()
    yield wf.Blocks.gate
    if wf.Blocks.gate is not None:
        wf.Blocks.gate.set()
    wf.Blocks.gate = None


@pytest.fixture
def side_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "side.txt"
    monkeypatch.setenv("CRUZFLOW_TEST_SIDE_FILE", str(path))
    return path


EngineFactory = Callable[..., Awaitable[Engine]]


class Stores:
    """The stores of one test, by name: the same name is the same store (a
    server restarted on it), on the backend of the run (TEST_STORE)."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self._tmp_path = tmp_path
        self._request = request
        self._urls: dict[str, str] = {}

    def url(self, name: str) -> str:
        """The PostgreSQL URL of store ``name`` (a database made on first use)."""
        if name not in self._urls:
            server = self._request.getfixturevalue("postgres_server")
            self._urls[name] = server.url(server.create_database())
        return self._urls[name]

    def open(self, name: str = "store.db") -> Store:
        if ON_POSTGRES:
            return PostgresStore(self.url(name))
        return SqliteStore(self._tmp_path / name)


@pytest.fixture
def stores(tmp_path: Path, request: pytest.FixtureRequest) -> Stores:
    return Stores(tmp_path, request)


@pytest.fixture
async def make_engine(stores: Stores) -> AsyncIterator[EngineFactory]:
    """Start engines on a real store of the run's backend; all are shut down after."""
    started: list[tuple[Engine, Store]] = []

    async def make(
        db: str = "store.db",
        env: Any = None,
        schedules: Sequence[ScheduleSpec] = (),
        before: Callable[[Store], Awaitable[None]] | None = None,
        **limits: Any,
    ) -> Engine:
        """``before`` gets the opened store ahead of the engine (to plant rows)."""
        store = stores.open(db)
        await store.open()
        if before is not None:
            await before(store)
        engine = Engine(store, specs(), env, Limits(**limits), schedules=schedules)
        await engine.start()
        started.append((engine, store))
        return engine

    yield make
    for engine, store in reversed(started):
        if not engine.stopping:
            await engine.shutdown(0.1)
            await store.close()


async def finished(engine: Engine, instance_id: str, timeout: float = 30.0) -> Any:
    """Follow the watch stream to the end and return the instance's record."""
    async with asyncio.timeout(timeout):
        async for _ in engine.watch(instance_id):
            pass
    record, _ = await engine.get(instance_id)
    return record


class Server:
    """An in-process service on a loopback port, with a stub on a channel
    (``transport`` "grpc"), or the same stub's calls over HTTP ("http"):
    ``channel`` is the gRPC one either way."""

    def __init__(
        self, service: Service, channel: grpc.aio.Channel, transport: str = "grpc"
    ) -> None:
        self.service = service
        self.channel = channel
        self.transport = transport
        self.connect: ConnectStub | None = None
        if transport in ("http", "http2"):
            self.connect = ConnectStub(
                f"http://127.0.0.1:{service.http_port}", http2=transport == "http2"
            )
        # The same calls either way: typed as the gRPC stub.
        self.stub = (
            cast("pb_grpc.WorkflowServiceAsyncStub", self.connect)
            if self.connect is not None
            else pb_grpc.WorkflowServiceStub(channel)
        )
        self.address = f"127.0.0.1:{service.port}"

    @functools.cached_property
    def binary(self) -> Any:
        """The stub, sending binary protobuf over HTTP too: for values that
        the JSON mapping cannot spell (a Duration's nanos past a second)."""
        if self.connect is None:
            return self.stub
        self._binary = ConnectStub(f"http://127.0.0.1:{self.service.http_port}", codec="proto")
        return self._binary

    async def close(self) -> None:
        await self.channel.close()
        for stub in (self.connect, getattr(self, "_binary", None)):
            if stub is not None:
                await stub.close()

    async def run(self, workflow: str, params: str = "", instance_id: str = "") -> pb.Instance:
        created = await self.stub.CreateInstance(
            pb.CreateInstanceRequest(workflow=workflow, params_json=params, instance_id=instance_id)
        )
        async for _ in self.stub.WatchInstance(
            pb.WatchInstanceRequest(instance_id=created.instance_id)
        ):
            pass
        status = await self.stub.GetStatus(pb.GetStatusRequest(instance_id=created.instance_id))
        return status.instance


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server(
    tmp_path: Path, stores: Stores, transport: str
) -> AsyncIterator[ServerFactory]:
    running: list[Server] = []

    async def make(
        limits: Mapping[str, int] | None = None,
        vars: Mapping[str, str] | None = None,
        databases: Mapping[str, str] | None = None,
        telemetry: Providers | None = None,
    ) -> Server:
        directory = tmp_path / f"server{len(running)}"
        directory.mkdir()
        path = write_config(
            directory,
            ALL_WORKFLOWS,
            limits=limits,
            vars=vars,
            databases=databases,
            store_url=stores.url(f"server{len(running)}") if ON_POSTGRES else None,
            http="127.0.0.1:0" if transport != "grpc" else None,
        )
        service = Service(load_config(path), telemetry)
        await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        server = Server(service, channel, transport)
        running.append(server)
        return server

    yield make
    for server in running:
        await server.close()
        await server.service.stop(0.1)


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    return await make_server()


async def eventually(condition: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    """Poll an async condition until truthy; fail clearly at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


os.environ.setdefault("CRUZFLOW_TEST", "1")
