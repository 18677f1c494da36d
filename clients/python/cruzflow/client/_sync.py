"""A blocking facade over the asynchronous client, for scripts.

Every call is run by the asynchronous client on a private event loop in a
daemon thread, so the facade adds no behaviour of its own, and may be used
from any thread, also from several at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Coroutine, Generator, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import grpc

from cruzflow.client._client import (
    _DEFAULT_RECONNECT,
    _DEFAULT_RETRY,
    _NO_OUTPUT,
    DEFAULT_TARGET,
    Client,
    InstanceHandle,
    NewInstance,
    WorkflowBinding,
)
from cruzflow.client._retry import RetryPolicy
from cruzflow.client._types import (
    CallerInfo,
    InstanceCounts,
    InstancePage,
    InstanceStatus,
    InstanceStatusInfo,
    RepairInfo,
    ScheduleInfo,
    WatchEvent,
    WorkflowInfo,
)

__all__ = ["SyncClient", "SyncInstanceHandle", "SyncWorkflowBinding"]

T = TypeVar("T")


class _Loop:
    """An event loop running in a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="cruzflow-client", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the cruzflow client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C in the caller's thread: do not leave the call running.
            future.cancel()
            raise

    def iterate(self, iterator: AsyncGenerator[T, None]) -> Generator[T, None, None]:
        # StopAsyncIteration cannot travel through a concurrent future: a flag does.
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(iterator)
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self.run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]  # set whenever `more` is
        finally:
            if not self.loop.is_closed():
                self.run(iterator.aclose())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class SyncClient:
    """The blocking counterpart of :class:`Client`, for scripts; same arguments.

    ::

        with SyncClient("127.0.0.1:50051") as client:
            instance = client.workflow("onboarding-workflow").create({"userId": "42"})
            for event in instance.watch():
                print(event.sequence, event.kind, event.status)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 10.0,
        retry: RetryPolicy | None = _DEFAULT_RETRY,
        reconnect: RetryPolicy | None = _DEFAULT_RECONNECT,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        # Built first: a bad argument raises before a thread is started.
        self._client = Client(
            target,
            timeout=timeout,
            retry=retry,
            reconnect=reconnect,
            metadata=metadata,
            credentials=credentials,
            token=token,
            channel_options=channel_options,
        )
        self._loop = _Loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the facade's thread. Closing twice is harmless."""
        if not self._loop.loop.is_closed():
            self._loop.run(self._client.close())
        self._loop.close()

    def __repr__(self) -> str:
        return f"Sync{self._client!r}"

    def workflow(self, name: str) -> SyncWorkflowBinding:
        """See :meth:`Client.workflow`."""
        return SyncWorkflowBinding(self._client.workflow(name), self._loop)

    def instance(self, id: str) -> SyncInstanceHandle:
        """See :meth:`Client.instance`."""
        return SyncInstanceHandle(self._client.instance(id), self._loop)

    def watch_many(
        self,
        instances: Mapping[str, int] | Iterable[str | SyncInstanceHandle | tuple[str, int]],
        *,
        timeout: float | None = None,
    ) -> Generator[WatchEvent, None, None]:
        """See :meth:`Client.watch_many`; a plain iterator (``close()`` it to stop early)."""
        given = (
            instances
            if isinstance(instances, Mapping | str | bytes)
            else [item.id if isinstance(item, SyncInstanceHandle) else item for item in instances]
        )
        return self._loop.iterate(self._client.watch_many(given, timeout=timeout))

    def list_workflows(self, *, timeout: float | None = None) -> list[WorkflowInfo]:
        """See :meth:`Client.list_workflows`."""
        return self._loop.run(self._client.list_workflows(timeout=timeout))

    def count_instances(
        self,
        *,
        workflow: str | None = None,
        create_time_min: datetime | None = None,
        create_time_max: datetime | None = None,
        lookup_key: str | None = None,
        timeout: float | None = None,
    ) -> InstanceCounts:
        """See :meth:`Client.count_instances`."""
        return self._loop.run(
            self._client.count_instances(
                workflow=workflow,
                create_time_min=create_time_min,
                create_time_max=create_time_max,
                lookup_key=lookup_key,
                timeout=timeout,
            )
        )

    def caller(self, *, timeout: float | None = None) -> CallerInfo:
        """See :meth:`Client.caller`."""
        return self._loop.run(self._client.caller(timeout=timeout))

    def list_instances_page(
        self,
        *,
        workflow: str | None = None,
        status: InstanceStatus | str | Iterable[InstanceStatus | str] | None = None,
        create_time_min: datetime | None = None,
        create_time_max: datetime | None = None,
        lookup_key: str | None = None,
        parent_id: str | None = None,
        page_size: int | None = None,
        page_token: str | None = None,
        timeout: float | None = None,
        schedule_id: str | None = None,
    ) -> InstancePage:
        """See :meth:`Client.list_instances_page`."""
        return self._loop.run(
            self._client.list_instances_page(
                workflow=workflow,
                status=status,
                create_time_min=create_time_min,
                create_time_max=create_time_max,
                lookup_key=lookup_key,
                parent_id=parent_id,
                page_size=page_size,
                page_token=page_token,
                timeout=timeout,
                schedule_id=schedule_id,
            )
        )

    def list_instances(
        self,
        *,
        workflow: str | None = None,
        status: InstanceStatus | str | Iterable[InstanceStatus | str] | None = None,
        create_time_min: datetime | None = None,
        create_time_max: datetime | None = None,
        lookup_key: str | None = None,
        parent_id: str | None = None,
        page_size: int | None = None,
        timeout: float | None = None,
        schedule_id: str | None = None,
    ) -> Generator[InstanceStatusInfo, None, None]:
        """See :meth:`Client.list_instances`; a plain iterator."""
        return self._loop.iterate(
            self._client.list_instances(
                workflow=workflow,
                status=status,
                create_time_min=create_time_min,
                create_time_max=create_time_max,
                lookup_key=lookup_key,
                parent_id=parent_id,
                page_size=page_size,
                timeout=timeout,
                schedule_id=schedule_id,
            )
        )

    # ---------------------------------------------------------- schedules
    def create_schedule(
        self,
        id: str,
        workflow: str,
        cron: str,
        *,
        params: Any = None,
        timezone: str = "UTC",
        catch_up: str = "once",
        paused: bool = False,
        timeout: float | None = None,
    ) -> ScheduleInfo:
        """See :meth:`Client.create_schedule`."""
        return self._loop.run(
            self._client.create_schedule(
                id,
                workflow,
                cron,
                params=params,
                timezone=timezone,
                catch_up=catch_up,
                paused=paused,
                timeout=timeout,
            )
        )

    def get_schedule(self, id: str, *, timeout: float | None = None) -> ScheduleInfo:
        """See :meth:`Client.get_schedule`."""
        return self._loop.run(self._client.get_schedule(id, timeout=timeout))

    def list_schedules(
        self, *, workflow: str | None = None, timeout: float | None = None
    ) -> list[ScheduleInfo]:
        """See :meth:`Client.list_schedules`."""
        return self._loop.run(self._client.list_schedules(workflow=workflow, timeout=timeout))

    def pause_schedule(self, id: str, *, timeout: float | None = None) -> ScheduleInfo:
        """See :meth:`Client.pause_schedule`."""
        return self._loop.run(self._client.pause_schedule(id, timeout=timeout))

    def resume_schedule(self, id: str, *, timeout: float | None = None) -> ScheduleInfo:
        """See :meth:`Client.resume_schedule`."""
        return self._loop.run(self._client.resume_schedule(id, timeout=timeout))

    def delete_schedule(self, id: str, *, timeout: float | None = None) -> None:
        """See :meth:`Client.delete_schedule`."""
        self._loop.run(self._client.delete_schedule(id, timeout=timeout))

    def trigger_schedule(self, id: str, *, timeout: float | None = None) -> SyncInstanceHandle:
        """See :meth:`Client.trigger_schedule`."""
        handle = self._loop.run(self._client.trigger_schedule(id, timeout=timeout))
        return SyncInstanceHandle(handle, self._loop)


