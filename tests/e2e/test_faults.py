"""Store faults made for real under a running ``cruzflow serve``, and a broken config.

No fakes: a small tmpfs that the test fills up (SQLITE_FULL), another process
holding ``BEGIN EXCLUSIVE`` on the store (SQLITE_BUSY), the immutable flag on
the store's files (root ignores permission bits, not ``chattr +i``), and a
workflow module that raises at import. For each fault the server says what is
wrong, refuses new work with UNAVAILABLE while it lasts, keeps serving reads,
holds the writes it had taken and commits them once the fault is gone, by
itself; the SQLite file passes ``PRAGMA integrity_check`` throughout.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.e2e import Cluster, integrity
from tests.e2e.conftest import ClusterFactory
from tests.procs import ROOT, ServerProcess, wait_for, write_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# The store's own messages, logged once per fault and once on recovery.
FAULT_LOGGED = "store cannot commit"
RECOVERY_LOGGED = "store commits again"


def tries_before_recovery(log: str) -> list[int]:
    """The failed attempts each recovery line reports."""
    return [int(n) for n in re.findall(r"store commits again after [\d.]+ s and (\d+) failed", log)]


def health(cluster: Cluster) -> int:
    with grpc.insecure_channel(cluster.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(response.status)


def create(
    cluster: Cluster, workflow: str, instance_id: str, params: object, timeout: float = 10.0
) -> tuple[grpc.StatusCode, str]:
    """CreateInstance; the status code and details (OK and "" on success)."""
    try:
        cluster.stub.CreateInstance(
            pb.CreateInstanceRequest(
                workflow=workflow, instance_id=instance_id, params_json=json.dumps(params)
            ),
            timeout=timeout,
        )
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def exists(cluster: Cluster, instance_id: str) -> bool:
    try:
        cluster.status(instance_id)
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return False
    return True


def refused_while_failing(cluster: Cluster, instance_id: str) -> str:
    """A create during the fault: UNAVAILABLE at once, with the cause; its details."""
    code, details = create(cluster, "three-steps", instance_id, {"n": 0})
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    return details


def completes(cluster: Cluster, ids: list[str]) -> None:
    for instance_id, instance in cluster.finished(ids, timeout=60).items():
        assert instance.status == pb.INSTANCE_STATUS_COMPLETE, (instance_id, instance)


def sleepers(cluster: Cluster, prefix: str, count: int = 3) -> list[str]:
    """Instances inside a 1.5 s step when the fault begins: they write through it."""
    ids = [f"{prefix}{i}" for i in range(count)]
    for instance_id in ids:
        cluster.create("sleepy", {"seconds": 1.5, "tag": instance_id}, instance_id=instance_id)
    return ids


# ------------------------------------------------------------------ disk full
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of its own, so the test can fill it without filling the machine."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        # Lazy: a server the test left running still has files open on it.
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full (ENOSPC), to the last page."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        size = 1 << 20
        while size >= 512:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_refuses_new_work_keeps_reads_and_recovers_by_itself(
    small_disk: Path, clusters: ClusterFactory
) -> None:
    cluster = clusters(store=small_disk / "store.db")
    cluster.start()
    running = sleepers(cluster, "full-sleepy")
    stored = [f"stored{i}" for i in range(3)]
    for instance_id in stored:
        assert create(cluster, "three-steps", instance_id, {"n": 1}) == (grpc.StatusCode.OK, "")
    filler = fill(small_disk)

    # Large params grow the WAL until SQLite gets ENOSPC. A create whose
    # commit is held waits (its deadline ends the call); once the fault is
    # known, creates are refused at once.
    big = {"pad": "x" * 64 * 1024}
    acked: list[str] = []
    refused: list[tuple[str, str]] = []
    for i in range(400):
        instance_id = f"big{i}"
        code, details = create(cluster, "three-steps", instance_id, big, timeout=3)
        if code == grpc.StatusCode.OK:
            acked.append(instance_id)
        elif code == grpc.StatusCode.UNAVAILABLE:
            refused.append((instance_id, details))
            break
        else:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (code, details)
    assert refused, "the disk never filled up"
    details = refused[0][1]
    assert "disk full" in details and "free space on the disk" in details, details
    assert "retry" in details

    wait_for(lambda: health(cluster) == NOT_SERVING)
    # Reads keep working from the store.
    assert cluster.status(stored[0]).status in (
        pb.INSTANCE_STATUS_RUNNING,
        pb.INSTANCE_STATUS_COMPLETE,
    )
    cluster.check_integrity()

    # SIGKILL in the middle of the fault, and a restart on the still-full disk.
    cluster.kill()
    cluster.start()
    assert exists(cluster, stored[0])
    # The resumed sleepers' first write fails again, and the server says so.
    wait_for(lambda: health(cluster) == NOT_SERVING)
    assert "disk full" in refused_while_failing(cluster, "refused-after-restart")

    # Let the writer try for a while: it must not log each try.
    time.sleep(3)
    filler.unlink()
    wait_for(lambda: health(cluster) == SERVING, timeout=30)
    assert create(cluster, "three-steps", "after-recovery", {"n": 2}) == (grpc.StatusCode.OK, "")
    completes(cluster, [*running, *stored, *acked, "after-recovery"])
    for instance_id in (refused[0][0], "refused-after-restart"):
        assert not exists(cluster, instance_id), f"{instance_id} was refused but stored"

    log = cluster.log()
    assert "disk full" in log
    # Each server logged the fault once and the second its recovery once,
    # however many times the writer tried in between.
    assert log.count(FAULT_LOGGED) == 2, log
    tries = tries_before_recovery(log)
    assert len(tries) == 1 and tries[0] > 3, log
    cluster.kill()


# ---------------------------------------------------------------- locked file
LOCKER = """
import sqlite3, sys
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
connection.execute("ROLLBACK")
"""


def test_a_database_locked_by_another_process_holds_writes_until_it_is_released(
    clusters: ClusterFactory,
) -> None:
    cluster = clusters()
    cluster.start()
    running = sleepers(cluster, "locked-sleepy")
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(cluster.store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdin is not None
        assert locker.stdout.readline().strip() == "locked"
        # Taken before the server knows the store is locked: held, not lost. The
        # call itself ends at its deadline while the server waits for the lock.
        code, _ = create(cluster, "three-steps", "held", {"n": 3}, timeout=2)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # SQLite's busy timeout (5 s) passes, then the fault is known.
        wait_for(lambda: health(cluster) == NOT_SERVING, timeout=30)
        details = refused_while_failing(cluster, "refused")
        assert "database locked" in details and "another process holds a lock" in details
        # Reads go on; control calls are refused like creates.
        assert cluster.status(running[0]).workflow == "sleepy"
        with pytest.raises(grpc.RpcError) as control:
            cluster.stub.TerminateInstance(
                pb.TerminateInstanceRequest(instance_id=running[0]), timeout=10
            )
        assert control.value.code() == grpc.StatusCode.UNAVAILABLE
        cluster.check_integrity()
        locker.stdin.write("\n")
        locker.stdin.flush()
        assert locker.wait(timeout=30) == 0
    finally:
        locker.kill()
        locker.wait()

    wait_for(lambda: health(cluster) == SERVING, timeout=30)
    completes(cluster, [*running, "held"])
    held = cluster.status("held")
    assert json.loads(held.output_json) == {"sum": 6, "params": {"n": 3}}
    assert not exists(cluster, "refused")
    log = cluster.log()
    assert log.count(FAULT_LOGGED) == 1, log
    assert log.count(RECOVERY_LOGGED) == 1, log
    cluster.kill()
    cluster.start()
    completes(cluster, [*running, "held"])
    cluster.kill()


# ------------------------------------------------------------ read-only file
def chattr(flag: str, *paths: Path) -> subprocess.CompletedProcess[str]:
    existing = [str(p) for p in paths if p.exists()]
    return subprocess.run(["chattr", flag, *existing], capture_output=True, text=True)


def store_files(cluster: Cluster) -> list[Path]:
    return [cluster.store.with_name(cluster.store.name + s) for s in ("", "-wal", "-shm")]


@pytest.fixture
def immutable_ok(tmp_path: Path) -> None:
    """Root writes through permission bits; only the immutable flag stops it."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("making a file read-only for root needs chattr and root")
    probe = tmp_path / "probe"
    probe.write_text("x")
    flagged = chattr("+i", probe)
    if flagged.returncode != 0:
        pytest.skip(f"this file system has no immutable flag: {flagged.stderr.strip()}")
    chattr("-i", probe)


