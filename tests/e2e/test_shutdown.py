"""SIGTERM and the grace period of the real server; one server per store."""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass

import grpc
import pytest

from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import sqlite_only
from tests.e2e import Watcher
from tests.e2e.conftest import ClusterFactory
from tests.procs import wait_for


@dataclass
class Probe:
    """One CreateInstance sent after SIGTERM."""

    instance_id: str
    code: grpc.StatusCode
    details: str
    draining: bool  # the answer came while the attempts in flight had not finished yet


def test_sigterm_lets_running_attempts_finish_and_refuses_new_instances(
    clusters: ClusterFactory,
) -> None:
    """SIGTERM with a 10 s grace: the 2 s attempts finish, the process exits 0.

    After the restart the finished attempts are not run again (attempt stays 1).
    CreateInstance sent during the drain is refused with UNAVAILABLE, and
    whatever the server did accept before it noticed the signal is not lost.
    """
    cluster = clusters(grace="10 seconds")
    server = cluster.start()
    tags = [f"drain{i}" for i in range(4)]
    for tag in tags:
        cluster.create("sleepy", {"seconds": 2, "tag": tag}, instance_id=tag)
    wait_for(lambda: all(cluster.in_attempt(tag, "slow", f"{tag}:slow:1", 1) for tag in tags))
    watcher = Watcher(cluster, tags[0])
    watcher.start()
    newest = cluster.status(tags[0]).last_sequence
    wait_for(lambda: watcher.last >= newest)

    def draining() -> bool:
        return sum(cluster.count(f"{tag}:slow-done") for tag in tags) < len(tags)

    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    probes: list[Probe] = []
    while server.proc.poll() is None and len(probes) < 200:
        instance_id = f"probe{len(probes)}"
        try:
            cluster.stub.CreateInstance(
                pb.CreateInstanceRequest(workflow="three-steps", instance_id=instance_id),
                timeout=10,
            )
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            code, details = exc.code(), exc.details() or ""
        probes.append(Probe(instance_id, code, details, draining()))
        if sum(p.code != grpc.StatusCode.OK for p in probes) >= 20:
            break
    assert server.proc.wait(timeout=30) == 0, cluster.log()

    # The attempts in flight ran to their end; nothing after them started.
    for tag in tags:
        assert cluster.count(f"{tag}:slow-done") == 1
        assert cluster.count(f"{tag}:after") == 0
    # New work was refused while the server was still draining.
    assert any(p.code == grpc.StatusCode.UNAVAILABLE and p.draining for p in probes), probes
    refused = [p for p in probes if p.code != grpc.StatusCode.OK]
    accepted = [p for p in probes if p.code == grpc.StatusCode.OK]
    # gRPC itself answers CANCELLED to a call that arrives in the instant its server
    # begins to stop; either way such a call is not stored (checked below).
    assert {p.code for p in refused} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert not accepted or accepted == probes[: len(accepted)]  # no accept after a refusal
    cluster.check_integrity()

    cluster.start()
    try:
        events = watcher.finish()
    finally:
        watcher.stop()
    done = cluster.finished(tags + [p.instance_id for p in accepted])
    # The watch stream was ended by the stop (UNAVAILABLE) and resumed without loss.
    assert [code for code, _ in watcher.cuts] == [grpc.StatusCode.UNAVAILABLE]
    assert watcher.resumed_after == [watcher.cuts[0][1]]
    assert watcher.cuts[0][1] >= newest
    assert [e.sequence for e in events] == list(range(1, done[tags[0]].last_sequence + 1))
    assert events[-1].status_changed.status == pb.INSTANCE_STATUS_COMPLETE
    for tag in tags:
        instance = done[tag]
        assert instance.status == pb.INSTANCE_STATUS_COMPLETE, instance
        assert json.loads(instance.output_json) == {"slow_attempt": 1, "tag": tag}
        assert [step.attempts for step in instance.steps] == [1, 1, 1]
        assert cluster.count(f"{tag}:before") == 1
        assert cluster.count(f"{tag}:slow:1") == 1
        assert cluster.count(f"{tag}:slow:2") == 0
        assert cluster.count(f"{tag}:slow-done") == 1
        assert cluster.count(f"{tag}:after") == 1
    for probe in accepted:
        assert done[probe.instance_id].status == pb.INSTANCE_STATUS_COMPLETE
    for probe in refused:
        with pytest.raises(grpc.RpcError) as info:
            cluster.status(probe.instance_id)
        assert isinstance(info.value, grpc.Call)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, probe


def test_short_grace_cuts_the_attempt_short_and_it_runs_again(clusters: ClusterFactory) -> None:
    """SIGTERM with a 200 ms grace during an hour-long attempt: exit 0 at once.

    After the restart the cut attempt runs again as attempt 2 and completes.
    """
    cluster = clusters(grace="200 milliseconds")
    server = cluster.start()
    tags = ["cut0", "cut1"]
    for tag in tags:
        cluster.create("long-first-attempt", {"first": 3600, "tag": tag}, instance_id=tag)
    wait_for(lambda: all(cluster.in_attempt(tag, "work", f"{tag}:work:1", 1) for tag in tags))

    try:
        code = server.terminate(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not stop within 20 s of SIGTERM:\n{cluster.log()}")
    assert code == 0, cluster.log()
    for tag in tags:
        assert cluster.count(f"{tag}:work-done") == 0
    cluster.check_integrity()

    cluster.start()
    done = cluster.finished(tags)
    for tag in tags:
        instance = done[tag]
        assert instance.status == pb.INSTANCE_STATUS_COMPLETE, instance
        assert json.loads(instance.output_json) == {"work_attempt": 2, "tag": tag}
        assert [(step.name, step.attempts) for step in instance.steps] == [("work", 2)]
        assert cluster.count(f"{tag}:work:1") == 1
        assert cluster.count(f"{tag}:work:2") == 1
        assert cluster.count(f"{tag}:work-done") == 1


@sqlite_only  # several servers share one PostgreSQL store
def test_a_second_server_on_the_same_store_refuses_to_start(clusters: ClusterFactory) -> None:
    """The store's lock file keeps a second process off it; the first serves on."""
    first = clusters("first")
    first.start()
    before = first.create("three-steps", {"n": 1}, instance_id="before")
    first.finished([before])

    second = clusters("second", store=first.store)
    with pytest.raises(RuntimeError):
        second.start()
    assert second.server.proc is not None
    code = second.server.proc.wait(timeout=30)
    assert code != 0
    assert "another cruzflow server" in second.log()

    # The first server is unharmed and still takes work.
    after = first.create("three-steps", {"n": 2}, instance_id="after")
    done = first.finished([before, after])
    assert all(i.status == pb.INSTANCE_STATUS_COMPLETE for i in done.values())

    # Once the first one stops, the lock is free: the second one starts and sees its data.
    assert first.server.terminate(timeout=30) == 0
    second.start()
    assert second.status("after").status == pb.INSTANCE_STATUS_COMPLETE
    second.kill()