class SyncWorkflowBinding:
    """The blocking counterpart of :class:`WorkflowBinding`."""

    __slots__ = ("_binding", "_loop")

    def __init__(self, binding: WorkflowBinding, loop: _Loop) -> None:
        self._binding = binding
        self._loop = loop

    @property
    def name(self) -> str:
        """The workflow's name."""
        return self._binding.name

    def __repr__(self) -> str:
        return f"Sync{self._binding!r}"

    def create(
        self,
        params: Any = None,
        *,
        id: str | None = None,
        lookup_key: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        if_exists: Literal["error", "return"] = "error",
        timeout: float | None = None,
    ) -> SyncInstanceHandle:
        """See :meth:`WorkflowBinding.create`."""
        handle = self._loop.run(
            self._binding.create(
                params,
                id=id,
                lookup_key=lookup_key,
                priority=priority,
                concurrency_key=concurrency_key,
                if_exists=if_exists,
                timeout=timeout,
            )
        )
        return SyncInstanceHandle(handle, self._loop)

    def run(
        self,
        params: Any = None,
        *,
        id: str | None = None,
        lookup_key: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """See :meth:`WorkflowBinding.run`."""
        return self._loop.run(
            self._binding.run(
                params,
                id=id,
                lookup_key=lookup_key,
                priority=priority,
                concurrency_key=concurrency_key,
                timeout=timeout,
            )
        )

    def create_batch(
        self, items: Iterable[NewInstance | Mapping[str, Any]], *, timeout: float | None = None
    ) -> list[SyncInstanceHandle]:
        """See :meth:`WorkflowBinding.create_batch`."""
        handles = self._loop.run(self._binding.create_batch(items, timeout=timeout))
        return [SyncInstanceHandle(handle, self._loop) for handle in handles]

    def get(self, id: str, *, timeout: float | None = None) -> SyncInstanceHandle:
        """See :meth:`WorkflowBinding.get`."""
        return SyncInstanceHandle(
            self._loop.run(self._binding.get(id, timeout=timeout)), self._loop
        )


class SyncInstanceHandle:
    """The blocking counterpart of :class:`InstanceHandle`."""

    __slots__ = ("_handle", "_loop")

    def __init__(self, handle: InstanceHandle, loop: _Loop) -> None:
        self._handle = handle
        self._loop = loop

    @property
    def id(self) -> str:
        """The instance id."""
        return self._handle.id

    def __repr__(self) -> str:
        return f"Sync{self._handle!r}"

    def status(self, *, timeout: float | None = None) -> InstanceStatusInfo:
        """See :meth:`InstanceHandle.status`."""
        return self._loop.run(self._handle.status(timeout=timeout))

    def export(self, *, timeout: float | None = None) -> dict[str, Any]:
        """See :meth:`InstanceHandle.export`."""
        return self._loop.run(self._handle.export(timeout=timeout))

    def pause(self, *, timeout: float | None = None) -> InstanceStatus:
        """See :meth:`InstanceHandle.pause`."""
        return self._loop.run(self._handle.pause(timeout=timeout))

    def resume(self, *, timeout: float | None = None) -> InstanceStatus:
        """See :meth:`InstanceHandle.resume`."""
        return self._loop.run(self._handle.resume(timeout=timeout))

    def terminate(self, *, rollback: bool = False, timeout: float | None = None) -> InstanceStatus:
        """See :meth:`InstanceHandle.terminate`."""
        return self._loop.run(self._handle.terminate(rollback=rollback, timeout=timeout))

    def restart(
        self,
        *,
        from_step: str | None = None,
        occurrence: int = 1,
        reason: str = "",
        timeout: float | None = None,
    ) -> InstanceStatus:
        """See :meth:`InstanceHandle.restart`."""
        return self._loop.run(
            self._handle.restart(
                from_step=from_step, occurrence=occurrence, reason=reason, timeout=timeout
            )
        )

    def repair(
        self,
        step: str,
        *,
        reason: str,
        output: Any = _NO_OUTPUT,
        retry: bool = False,
        occurrence: int = 1,
        timeout: float | None = None,
    ) -> RepairInfo:
        """See :meth:`InstanceHandle.repair`."""
        return self._loop.run(
            self._handle.repair(
                step, reason=reason, output=output, retry=retry, occurrence=occurrence,
                timeout=timeout,
            )
        )  # fmt: skip

    def send_event(self, type: str, payload: Any = None, *, timeout: float | None = None) -> None:
        """See :meth:`InstanceHandle.send_event`."""
        self._loop.run(self._handle.send_event(type, payload, timeout=timeout))

    def watch(
        self, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Generator[WatchEvent, None, None]:
        """See :meth:`InstanceHandle.watch`; a plain iterator (``close()`` it to stop early)."""
        return self._loop.iterate(self._handle.watch(after_sequence, timeout=timeout))

    def wait(self, timeout: float | None = None) -> InstanceStatusInfo:
        """See :meth:`InstanceHandle.wait`."""
        return self._loop.run(self._handle.wait(timeout))

    def result(self, timeout: float | None = None) -> Any:
        """See :meth:`InstanceHandle.result`."""
        return self._loop.run(self._handle.result(timeout))
