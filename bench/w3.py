"""W3: kill the server (SIGKILL) while every instance is inside a 2-second step.

N instances of SlowStep (a quick step, a 2 s step, a quick step) are
created at once. When every one is inside its 2 s step (its RUNNING row is
in the store and its body has begun), the server is killed and at once
started again on the same store; a WaitInstance per instance then times
restart to all done.

The interrupted 2 s attempts begin again from their start after the restart,
so no server can finish sooner than 2 s after it: ``after_slow_step_s``
(restart to all done, less 2 s) is what PERFORMANCE.md's "all done within
0.3 s after the 2 s step ends" and Restate's 2.73 s (0.73 s) compare with.

The step bodies append a line each time they begin and end to a side file
(bench/workflows.py), so the figures count what actually ran again: no step
that had completed before the kill may run again, and each interrupted
attempt runs again exactly once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import (
    MARKS_ENV,
    SLOW_WORKFLOW,
    SQLITE,
    Server,
    Store,
    open_channels,
    percentile,
    write_config,
)
from bench.workflows import SLOW_STEP_SECONDS
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from bench.harness import Stub

SLOW = "slow"
# Steps of SlowStep and the attempts each must end with after one kill.
EXPECTED_ATTEMPTS = {"s1": 1, SLOW: 2, "s3": 1}


@dataclass(frozen=True, slots=True)
class Mark:
    at: float
    instance: str
    step: str
    attempt: int
    phase: str
    pid: int = 0
    """The server process that ran the step body."""


def read_marks(path: Path, start: int = 0, end: int | None = None) -> list[Mark]:
    """The marks the step bodies wrote between byte offsets ``start`` and ``end``."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(end - start)
    except FileNotFoundError:
        return []
    marks = []
    for line in data.decode().splitlines():
        at, instance, step, attempt, phase, *pid = line.split()
        marks.append(
            Mark(float(at), instance, step, int(attempt), phase, int(pid[0]) if pid else 0)
        )
    return marks


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _seconds(ts: Any) -> float:
    return float(ts.seconds + ts.nanos / 1e9)


async def _create(stubs: list[Stub], n: int, timeout: float) -> list[str]:
    async def one(i: int) -> str:
        created = await stubs[i % len(stubs)].CreateInstance(
            pb.CreateInstanceRequest(workflow=SLOW_WORKFLOW, params_json=json.dumps({"n": i})),
            timeout=timeout,
        )
        return created.instance_id

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _until_inside(
    stubs: list[Stub], ids: list[str], marks: Path, timeout: float
) -> tuple[set[tuple[str, str]], int]:
    """Poll until every instance is inside the slow step, durably and for real.

    Returns the steps GetStatus showed SUCCEEDED in the last poll of each
    instance, and how many rounds of GetStatus it took.
    """
    pending = set(ids)
    succeeded: set[tuple[str, str]] = set()
    rounds = 0
    deadline = time.monotonic() + timeout
    while True:
        rounds += 1
        if pending:
            polled = list(pending)
            answers = await asyncio.gather(
                *(
                    stubs[i % len(stubs)].GetStatus(
                        pb.GetStatusRequest(instance_id=iid), timeout=timeout
                    )
                    for i, iid in enumerate(polled)
                )
            )
            for iid, answer in zip(polled, answers, strict=True):
                steps = {s.name: s for s in answer.instance.steps}
                slow = steps.get(SLOW)
                if slow is not None and slow.status == pb.STEP_STATUS_RUNNING and slow.attempts:
                    pending.discard(iid)
                    succeeded.update(
                        (iid, s.name)
                        for s in steps.values()
                        if s.status == pb.STEP_STATUS_SUCCEEDED
                    )
        begun = {m.instance for m in read_marks(marks) if m.step == SLOW and m.phase == "begin"}
        if not pending and begun.issuperset(ids):
            return succeeded, rounds
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout:g} s, {len(pending)} instance(s) not RUNNING their slow step "
                f"in the store and {len(set(ids) - begun)} not begun it"
            )
        await asyncio.sleep(0.005)


