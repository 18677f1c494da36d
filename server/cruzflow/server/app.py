"""Assembles the service: config -> store -> engine -> gRPC server."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cruzflow.server.bindings import (
    Env,
    ServerLink,
    SqliteDatabase,
    bind_workflows,
    local_address,
)
from cruzflow.server.config import Config
from cruzflow.server.engine.runtime import Engine
from cruzflow.server.store.sqlite import SqliteStore
from cruzflow.server.telemetry import Providers, configure_logging
from cruzflow.server.transport.servicer import WorkflowServicer
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

log = logging.getLogger("cruzflow")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name


class Service:
    """The running service. ``start`` returns the bound port; ``stop`` drains it."""

    def __init__(self, config: Config, telemetry: Providers | None = None) -> None:
        self.config = config
        # Tests hand in providers with in-memory exporters; a server builds
        # them from the config and the OTEL_* environment.
        self.telemetry = telemetry if telemetry is not None else Providers(config.telemetry)
        self.store = SqliteStore(config.store_path, synchronous=config.file.store.synchronous)
        values: dict[str, Any] = dict(config.file.vars)
        for binding, path in config.database_paths().items():
            values[binding] = SqliteDatabase(path)
        # Workflows hosted here are called through a client to this server's own
        # address, known once it listens (see start).
        self.own_link = ServerLink()
        values.update(bind_workflows(config.workflow_bindings, self.own_link))
        self.env = Env(values)
        self.engine = Engine(
            self.store, config.workflows, self.env, config.limits, self.telemetry.observer
        )
        self.health = health.aio.HealthServicer()
        limit = config.limits.max_payload_bytes
        self.server = grpc.aio.server(
            interceptors=self.telemetry.server_interceptors(),
            options=[
                # Room for a full payload plus its envelope; larger is refused by gRPC.
                ("grpc.max_receive_message_length", 2 * limit + 64 * 1024),
                ("grpc.max_send_message_length", 64 * limit),
                # A burst of thousands of creates queues instead of being cancelled.
                ("grpc.server.max_pending_requests", 20_000),
            ],
        )
        self.port = 0

    async def start(self) -> int:
        await self.store.open()
        await self.engine.start()
        pb_grpc.add_WorkflowServiceServicer_to_server(WorkflowServicer(self.engine), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(
                f"{self.config.listen}: cannot listen there (in use, or not an address here)"
            )
        await self.server.start()
        self.own_link.listening(local_address(self.config.listen, self.port))
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight attempts finish within ``grace``, close."""
        grace = self.config.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        # Keep listening while the engine drains: new creates get UNAVAILABLE
        # (which clients retry) rather than the CANCELLED of a closing server.
        await self.engine.shutdown(grace)
        await self.server.stop(1.0)
        await self.store.close()
        await self.env.aclose()
        # The exporters' flush blocks; keep it off the event loop.
        await asyncio.to_thread(self.telemetry.shutdown)


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    configure_logging(config.file.telemetry.log_format)
    service = Service(config)
    service.telemetry.install_global()
    port = await service.start()
    host = config.listen.rpartition(":")[0]
    log.info(
        "%s serving %d workflow(s) on %s:%d, store %s",
        config.name,
        len(config.workflows),
        host,
        port,
        config.store_path,
    )
    # A line for scripts and tests that start the server on port 0.
    print(f"cruzflow listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Everything loaded so far lives as long as the server: keep the cyclic
    # collector from walking it again and again, and run it less often; the
    # engine's hot path makes few cycles.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down (grace %.1f s)", config.grace_period)
    await service.stop()
    log.info("stopped")
