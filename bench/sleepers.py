"""``python -m bench.bench --sleepers N``: what N sleeping instances cost the server.

Each instance (bench.workflows:Sleeper) runs one tiny step and then sleeps
durably for a day. A sleeping instance should leave memory: no task, no
coroutine, no handle, only its rows in the store. This mode creates the
sleepers in two stages (a tenth, then the rest), lets each stage settle (the
server's CPU goes idle, then a GetStatus of every instance shows it WAITING),
and reads the server's memory after each. The growth between the two
settled stages, divided by the sleepers added, is the memory a sleeper
holds; a coroutine per sleeper would show as several KB each. The growth
includes fixed costs too (SQLite's page caches, the allocator's arenas after
the burst of creates), so per-sleeper figures mean something only for large
N (100,000: tens to a few hundred bytes each).

It also times GetStatus of one instance (200 calls one after another) with
almost nothing stored and again with N stored, and the server's CPU while
N sleepers wait (the timer loop must not scan them).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import SLEEPER_WORKFLOW, Server, open_channels, percentile, write_config
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from bench.harness import Stub

WAITING = pb.INSTANCE_STATUS_WAITING
LATENCY_CALLS = 200


class Cut(Exception):
    """The time budget ran out."""


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def store_bytes(folder: Path) -> dict[str, int]:
    sizes = {}
    for suffix in ("", "-wal", "-shm"):
        path = folder / f"store.db{suffix}"
        sizes[path.name] = path.stat().st_size if path.exists() else 0
    return sizes


class Sleepers:
    def __init__(
        self, server: Server, stubs: list[Stub], concurrency: int, timeout: float, deadline: float
    ) -> None:
        self.server = server
        self.stubs = stubs
        self.concurrency = concurrency
        self.timeout = timeout
        self.deadline = deadline  # time.monotonic()
        self.ids: list[str] = []
        self.failures: Counter[str] = Counter()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    async def pool(
        self, count: int, work: Callable[[int], Any], reserve: Callable[[], float] | None = None
    ) -> int:
        """``work(i)`` for i in range(count), ``concurrency`` at a time, while more
        than ``reserve()`` seconds of the budget are left; how many ran."""
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < count and self.left() > (reserve() if reserve else 0):
                i = issued
                issued += 1
                try:
                    await work(i)
                except grpc.aio.AioRpcError as exc:
                    self.failures[f"{exc.code().name}: {exc.details()}"[:200]] += 1

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, count))))
        return issued

    async def create(self, count: int) -> dict[str, Any]:
        """``count`` more sleepers, ``concurrency`` in flight; stops early on the budget,
        keeping time to settle and sweep all of them and to measure."""
        first = len(self.ids)
        stubs = self.stubs
        made: list[str] = []
        # Every tenth of the way: how many so far, wall and server CPU seconds.
        every = max(count // 10, 1)
        timeline: list[tuple[int, float, float]] = []

        async def one(i: int) -> None:
            number = first + i
            created = await stubs[number % len(stubs)].CreateInstance(
                pb.CreateInstanceRequest(
                    workflow=SLEEPER_WORKFLOW, params_json=f'{{"n":{number}}}'
                ),
                timeout=self.timeout,
            )
            made.append(created.instance_id)
            if len(made) % every == 0:
                timeline.append((len(made), time.perf_counter() - wall, self.server.cpu_seconds()))

        cpu, loop = self.server.cpu_seconds(), self.server.cpu_seconds(loop_only=True)
        wall = time.perf_counter()

        def reserve() -> float:
            # A GetStatus sweep runs at 3,000-4,500/s on 2 cores; the measuring takes ~10 s.
            return 15.0 + (first + len(made)) / 2000

        await self.pool(count, one, reserve)
        wall = time.perf_counter() - wall
        cpu_total = self.server.cpu_seconds() - cpu
        loop = self.server.cpu_seconds(loop_only=True) - loop
        self.ids.extend(made)
        # Rate and server CPU per create in each tenth: flat if the store's size costs nothing.
        tenths = []
        previous = (0, 0.0, cpu)
        for point in timeline:
            done, took, spent = (b - a for a, b in zip(previous, point, strict=True))
            if done and took > 0:
                tenths.append([round(done / took, 1), round(spent * 1000 / done, 3)])
            previous = point
        return {
            "created": len(made),
            "wall_s": _r(wall),
            "creates_per_s": _r(len(made) / wall, 1) if wall > 0 else None,
            "server_cpu_ms_per_create": _r(cpu_total * 1000 / len(made)) if made else None,
            "server_loop_cpu_ms_per_create": _r(loop * 1000 / len(made)) if made else None,
            "by_tenth_creates_per_s_and_cpu_ms": tenths,
        }

    async def settle(self) -> dict[str, Any]:
        """Wait for the server's CPU to go idle, then until GetStatus shows every
        instance WAITING; how long each took and what the sweep saw."""
        began = time.perf_counter()
        previous = self.server.cpu_seconds()
        while self.left() > 0:
            await asyncio.sleep(0.5)
            now = self.server.cpu_seconds()
            # Under 4% of a core over half a second: the backlog is done.
            if now - previous <= 0.02:
                break
            previous = now
        idle = time.perf_counter() - began
        pending = list(self.ids)
        sweeps: list[dict[str, Any]] = []
        statuses: Counter[str] = Counter()
        while pending and self.left() > 0:
            seen: dict[str, pb.InstanceStatus.ValueType] = {}

            async def one(
                i: int,
                polled: list[str] = pending,
                seen: dict[str, pb.InstanceStatus.ValueType] = seen,
            ) -> None:
                iid = polled[i]
                answer = await self.stubs[i % len(self.stubs)].GetStatus(
                    pb.GetStatusRequest(instance_id=iid), timeout=self.timeout
                )
                seen[iid] = answer.instance.status

            start = time.perf_counter()
            await self.pool(len(pending), one)
            took = time.perf_counter() - start
            statuses = Counter(pb.InstanceStatus.Name(s) for s in seen.values())
            sweeps.append(
                {
                    "polled": len(seen),
                    "wall_s": _r(took),
                    "getstatus_per_s": _r(len(seen) / took, 1) if took > 0 else None,
                    "statuses": dict(statuses),
                }
            )
            pending = [iid for iid in pending if seen.get(iid) != WAITING]
            if pending:
                await asyncio.sleep(0.5)
        if pending:
            raise Cut(
                f"the budget ran out before GetStatus saw {len(pending):,} of "
                f"{len(self.ids):,} instances WAITING"
            )
        return {
            "cpu_idle_after_s": _r(idle),
            "all_waiting_after_s": _r(time.perf_counter() - began),
            "sweeps": sweeps,
        }

    async def latency(self, instance_id: str) -> dict[str, Any]:
        """``LATENCY_CALLS`` GetStatus of one instance, one after another (after 20 unmeasured)."""
        stub = self.stubs[0]
        request = pb.GetStatusRequest(instance_id=instance_id)
        for _ in range(20):
            await stub.GetStatus(request, timeout=self.timeout)
        times = []
        for _ in range(LATENCY_CALLS):
            start = time.perf_counter()
            await stub.GetStatus(request, timeout=self.timeout)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        return {
            "p50_ms": _r(percentile(times, 50)),
            "p90_ms": _r(percentile(times, 90)),
            "p99_ms": _r(percentile(times, 99)),
        }

    def snapshot(self, folder: Path) -> dict[str, Any]:
        mem = self.server.memory_kb()
        return {
            "sleepers": len(self.ids),
            "rss_mb": _r(mem.get("VmRSS", 0) / 1024, 1),
            "rss_anon_mb": _r(mem.get("RssAnon", 0) / 1024, 1),
            "rss_hwm_mb": _r(mem.get("VmHWM", 0) / 1024, 1),
            "store_mb": _r(sum(store_bytes(folder).values()) / 2**20, 1),
        }

    async def idle_cpu(self, seconds: float) -> dict[str, Any]:
        cpu, loop = self.server.cpu_seconds(), self.server.cpu_seconds(loop_only=True)
        await asyncio.sleep(seconds)
        return {
            "seconds": seconds,
            "server_cpu_util": _r((self.server.cpu_seconds() - cpu) / seconds),
            "server_loop_util": _r((self.server.cpu_seconds(loop_only=True) - loop) / seconds),
        }


async def _drive(
    server: Server, n: int, concurrency: int, channels: int, timeout: float, budget: float
) -> dict[str, Any]:
    folder = server.folder
    chans = await open_channels(server.address, channels)
    report: dict[str, Any] = {"n": n, "concurrency": concurrency, "channels": channels}
    s = Sleepers(
        server,
        [pb_grpc.WorkflowServiceStub(ch) for ch in chans],
        concurrency,
        timeout,
        time.monotonic() + budget,
    )
    try:
        report["started"] = s.snapshot(folder)
        # The probe: one sleeper, the instance GetStatus is timed on.
        await s.create(1)
        await s.settle()
        probe = report["probe"] = s.ids[0]
        report["getstatus_1_stored"] = await s.latency(probe)
        idle = s.snapshot(folder)
        report["idle"] = idle
        stages: list[dict[str, Any]] = []
        report["stages"] = stages
        # A tenth, then the rest: the memory between two settled states.
        for count in (max(n // 10, 1), n - max(n // 10, 1)):
            if count <= 0 or s.left() <= 0:
                continue
            stage: dict[str, Any] = {"create": await s.create(count)}
            stages.append(stage)
            stage["settle"] = await s.settle()
            stage["memory"] = s.snapshot(folder)
            if stage["create"]["created"] < count:
                # Measure what there is, but say the run is short.
                report["cut"] = (
                    f"the budget ran out after {len(s.ids):,} of {n + 1:,} creates "
                    f"(time is kept for settling and measuring)"
                )
                break
        final = stages[-1]["memory"] if stages else s.snapshot(folder)
        added = final["sleepers"] - idle["sleepers"]
        report["sleepers"] = final["sleepers"]
        report["rss_mb"] = final["rss_mb"]
        report["rss_growth_mb"] = _r(final["rss_mb"] - idle["rss_mb"], 1)
        report["rss_bytes_per_sleeper"] = (
            round((final["rss_mb"] - idle["rss_mb"]) * 2**20 / added) if added else None
        )
        if len(stages) == 2:
            first, last = stages[0]["memory"], stages[1]["memory"]
            more = last["sleepers"] - first["sleepers"]
            report["rss_bytes_per_sleeper_between_stages"] = (
                round((last["rss_mb"] - first["rss_mb"]) * 2**20 / more) if more else None
            )
        report["store_bytes"] = store_bytes(folder)
        report["store_bytes_per_sleeper"] = (
            round(sum(report["store_bytes"].values()) / final["sleepers"])
            if final["sleepers"]
            else None
        )
        report["getstatus_all_stored"] = {
            "stored": final["sleepers"],
            **await s.latency(probe),
        }
        report["getstatus_newest"] = await s.latency(s.ids[-1])
        report["idle_cpu_with_sleepers"] = await s.idle_cpu(5.0)
        report["after"] = s.snapshot(folder)
    except Cut as exc:
        report["cut"] = str(exc)
    finally:
        await asyncio.gather(*(ch.close() for ch in chans))
    report["failures"] = dict(s.failures)
    return report


async def sleepers(
    folder: Path,
    *,
    n: int,
    concurrency: int,
    channels: int,
    timeout: float,
    budget: float,
    server_uvloop: bool,
) -> dict[str, Any]:
    """The sleepers benchmark against its own server and store in ``folder``."""
    server = Server(write_config(folder, uvloop=server_uvloop))
    server.start()
    try:
        result = await _drive(server, n, concurrency, channels, timeout, budget)
        stopping = time.perf_counter()
        code = server.stop()
        result["stop_s"] = _r(time.perf_counter() - stopping)
        if "probe" in result and not result.get("cut") and code == 0:
            # Sleepers stay in the store across a restart: none may be loaded.
            server.start()
            result["restarted"] = await _restarted(server, result["probe"], timeout)
            code = server.stop()
    finally:
        stopped = server.stop()
    result["server_exit_code"] = code if stopped is None else stopped
    return result


async def _restarted(server: Server, probe: str, timeout: float) -> dict[str, Any]:
    """The restarted server with the sleepers stored: start-up, memory, idle CPU."""
    (chan,) = await open_channels(server.address, 1)
    try:
        answer = await pb_grpc.WorkflowServiceStub(chan).GetStatus(
            pb.GetStatusRequest(instance_id=probe), timeout=timeout
        )
        cpu, loop = server.cpu_seconds(), server.cpu_seconds(loop_only=True)
        await asyncio.sleep(3.0)
        mem = server.memory_kb()
    finally:
        await chan.close()
    return {
        "restart_to_listening_s": _r(server.listening_at - server.started_at),
        "probe_status": pb.InstanceStatus.Name(answer.instance.status),
        "rss_mb": _r(mem.get("VmRSS", 0) / 1024, 1),
        "rss_hwm_mb": _r(mem.get("VmHWM", 0) / 1024, 1),
        "idle_cpu_util_3s": _r((server.cpu_seconds() - cpu) / 3.0),
        "idle_loop_util_3s": _r((server.cpu_seconds(loop_only=True) - loop) / 3.0),
    }


def summary(report: dict[str, Any]) -> list[str]:
    lines = []
    stages = report.get("stages", [])
    for stage in stages:
        if "memory" not in stage:
            continue
        c, st, m = stage["create"], stage["settle"], stage["memory"]
        lines.append(
            f"created {c['created']:,} sleepers in {c['wall_s']} s ({c['creates_per_s']}/s, "
            f"server CPU {c['server_cpu_ms_per_create']} ms each); all WAITING "
            f"{st['all_waiting_after_s']} s later; {m['sleepers']:,} sleeping: RSS "
            f"{m['rss_mb']} MB, store {m['store_mb']} MB"
        )
    if "rss_bytes_per_sleeper" in report:
        lines.append(
            f"{report['sleepers']:,} sleepers: RSS {report['rss_mb']} MB, "
            f"{report['rss_growth_mb']} MB over the idle server "
            f"({report['rss_bytes_per_sleeper']} B per sleeper; "
            f"{report.get('rss_bytes_per_sleeper_between_stages')} B per sleeper between the "
            f"settled stages); store {report['store_bytes_per_sleeper']} B per sleeper"
        )
        one, many = report["getstatus_1_stored"], report["getstatus_all_stored"]
        lines.append(
            f"GetStatus of one instance, p50/p99: {one['p50_ms']}/{one['p99_ms']} ms with 1 "
            f"stored, {many['p50_ms']}/{many['p99_ms']} ms with {many['stored']:,}"
        )
        idle = report["idle_cpu_with_sleepers"]
        lines.append(
            f"server CPU while they sleep: {idle['server_cpu_util']:.1%} of a core "
            f"(event loop {idle['server_loop_util']:.1%}) over {idle['seconds']:g} s"
        )
    if "restarted" in report:
        r = report["restarted"]
        lines.append(
            f"restarted with them stored: listening after {r['restart_to_listening_s']} s, RSS "
            f"{r['rss_mb']} MB (peak {r['rss_hwm_mb']}), idle CPU {r['idle_cpu_util_3s']:.1%}, "
            f"probe {r['probe_status']}"
        )
    if report.get("cut"):
        lines.append(f"CUT: {report['cut']}")
    for problem, count in report.get("failures", {}).items():
        lines.append(f"FAILED {count}x: {problem}")
    return lines
