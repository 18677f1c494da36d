"""What every benchmark mode shares: the server process, its config, the client's loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc

from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    Stub = pb_grpc.WorkflowServiceAsyncStub

ROOT = Path(__file__).resolve().parent.parent
LISTENING = "cruzflow listening on "
HTTP_LISTENING = "cruzflow http listening on "
# The workflows of bench/workflows.py, by the names the config gives them.
WORKFLOW = "bench-three-steps"
SLOW_WORKFLOW = "bench-slow-step"
SLEEPER_WORKFLOW = "bench-sleeper"
FAN_OUT_WORKFLOW = "bench-fan-out"
W4_STEPS = 100
"""W4: the steps one instance runs at once (then one more that sums them)."""
# Where bench.workflows appends a line per step body it runs (see there).
MARKS_ENV = "CRUZFLOW_BENCH_MARKS"
# The server's PostgreSQL URL, in its environment rather than its config file.
STORE_URL_ENV = "CRUZFLOW_STORE_URL"
# The start lines of fsync-like calls; strace splits a call that another thread
# interrupts into "<unfinished ...>" and "<... resumed>", and only the first
# names the call with its parenthesis.
_FSYNC_LINE = re.compile(rb"\b(?:fsync|fdatasync)\(")


def has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_factory(uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not uvloop:
        return None
    import uvloop as uv

    return uv.new_event_loop


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile: a value that was measured, never interpolated."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Store:
    """Where the bench's servers keep their state.

    Without ``url``, each server has a SQLite file of its own (store.db in its
    folder). With it, the servers share that PostgreSQL database, each with a
    lease on the instances it runs that lives ``lease_period_s`` unrenewed.
    """

    url: str | None = None
    lease_period_s: float = 2.0

    def env(self) -> dict[str, str]:
        """What a server's environment needs for this store."""
        return {} if self.url is None else {STORE_URL_ENV: self.url}


SQLITE = Store()


def write_config(
    directory: Path,
    *,
    uvloop: bool,
    rpc_spans: str = "all",
    store: Store = SQLITE,
    http: bool = False,
) -> Path:
    """The config of a bench server in ``directory`` (made if missing); its path.

    A PostgreSQL store's URL is not in it: the server has it from
    ``Store.env()``, so no password is written to a file.
    """
    # python_path is relative to the config's folder, which is a temp folder
    # here, so the repository root goes in as an absolute path found at runtime.
    directory.mkdir(parents=True, exist_ok=True)
    if store.url is None:
        store_lines = ['path = "store.db"']
    else:
        # A number of milliseconds.
        store_lines = [f"lease_period = {round(store.lease_period_s * 1000)}"]
    lines = [
        'name = "cruzflow-bench"',
        f"python_path = [{json.dumps(str(ROOT))}]",
        "[server]",
        'listen = "127.0.0.1:0"',
        'grace_period = "5 seconds"',
        f"uvloop = {'true' if uvloop else 'false'}",
        *(["[http]", 'listen = "127.0.0.1:0"'] if http else []),
        "[store]",
        *store_lines,
        "[limits]",
        "max_running_instances = 10000",
        "[[workflows]]",
        'binding = "THREE_STEPS"',
        f'name = "{WORKFLOW}"',
        'class_name = "bench.workflows:ThreeSteps"',
        "[[workflows]]",
        'binding = "SLOW_STEP"',
        f'name = "{SLOW_WORKFLOW}"',
        'class_name = "bench.workflows:SlowStep"',
        "[[workflows]]",
        'binding = "SLEEPER"',
        f'name = "{SLEEPER_WORKFLOW}"',
        'class_name = "bench.workflows:Sleeper"',
        "[[workflows]]",
        'binding = "FAN_OUT"',
        f'name = "{FAN_OUT_WORKFLOW}"',
        'class_name = "bench.workflows:FanOut"',
        "[telemetry]",
        f'rpc_spans = "{rpc_spans}"',
    ]
    path = directory / "cruzflow.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def open_channels(address: str, count: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool gives each channel its own TCP connection;
    # otherwise channels with equal arguments share one.
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(ch.channel_ready() for ch in channels))
    except BaseException:
        await asyncio.gather(*(ch.close() for ch in channels))
        raise
    return channels


