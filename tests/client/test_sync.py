"""The blocking facade, driven from a plain thread as a script would.

The in-process server runs on the test's event loop, so each script runs in a
worker thread (``asyncio.to_thread``) while the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cruzflow.client import (
    EventKind,
    FailedPrecondition,
    InstanceNotFound,
    InstanceStatus,
    InvalidArgument,
    ResultTimeout,
    SyncClient,
    WorkflowFailed,
    WorkflowNotFound,
    WorkflowTerminated,
)
from tests.conftest import Server

TIMEOUT = 30.0


async def test_sync_client_runs_every_call(server: Server) -> None:
    def script() -> None:
        with SyncClient(server.address) as client:
            assert "three-steps" in {w.name for w in client.list_workflows()}
            binding = client.workflow("three-steps")
            assert binding.name == "three-steps"
            assert binding.run({"s": 0}, timeout=TIMEOUT) == {"sum": 6, "params": {"s": 0}}
            handle = binding.create({"s": 1}, id="sync-1", lookup_key="sync")
            assert handle.result(timeout=TIMEOUT) == {"sum": 6, "params": {"s": 1}}
            events = list(handle.watch())
            assert [e.sequence for e in events] == list(range(1, 9))
            assert events[-1].is_final and events[-1].output == {"sum": 6, "params": {"s": 1}}
            assert list(handle.watch(after_sequence=6)) == events[6:]
            info = handle.status()
            assert info.status is InstanceStatus.COMPLETE and len(info.steps) == 3
            assert binding.get("sync-1").id == "sync-1"
            assert binding.create(id="sync-1", if_exists="return").id == "sync-1"
            assert handle.restart() in (InstanceStatus.RUNNING, InstanceStatus.QUEUED)
            assert handle.wait(timeout=TIMEOUT).status is InstanceStatus.COMPLETE

            batch = binding.create_batch(
                [{"id": f"sync-b{i}", "lookup_key": "sync"} for i in range(3)]
            )
            assert [h.result(timeout=TIMEOUT)["sum"] for h in batch] == [6, 6, 6]
            listed = [i.id for i in client.list_instances(lookup_key="sync", page_size=2)]
            assert listed == ["sync-b2", "sync-b1", "sync-b0", "sync-1"]
            page = client.list_instances_page(lookup_key="sync", page_size=3)
            assert len(page.instances) == 3 and page.next_page_token
            counts = client.count_instances(lookup_key="sync")
            assert (counts.total, counts.of("three-steps", "complete")) == (4, 4)
            assert not client.caller().auth_required

            waiting = client.workflow("approval").create(id="sync-approval")
            with pytest.raises(ResultTimeout):
                waiting.result(timeout=0.1)
            first = next(iter(waiting.watch()))
            assert first.sequence == 1 and first.kind is EventKind.STATUS_CHANGED
            stream = waiting.watch()
            assert next(stream).sequence == 1
            stream.close()  # leaves early; the stream is cancelled
            assert waiting.pause() in (InstanceStatus.PAUSED, InstanceStatus.WAITING_FOR_PAUSE)
            assert waiting.resume() in (InstanceStatus.RUNNING, InstanceStatus.QUEUED)
            waiting.send_event("approval", {"ok": True})
            assert waiting.result(timeout=TIMEOUT)["approved"] == {"ok": True}

            doomed = client.instance(client.workflow("approval").create().id)
            assert doomed.terminate() is InstanceStatus.TERMINATED
            with pytest.raises(WorkflowTerminated):
                doomed.result()
            with pytest.raises(FailedPrecondition):
                doomed.send_event("approval")
            with pytest.raises(WorkflowFailed) as failed:
                client.workflow("raises").create().result(timeout=TIMEOUT)
            assert failed.value.error_name == "ValueError"
            with pytest.raises(InstanceNotFound):
                client.instance("nobody").status()
            with pytest.raises(WorkflowNotFound):
                client.workflow("nothing").create()
            with pytest.raises(InvalidArgument):
                client.workflow("three-steps").create({1, 2})
        with pytest.raises(RuntimeError, match="closed"):
            client.list_workflows()
        client.close()  # twice is harmless

    await asyncio.to_thread(script)


async def test_sync_client_serves_many_threads_at_once(server: Server) -> None:
    def script() -> None:
        with SyncClient(server.address) as client:
            binding = client.workflow("three-steps")

            def run(i: int) -> object:
                return binding.create({"i": i}).result(timeout=TIMEOUT)

            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(run, range(24)))
        assert [r["params"]["i"] for r in results] == list(range(24))  # type: ignore[index]

    await asyncio.to_thread(script)
    # The facade's loop thread ends with close().
    assert not [t for t in threading.enumerate() if t.name == "cruzflow-client"]