async def _wait_all(
    stubs: list[Stub], ids: list[str], timeout: float
) -> tuple[dict[str, pb.Instance], dict[str, float], Counter[str]]:
    """A WaitInstance per instance, all at once: the instances and when each answered."""
    instances: dict[str, pb.Instance] = {}
    answered: dict[str, float] = {}
    problems: Counter[str] = Counter()

    async def one(i: int, iid: str) -> None:
        try:
            waited = await stubs[i % len(stubs)].WaitInstance(
                pb.WaitInstanceRequest(instance_id=iid, include_steps=True), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            problems[f"WaitInstance {exc.code().name}: {exc.details()}"] += 1
            return
        answered[iid] = time.time()
        instances[iid] = waited.instance

    await asyncio.gather(*(one(i, iid) for i, iid in enumerate(ids)))
    return instances, answered, problems


async def _drive(
    server: Server, marks: Path, n: int, channels: int, timeout: float
) -> dict[str, Any]:
    chans = await open_channels(server.address, channels)
    try:
        stubs = [pb_grpc.WorkflowServiceStub(ch) for ch in chans]
        begin = time.time()
        ids = await _create(stubs, n, timeout)
        created = time.time()
        # The kill must come before the first slow step ends, 2 s after it began.
        succeeded, rounds = await _until_inside(stubs, ids, marks, SLOW_STEP_SECONDS * 0.75)
        inside = time.time()
        killed_at, cut = _kill(server, marks)
    finally:
        await asyncio.gather(*(ch.close() for ch in chans))
    before = read_marks(marks, 0, cut)

    server.start()
    restarted_at, listening_at = server.started_at, server.listening_at
    chans = await open_channels(server.address, channels)
    try:
        stubs = [pb_grpc.WorkflowServiceStub(ch) for ch in chans]
        instances, answered, problems = await _wait_all(stubs, ids, timeout)
        all_answered = time.time()
    finally:
        await asyncio.gather(*(ch.close() for ch in chans))
    recovery_cpu = server.cpu_seconds()
    after = read_marks(marks, cut)

    # What ran again: a body begun after the restart whose step had completed.
    begun_after = [m for m in after if m.phase == "begin"]
    rerun_completed = sum((m.instance, m.step) in succeeded for m in begun_after)
    slow_reruns = [m for m in begun_after if m.step == SLOW]
    slow_ends = [m.at for m in after if m.step == SLOW and m.phase == "end"]
    slow_begun_before = [m.at for m in before if m.step == SLOW and m.phase == "begin"]

    number = {iid: i for i, iid in enumerate(ids)}
    attempts: dict[str, Counter[int]] = {name: Counter() for name in EXPECTED_ATTEMPTS}
    ends: list[float] = []
    for iid, inst in instances.items():
        if inst.status != pb.INSTANCE_STATUS_COMPLETE:
            problems[f"ended {pb.InstanceStatus.Name(inst.status)}"] += 1
            continue
        if json.loads(inst.output_json)["params"]["n"] != number[iid]:
            problems["wrong output"] += 1
        ends.append(_seconds(inst.end_time))
        for s in inst.steps:
            attempts.setdefault(s.name, Counter())[s.attempts] += 1
    for name, want in EXPECTED_ATTEMPTS.items():
        wrong = sum(c for a, c in attempts[name].items() if a != want)
        if wrong:
            problems[f"step {name!r}: {wrong} instance(s) with attempts != {want}"] += 1
    if rerun_completed:
        problems[f"{rerun_completed} completed step(s) ran again after the restart"] += 1
    if len(slow_reruns) != n:
        problems[f"{len(slow_reruns)} interrupted attempts ran again, not {n}"] += 1
    ended_early = sum(m.step == SLOW and m.phase == "end" for m in before)
    if ended_early:
        problems[f"{ended_early} slow step(s) ended before the kill: killed too late"] += 1

    done = len(ends)
    latencies = sorted(answered[iid] - restarted_at for iid in answered)
    restart_to_done = all_answered - restarted_at if done == n else None
    return {
        "n": n,
        "completed": done,
        "slow_step_s": SLOW_STEP_SECONDS,
        # Before the kill.
        "create_s": _r(created - begin),
        "all_inside_slow_step_s": _r(inside - begin),
        "poll_rounds": rounds,
        "killed_into_slow_step_s": {
            "min": _r(killed_at - max(slow_begun_before)) if slow_begun_before else None,
            "max": _r(killed_at - min(slow_begun_before)) if slow_begun_before else None,
        },
        "slow_ended_before_kill": ended_early,
        "kill_to_restart_s": _r(restarted_at - killed_at),
        # From the new process's start (Popen) on.
        "restart_to_listening_s": _r(listening_at - restarted_at),
        "restart_to_first_slow_rerun_s": _r(min(m.at for m in slow_reruns) - restarted_at)
        if slow_reruns
        else None,
        "restart_to_last_slow_rerun_s": _r(max(m.at for m in slow_reruns) - restarted_at)
        if slow_reruns
        else None,
        "restart_to_all_done_s": _r(restart_to_done),
        "restart_to_all_done_server_s": _r(max(ends) - restarted_at) if done == n else None,
        "after_slow_step_s": _r(restart_to_done - SLOW_STEP_SECONDS)
        if restart_to_done is not None
        else None,
        "last_slow_end_to_all_done_s": _r(all_answered - max(slow_ends)) if slow_ends else None,
        "wait_answered_after_restart_p50_s": _r(percentile(latencies, 50)) if latencies else None,
        "server_cpu_s_restart_to_done": _r(recovery_cpu),
        # What ran again.
        "completed_steps_before_kill": len(succeeded),
        "completed_steps_rerun": rerun_completed,
        "interrupted_attempts_rerun": len(slow_reruns),
        "step_bodies_begun_after_restart": dict(Counter(m.step for m in begun_after)),
        "store_attempts": {
            name: {str(a): c for a, c in sorted(counts.items())}
            for name, counts in attempts.items()
        },
        "failures": dict(problems),
    }


def _kill(server: Server, marks: Path) -> tuple[float, int]:
    """SIGKILL the server: when, and how long the marks file was then."""
    killed_at = server.kill()
    # The server is dead: what the file holds now is everything before the kill.
    return killed_at, marks.stat().st_size


def _prepare(folder: Path, server_uvloop: bool, store: Store) -> tuple[Server, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    marks = folder / "marks.log"
    config = write_config(folder, uvloop=server_uvloop, store=store)
    return Server(config, env={MARKS_ENV: str(marks), **store.env()}), marks


async def w3(
    folder: Path,
    *,
    n: int = 200,
    channels: int = 2,
    timeout: float = 30.0,
    server_uvloop: bool,
    store: Store = SQLITE,
) -> dict[str, Any]:
    """W3 against its own server and store in ``folder`` (or its own PostgreSQL
    database: the restarted server takes a new lease, and the killed one's
    instances are free once its lease has expired)."""
    server, marks = _prepare(folder, server_uvloop, store)
    server.start()
    try:
        result = await _drive(server, marks, n, channels, timeout)
    except (TimeoutError, grpc.aio.AioRpcError, RuntimeError) as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        result = {"n": n, "completed": 0, "failures": {f"{type(exc).__name__}: {detail}": 1}}
    finally:
        code = server.stop()
    result["server_exit_code"] = code
    if store.url is not None:
        result["lease_period_s"] = store.lease_period_s
    if code not in (0, None):
        result["failures"][f"server exited with {code}: {server.log_tail(5)}"] = 1
    return result
