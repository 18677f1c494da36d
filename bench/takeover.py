"""W3 with replicas: SIGKILL one of N servers on one PostgreSQL database while
every instance is inside a 2-second step; time the others' takeover.

N servers (``cruzflow serve``, distinct ports, the same config) share a
database of their own. Each holds the instances it runs under a lease that
lives ``lease_period`` unrenewed (2 s in the bench). N instances of SlowStep
(a quick step, a 2 s step, a quick step) are created round-robin over the
servers; a server runs what it is asked to create. When every instance is
inside its 2 s step (RUNNING in the store, its body begun), the last server
is killed with SIGKILL and not restarted.

The killed server's instances are those its lease held just before the kill
(``instances.epoch``), its lease found in the ``servers`` table by its owner
name (``<host>-<server pid>-...``). The lease's expiry is read from the
``servers`` table after the kill, when nothing renews it any more (the
database's clock; the client runs on the same machine, so on the same clock).
Once it has expired the other servers claim those instances (their claim
loops look every min(1 s, lease_period / 5)) and run each interrupted 2 s
attempt again from its start. A WaitInstance per instance, spread over the
surviving servers, times the end.

All the figures start at the lease's expiry: when the others began the
interrupted steps again (the step bodies' marks, bench/workflows.py), when
the last of the killed server's instances was answered COMPLETE
(``expiry_to_all_done_s``) and, less the 2 s step that runs again in full,
what the takeover added (``after_slow_step_s``). The marks also tell which
step bodies ran again: no step that had completed before the kill may
(``completed_steps_rerun``, 0), and exactly the killed server's interrupted
attempts must (one each).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc

from bench.harness import MARKS_ENV, Server, Store, open_channels, write_config
from bench.w3 import SLOW, _create, _kill, _r, _seconds, _until_inside, _wait_all, read_marks
from bench.workflows import SLOW_STEP_SECONDS
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from bench.harness import Stub
    from bench.pg import Postgres

DATABASE = "bench_w3"


def _interleave(stubs: list[list[Stub]]) -> list[Stub]:
    """One list in which index i is a stub of server i mod N (each server's
    channels in turn), as bench.w3's helpers spread by ``i % len(stubs)``."""
    count, per = len(stubs), min(len(s) for s in stubs)
    return [stubs[j % count][(j // count) % per] for j in range(count * per)]


async def _lease_of(conn: asyncpg.Connection, pid: int) -> tuple[int, list[str]] | None:
    """The live lease of the server process ``pid`` and the instances it holds."""
    # The engine names its owner "<host>-<pid>-<random>" (engine/core.py).
    owner = f"{socket.gethostname()}-{pid}-%"
    epoch = await conn.fetchval(
        "SELECT epoch FROM servers WHERE owner LIKE $1 AND expires_at > clock_timestamp()"
        " ORDER BY epoch DESC LIMIT 1",
        owner,
    )
    if epoch is None:
        return None
    rows = await conn.fetch("SELECT id FROM instances WHERE epoch = $1", epoch)
    return int(epoch), [str(r["id"]) for r in rows]


async def _drive(
    servers: list[Server],
    pg: Postgres,
    marks: Path,
    n: int,
    channels: int,
    timeout: float,
    lease_period_s: float,
) -> dict[str, Any]:
    victim, survivors = servers[-1], servers[:-1]
    chans: list[list[grpc.aio.Channel]] = []
    conn = await pg.cluster.admin(DATABASE)
    try:
        for server in servers:
            chans.append(await open_channels(server.address, channels))
        stubs = [[pb_grpc.WorkflowServiceStub(ch) for ch in c] for c in chans]
        everyone = _interleave(stubs)
        begin = time.time()
        ids = await _create(everyone, n, timeout)
        created = time.time()
        # The kill must come before the first slow step ends, 2 s after it began.
        succeeded, rounds = await _until_inside(everyone, ids, marks, SLOW_STEP_SECONDS * 0.75)
        inside = time.time()
        lease = await _lease_of(conn, victim.pid)
        killed_at, cut = _kill(victim, marks)
        if lease is not None:
            epoch, held = lease
            expiry: float = await conn.fetchval(
                "SELECT extract(epoch FROM expires_at)::float8 FROM servers WHERE epoch = $1",
                epoch,
            )
            expiry_source = "the servers table: the killed server's lease's expires_at"
        else:
            # Not found (the engine names its leases otherwise now): what it ran
            # is what it was asked to create, and its lease lives a period at most.
            held = [iid for i, iid in enumerate(ids) if i % len(servers) == len(servers) - 1]
            expiry = killed_at + lease_period_s
            expiry_source = "kill time + lease period (the killed server's lease was not found)"
        await asyncio.gather(*(ch.close() for ch in chans.pop()))
        waits = _interleave(stubs[: len(survivors)])
        instances, answered, problems = await _wait_all(waits, ids, timeout)
        all_answered = time.time()
    finally:
        await asyncio.gather(*(ch.close() for c in chans for ch in c))
        await conn.close()
    before = read_marks(marks, 0, cut)
    after = read_marks(marks, cut)
    mine = set(held)

    begun_after = [m for m in after if m.phase == "begin"]
    rerun_completed = sum((m.instance, m.step) in succeeded for m in begun_after)
    takeovers = [m for m in begun_after if m.step == SLOW and m.instance in mine]
    strays = [m for m in begun_after if m.step == SLOW and m.instance not in mine]
    by_pid = {s.pid: i for i, s in enumerate(servers)}
    taken_by = Counter(f"server{by_pid.get(m.pid, '?')}" for m in takeovers)

    number = {iid: i for i, iid in enumerate(ids)}
    wrong_attempts: Counter[str] = Counter()
    done_at: dict[str, float] = {}
    for iid, inst in instances.items():
        if inst.status != pb.INSTANCE_STATUS_COMPLETE:
            problems[f"ended {pb.InstanceStatus.Name(inst.status)}"] += 1
            continue
        if json.loads(inst.output_json)["params"]["n"] != number[iid]:
            problems["wrong output"] += 1
        done_at[iid] = _seconds(inst.end_time)
        for s in inst.steps:
            want = 2 if s.name == SLOW and iid in mine else 1
            if s.attempts != want:
                wrong_attempts[
                    f"step {s.name!r} of the {'killed' if iid in mine else 'other'} server's instances: attempts != {want}"
                ] += 1
    for problem, count in wrong_attempts.items():
        problems[f"{count} instance(s): {problem}"] += 1
    if rerun_completed:
        problems[f"{rerun_completed} completed step(s) ran again after the kill"] += 1
    if len(takeovers) != len(mine):
        problems[f"{len(takeovers)} interrupted attempts ran again, not {len(mine)}"] += 1
    if strays:
        problems[f"{len(strays)} slow step(s) of the surviving servers' instances ran again"] += 1
    ended_early = sum(m.step == SLOW and m.phase == "end" for m in before)
    if ended_early:
        problems[f"{ended_early} slow step(s) ended before the kill: killed too late"] += 1
    if not mine:
        problems["the killed server held no instance"] += 1

    mine_done = [iid for iid in held if iid in done_at]
    all_mine = bool(mine) and len(mine_done) == len(mine)
    to_done = max(answered[iid] for iid in mine_done) - expiry if all_mine else None
    slow_begun_before = [m.at for m in before if m.step == SLOW and m.phase == "begin"]
    return {
        "n": n,
        "completed": len(done_at),
        "replicas": len(servers),
        "killed": f"server{len(servers) - 1}",
        "killed_held": len(mine),
        "slow_step_s": SLOW_STEP_SECONDS,
        "lease_period_s": lease_period_s,
        "lease_expiry_from": expiry_source,
        # Before the kill.
        "create_s": _r(created - begin),
        "all_inside_slow_step_s": _r(inside - begin),
        "poll_rounds": rounds,
        "killed_into_slow_step_s": {
            "min": _r(killed_at - max(slow_begun_before)) if slow_begun_before else None,
            "max": _r(killed_at - min(slow_begun_before)) if slow_begun_before else None,
        },
        "slow_ended_before_kill": ended_early,
        "kill_to_lease_expiry_s": _r(expiry - killed_at),
        # From the lease's expiry on.
        "expiry_to_first_takeover_s": _r(min(m.at for m in takeovers) - expiry)
        if takeovers
        else None,
        "expiry_to_last_takeover_s": _r(max(m.at for m in takeovers) - expiry)
        if takeovers
        else None,
        "expiry_to_all_done_s": _r(to_done),
        "expiry_to_all_done_server_s": _r(max(done_at[i] for i in mine_done) - expiry)
        if all_mine
        else None,
        "after_slow_step_s": _r(to_done - SLOW_STEP_SECONDS) if to_done is not None else None,
        "kill_to_all_done_s": _r(all_answered - killed_at),
        "taken_over_by": dict(sorted(taken_by.items())),
        # What ran again.
        "completed_steps_before_kill": len(succeeded),
        "completed_steps_rerun": rerun_completed,
        "interrupted_attempts_rerun": len(takeovers),
        "other_slow_steps_rerun": len(strays),
        "step_bodies_begun_after_kill": dict(Counter(m.step for m in begun_after)),
        "failures": dict(problems),
    }


def _prepare(
    folder: Path, pg: Postgres, replicas: int, lease_period_s: float, server_uvloop: bool
) -> tuple[list[Server], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    marks = folder / "marks.log"
    store = Store(pg.database(DATABASE), lease_period_s)
    servers = [
        Server(
            write_config(folder / f"server{i}", uvloop=server_uvloop, store=store),
            env={MARKS_ENV: str(marks), **store.env()},
        )
        for i in range(replicas)
    ]
    return servers, marks


async def w3_replicas(
    folder: Path,
    pg: Postgres,
    *,
    replicas: int,
    lease_period_s: float,
    n: int = 200,
    channels: int = 2,
    timeout: float = 30.0,
    server_uvloop: bool,
) -> dict[str, Any]:
    """W3 with ``replicas`` servers on a database of its own; one is killed."""
    servers, marks = _prepare(folder, pg, replicas, lease_period_s, server_uvloop)
    try:
        for server in servers:
            server.start()
        result = await _drive(servers, pg, marks, n, channels, timeout, lease_period_s)
    except (TimeoutError, grpc.aio.AioRpcError, RuntimeError, asyncpg.PostgresError) as exc:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        result = {"n": n, "completed": 0, "failures": {f"{type(exc).__name__}: {detail}": 1}}
    finally:
        # The killed one is gone already (None).
        codes = [server.stop() for server in servers]
    result["server_exit_codes"] = codes
    for i, (server, code) in enumerate(zip(servers, codes, strict=True)):
        if code not in (0, None):
            result["failures"][f"server{i} exited with {code}: {server.log_tail(5)}"] = 1
    return result
