"""``make bench``: throughput (W1), latency (W2) and crash recovery (W3) through
the public gRPC API.

Starts the real server (``cruzflow serve``) on a throw-away store, drives it
with grpc.aio clients, prints one JSON line on stdout and a short summary on
stderr, then stops the server with SIGTERM. See PERFORMANCE.md for the work
and the targets: one workflow is three trivial steps. W3 (bench/w3.py) runs
on a server and store of its own, which it kills with SIGKILL and restarts.

With ``--store postgres`` the server runs on a throw-away PostgreSQL cluster
(bench/pg.py), and with ``--replicas N`` N servers share its database: W1
spreads its workflows over them, W2 alternates, and W3 (bench/takeover.py)
kills one of them and times the others' takeover of its instances.

    make bench                       # W1: 2,000 at once; W2: 300 one at a time; W3
    make bench BENCH_ARGS=--quick    # a few seconds, to check that it runs
    make bench BENCH_ARGS="--store postgres --replicas 3"
    python -m bench.bench --sleepers 100000   # only: memory of 100k sleeping instances
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc

from bench.harness import (
    FAN_OUT_WORKFLOW,
    SQLITE,
    W4_STEPS,
    WORKFLOW,
    Server,
    Store,
    has_uvloop,
    loop_factory,
    open_channels,
    percentile,
    write_config,
)
from bench.pg import SETTINGS as PG_SETTINGS
from bench.pg import STATEMENTS as PG_STATEMENTS
from bench.pg import Postgres, phase_figures
from bench.sleepers import sleepers
from bench.sleepers import summary as sleepers_summary
from bench.takeover import w3_replicas
from bench.w3 import w3
from bench.w5 import w5
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.connect_stub import ConnectStub

if TYPE_CHECKING:
    from bench.harness import Stub

    # Workflow number -> the stubs it is created on and waited for on.
    Pick = Callable[[int], tuple[Stub, Stub]]

STEPS_PER_WORKFLOW = 3
# W1 watch-many: workflows created together and followed by one WatchInstances stream.
WATCH_BATCH = 50
TARGET_W1_PER_S = 1500.0
TARGET_W2_P50_MS = 3.5
TARGET_W3_AFTER_SLOW_STEP_S = 0.3
# On PostgreSQL: W1 and W2 with one server; a dead server's instances taken
# over (their interrupted steps begun again elsewhere) within 2 s of its
# lease's expiry.
TARGET_PG_W1_PER_S = 1000.0
TARGET_PG_W2_P50_MS = 5.0
TARGET_PG_TAKEOVER_S = 2.0
_QUOTED = re.compile(r"'[^']*'")
_PERF_EVENTS = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync"


@dataclass(frozen=True, slots=True)
class Options:
    n: int
    concurrency: int
    m: int
    warmup: int
    channels: int
    rpc_timeout: float
    budget: float
    client_uvloop: bool
    server_uvloop: bool
    fsync_method: str
    profile: Path | None
    profile_format: str
    keep: bool
    w3: bool
    w3_n: int
    sleepers: int
    sleepers_concurrency: int
    telemetry: str = "off"
    store: str = "sqlite"
    replicas: int = 1
    lease_period: float = 2.0
    wait_on: str = "same"
    pg_statements: bool = False
    http: bool = True
    w4: int = 20
    w5: int = 10_000
    w5_limit: int = 50


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="Benchmark a real cruzflow server through its gRPC API (W1, W2, W3), "
        "or with --sleepers N, its memory with N instances in a durable sleep.",
    )
    parser.add_argument("--n", type=int, default=2000, help="W1: workflows (default 2000)")
    parser.add_argument(
        "--concurrency", type=int, default=1000, help="W1: workflows in flight (default 1000)"
    )
    parser.add_argument("--m", type=int, default=300, help="W2: workflows one at a time (300)")
    parser.add_argument("--warmup", type=int, default=50, help="workflows before each phase (50)")
    parser.add_argument(
        "--channels", type=int, default=4, help="W1 and --sleepers: client channels (4)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a tiny run: n=200, m=30, warmup=10 (overrides those)"
    )
    parser.add_argument("--rpc-timeout", type=float, default=30.0, help="deadline of each RPC, s")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all the client's work in W1 and W2, warm-ups included; what is left "
        "is cut (90); with --sleepers, for the whole run (600)",
    )
    parser.add_argument("--no-w3", action="store_true", help="skip W3 (kill and restart)")
    parser.add_argument(
        "--no-http",
        action="store_true",
        help="skip W1 and W2 over HTTP/JSON (Connect), run after gRPC's on the same server",
    )
    parser.add_argument(
        "--w3-n", type=int, default=200, help="W3: workflows killed in their 2 s step (200)"
    )
    parser.add_argument(
        "--sleepers",
        type=int,
        default=0,
        metavar="N",
        help="instead of W1-W3: create N instances that sleep for a day and report the "
        "server's memory, store size and GetStatus latency with them stored",
    )
    parser.add_argument(
        "--sleepers-concurrency", type=int, default=500, help="--sleepers: creates in flight (500)"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="client on asyncio's loop")
    parser.add_argument(
        "--no-server-uvloop", action="store_true", help="[server] uvloop = false in the config"
    )
    parser.add_argument(
        "--fsync-method",
        choices=("auto", "perf", "strace", "none"),
        default="auto",
        help="how to count the server's fsyncs: perf tracepoints (auto: if usable), or "
        "strace, which stops the server on every fsync and so slows every commit",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the server with py-spy during each phase into DIR/w1.*, DIR/w2.*",
    )
    parser.add_argument(
        "--profile-format",
        choices=("flamegraph", "raw", "speedscope"),
        default="flamegraph",
        help="py-spy's output: an SVG flame graph, collapsed stacks (text), or speedscope JSON",
    )
    parser.add_argument(
        "--telemetry",
        choices=("off", "otlp", "otlp-writes", "otlp-none"),
        default="off",
        help="otlp: the server exports traces and metrics over OTLP/gRPC to a real receiver "
        "(bench.otlp_sink, in a process of its own) during W1 and W2; otlp-writes: the same "
        'with [telemetry] rpc_spans = "writes" (no server spans for reads); otlp-none: '
        'rpc_spans = "none" (no server spans; the runs sit under the caller\'s span)',
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="sqlite: each server on a SQLite file of its own (the default); postgres: a "
        "throw-away PostgreSQL cluster started from the machine's binaries, which the "
        "server(s) share (synchronous_commit on)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="--store postgres: N servers on the one database (1); W1 spreads its workflows "
        "over them, W2 alternates, W3 kills one of them and times the others' takeover",
    )
    parser.add_argument(
        "--lease-period",
        type=float,
        default=2.0,
        metavar="S",
        help="--store postgres: the servers' [store] lease_period, s (2: a killed server's "
        "instances are taken over soon after)",
    )
    parser.add_argument(
        "--wait-on",
        choices=("same", "next"),
        default="same",
        help="--replicas N: W1 waits for each workflow on the server that created it (same), "
        "or on the next one (next: the wait is told of the run by the database)",
    )
    parser.add_argument(
        "--pg-statements",
        action="store_true",
        help="--store postgres: load pg_stat_statements and report the statements each "
        "phase ran per workflow (round trips; it costs the database some CPU)",
    )
    parser.add_argument(
        "--w4",
        type=int,
        default=20,
        help=f"W4: instances of {W4_STEPS} parallel steps, one at a time, then all at once "
        "(20; 0 skips W4)",
    )
    parser.add_argument(
        "--w5",
        type=int,
        default=10_000,
        help="W5: instances through a workflow with a concurrency limit, all created at once "
        "(10000; 0 skips W5)",
    )
    parser.add_argument(
        "--w5-limit", type=int, default=50, help="W5: the workflow's concurrency limit (50)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    n, m, warmup = args.n, args.m, args.warmup
    if args.quick:
        n, m, warmup = 200, 30, 10
        args.w4 = min(args.w4, 5)
        args.w5 = min(args.w5, 1000)
    for name, value in (("--n", n), ("--m", m), ("--channels", args.channels)):
        if value < 1:
            parser.error(f"{name} must be at least 1")
    if args.w3_n < 1 or args.sleepers < 0 or args.sleepers_concurrency < 1:
        parser.error("--w3-n and --sleepers-concurrency must be at least 1, --sleepers at least 0")
    if args.concurrency < 1 or warmup < 0:
        parser.error("--concurrency must be at least 1 and --warmup at least 0")
    if args.replicas < 1 or (args.replicas > 1 and args.store != "postgres"):
        parser.error("--replicas must be at least 1, and more than 1 only with --store postgres")
    if args.w5_limit < 1:
        parser.error("--w5-limit must be at least 1")
    if args.lease_period <= 0:
        parser.error("--lease-period must be more than 0")
    if args.sleepers and args.store != "sqlite":
        parser.error("--sleepers runs on SQLite only")
    return Options(
        n=n,
        concurrency=args.concurrency,
        m=m,
        warmup=warmup,
        channels=args.channels,
        rpc_timeout=args.rpc_timeout,
        budget=args.budget if args.budget is not None else 600.0 if args.sleepers else 90.0,
        client_uvloop=not args.no_uvloop and has_uvloop(),
        server_uvloop=not args.no_server_uvloop,
        fsync_method=args.fsync_method,
        profile=args.profile,
        profile_format=args.profile_format,
        keep=args.keep,
        w3=not args.no_w3,
        w3_n=args.w3_n,
        sleepers=args.sleepers,
        sleepers_concurrency=args.sleepers_concurrency,
        telemetry=args.telemetry,
        store=args.store,
        replicas=args.replicas,
        lease_period=args.lease_period,
        wait_on=args.wait_on,
        pg_statements=args.pg_statements,
        http=not args.no_http,
        w4=max(args.w4, 0),
        w5=max(args.w5, 0),
        w5_limit=args.w5_limit,
    )


class Sink:
    """``bench.otlp_sink`` in a child process: a real OTLP receiver that counts spans."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.otlp_sink"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("otlp sink listening on "):
            raise RuntimeError(f"the OTLP sink did not start: {line!r}")
        self.endpoint = "http://" + line.split()[-1]

    def env(self) -> dict[str, str]:
        """The server's OTEL_* settings; ones already in the environment win (e.g.
        OTEL_TRACES_SAMPLER, or OTEL_METRICS_EXPORTER=none to measure traces alone)."""
        defaults = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": "5000",
        }
        return {key: os.environ.get(key, value) for key, value in defaults.items()}

    def spans(self) -> int:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("count\n")
        self._proc.stdin.flush()
        return int(self._proc.stdout.readline())

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(10)


