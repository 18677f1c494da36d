"""What ``self.env`` holds: the config's vars and the resources it binds.

A ``[[workflows]]`` entry is bound as a :class:`BoundWorkflow`: the typed
client's ``WorkflowBinding`` API, to a workflow of another cruzflow server
(``address``) or of this one (``class_name``). A call made inside a step
carries the attempt's remaining time as its deadline, and a ``create``
without an id gets one derived from the instance and the step, so a retried
or replayed step finds the child it created before instead of making another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiosqlite
import grpc

from cruzflow.client import (
    Client,
    DeadlineExceeded,
    InstanceAlreadyExists,
    InstanceHandle,
    InstanceNotFound,
    InstanceStatus,
    InstanceStatusInfo,
    InvalidArgument,
    NewInstance,
    RepairInfo,
    Unavailable,
    WatchEvent,
    WorkflowFailed,
    WorkflowTerminated,
)
from cruzflow.client._client import _NO_OUTPUT
from cruzflow.server.engine.errors import NonRetryableError
from cruzflow.server.engine.scope import StepScope, current_step

if TYPE_CHECKING:
    from cruzflow.server.config import Config


class SqliteDatabase:
    """A SQLite database bound in the config (the seed's D1 binding).

    Each call runs in its own transaction, committed (and fsynced) before it
    returns, so what a step wrote is durable when the step's result is stored.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> aiosqlite.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(self.path)
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA busy_timeout = 5000")
            self._conn = conn
        return self._conn

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one parameterised statement, commit, and return its rows."""
        async with self._lock:
            conn = await self._connection()
            rows = await conn.execute_fetchall(sql, tuple(params))
            await conn.commit()
            return [tuple(r) for r in rows]

    async def executescript(self, script: str) -> None:
        """Run several statements (schema setup), then commit."""
        async with self._lock:
            conn = await self._connection()
            await conn.executescript(script)
            await conn.commit()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # Env.aclose (at the server's stop) closes what has this.
    aclose_binding = close


# ---------------------------------------------------------------- workflows

DEFAULT_CALL_TIMEOUT = 10.0
"""Seconds a binding call may take when the config gives no ``timeout``."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PEM contents of a remote entry's ``tls_*_file`` keys, read at load."""

    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials; without a CA file the system's roots are trusted."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True, slots=True)
class WorkflowTarget:
    """One ``[[workflows]]`` entry as ``self.env`` binds it."""

    binding: str
    name: str
    address: str | None
    """host:port of the server hosting it; None when this server hosts it."""
    timeout: float = DEFAULT_CALL_TIMEOUT
    """Default deadline of a call, in seconds."""
    token: str | None = field(default=None, repr=False)
    """The bearer token read from the variable ``token_env`` names."""
    tls: TlsFiles | None = None


class OutsideStepError(RuntimeError):
    """A binding call that changes something was made outside a step.

    Code outside ``step.do`` runs again on every replay, so such a call would
    be repeated each time (a new child instance per replay); nothing records
    that it was made.
    """


class ChildWorkflowFailed(WorkflowFailed, NonRetryableError):
    """``result()`` of a bound instance that ended errored.

    Not retried when raised in a step: a retry would find the same child
    (its id is derived from the step), with the same outcome.
    """


class ChildWorkflowTerminated(WorkflowTerminated, NonRetryableError):
    """``result()`` of a bound instance that was terminated; not retried either."""


class ServerLink:
    """A typed client to one server, made on first use.

    The link of the workflows hosted here has no address until the service
    listens (``listening``); calls made before that, by instances resumed at
    start-up, wait for it within their deadline.
    """

    def __init__(self, target: WorkflowTarget | None = None) -> None:
        self._target = target
        self._address = target.address if target is not None else None
        self._known = asyncio.Event()
        if self._address is not None:
            self._known.set()
        self._client: Client | None = None
        self._closed = False

    def listening(self, address: str) -> None:
        """This server listens on ``address``: hosted workflows are called there."""
        self._address = address
        self._known.set()

    async def client(self, wait: float | None) -> Client:
        if self._closed:
            raise RuntimeError("the workflow binding is closed (the server is stopping)")
        if not self._known.is_set():
            try:
                async with asyncio.timeout(wait):
                    await self._known.wait()
            except TimeoutError:
                raise Unavailable(
                    "this server is not listening yet, so its own workflows cannot be "
                    "called; try again once it serves",
                    code=grpc.StatusCode.UNAVAILABLE,
                ) from None
        if self._client is None:
            assert self._address is not None
            target = self._target
            self._client = Client(
                self._address,
                timeout=target.timeout if target is not None else DEFAULT_CALL_TIMEOUT,
                token=target.token if target is not None else None,
                credentials=(
                    target.tls.credentials()
                    if target is not None and target.tls is not None
                    else None
                ),
            )
        return self._client

    async def close(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.close()


def local_address(listen: str, port: int) -> str:
    """The address this server is reached at from itself, for ``listen`` and its bound port."""
    host = listen.rpartition(":")[0]
    # A wildcard listens everywhere but cannot be connected to: use loopback.
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"{host}:{port}"


def bind_workflows(targets: Iterable[WorkflowTarget], own: ServerLink) -> dict[str, BoundWorkflow]:
    """``self.env`` entries for the ``[[workflows]]`` of the config.

    Workflows hosted here are called through ``own``, a client to this
    server's own address: the same code path, errors and semantics as a
    remote workflow, instead of a second, in-process implementation.
    """
    return {
        t.binding: BoundWorkflow(t, own if t.address is None else ServerLink(t)) for t in targets
    }


def config_values(config: Config, own: ServerLink) -> dict[str, Any]:
    """What ``self.env`` holds under ``config``: its [vars], a binding per
    [[sqlite_databases]] entry (connected on first use) and per [[workflows]]
    entry (its client made on first use, through ``own`` for those hosted here)."""
    values: dict[str, Any] = dict(config.file.vars)
    for binding, path in config.database_paths().items():
        values[binding] = SqliteDatabase(path)
    values.update(bind_workflows(config.workflow_bindings, own))
    return values


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def derived_id(scope: StepScope, workflow: str) -> str:
    """The id of the n-th instance of ``workflow`` that an attempt creates without one.

    The same for every attempt and replay of the step (instance, its creation
    time, step name and occurrence, workflow, n), so a retry after a failure,
    a timeout or a crash finds what an earlier attempt created. It matches the
    servers' id pattern and is 62 characters at most; the readable prefix
    names the parent instance and step.
    """
    number = scope.next_number(workflow)
    key = "\x1f".join((
        scope.instance_id, str(scope.created_at), scope.step_name, str(scope.occurrence),
        workflow, str(number),
    ))  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    step = _UNSAFE.sub("_", scope.step_name)[:12]
    return f"{scope.instance_id[:24]}-{step}-{digest}"


def _call_timeout(timeout: float) -> float:
    """The deadline of a call that may last ``timeout`` seconds, inside the current step."""
    scope = current_step.get()
    if scope is None:
        return timeout
    remaining = scope.remaining()
    # End the call a little before the attempt, so the body sees the call's own
    # DeadlineExceeded (and may handle it) rather than being cut by the step timeout.
    usable = remaining - min(1.0, remaining * 0.1)
    if usable <= 0.001:
        raise DeadlineExceeded(
            f"no time is left in attempt {scope.attempt} of step {scope.step_name!r} for the call",
            code=grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    return min(timeout, usable)


def _wait_bound(timeout: float | None) -> float | None:
    """How long a wait or watch may last: ``timeout``, and inside a step no longer
    than the attempt has left."""
    if current_step.get() is None:
        return timeout
    return _call_timeout(float("inf") if timeout is None else timeout)


class BoundWorkflow:
    """``self.env.<binding>`` for a ``[[workflows]]`` entry: one workflow, hosted
    by another cruzflow server or by this one, with the typed client's
    ``WorkflowBinding`` API (``create``, ``create_batch``, ``get``).

    Inside a step, every call's deadline is the configured ``timeout`` (or the
    call's own) cut to what is left of the attempt, and ``create`` without an
    ``id`` uses one derived from the instance and the step, with
    ``if_exists="return"``: a retried or replayed step gets back the instance
    it created before. ``create``, ``create_batch`` and the handles' calls that
    change something (pause, resume, terminate, restart, send_event) are
    refused outside a step, where they would be repeated on every replay.
    """

    __slots__ = ("_link", "_target")

    def __init__(self, target: WorkflowTarget, link: ServerLink) -> None:
        self._target = target
        self._link = link

    @property
    def name(self) -> str:
        """The workflow's name on the server that hosts it."""
        return self._target.name

    @property
    def binding(self) -> str:
        return self._target.binding

    def __repr__(self) -> str:
        where = self._target.address or "this server"
        return f"BoundWorkflow({self._target.binding}: {self._target.name!r} on {where})"

    async def create(
        self,
        params: Any = None,
        *,
        id: str | None = None,
        lookup_key: str | None = None,
        if_exists: Literal["error", "return"] = "error",
        timeout: float | None = None,
    ) -> BoundInstance:
        """Create an instance (see ``cruzflow.client.WorkflowBinding.create``).

        Only inside a step. Without ``id``, the id is derived from the
        instance, the step and how many instances of this workflow the
        attempt created before, and an existing instance of that id is
        returned: the step may be retried or replayed safely. With your own
        ``id``, pass ``if_exists="return"`` for the same safety.
        """
        scope = self._require_step("create")
        if id is None:
            id, if_exists = derived_id(scope, self.name), "return"
        client = await self._client(timeout)
        handle = await client.workflow(self.name).create(
            params,
            id=id,
            lookup_key=lookup_key,
            if_exists=if_exists,
            timeout=self._timeout(timeout),
        )
        return BoundInstance(client, handle.id, self)

    async def create_batch(
        self,
        items: Iterable[NewInstance | Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> list[BoundInstance]:
        """Create several instances in one transaction, all or none (see
        ``cruzflow.client.WorkflowBinding.create_batch``).

        Only inside a step. Items without an ``id`` get derived ones, as with
        ``create``; when an earlier attempt stored the batch already, its
        instances are returned.
        """
        scope = self._require_step("create_batch")
        filled: list[NewInstance | Mapping[str, Any]] = []
        derived = False
        for item in items:
            if isinstance(item, NewInstance) and item.id is None:
                item = dataclasses.replace(item, id=derived_id(scope, self.name))
                derived = True
            elif isinstance(item, Mapping) and item.get("id") is None:
                item = {**item, "id": derived_id(scope, self.name)}
                derived = True
            filled.append(item)
        client = await self._client(timeout)
        binding = client.workflow(self.name)
        try:
            handles = await binding.create_batch(filled, timeout=self._timeout(timeout))
        except InstanceAlreadyExists:
            if not derived:
                raise
            # All or none: if any id of ours is taken, an earlier attempt stored the batch.
            ids = [str(item.id if isinstance(item, NewInstance) else item["id"]) for item in filled]
            for id in ids:
                try:
                    await binding.get(id, timeout=self._timeout(timeout))
                except InstanceNotFound:
                    raise InstanceAlreadyExists(
                        f"the batch's ids are taken in part only (no instance {id!r}): they were "
                        f"not all made by an earlier attempt of this step",
                        code=grpc.StatusCode.ALREADY_EXISTS,
                        instance_id=id,
                    ) from None
            return [BoundInstance(client, id, self) for id in ids]
        return [BoundInstance(client, handle.id, self) for handle in handles]

    async def get(self, id: str, *, timeout: float | None = None) -> BoundInstance:
        """The handle of an existing instance of this workflow (``InstanceNotFound``
        if there is none). Allowed outside steps too; it changes nothing."""
        client = await self._client(timeout)
        handle = await client.workflow(self.name).get(id, timeout=self._timeout(timeout))
        return BoundInstance(client, handle.id, self)

    async def close(self) -> None:
        await self._link.close()

    aclose_binding = close

    # ----------------------------------------------------------- plumbing
    def _timeout(self, timeout: float | None) -> float:
        if timeout is None:
            return _call_timeout(self._target.timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise InvalidArgument(
                f"timeout: must be a number of seconds over 0, or None; got {timeout!r}"
            )
        return _call_timeout(timeout)

    async def _client(self, timeout: float | None) -> Client:
        return await self._link.client(self._timeout(timeout))

    def _require_step(self, call: str) -> StepScope:
        scope = current_step.get()
        if scope is None:
            raise OutsideStepError(
                f"env.{self.binding}.{call}() was called outside a step; code outside steps "
                f"runs again on every replay, so it would be repeated each time. Call it inside "
                f"step.do(...), which runs it once and stores what it returns (return the "
                f"instance's id, and get() the instance by it in a later step)"
            )
        return scope


class BoundInstance(InstanceHandle):
    """A handle from a :class:`BoundWorkflow`: the client's ``InstanceHandle``
    whose calls, inside a step, end before the attempt does.

    ``wait``, ``result`` and ``watch`` inside a step last no longer than the
    attempt has left (``ResultTimeout`` / ``DeadlineExceeded`` past it), so a
    long child is better awaited by a step that creates it and a later
    ``step.wait_for_event``, or a step that polls ``status()`` with retries.
    """

    __slots__ = ("_bound",)

    def __init__(self, client: Client, id: str, bound: BoundWorkflow) -> None:
        super().__init__(client, id)
        self._bound = bound

    def __repr__(self) -> str:
        return f"BoundInstance({self.id!r} of {self._bound.name!r})"

    async def status(self, *, timeout: float | None = None) -> InstanceStatusInfo:
        return await super().status(timeout=self._bound._timeout(timeout))

    async def wait(self, timeout: float | None = None) -> InstanceStatusInfo:
        # result() waits through this method, so it is bounded here too.
        return await super().wait(_wait_bound(timeout))

    async def result(self, timeout: float | None = None) -> Any:
        """What the instance returned; ``ChildWorkflowFailed`` or
        ``ChildWorkflowTerminated`` (subclasses of the client's
        ``WorkflowFailed`` and ``WorkflowTerminated``, and non-retryable) if
        it did not complete."""
        try:
            return await super().result(timeout)
        except WorkflowFailed as exc:
            raise ChildWorkflowFailed(
                self.id, exc.error_name, exc.error_message, exc.error_traceback
            ) from None
        except WorkflowTerminated:
            raise ChildWorkflowTerminated(self.id) from None

    async def watch(
        self, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        async for event in super().watch(after_sequence, timeout=_wait_bound(timeout)):
            yield event

    async def pause(self, *, timeout: float | None = None) -> InstanceStatus:
        self._bound._require_step("pause")
        return await super().pause(timeout=self._bound._timeout(timeout))

    async def resume(self, *, timeout: float | None = None) -> InstanceStatus:
        self._bound._require_step("resume")
        return await super().resume(timeout=self._bound._timeout(timeout))

    async def terminate(
        self, *, rollback: bool = False, timeout: float | None = None
    ) -> InstanceStatus:
        self._bound._require_step("terminate")
        return await super().terminate(rollback=rollback, timeout=self._bound._timeout(timeout))

    async def restart(
        self,
        *,
        from_step: str | None = None,
        occurrence: int = 1,
        reason: str = "",
        timeout: float | None = None,
    ) -> InstanceStatus:
        self._bound._require_step("restart")
        return await super().restart(
            from_step=from_step,
            occurrence=occurrence,
            reason=reason,
            timeout=self._bound._timeout(timeout),
        )

    async def repair(
        self,
        step: str,
        *,
        reason: str,
        output: Any = _NO_OUTPUT,
        retry: bool = False,
        occurrence: int = 1,
        timeout: float | None = None,
    ) -> RepairInfo:
        self._bound._require_step("repair")
        return await super().repair(
            step, reason=reason, output=output, retry=retry, occurrence=occurrence,
            timeout=self._bound._timeout(timeout),
        )  # fmt: skip

    async def send_event(
        self, type: str, payload: Any = None, *, timeout: float | None = None
    ) -> None:
        self._bound._require_step("send_event")
        await super().send_event(type, payload, timeout=self._bound._timeout(timeout))
