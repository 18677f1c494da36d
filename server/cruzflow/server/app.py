"""Assembles the service: config -> store -> engine -> gRPC server."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cruzflow.sdk.api import Env
from cruzflow.server.auth import INTERNAL_NAME, AuthInterceptor, Gate, Refusal, TokenRule, digest
from cruzflow.server.bindings import (
    ServerLink,
    WorkflowTarget,
    config_values,
    local_address,
)
from cruzflow.server.config import Config
from cruzflow.server.engine.errors import InvalidArgument
from cruzflow.server.engine.runtime import Engine
from cruzflow.server.engine.schedules import check_schedule_id
from cruzflow.server.store.base import StoreError
from cruzflow.server.store.sqlite import SqliteStore
from cruzflow.server.telemetry import Providers, configure_logging
from cruzflow.server.transport.api import WorkflowApi
from cruzflow.server.transport.console import Console
from cruzflow.server.transport.http import (
    CORS_REQUEST_HEADERS,
    CORS_RESPONSE_HEADERS,
    HttpApp,
    HttpListener,
    connect_app,
)
from cruzflow.server.transport.servicer import add_to_server
from cruzflow.v1 import workflows_pb2 as pb

log = logging.getLogger("cruzflow")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name


class Service:
    """The running service. ``start`` returns the bound port; ``stop`` drains it."""

    def __init__(self, config: Config, telemetry: Providers | None = None) -> None:
        self.config = config
        # Tests hand in providers with in-memory exporters; a server builds
        # them from the config and the OTEL_* environment.
        self.telemetry = telemetry if telemetry is not None else Providers(config.telemetry)
        self.store = (
            SqliteStore(config.store_path, synchronous=config.file.store.synchronous)
            if config.store_url is None
            else config.postgres_store()
        )
        # Workflows hosted here are called through a client to this server's own
        # address, known once it listens (see start). With tokens, that client
        # holds one of its own, made anew at each start and never shown.
        self._own_token = secrets.token_urlsafe(32) if config.tokens else None
        self.own_link = ServerLink(
            WorkflowTarget("", "", None, token=self._own_token) if self._own_token else None
        )
        self._own_socket: Path | None = None
        self.gate = (
            Gate(
                [*config.tokens, TokenRule(INTERNAL_NAME, digest(self._own_token))],
                self._workflow_of,
                self._workflow_of_schedule,
            )
            if self._own_token is not None
            else None
        )
        """Who may call what, on every transport; None: no authentication."""
        self.env = Env(config_values(config, self.own_link))
        self.engine = Engine(
            self.store,
            config.workflows,
            self.env,
            config.limits,
            self.telemetry.observer,
            schedules=config.schedules,
        )
        self.api = WorkflowApi(self.engine)
        """The service's handlers, served over gRPC and (with [http]) over HTTP."""
        self.health = health.aio.HealthServicer()
        # While the store cannot commit, new work is refused: say NOT_SERVING so
        # that balancers and probes look elsewhere, and SERVING once it is back.
        self._health_updates: set[asyncio.Task[None]] = set()
        self.engine.store_listeners.append(self._store_health)
        limit = config.limits.max_payload_bytes
        self.server = grpc.aio.server(
            # Telemetry first (outermost): a call the auth interceptor refuses
            # still gets its server span, with the status it was refused with.
            interceptors=[*self.telemetry.server_interceptors(), *self._auth()],
            # Calls past this many in flight (watch streams included) get
            # RESOURCE_EXHAUSTED at once: a burst cannot grow memory without bound.
            maximum_concurrent_rpcs=config.limits.max_concurrent_rpcs,
            options=[
                # Room for a full payload plus its envelope; larger is refused by gRPC.
                ("grpc.max_receive_message_length", 2 * limit + 64 * 1024),
                ("grpc.max_send_message_length", 64 * limit),
                # A burst of thousands of creates queues instead of being cancelled.
                ("grpc.server.max_pending_requests", 20_000),
                # gRPC turns SO_REUSEPORT on by default: a second server on a
                # taken address would start and take half its calls.
                ("grpc.so_reuseport", 0),
            ],
        )
        self.port = 0
        self.http_port: int | None = None
        """The HTTP listener's port once started; None: no [http] listen."""
        self._http: HttpListener | None = None
        self._serving = False
        self._stopping = False

    def http_app(self) -> Any:
        """The HTTP listener's ASGI application: Connect, the /workflows/
        routes, the web console ([console] enabled), and CORS when [http]
        cors_origins names origins."""
        config = self.config
        # Room for a full payload plus its envelope, as gRPC's receive limit.
        read_max_bytes = 2 * config.limits.max_payload_bytes + 64 * 1024
        app: Any = HttpApp(
            connect_app(
                self.api,
                self.gate,
                max_in_flight=config.limits.max_concurrent_rpcs,
                read_max_bytes=read_max_bytes,
                telemetry=self.telemetry.connect_interceptors(),
            ),
            read_max_bytes,
            self.serving,
            self.gate,
            Console(config.file.console.trace_url) if config.file.console.enabled else None,
        )
        if config.file.http.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            app = CORSMiddleware(
                app,
                allow_origins=config.file.http.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=CORS_REQUEST_HEADERS,
                expose_headers=CORS_RESPONSE_HEADERS,
                max_age=7200,
            )
        return app

    async def start(self) -> int:
        # The addresses first: a server that cannot listen must not open the
        # store, let alone resume its instances.
        self.port = self._listen()
        http_socket = None
        if self.config.http_listen is not None:
            http_socket = _bind(self.config.http_listen, "--http-listen or [http] listen")
        await self.store.open()
        await self.engine.start()
        # Guarded: a request that is not a valid message gets INVALID_ARGUMENT.
        add_to_server(self.api, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        for warning in self.config.warnings:
            log.warning("%s", warning)
        tls = self.config.server_tls
        own = local_address(self.config.listen, self.port)
        if tls is not None:
            # This server's own bindings cannot pass its TLS checks (it has no
            # client certificate, and its certificate need not name loopback):
            # they call it on a Unix socket in a folder only this user can
            # open, with the same interceptors (tokens) as the network port.
            self._own_socket = _own_socket_folder() / "own.sock"
            own = f"unix:{self._own_socket}"
            if not self.server.add_insecure_port(own):
                raise OSError(f"{own}: cannot listen there for this server's own bindings")
        await self.server.start()
        if http_socket is not None:
            self._http = HttpListener(self.http_app(), http_socket, tls=self._http_tls())
            await self._http.start()
            self.http_port = http_socket.getsockname()[1]
        self.own_link.listening(own)
        await self._set_health(self.engine.store_fault is None)
        return self.port

    def _http_tls(self) -> tuple[Path, Path, Path | None] | None:
        server = self.config.file.server
        if self.config.server_tls is None or not server.tls_cert_file or not server.tls_key_file:
            return None
        base = self.config.base
        ca = server.tls_client_ca_file
        return (
            base / server.tls_cert_file,
            base / server.tls_key_file,
            None if ca is None else base / ca,
        )

    def _listen(self) -> int:
        """Bind the listen address; the port bound. An address another process
        listens on is refused (the server's options turn SO_REUSEPORT off, so
        two servers cannot split one address's calls between their stores)."""
        listen = self.config.listen
        tls = self.config.server_tls
        try:
            if tls is None:
                port = self.server.add_insecure_port(listen)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(tls.private_key, tls.certificate_chain)],
                    root_certificates=tls.client_ca,
                    require_client_auth=tls.client_ca is not None,
                )
                port = self.server.add_secure_port(listen, credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(_bind_failure(listen, "--listen or [server] listen"))
        return port

    def _auth(self) -> list[grpc.aio.ServerInterceptor]:
        if self.gate is None:
            return []
        return [AuthInterceptor(self.gate, open_reflection=self.config.open_reflection)]

    async def _workflow_of(self, instance_id: str) -> str | None:
        """The workflow of an instance, for tokens limited to some workflows."""
        try:
            self.engine.check_id(instance_id)
            record = await self.store.get_instance(instance_id)
        except InvalidArgument as exc:
            raise Refusal("INVALID_ARGUMENT", str(exc)) from None
        except StoreError as exc:
            raise Refusal("UNAVAILABLE", str(exc)) from None
        return None if record is None else record.workflow

    async def _workflow_of_schedule(self, schedule_id: str) -> str | None:
        """The workflow of a schedule, for tokens limited to some workflows."""
        try:
            check_schedule_id(schedule_id)
            record = await self.store.get_schedule(schedule_id)
        except InvalidArgument as exc:
            raise Refusal("INVALID_ARGUMENT", str(exc)) from None
        except StoreError as exc:
            raise Refusal("UNAVAILABLE", str(exc)) from None
        return None if record is None else record.workflow

    def serving(self) -> bool:
        """What the health service answers: the store commits, and no stop has begun."""
        return self._serving and not self._stopping

    async def _set_health(self, serving: bool) -> None:
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        # After enter_graceful_shutdown the servicer ignores these: a stop wins.
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def _store_health(self, fault: StoreError | None) -> None:
        if not self.port:
            return  # not listening yet: start() sets health from the store's state
        task = asyncio.ensure_future(self._set_health(fault is None))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight attempts finish within ``grace``, close."""
        grace = self.config.grace_period if grace is None else grace
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        # Keep listening while the engine drains: new creates get UNAVAILABLE
        # (which clients retry) rather than the CANCELLED of a closing server.
        await self.engine.shutdown(grace)
        if self._http is not None:
            await self._http.stop()
        await self.server.stop(1.0)
        if self._own_socket is not None:
            shutil.rmtree(self._own_socket.parent, ignore_errors=True)
        await self.store.close()
        await self.env.aclose()
        # The exporters' flush blocks; keep it off the event loop.
        await asyncio.to_thread(self.telemetry.shutdown)


def _bind(listen: str, where: str) -> socket.socket:
    """A socket listening on ``listen`` (port 0: a free one), without
    SO_REUSEPORT; OSError saying why not and how to mend it (``where``: the
    option and key that set the address)."""
    host, _, port = listen.rpartition(":")
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host.strip("[]") or "0.0.0.0", int(port), type=socket.SOCK_STREAM
        )[0]
        sock = socket.create_server(address[:2], family=family, backlog=2048)
        # Inherited by every accepted connection: an answer written in two
        # parts (headers, then body) must not wait for the client's delayed
        # ACK, 40 ms a call on a kept-alive connection. uvloop sets it on
        # each connection itself; asyncio's own loop, under uvicorn, did not.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except (OSError, ValueError):
        raise OSError(_bind_failure(listen, where)) from None


def _bind_failure(listen: str, where: str) -> str:
    """Why ``listen`` cannot be bound, found by binding it with a plain socket,
    and what mends it."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    mend = f"choose another address with {where}"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        return f"cannot listen on {listen}: {exc}; {mend}"
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"cannot listen on {listen}: the address is in use (another process listens "
                f"there: a cruzflow server already running?); stop it, or {mend}"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"cannot listen on {listen}: {host} is not an address of this machine; {mend}"
        return f"cannot listen on {listen}: {exc.strerror}; {mend}"
    finally:
        probe.close()
    return f"cannot listen on {listen}; {mend}"


# The folders of the servers' own-bindings sockets: prefix, pid, random part.
_OWN_PREFIX = "cruzflow-own-"


def _own_socket_folder() -> Path:
    """A new folder only this user can open, for this server's own-bindings
    socket. Folders left by servers of this user that died without stopping
    (a SIGKILL) are removed first."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{_OWN_PREFIX}*-*"):
        pid = old.name[len(_OWN_PREFIX) :].split("-", 1)[0]
        try:
            mine = old.is_dir() and old.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_OWN_PREFIX}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    configure_logging(config.file.telemetry.log_format)
    service = Service(config)
    service.telemetry.install_global()
    port = await service.start()
    host = config.listen.rpartition(":")[0]
    tls = config.server_tls
    log.info(
        "%s serving %d workflow(s) on %s:%d (%s, %s), store %s",
        config.name,
        len(config.workflows),
        host,
        port,
        "plaintext" if tls is None else "TLS" if tls.client_ca is None else "mTLS",
        f"{len(config.tokens)} token(s)" if config.tokens else "no authentication",
        # A PostgreSQL URL as its store names it: the password as ***.
        config.store_path if config.store_url is None else getattr(service.store, "url", "?"),
    )
    # A line for scripts and tests that start the server on port 0.
    print(f"cruzflow listening on {host}:{port}", flush=True)
    if service.http_port is not None and config.http_listen is not None:
        http_host = config.http_listen.rpartition(":")[0]
        log.info(
            "HTTP (Connect, gRPC-Web, /workflows/) on %s:%d%s",
            http_host,
            service.http_port,
            f", CORS for {', '.join(config.file.http.cors_origins)}"
            if config.file.http.cors_origins
            else "",
        )
        print(f"cruzflow http listening on {http_host}:{service.http_port}", flush=True)
        if config.file.console.enabled:
            scheme = "https" if config.file.server.tls_cert_file else "http"
            log.info("web console at %s://%s:%d/", scheme, http_host, service.http_port)
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