@pytest.mark.usefixtures("immutable_ok")
def test_a_read_only_store_refuses_new_work_and_recovers_once_writable(
    clusters: ClusterFactory,
) -> None:
    cluster = clusters()
    cluster.start()
    running = sleepers(cluster, "ro-sleepy")
    files = store_files(cluster)
    try:
        # While the server runs: its database and WAL go read-only under it. Not
        # the -shm: SQLite maps it, and ext4 answers a write fault on a mapping
        # of an immutable file with SIGBUS, which ends the server like a SIGKILL.
        assert chattr("+i", *files[:2]).returncode == 0
        wait_for(lambda: health(cluster) == NOT_SERVING, timeout=30)
        details = refused_while_failing(cluster, "refused-ro")
        assert "read-only" in details and "Operation not permitted" in details, details
        assert "immutable flag" in details
        assert cluster.status(running[0]).workflow == "sleepy"
        cluster.check_integrity()
        assert chattr("-i", *files).returncode == 0
        wait_for(lambda: health(cluster) == SERVING, timeout=30)
        completes(cluster, running)

        # At start: opening the store writes nothing once it exists, so the
        # server starts on the read-only file, serves reads, refuses writes,
        # and reconnects once the file is writable (SQLite never upgrades a
        # connection it opened read-only).
        late = sleepers(cluster, "ro-late")
        cluster.kill()
        # All three now: a starting server maps a -shm it cannot write read-only.
        assert chattr("+i", *files).returncode == 0
        cluster.start()
        assert exists(cluster, late[0])
        wait_for(lambda: health(cluster) == NOT_SERVING, timeout=30)
        assert "read-only" in refused_while_failing(cluster, "refused-ro-start")
        # Let it retry a while: the fault must still be logged once, not per try.
        time.sleep(3)
        cluster.check_integrity()
        assert chattr("-i", *files).returncode == 0
        wait_for(lambda: health(cluster) == SERVING, timeout=30)
    finally:
        chattr("-i", *files)
    completes(cluster, late)
    for instance_id in ("refused-ro", "refused-ro-start"):
        assert not exists(cluster, instance_id)
    log = cluster.log()
    tries = tries_before_recovery(log)
    # One fault and one recovery for each server: the running one, then the one
    # started on the read-only file.
    assert log.count(FAULT_LOGGED) == 2, log
    assert len(tries) == 2 and tries[1] > 3, log
    cluster.kill()