class Server:
    """``cruzflow serve`` in a child process, optionally under strace.

    Under strace, ``--seccomp-bpf`` stops the server only on fsync and
    fdatasync, and strace writes one line per call, read between phases.
    ``start`` may be called again after ``stop`` or ``kill``: the same
    config and store, a new port.
    """

    def __init__(
        self, config: Path, *, strace: bool = False, env: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        self.folder = config.parent
        self.trace_path = self.folder / "fsync.trace" if strace else None
        self.log_path = self.folder / "server.log"
        self.env = {**os.environ, **env} if env else None
        self.address = ""
        self.http_address = ""
        """host:port of the HTTP listener, when the config has one."""
        self.pid = 0
        # time.time() just before the process was started, and once it listened.
        self.started_at = 0.0
        self.listening_at = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: queue.Queue[bytes] = queue.Queue()

    def start(self, timeout: float = 30.0) -> None:
        command = [
            sys.executable,
            "-m",
            "cruzflow.server.cli",
            "serve",
            "--config",
            str(self.config),
        ]
        if self.trace_path is not None:
            command = [
                "strace",
                "-f",
                "--seccomp-bpf",
                "-qq",
                "-e",
                "trace=fsync,fdatasync",
                "-e",
                "signal=none",
                "-o",
                str(self.trace_path),
                *command,
            ]
        self.address = self.http_address = ""
        self._lines = queue.Queue()
        with open(self.log_path, "ab") as log:
            self.started_at = time.time()
            self._proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, cwd=self.folder, env=self.env
            )
        assert self._proc.stdout is not None
        # A thread keeps the pipe drained, so the server never blocks on a full
        # stdout, and lets the wait for the first line have a deadline.
        threading.Thread(
            target=self._drain, args=(self._proc.stdout, self._lines), daemon=True
        ).start()
        deadline = time.monotonic() + timeout
        while not self.address:
            left = deadline - time.monotonic()
            if left <= 0 or self._proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.log_tail()}")
            with contextlib.suppress(queue.Empty):
                line = self._lines.get(timeout=min(left, 0.5)).decode(errors="replace")
                if line.startswith(LISTENING):
                    self.listening_at = time.time()
                    self.address = line[len(LISTENING) :].strip()
        # The HTTP listener's line follows at once, when there is one.
        if "[http]" in self.config.read_text():
            line = self._lines.get(timeout=max(1.0, deadline - time.monotonic())).decode()
            if not line.startswith(HTTP_LISTENING):
                raise RuntimeError(f"expected {HTTP_LISTENING!r}, got {line!r}")
            self.http_address = line[len(HTTP_LISTENING) :].strip()
        self.pid = self._server_pid()

    @staticmethod
    def _drain(stream: IO[bytes], lines: queue.Queue[bytes]) -> None:
        for line in stream:
            lines.put(line)

    def _server_pid(self) -> int:
        assert self._proc is not None
        if self.trace_path is None:
            return self._proc.pid
        # Under strace the server is strace's only child.
        children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children")
        pids = children.read_text().split()
        if len(pids) != 1:
            raise RuntimeError(f"expected one child of strace, found {pids}")
        return int(pids[0])

    def cpu_seconds(self, *, loop_only: bool = False) -> float:
        """User plus system CPU of the server so far: all threads, or the main one.

        The main thread runs the event loop, so its share tells whether the
        loop is the bound; the others are aiosqlite's and gRPC's threads.
        """
        where = f"/proc/{self.pid}/task/{self.pid}/stat" if loop_only else f"/proc/{self.pid}/stat"
        stat = Path(where).read_text()
        # Fields after the command name, which may hold spaces, start at field 3.
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory_kb(self) -> dict[str, int]:
        """The server's VmRSS, VmHWM, RssAnon and RssFile, in kB (from /proc)."""
        wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
        found: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0])
        return found

    def rss_mb(self) -> float:
        return self.memory_kb().get("VmRSS", 0) / 1024

    def traced_fsyncs(self) -> int:
        assert self.trace_path is not None
        return len(_FSYNC_LINE.findall(self.trace_path.read_bytes()))

    def kill(self) -> float:
        """SIGKILL the server, as a crash would; time.time() of the signal."""
        proc = self._proc
        assert proc is not None, "the server is not running"
        self._proc = None
        at = time.time()
        for pid in {self.pid, proc.pid} - {0}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        return at

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait for the graceful stop; SIGKILL past ``timeout``."""
        proc = self._proc
        if proc is None:
            return None
        self._proc = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid or proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in {self.pid, proc.pid} - {0}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"