# ------------------------------------------------------------------ server
def _works(command: list[str]) -> bool:
    if shutil.which(command[0]) is None:
        return False
    try:
        probe = subprocess.run(command, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and b"not supported" not in probe.stderr


def perf_works() -> bool:
    """Whether perf may count syscall tracepoints here (root or a low perf_event_paranoid)."""
    return _works(["perf", "stat", "-x", ",", "-e", _PERF_EVENTS, "--", "true"])


def strace_works() -> bool:
    """Whether strace can trace a child here (containers often forbid ptrace)."""
    return _works(
        ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=fsync", "-o", os.devnull, "true"]
    )


# ------------------------------------------------------------- side tools
def _interrupt(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bytes:
    """SIGINT (how perf and py-spy finish and write out), then wait; its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err or b""


class FsyncCounter:
    """Counts the fsync and fdatasync calls of some processes during one phase.

    perf counts the syscall tracepoints in the kernel: nothing stops the
    processes. It starts with its counters off and turns them on and off
    through its control FIFO, which acknowledges each command, so the count
    covers exactly the phase and not perf's own start-up. It watches the
    processes ``pids()`` names at the phase's start (``watched``) and, its
    counters being inherited, the processes they start during it (such as
    the PostgreSQL backends the postmaster forks for new connections).
    """

    def __init__(
        self,
        method: str,
        folder: Path,
        pids: Callable[[], Sequence[int]],
        traced: Callable[[], int] | None = None,
        name: str = "perf",
    ) -> None:
        self.method = method
        self._folder = folder
        self._pids = pids
        self._traced = traced
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl = self._ack = -1
        self._start = 0
        self._out = folder / f"{name}.csv"
        self.watched: frozenset[int] = frozenset()

    def begin(self) -> None:
        if self.method == "strace":
            assert self._traced is not None
            self._start = self._traced()
        elif self.method == "perf":
            self._begin_perf()

    def end(self) -> int | None:
        if self.method == "strace":
            assert self._traced is not None
            return self._traced() - self._start
        if self.method == "perf" and self._proc is not None:
            return self._end_perf()
        return None

    def _begin_perf(self) -> None:
        self.watched = frozenset(self._pids())
        folder = Path(tempfile.mkdtemp(dir=self._folder))
        ctl, ack = folder / "ctl", folder / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        self._out.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [
                "perf",
                "stat",
                "-D",
                "-1",
                "--control",
                f"fifo:{ctl},{ack}",
                "-x",
                ",",
                "-e",
                _PERF_EVENTS,
                "-p",
                ",".join(str(pid) for pid in sorted(self.watched)),
                "-o",
                str(self._out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._ack = os.open(ack, os.O_RDONLY | os.O_NONBLOCK)
        deadline = time.monotonic() + 10
        # Opening a FIFO to write fails until its reader, perf, has it open.
        while self._ctl < 0:
            try:
                self._ctl = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"perf did not start: {_interrupt(self._proc)!r}") from None
                time.sleep(0.01)
        self._command(b"enable")

    def _command(self, word: bytes) -> None:
        os.write(self._ctl, word + b"\n")
        # poll, not select: over HTTP/1.1 the client holds a thousand sockets,
        # and select refuses descriptors past 1024.
        waiter = select.poll()
        waiter.register(self._ack, select.POLLIN)
        ready = waiter.poll(10_000)
        if not ready or not os.read(self._ack, 16).startswith(b"ack"):
            raise RuntimeError(f"perf did not acknowledge {word.decode()!r}")

    def _end_perf(self) -> int:
        assert self._proc is not None
        self._command(b"disable")
        err = _interrupt(self._proc)
        self._proc = None
        for fd in (self._ctl, self._ack):
            os.close(fd)
        self._ctl = self._ack = -1
        total = 0
        for line in self._out.read_text().splitlines():
            value, _, rest = line.partition(",")
            if "syscalls:sys_enter_" in rest:
                if not value.isdigit():
                    raise RuntimeError(f"perf could not count: {line!r} {err!r}")
                total += int(value)
        return total


class Profiler:
    """py-spy on the server during one phase, when asked for and installed."""

    def __init__(self, folder: Path | None, fmt: str, pid: int) -> None:
        self._folder = folder
        self._format = fmt
        self._pid = pid
        self._proc: subprocess.Popen[bytes] | None = None
        self._exe = shutil.which("py-spy") or shutil.which(
            "py-spy", path=str(Path(sys.executable).parent)
        )
        self.notes: list[str] = []
        if folder is not None and self._exe is None:
            self.notes.append("py-spy not installed (.venv/bin/pip install py-spy)")

    def begin(self, name: str) -> None:
        if self._folder is None or self._exe is None:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        suffix = {"flamegraph": "svg", "raw": "txt", "speedscope": "json"}[self._format]
        out = self._folder / f"{name.lower()}.{suffix}"
        # --nonblocking: sampling never pauses the server. py-spy still takes
        # CPU from the same two cores, so a profiled run is slower.
        self._proc = subprocess.Popen(
            [
                self._exe,
                "record",
                "--pid",
                str(self._pid),
                "--nonblocking",
                "--rate",
                "250",
                "--format",
                self._format,
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.notes.append(str(out))

    def end(self) -> None:
        if self._proc is None:
            return
        err = _interrupt(self._proc, timeout=60)
        if self._proc.returncode != 0:
            self.notes[-1] += f": py-spy failed: {err.decode(errors='replace').strip()[-300:]}"
        self._proc = None


# ------------------------------------------------------------------ client
@dataclass(slots=True)
class Tally:
    """Outcomes of one phase."""

    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        # Quoted values are mostly instance ids; without them equal faults group.
        reason = _QUOTED.sub("'...'", reason)[:200]
        self.failures[reason] = self.failures.get(reason, 0) + 1

    @property
    def failed(self) -> int:
        return sum(self.failures.values())


async def one_workflow(
    stub: Stub, number: int, timeout: float, how: str = "wait", waiter: Stub | None = None
) -> str | None:
    """One instance, submitted to ``stub`` and followed to its end on ``waiter``
    (the same by default); ``how``: "wait" (CreateInstance, then WaitInstance),
    "watch" (CreateInstance, then a WatchInstance stream) or "run" (one
    RunInstance on ``stub``, which must then be the waiter). None when it
    COMPLETEd."""
    waiter = stub if waiter is None else waiter
    new = pb.CreateInstanceRequest(workflow=WORKFLOW, params_json=f'{{"n":{number}}}')
    try:
        if how == "run":
            assert waiter is stub, "RunInstance waits where it creates"
            ran = await stub.RunInstance(pb.RunInstanceRequest(instance=new), timeout=timeout)
            return _problem(ran.instance, number)
        created = await stub.CreateInstance(new, timeout=timeout)
        if how == "wait":
            waited = await waiter.WaitInstance(
                pb.WaitInstanceRequest(instance_id=created.instance_id), timeout=timeout
            )
            return _problem(waited.instance, number)
        succeeded = 0
        final = pb.INSTANCE_STATUS_UNSPECIFIED
        call = waiter.WatchInstance(
            pb.WatchInstanceRequest(instance_id=created.instance_id), timeout=timeout
        )
        async for event in call:
            kind = event.WhichOneof("event")
            if kind == "step_succeeded":
                succeeded += 1
            elif kind == "status_changed":
                final = event.status_changed.status
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    if final != pb.INSTANCE_STATUS_COMPLETE:
        return f"ended {pb.InstanceStatus.Name(final)}"
    if succeeded != STEPS_PER_WORKFLOW:
        return f"{succeeded} steps succeeded"
    return None


def _problem(instance: pb.Instance, number: int) -> str | None:
    """What is wrong with the final answer for workflow ``number``; None if nothing."""
    if instance.status != pb.INSTANCE_STATUS_COMPLETE:
        return f"ended {pb.InstanceStatus.Name(instance.status)}"
    if json.loads(instance.output_json)["params"].get("n") != number:
        return "wrong output"
    return None


async def watched_batch(
    stub: Stub, numbers: range, timeout: float, waiter: Stub | None = None
) -> list[str | None]:
    """Create an instance per number on ``stub`` and follow them all with one
    WatchInstances stream on ``waiter`` (the same by default); per number, None
    when it COMPLETEd with every step, else what went wrong."""
    waiter = stub if waiter is None else waiter
    problems: dict[str, str | None] = {}
    try:
        created = await asyncio.gather(
            *(
                stub.CreateInstance(
                    pb.CreateInstanceRequest(workflow=WORKFLOW, params_json=f'{{"n":{number}}}'),
                    timeout=timeout,
                )
                for number in numbers
            )
        )
        ids = [c.instance_id for c in created]
        succeeded = dict.fromkeys(ids, 0)
        final = dict.fromkeys(ids, pb.INSTANCE_STATUS_UNSPECIFIED)
        call = waiter.WatchInstances(
            pb.WatchInstancesRequest(instances=[pb.WatchCursor(instance_id=i) for i in ids]),
            timeout=timeout,
        )
        async for message in call:
            for event in message.events:
                kind = event.WhichOneof("event")
                if kind == "step_succeeded":
                    succeeded[event.instance_id] += 1
                elif kind == "status_changed":
                    final[event.instance_id] = event.status_changed.status
    except grpc.aio.AioRpcError as exc:
        return [f"{exc.code().name}: {exc.details()}"] * len(numbers)
    for instance_id in ids:
        if final[instance_id] != pb.INSTANCE_STATUS_COMPLETE:
            problems[instance_id] = f"ended {pb.InstanceStatus.Name(final[instance_id])}"
        elif succeeded[instance_id] != STEPS_PER_WORKFLOW:
            problems[instance_id] = f"{succeeded[instance_id]} steps succeeded"
        else:
            problems[instance_id] = None
    return list(problems.values())


async def run_batches(
    pick: Pick, count: int, concurrency: int, first: int, timeout: float, tally: Tally
) -> None:
    """``count`` workflows, at most ``concurrency`` in flight, in batches of
    WATCH_BATCH created at once and followed by one WatchInstances stream each,
    on the stubs ``pick`` gives the batch's first number."""
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count:
            size = min(WATCH_BATCH, count - issued)
            numbers = range(first + issued, first + issued + size)
            issued += size
            stub, waiter = pick(numbers[0])
            for problem in await watched_batch(stub, numbers, timeout, waiter):
                if problem is None:
                    tally.ok += 1
                else:
                    tally.fail(problem)

    workers = max(1, min(concurrency, count) // WATCH_BATCH)
    await asyncio.gather(*(worker() for _ in range(workers)))


async def run_many(
    pick: Pick,
    count: int,
    concurrency: int,
    first: int,
    timeout: float,
    tally: Tally,
    how: str = "wait",
) -> None:
    """``count`` workflows, at most ``concurrency`` in flight, each on the stubs
    ``pick`` gives its number, followed as ``how`` says (see one_workflow)."""
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count:
            number = first + issued
            issued += 1
            stub, waiter = pick(number)
            problem = await one_workflow(
                stub, number, timeout, how, stub if how == "run" else waiter
            )
            if problem is None:
                tally.ok += 1
            else:
                tally.fail(problem)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


async def run_sequential(
    pick: Pick,
    count: int,
    first: int,
    timeout: float,
    tally: Tally,
    latencies_ms: list[float],
    how: str = "run",
) -> None:
    for number in range(first, first + count):
        stub, waiter = pick(number)
        start = time.perf_counter()
        problem = await one_workflow(stub, number, timeout, how, waiter)
        elapsed = time.perf_counter() - start
        if problem is None:
            tally.ok += 1
            latencies_ms.append(elapsed * 1000)
        else:
            tally.fail(problem)


def _per(value: float | None, count: float, scale: float = 1.0) -> float | None:
    return None if value is None or count <= 0 else round(value * scale / count, 3)


@dataclass(frozen=True, slots=True)
class Database:
    """``--store postgres``: the cluster, and the database the phases run on."""

    pg: Postgres
    name: str


class Bench:
    """The phases, run against one server, or several on one database."""

    def __init__(
        self,
        servers: list[Server],
        stubs: list[list[Stub]],
        opts: Options,
        fsync_method: str,
        db: Database | None = None,
    ):
        self.servers = servers
        self.server = servers[0]
        self.stubs = stubs  # a list of channels' stubs per server
        self.opts = opts
        self.db = db
        self.fsyncs = FsyncCounter(
            fsync_method,
            self.server.folder,
            lambda: [s.pid for s in servers],
            lambda: sum(s.traced_fsyncs() for s in servers),
        )
        # The database's WAL flushes: perf only (strace would stop PostgreSQL).
        self.pg_fsyncs = (
            FsyncCounter(
                "perf" if fsync_method == "perf" else "none",
                self.server.folder,
                db.pg.processes,
                name="perf-postgres",
            )
            if db is not None
            else None
        )
        self._relations: dict[tuple[int, int], str] | None = None
        self.profiler = Profiler(opts.profile, opts.profile_format, self.server.pid)
        self.warm = Tally()
        self.tallies = [self.warm]
        self.cut: list[str] = []
        self.numbered = 0  # workflows issued so far, so each gets its own number
        self.deadline = asyncio.get_running_loop().time() + opts.budget

    def _take(self, count: int) -> int:
        first = self.numbered
        self.numbered += count
        return first

    def spread(self, number: int) -> tuple[Stub, Stub]:
        """W1: workflow ``number`` is created on server ``number % N`` and waited
        for there (``--wait-on same``) or on the next server; its channel there
        goes round-robin. With one server: channel ``number % channels``."""
        count = len(self.stubs)
        server = number % count
        channel = (number // count) % len(self.stubs[server])
        waiter = server if self.opts.wait_on == "same" else (server + 1) % count
        return self.stubs[server][channel], self.stubs[waiter][channel]

    def alternate(self, number: int) -> tuple[Stub, Stub]:
        """W2: workflow ``number`` is created and waited for on server
        ``number % N``, through its first channel."""
        stub = self.stubs[number % len(self.stubs)][0]
        return stub, stub

    async def bounded(self, name: str, work: Awaitable[None]) -> None:
        """Run ``work`` until the run's time budget is spent, then cut it."""
        try:
            async with asyncio.timeout_at(self.deadline):
                await work
        except TimeoutError:
            self.cut.append(f"{name} cut: the {self.opts.budget:g} s budget ran out")

    async def measured(self, name: str, tally: Tally, work: Awaitable[None]) -> dict[str, Any]:
        """Run one phase within the budget; its wall time and costs."""
        servers = self.servers
        pg_start = await self.db.pg.edge() if self.db is not None else None
        if self.db is not None and self.db.pg.statements:
            await self.db.pg.statements_reset()
        if self.pg_fsyncs is not None:
            self.pg_fsyncs.begin()
        self.fsyncs.begin()
        self.profiler.begin(name)
        cpus = [s.cpu_seconds() for s in servers]
        loops = [s.cpu_seconds(loop_only=True) for s in servers]
        client, wall = time.process_time(), time.perf_counter()
        await self.bounded(name, work)
        wall = time.perf_counter() - wall
        client = time.process_time() - client
        cpus = [s.cpu_seconds() - c for s, c in zip(servers, cpus, strict=True)]
        loops = [s.cpu_seconds(loop_only=True) - c for s, c in zip(servers, loops, strict=True)]
        pg_end = await self.db.pg.edge() if self.db is not None else None
        calls = (
            await self.db.pg.statement_calls(self.db.name)
            if self.db is not None and self.db.pg.statements
            else None
        )
        self.profiler.end()
        fsyncs = self.fsyncs.end()
        pg_fsyncs = self.pg_fsyncs.end() if self.pg_fsyncs is not None else None
        done = tally.ok
        cpu, loop = sum(cpus), sum(loops)
        result: dict[str, Any] = {
            "completed": done,
            "failed": tally.failed,
            "wall_s": round(wall, 3),
            "fsyncs": fsyncs,
            "fsyncs_per_wf": _per(fsyncs, done),
            "server_cpu_s": round(cpu, 3),
            "server_cpu_ms_per_wf": _per(cpu, done, 1000),
            "server_cpu_util": _per(cpu, wall),
            "server_loop_cpu_ms_per_wf": _per(loop, done, 1000),
            # With several servers: the busiest event loop's.
            "server_loop_util": _per(max(loops), wall),
            "client_cpu_ms_per_wf": _per(client, done, 1000),
        }
        if len(servers) > 1:
            result["servers_cpu_ms_per_wf"] = [_per(c, done, 1000) for c in cpus]
            result["servers_cpu_util"] = [_per(c, wall) for c in cpus]
            result["servers_loop_util"] = [_per(c, wall) for c in loops]
        if self.db is not None and pg_start is not None and pg_end is not None:
            pg = self.db.pg
            if self._relations is None:
                self._relations = await pg.relations(self.db.name)
            wal = await asyncio.to_thread(pg.wal, pg_start, pg_end, self._relations)
            result.update(phase_figures(pg_start, pg_end, wal, pg_fsyncs, done, wall))
            if pg_fsyncs is not None and self.pg_fsyncs is not None:
                watched = self.pg_fsyncs.watched
                result["pg_fsyncs_processes"] = len(watched)
                # Connections opened during the phase (pools growing); perf
                # counts theirs too, through the postmaster's inherited counters.
                result["pg_processes_started_in_phase"] = len(set(pg.processes()) - watched)
            if calls is not None:
                result["pg_statements_per_wf"] = {
                    query: _per(count, done) for query, count in calls.items()
                }
            pg_cpu = pg_end.cpu_s - pg_start.cpu_s
            result["total_cpu_ms_per_wf"] = _per(cpu + pg_cpu + client, done, 1000)
        return result

    async def w1(self, how: str = "wait", label: str = "") -> dict[str, Any]:
        """N workflows submitted at once, a bounded number in flight; followed
        with WaitInstance (``how="wait"``), a WatchInstance stream each
        ("watch"), a WatchInstances stream per batch of WATCH_BATCH
        ("watch-many"), or submitted and awaited with one RunInstance ("run")."""
        o = self.opts
        name = ("W1" if how == "wait" else f"W1 {how}") + label

        def work(count: int, first: int, tally: Tally) -> Awaitable[None]:
            if how == "watch-many":
                return run_batches(self.spread, count, o.concurrency, first, o.rpc_timeout, tally)
            return run_many(self.spread, count, o.concurrency, first, o.rpc_timeout, tally, how)

        first = self._take(o.warmup)
        await self.bounded(f"{name} warm-up", work(o.warmup, first, self.warm))
        tally = Tally()
        self.tallies.append(tally)
        first = self._take(o.n)
        result = await self.measured(name, tally, work(o.n, first, tally))
        wall = result["wall_s"]
        rss = [s.rss_mb() for s in self.servers]
        figures = {
            "n": o.n,
            "concurrency": min(o.concurrency, o.n),
            "channels": len(self.stubs[0]),
            "workflows_per_s": round(tally.ok / wall, 1),
            "steps_per_s": round(tally.ok * STEPS_PER_WORKFLOW / wall, 1),
            **result,
            "server_rss_mb": round(sum(rss), 1),
        }
        if how == "watch-many":
            figures["watch_batch"] = WATCH_BATCH
        if len(self.servers) > 1:
            figures["servers"] = len(self.servers)
            figures["spread"] = (
                f"workflow k created on server k mod {len(self.servers)} and waited for on "
                + ("the same server" if o.wait_on == "same" else "the next one (k+1 mod N)")
                + f"; {len(self.stubs[0])} channels to each server"
            )
            figures["servers_rss_mb"] = [round(r, 1) for r in rss]
        return figures

    async def w2(self, label: str = "", how: str = "run") -> dict[str, Any]:
        """M workflows one at a time: submit-to-result latency, with one
        RunInstance each (``how="run"``, as the peers' W2 calls), or
        CreateInstance then WaitInstance ("wait")."""
        o = self.opts
        label = label if how == "run" else f" create+wait{label}"
        first = self._take(o.warmup)
        await self.bounded(
            f"W2{label} warm-up",
            run_sequential(self.alternate, o.warmup, first, o.rpc_timeout, self.warm, [], how),
        )
        tally = Tally()
        self.tallies.append(tally)
        lat: list[float] = []
        first = self._take(o.m)
        result = await self.measured(
            f"W2{label}",
            tally,
            run_sequential(self.alternate, o.m, first, o.rpc_timeout, tally, lat, how),
        )
        lat.sort()

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        figures = {
            "m": o.m,
            "p50_ms": ms(percentile(lat, 50) if lat else None),
            "p90_ms": ms(percentile(lat, 90) if lat else None),
            "p99_ms": ms(percentile(lat, 99) if lat else None),
            "mean_ms": ms(sum(lat) / len(lat) if lat else None),
            "min_ms": ms(lat[0] if lat else None),
            "max_ms": ms(lat[-1] if lat else None),
            **result,
        }
        if len(self.servers) > 1:
            figures["spread"] = (
                f"one at a time, alternating: workflow k created and waited for on server "
                f"k mod {len(self.servers)}"
            )
        return figures

    async def w4(self) -> dict[str, Any]:
        """W4: instances of W4_STEPS trivial steps run in parallel (asyncio.gather):
        one instance at a time (its latency), then all of them at once."""
        o = self.opts
        stub = self.stubs[0][0]
        server = self.servers[0]

        async def one(number: int) -> float:
            start = time.perf_counter()
            created = await stub.CreateInstance(
                pb.CreateInstanceRequest(
                    workflow=FAN_OUT_WORKFLOW, params_json=f'{{"n":{number},"steps":{W4_STEPS}}}'
                ),
                timeout=o.rpc_timeout,
            )
            done = await stub.WaitInstance(
                pb.WaitInstanceRequest(instance_id=created.instance_id), timeout=o.rpc_timeout
            )
            if done.instance.status != pb.INSTANCE_STATUS_COMPLETE:
                raise RuntimeError(f"W4 instance ended {done.instance.status}: {done.instance}")
            return (time.perf_counter() - start) * 1000

        await one(-1)  # warm-up
        cpu = server.cpu_seconds()
        self.fsyncs.begin()
        lat = sorted([await one(i) for i in range(o.w4)])
        fsyncs = self.fsyncs.end()
        cpu_one = server.cpu_seconds() - cpu
        cpu = server.cpu_seconds()
        start = time.perf_counter()
        await asyncio.gather(*(one(o.w4 + i) for i in range(o.w4)))
        wall = time.perf_counter() - start
        cpu_all = server.cpu_seconds() - cpu
        steps = o.w4 * (W4_STEPS + 1)
        return {
            "instances": o.w4,
            "parallel_steps": W4_STEPS,
            "one_at_a_time_p50_ms": round(percentile(lat, 50), 2),
            "one_at_a_time_p90_ms": round(percentile(lat, 90), 2),
            "all_at_once_wall_s": round(wall, 3),
            "all_at_once_steps_per_s": round(steps / wall, 1),
            "server_cpu_ms_per_step": round((cpu_one + cpu_all) * 1000 / (2 * steps), 4),
            # One at a time: what storing an instance's 101 steps took.
            "fsyncs_per_instance": None if fsyncs is None else round(fsyncs / o.w4, 2),
        }


async def drive(
    servers: list[Server], opts: Options, fsync_method: str, db: Database | None = None
) -> dict[str, Any]:
    channels: list[list[grpc.aio.Channel]] = []
    # Over HTTP: a Connect client (its own connection pool) per gRPC channel,
    # on HTTP/1.1 (a connection per call in flight) and on HTTP/2.
    http_stubs, http2_stubs = (
        [
            [
                ConnectStub(f"http://{server.http_address}", http2=http2)
                for _ in range(opts.channels)
            ]
            for server in (servers if opts.http else [])
        ]
        for http2 in (False, True)
    )
    http: dict[str, Any] = {}
    try:
        for server in servers:
            channels.append(await open_channels(server.address, opts.channels))
        bench = Bench(
            servers,
            [[pb_grpc.WorkflowServiceStub(ch) for ch in chans] for chans in channels],
            opts,
            fsync_method,
            db,
        )
        w1 = await bench.w1()
        w1_watch = await bench.w1("watch")
        w1_watch_many = await bench.w1("watch-many")
        w1_run = await bench.w1("run")
        w2 = await bench.w2()
        w2_create_wait = await bench.w2(how="wait")
        w4 = await bench.w4() if opts.w4 else None
        if http_stubs:
            bench.stubs = cast("list[list[Stub]]", http_stubs)
            http["w1_http"] = await bench.w1(label=" HTTP/1.1")
            http["w2_http"] = await bench.w2(label=" HTTP/1.1")
            bench.stubs = cast("list[list[Stub]]", http2_stubs)
            http["w1_http2"] = await bench.w1(label=" HTTP/2")
    finally:
        await asyncio.gather(*(ch.close() for chans in channels for ch in chans))
        await asyncio.gather(
            *(stub.close() for stubs in http_stubs + http2_stubs for stub in stubs)
        )
        if db is not None:
            await db.pg.close_admin()
    failures: dict[str, int] = {}
    for tally in bench.tallies:
        for problem, count in tally.failures.items():
            failures[problem] = failures.get(problem, 0) + count
    return {
        "w1": w1,
        "w1_watch": w1_watch,
        "w1_watch_many": w1_watch_many,
        "w1_run": w1_run,
        "w2": w2,
        "w2_create_wait": w2_create_wait,
        **({"w4": w4} if w4 is not None else {}),
        **http,
        "warmup_failed": bench.warm.failed,
        "failures": failures,
        "cut": bench.cut,
        "profile": bench.profiler.notes,
    }


# ------------------------------------------------------------------ report
def machine(opts: Options) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "grpcio": grpc.__version__,
        "client_uvloop": opts.client_uvloop,
        # The server runs on this interpreter, so it has uvloop when we do.
        "server_uvloop": opts.server_uvloop and has_uvloop(),
    }


def _pct(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def _pg_lines(phase: dict[str, Any]) -> Iterator[str]:
    """The PostgreSQL and per-server figures of one phase, when it has them."""
    if "servers_cpu_ms_per_wf" in phase:
        yield (
            f"   each server: CPU {phase['servers_cpu_ms_per_wf']} ms/wf, "
            f"event loop busy {[_pct(u) for u in phase['servers_loop_util']]}"
        )
    if "postgres_cpu_ms_per_wf" not in phase:
        return
    rows = phase["pg_row_writes"]
    yield (
        f"   PostgreSQL CPU {phase['postgres_cpu_ms_per_wf']} ms/wf "
        f"({_pct(phase['postgres_cpu_util'])} of a core); all processes "
        f"{phase['total_cpu_ms_per_wf']} ms/wf; commits {phase['pg_commits_per_wf']}/wf, "
        f"WAL flushes {phase['pg_fsyncs_per_wf']}/wf, WAL {phase['pg_wal_bytes_per_wf']} B/wf"
    )
    yield (
        f"   per commit: {phase['pg_wf_per_commit']} workflows, "
        f"{phase['pg_step_writes_per_commit']} step rows, "
        f"{phase['pg_instance_writes_per_commit']} instance rows, "
        f"{phase['pg_event_writes_per_commit']} event rows "
        f"({rows['steps']} step, {rows['instances']} instance, {rows['events']} event row "
        f"writes in {phase['pg_commits']} commits)"
    )


def summary(report: dict[str, Any]) -> Iterator[str]:
    w1, w2 = report["w1"], report["w2"]
    targets = report["targets"]
    store = report.get("store", {})
    if store.get("kind") == "postgres":
        yield (
            f"store: PostgreSQL {store['postgres'].split()[0]}, {store['replicas']} server(s) on "
            f"one database, lease period {store['lease_period_s']:g} s, synchronous_commit on"
        )
    t1, t2 = targets.get("w1_workflows_per_s"), targets.get("w2_p50_ms")
    ok1 = t1 is not None and w1["workflows_per_s"] >= t1
    ok2 = t2 is not None and w2["p50_ms"] is not None and w2["p50_ms"] < t2
    target1 = f" [target >= {t1:.0f}: {'met' if ok1 else 'MISSED'}]" if t1 is not None else ""
    target2 = f" [target p50 < {t2}: {'met' if ok2 else 'MISSED'}]" if t2 is not None else ""
    yield (
        f"W1 {w1['completed']}/{w1['n']} workflows, {w1['concurrency']} in flight: "
        f"{w1['wall_s']:.2f} s, {w1['workflows_per_s']:.0f} workflows/s, "
        f"{w1['steps_per_s']:.0f} steps/s{target1}"
    )
    if "spread" in w1:
        yield f"   {w1['spread']}"
    yield (
        f"   server CPU {w1['server_cpu_ms_per_wf']} ms/wf ({_pct(w1['server_cpu_util'])} of a "
        f"core; event loop thread {w1['server_loop_cpu_ms_per_wf']} ms/wf, "
        f"{_pct(w1['server_loop_util'])} busy), client CPU {w1['client_cpu_ms_per_wf']} ms/wf, "
        f"fsyncs {w1['fsyncs_per_wf']}/wf"
    )
    yield from _pg_lines(w1)
    ww = report["w1_watch"]
    yield (
        f"W1 with a WatchInstance stream per workflow instead of WaitInstance: "
        f"{ww['workflows_per_s']:.0f} workflows/s, server CPU {ww['server_cpu_ms_per_wf']} ms/wf"
    )
    wm = report.get("w1_watch_many")
    if wm is not None:
        share = wm["workflows_per_s"] / (w1["workflows_per_s"] or 1)
        yield (
            f"W1 with a WatchInstances stream per batch of {wm['watch_batch']} workflows: "
            f"{wm['workflows_per_s']:.0f} workflows/s, {share:.0%} of W1's "
            f"[target >= 90%: {'met' if share >= 0.9 else 'MISSED'}], "
            f"server CPU {wm['server_cpu_ms_per_wf']} ms/wf"
        )
    wr = report.get("w1_run")
    if wr is not None:
        yield (
            f"W1 with one RunInstance per workflow (create and wait in one call): "
            f"{wr['workflows_per_s']:.0f} workflows/s, server CPU {wr['server_cpu_ms_per_wf']} "
            f"ms/wf"
        )
    hw1, hw2, h2w1 = report.get("w1_http"), report.get("w2_http"), report.get("w1_http2")
    if hw1 is not None and hw2 is not None and h2w1 is not None:
        grpc_rate = w1["workflows_per_s"] or 1
        share = hw1["workflows_per_s"] / grpc_rate
        yield (
            f"W1 over HTTP/1.1 JSON (Connect): {hw1['workflows_per_s']:.0f} workflows/s, "
            f"{share:.0%} of gRPC's [target >= 70%: {'met' if share >= 0.7 else 'MISSED'}], "
            f"server CPU {hw1['server_cpu_ms_per_wf']} ms/wf, client CPU "
            f"{hw1['client_cpu_ms_per_wf']} ms/wf; over HTTP/2: {h2w1['workflows_per_s']:.0f} "
            f"workflows/s ({h2w1['workflows_per_s'] / grpc_rate:.0%}), server CPU "
            f"{h2w1['server_cpu_ms_per_wf']} ms/wf"
        )
        yield f"W2 over HTTP/1.1 JSON: p50 {hw2['p50_ms']} ms, p99 {hw2['p99_ms']} ms"
    yield (
        f"W2 {w2['completed']}/{w2['m']} one at a time, a RunInstance each: p50 "
        f"{w2['p50_ms']} ms, p99 {w2['p99_ms']} ms, mean {w2['mean_ms']} ms{target2}"
    )
    wc = report.get("w2_create_wait")
    if wc is not None:
        yield (
            f"   with CreateInstance then WaitInstance instead: p50 {wc['p50_ms']} ms, "
            f"p99 {wc['p99_ms']} ms"
        )
    if "spread" in w2:
        yield f"   {w2['spread']}"
    yield (
        f"   server CPU {w2['server_cpu_ms_per_wf']} ms/wf (event loop thread "
        f"{w2['server_loop_cpu_ms_per_wf']} ms/wf), client CPU "
        f"{w2['client_cpu_ms_per_wf']} ms/wf, fsyncs {w2['fsyncs_per_wf']}/wf"
    )
    yield from _pg_lines(w2)
    w4 = report.get("w4")
    if w4 is not None:
        yield (
            f"W4 {w4['instances']} instances of {w4['parallel_steps']} parallel steps: one at a "
            f"time p50 {w4['one_at_a_time_p50_ms']} ms an instance; all at once "
            f"{w4['all_at_once_steps_per_s']:.0f} steps/s; server CPU "
            f"{w4['server_cpu_ms_per_step']} ms/step, fsyncs {w4['fsyncs_per_instance']} an "
            f"instance one at a time"
        )
    w5 = report.get("w5")
    if w5 is not None:
        yield (
            f"W5 {w5['completed']}/{w5['n']} instances through a concurrency limit of "
            f"{w5['limit']}: {w5['instances_per_s']} instances/s, at most "
            f"{w5['max_concurrency']} in flight (from the step log), queue wait p50 "
            f"{w5['queue_wait_p50_ms']} ms, server CPU {w5['server_cpu_ms_per_instance']} "
            f"ms/instance"
        )
    w = report.get("w3")
    if w is not None and w.get("restart_to_all_done_s") is not None:
        after = w["after_slow_step_s"]
        t3 = targets.get("w3_after_slow_step_s")
        target3 = (
            f"target <= {t3}: {'met' if after <= t3 else 'MISSED'}; " if t3 is not None else ""
        )
        yield (
            f"W3 {w['completed']}/{w['n']} killed (SIGKILL) {w['killed_into_slow_step_s']['min']}-"
            f"{w['killed_into_slow_step_s']['max']} s into their 2 s step: restart to all done "
            f"{w['restart_to_all_done_s']} s, i.e. {after} s after the 2 s step "
            f"[{target3}Restate 2.73 s]"
        )
        yield (
            f"   listening {w['restart_to_listening_s']} s after the restart, the 2 s steps "
            f"begun again from {w['restart_to_first_slow_rerun_s']} to "
            f"{w['restart_to_last_slow_rerun_s']} s, all done {w['last_slow_end_to_all_done_s']} "
            f"s after the last one ended; completed steps run again: "
            f"{w['completed_steps_rerun']} (must be 0), interrupted attempts run again: "
            f"{w['interrupted_attempts_rerun']} (expected {w['n']})"
        )
        if "lease_period_s" in w:
            yield (
                f"   PostgreSQL: the killed server's lease ({w['lease_period_s']:g} s) had to "
                f"expire before the restarted server could take its instances up"
            )
    elif w is not None and w.get("expiry_to_all_done_s") is not None:
        t3 = targets.get("w3_expiry_to_last_takeover_s")
        last = w["expiry_to_last_takeover_s"]
        ok3 = t3 is not None and last is not None and last < t3
        yield (
            f"W3 {w['completed']}/{w['n']} in their 2 s step on {w['replicas']} servers, "
            f"{w['killed']} killed (SIGKILL) {w['killed_into_slow_step_s']['min']}-"
            f"{w['killed_into_slow_step_s']['max']} s into them, holding {w['killed_held']}: "
            f"its lease expired {w['kill_to_lease_expiry_s']} s after the kill; from then, all "
            f"its instances done in {w['expiry_to_all_done_s']} s, i.e. {w['after_slow_step_s']} "
            f"s after the 2 s step run again"
        )
        yield (
            f"   taken over (their 2 s steps begun again) {w['expiry_to_first_takeover_s']} to "
            f"{last} s after the expiry"
            + (f" [target < {t3:g}: {'met' if ok3 else 'MISSED'}]" if t3 is not None else "")
            + f", by {w['taken_over_by']}; completed steps run again: "
            f"{w['completed_steps_rerun']} (must be 0), interrupted attempts run again: "
            f"{w['interrupted_attempts_rerun']} (expected {w['killed_held']})"
        )
    elif w is not None:
        yield f"W3 did not finish: {w['failures']}"
    finished = w is not None and (
        w.get("restart_to_all_done_s") is not None or w.get("expiry_to_all_done_s") is not None
    )
    if w is not None and finished and w.get("failures"):
        yield f"W3 FAILED: {w['failures']}"
    telemetry = report.get("telemetry", {})
    if telemetry.get("mode", "off") != "off":
        yield (
            f"telemetry {telemetry['mode']}: traces and metrics exported over OTLP/gRPC to a "
            f"real receiver, "
            f"{telemetry.get('spans_received')} spans received"
        )
    else:
        yield "telemetry: off (OTEL_SDK_DISABLED=true)"
    m = report["machine"]
    yield (
        f"{m['nproc']} cores, Python {m['python']}, client uvloop "
        f"{'on' if m['client_uvloop'] else 'off'}, server uvloop "
        f"{'on' if m['server_uvloop'] else 'off'}, fsyncs counted by {report['fsync_method']}"
    )
    for problem, count in report["failures"].items():
        yield f"FAILED {count}x: {problem}"
    for reason in report["cut"]:
        yield f"CUT: {reason}"


def choose_fsync_method(wanted: str) -> str:
    if wanted == "auto":
        return "perf" if perf_works() else "none"
    if wanted == "perf" and not perf_works():
        raise SystemExit(
            "bench: perf cannot count syscall tracepoints here; try --fsync-method strace"
        )
    if wanted == "strace" and not strace_works():
        raise SystemExit("bench: strace cannot trace here; try --fsync-method perf")
    return wanted


_METHODS = {
    "perf": f"perf stat -e {_PERF_EVENTS} -p SERVER (in-kernel counts, server never stopped)",
    "strace": "strace -f --seccomp-bpf -e trace=fsync,fdatasync (server stopped on each fsync: "
    "slower commits, larger batches, fewer fsyncs and lower throughput than untraced)",
    "none": "none (perf not usable here; --fsync-method strace to count under strace)",
}


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.sleepers:
        return main_sleepers(opts)
    method = choose_fsync_method(opts.fsync_method)
    folder = Path(tempfile.mkdtemp(prefix="cruzflow-bench-"))
    sink = Sink() if opts.telemetry != "off" else None
    rpc_spans = {"otlp-writes": "writes", "otlp-none": "none"}.get(opts.telemetry, "all")
    env = sink.env() if sink is not None else {"OTEL_SDK_DISABLED": "true"}
    started = time.perf_counter()
    code: int | None = None
    codes: list[int | None] = []
    servers: list[Server] = []
    pg: Postgres | None = None
    telemetry: dict[str, Any] = {"mode": opts.telemetry}
    store_report: dict[str, Any] = {"kind": opts.store, "replicas": opts.replicas}
    try:
        store = SQLITE
        if opts.store == "postgres":
            pg = Postgres(statements=opts.pg_statements)
            store = Store(pg.database("bench"), opts.lease_period)
            store_report.update(_postgres_report(pg, opts))
        # One server: in the run's folder, as ever; several: a folder each.
        folders = (
            [folder]
            if opts.replicas == 1
            else [folder / f"server{i}" for i in range(opts.replicas)]
        )
        servers = [
            Server(
                write_config(
                    d, uvloop=opts.server_uvloop, rpc_spans=rpc_spans, store=store, http=opts.http
                ),
                strace=method == "strace",
                env={**env, **store.env()},
            )
            for d in folders
        ]
        for server in servers:
            server.start()
            print(
                f"server pid {server.pid} on {server.address}, folder {server.folder}",
                file=sys.stderr,
            )
        _quiet_gc()
        db = Database(pg, "bench") if pg is not None else None
        with asyncio.Runner(loop_factory=loop_factory(opts.client_uvloop)) as runner:
            results = runner.run(drive(servers, opts, method, db))
            codes = [server.stop() for server in servers]
            if sink is not None:
                # The server flushed its exporters on the way out.
                telemetry["spans_received"] = sink.spans()
            if opts.w3 and pg is not None and opts.replicas > 1:
                # On servers and a database of their own; one is killed.
                results["w3"] = runner.run(
                    w3_replicas(
                        folder / "w3",
                        pg,
                        replicas=opts.replicas,
                        lease_period_s=opts.lease_period,
                        n=opts.w3_n,
                        timeout=opts.rpc_timeout,
                        server_uvloop=opts.server_uvloop,
                    )
                )
            elif opts.w3:
                # On a server and store of its own, which it kills and restarts.
                own = SQLITE if pg is None else Store(pg.database("bench_w3"), opts.lease_period)
                results["w3"] = runner.run(
                    w3(
                        folder / "w3",
                        n=opts.w3_n,
                        timeout=opts.rpc_timeout,
                        server_uvloop=opts.server_uvloop,
                        store=own,
                    )
                )
            if opts.w5:
                # On a server and store of its own: the limited workflow alone.
                own = SQLITE if pg is None else Store(pg.database("bench_w5"), opts.lease_period)
                results["w5"] = runner.run(
                    w5(
                        folder / "w5",
                        n=opts.w5,
                        limit=opts.w5_limit,
                        timeout=opts.rpc_timeout,
                        server_uvloop=opts.server_uvloop,
                        store=own,
                    )
                )
    finally:
        stopped = [server.stop() for server in servers]
        codes = [c if c is not None else s for c, s in zip(codes or stopped, stopped, strict=True)]
        for server, c in zip(servers, codes, strict=True):
            if c not in (0, None):
                print(f"server exited with {c}:\n{server.log_tail()}", file=sys.stderr)
        # The first failure's exit code, or 0 (None: a server never stopped).
        code = next((c for c in codes if c not in (0, None)), codes[0] if codes else None)
        if sink is not None:
            sink.close()
        if pg is not None:
            pg.close()
        if opts.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report: dict[str, Any] = {
        "bench": "cruzflow",
        "workflow": f"{STEPS_PER_WORKFLOW} trivial steps",
        **results,
        "telemetry": telemetry,
        "fsync_method": _METHODS[method],
        "server_exit_code": code,
        "total_s": round(time.perf_counter() - started, 2),
        "machine": machine(opts),
        "targets": _targets(opts),
        "store": store_report,
    }
    if len(codes) > 1:
        report["server_exit_codes"] = codes
    print(json.dumps(report, separators=(",", ":")), flush=True)
    for line in summary(report):
        print(line, file=sys.stderr)
    clean = not report["failures"] and not report["cut"] and code == 0
    if "w3" in report:
        clean = clean and not report["w3"]["failures"]
    return 0 if clean else 1


def _targets(opts: Options) -> dict[str, float]:
    """PERFORMANCE.md's targets for this run's store and replicas."""
    if opts.store == "sqlite":
        return {
            "w1_workflows_per_s": TARGET_W1_PER_S,
            "w2_p50_ms": TARGET_W2_P50_MS,
            "w3_after_slow_step_s": TARGET_W3_AFTER_SLOW_STEP_S,
        }
    if opts.replicas == 1:
        return {"w1_workflows_per_s": TARGET_PG_W1_PER_S, "w2_p50_ms": TARGET_PG_W2_P50_MS}
    return {"w3_expiry_to_last_takeover_s": TARGET_PG_TAKEOVER_S}


def _postgres_report(pg: Postgres, opts: Options) -> dict[str, Any]:
    return {
        "postgres": pg.version,
        "postgres_started_in_s": round(pg.started_in_s, 2),
        "settings": [
            "synchronous_commit=on (the default)",
            *PG_SETTINGS,
            *([PG_STATEMENTS] if opts.pg_statements else []),
        ],
        "lease_period_s": opts.lease_period,
        "databases": "bench (W1, W2), bench_w3 (W3)",
    }


def _quiet_gc() -> None:
    # The client shares the cores with the server under test. Its cyclic GC
    # walking thousands of live calls is CPU the server does not get, so
    # freeze what is loaded and let the young generation grow large.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)


def main_sleepers(opts: Options) -> int:
    """``--sleepers N``: the server's memory with N instances in a durable sleep."""
    folder = Path(tempfile.mkdtemp(prefix="cruzflow-sleepers-"))
    print(f"{opts.sleepers:,} sleepers, folder {folder}", file=sys.stderr)
    started = time.perf_counter()
    _quiet_gc()
    try:
        with asyncio.Runner(loop_factory=loop_factory(opts.client_uvloop)) as runner:
            results = runner.run(
                sleepers(
                    folder,
                    n=opts.sleepers,
                    concurrency=opts.sleepers_concurrency,
                    channels=opts.channels,
                    timeout=opts.rpc_timeout,
                    budget=opts.budget,
                    server_uvloop=opts.server_uvloop,
                )
            )
    finally:
        if opts.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report: dict[str, Any] = {
        "bench": "cruzflow-sleepers",
        "workflow": "one tiny step, then step.sleep('long', '1 day')",
        **results,
        "total_s": round(time.perf_counter() - started, 2),
        "machine": machine(opts),
    }
    print(json.dumps(report, separators=(",", ":")), flush=True)
    for line in sleepers_summary(report):
        print(line, file=sys.stderr)
    clean = not report["failures"] and not report.get("cut") and report["server_exit_code"] == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