# ----------------------------------------------------- a module that won't import
BROKEN = "raise RuntimeError('the payments SDK needs PAYMENTS_KEY')\n"
FIXED = """
from cruzflow.workflows import WorkflowEntrypoint


class Payments(WorkflowEntrypoint):
    async def run(self, event, step):
        return await step.do("charge", lambda: "charged")
"""


def test_a_workflow_module_that_fails_to_import_stops_the_start_and_touches_nothing(
    tmp_path: Path,
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    module = modules / "fault_payments.py"
    module.write_text(FIXED)
    config = write_config(
        tmp_path,
        {"three-steps": "tests.workflows:ThreeSteps", "payments": "fault_payments:Payments"},
    )
    env = {"PYTHONPATH": os.pathsep.join([str(modules), str(ROOT)])}
    server = ServerProcess(config, env).start()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.WorkflowServiceStub(channel)
        stub.CreateInstance(
            pb.CreateInstanceRequest(workflow="payments", instance_id="p1"), timeout=10
        )
    server.kill()
    store = tmp_path / "store.db"
    before = {p.name: p.read_bytes() for p in tmp_path.glob("store.db*")}

    module.write_text(BROKEN)
    started = subprocess.run(
        [sys.executable, "-m", "cruzflow.server.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        cwd=tmp_path,
    )
    assert started.returncode == 2, started
    assert "cruzflow listening" not in started.stdout
    message = started.stderr
    assert "not starting" in message
    assert "workflows[1].class_name" in message
    assert "cannot import module 'fault_payments'" in message
    assert "RuntimeError: the payments SDK needs PAYMENTS_KEY" in message
    assert "Traceback" not in message
    # The store was not opened: not a byte changed, and it is sound.
    assert {p.name: p.read_bytes() for p in tmp_path.glob("store.db*")} == before
    assert integrity(store) == "ok"

    module.write_text(FIXED)
    server = ServerProcess(config, env).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.WorkflowServiceStub(channel)
            response = stub.WaitInstance(pb.WaitInstanceRequest(instance_id="p1"), timeout=40)
        assert response.instance.status == pb.INSTANCE_STATUS_COMPLETE
        assert json.loads(response.instance.output_json) == "charged"
    finally:
        server.stop()
