"""W5: N instances through a workflow limited to L running at once.

All N instances of Limited (two trivial steps; ``concurrency = L`` in its
[[workflows]] entry) are created at once, in batches of 100 (CreateInstances),
on a server and store of their own. The step bodies append a line as they
begin and end (bench/workflows.py); from those lines alone come the most
instances in flight at once (first step begun, last step not yet ended: it
must never pass L) and each instance's queue wait (from the moment its
create was sent to its first step's start). Throughput is N over the time
from the first create sent to the last instance complete.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import (
    MARKS_ENV,
    SQLITE,
    Server,
    Store,
    open_channels,
    percentile,
    write_config,
)
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from bench.harness import Stub

LIMITED_WORKFLOW = "bench-limited"
BATCH = 100
BATCHES_IN_FLIGHT = 8


def _config(folder: Path, server_uvloop: bool, store: Store, limit: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = write_config(folder, uvloop=server_uvloop, store=store)
    entry = (
        f'[[workflows]]\nbinding = "LIMITED"\nname = "{LIMITED_WORKFLOW}"\n'
        f'class_name = "bench.workflows:Limited"\nconcurrency = {limit}\n'
    )
    config.write_text(config.read_text() + entry)
    return config


async def w5(
    folder: Path,
    *,
    n: int = 10_000,
    limit: int = 50,
    timeout: float = 30.0,
    server_uvloop: bool,
    store: Store = SQLITE,
) -> dict[str, Any]:
    """W5 against its own server and store in ``folder``."""
    marks = folder / "marks.log"
    server = Server(
        _config(folder, server_uvloop, store, limit),
        env={MARKS_ENV: str(marks), "OTEL_SDK_DISABLED": "true", **store.env()},
    )
    server.start()
    failures: dict[str, int] = {}
    sent: dict[str, float] = {}
    wall = None
    cpu = 0.0
    try:
        channels = await open_channels(server.address, 4)
        try:
            stubs: list[Stub] = [pb_grpc.WorkflowServiceStub(ch) for ch in channels]
            cpu = server.cpu_seconds()
            wall = await _drive(stubs, n, timeout, sent)
            cpu = server.cpu_seconds() - cpu
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
    except (TimeoutError, grpc.aio.AioRpcError, RuntimeError) as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        failures[f"{type(exc).__name__}: {detail}"] = 1
    finally:
        code = server.stop()
    if code not in (0, None):
        failures[f"server exited with {code}: {server.log_tail(5)}"] = 1
    most, waits, ran = await asyncio.to_thread(_read_marks, marks, sent)
    return {
        "n": n,
        "limit": limit,
        "completed": ran,
        "wall_s": None if wall is None else round(wall, 3),
        "instances_per_s": None if not wall else round(n / wall, 1),
        "max_concurrency": most,
        "queue_wait_p50_ms": round(percentile(waits, 50) * 1000, 1) if waits else None,
        "queue_wait_p99_ms": round(percentile(waits, 99) * 1000, 1) if waits else None,
        "server_cpu_ms_per_instance": round(cpu * 1000 / n, 4) if wall else None,
        "server_exit_code": code,
        "failures": failures,
    }


async def _drive(stubs: list[Stub], n: int, timeout: float, sent: dict[str, float]) -> float:
    """Create every instance (batches of BATCH, BATCHES_IN_FLIGHT at once), then
    wait until all are complete; returns the seconds from the first create."""
    slots = asyncio.Semaphore(BATCHES_IN_FLIGHT)

    async def batch(number: int) -> None:
        ids = [f"w5-{i}" for i in range(number * BATCH, min(n, (number + 1) * BATCH))]
        requests = [
            pb.CreateInstanceRequest(
                workflow=LIMITED_WORKFLOW, instance_id=i, params_json=json.dumps(i)
            )
            for i in ids
        ]
        async with slots:
            now = time.time()
            sent.update(dict.fromkeys(ids, now))
            await stubs[number % len(stubs)].CreateInstances(
                pb.CreateInstancesRequest(requests=requests), timeout=timeout
            )

    start = time.perf_counter()
    await asyncio.gather(*(batch(b) for b in range((n + BATCH - 1) // BATCH)))
    deadline = time.monotonic() + max(timeout, n / 50)
    while True:
        counts = await stubs[0].CountInstances(
            pb.CountInstancesRequest(workflow=LIMITED_WORKFLOW), timeout=timeout
        )
        done = sum(c.count for c in counts.counts if c.status == pb.INSTANCE_STATUS_COMPLETE)
        if done >= n:
            return time.perf_counter() - start
        unfinished = counts.total - done
        if done + unfinished < n or time.monotonic() > deadline:
            raise RuntimeError(f"W5: {done} of {n} instances complete by the deadline")
        await asyncio.sleep(0.02)


def _read_marks(marks: Path, sent: dict[str, float]) -> tuple[int, list[float], int]:
    """The most instances in flight at once, each instance's queue wait (s,
    sorted), and how many instances ended their last step."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    if marks.exists():
        for line in marks.read_text().splitlines():
            at, instance, step, _attempt, phase, _pid = line.split()
            if step == "w5-a" and phase == "begin":
                first.setdefault(instance, float(at))
            elif step == "w5-b" and phase == "end":
                last[instance] = float(at)
    # Ends before begins at the same instant: an instance that ended as the
    # next began was not in flight with it.
    edges = sorted(
        [(at, 1) for at in first.values()] + [(at, -1) for i, at in last.items() if i in first]
    )
    most = now = 0
    for _, change in edges:
        now += change
        most = max(most, now)
    waits = sorted(max(0.0, at - sent[i]) for i, at in first.items() if i in sent)
    return most, waits, len(last)
