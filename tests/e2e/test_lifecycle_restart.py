"""Sleeps, events and the control RPCs across a SIGKILL of the real server (issue 3).

Each test drives ``cruzflow serve`` processes on one store: it brings an
instance into a sleep, an event wait, a pause or a final status, SIGKILLs the
server (no cleanup of any kind runs), checks the SQLite file with ``PRAGMA
integrity_check``, starts a new process on the same store and checks that the
instance goes on as if nothing had happened: a sleep wakes at its original
time, events are kept and taken once, a paused instance stays paused, a
terminated one stays terminated, and every transition reaches WatchInstance
with consecutive sequence numbers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cruzflow.v1 import workflows_pb2 as pb
from tests.conftest import ON_POSTGRES, Stores
from tests.e2e import WORKFLOWS, Cluster, Watcher
from tests.procs import wait_for, write_config

ClusterFactory = Callable[..., Cluster]

# Workflows these tests add to the e2e set (their classes are in tests/workflows.py).
EXTRA_WORKFLOWS = {"slow-then-waits-twice": "tests.workflows:SlowThenWaitsTwice"}


S = pb.InstanceStatus


@pytest.fixture
def clusters(tmp_path: Path, stores: Stores) -> Iterator[ClusterFactory]:
    """Make clusters under tmp_path, on the run's store; every server process is
    stopped afterwards."""
    made: list[Cluster] = []

    def make(name: str = "cluster", **kwargs: Any) -> Cluster:
        if ON_POSTGRES:
            kwargs.setdefault("store_url", stores.url(name))
        cluster = Cluster(tmp_path / name, **kwargs)
        write_config(
            cluster.directory,
            {**WORKFLOWS, **EXTRA_WORKFLOWS},
            store=str(cluster.store),
            store_url=cluster.store_url,
            lease_period="1 second" if cluster.store_url is not None else None,
        )
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.close()


# ---------------------------------------------------------------- helpers
def ms(timestamp: Timestamp) -> int:
    """A protobuf Timestamp as milliseconds since the epoch."""
    return timestamp.ToMilliseconds()


def steps_by_name(instance: pb.Instance) -> dict[str, pb.Step]:
    return {step.name: step for step in instance.steps}


def status_changes(events: Sequence[pb.WatchInstanceResponse]) -> list[S.ValueType]:
    return [e.status_changed.status for e in events if e.WhichOneof("event") == "status_changed"]


def names(statuses: Sequence[S.ValueType]) -> list[str]:
    return [S.Name(s).removeprefix("INSTANCE_STATUS_") for s in statuses]


def assert_consecutive(events: Sequence[pb.WatchInstanceResponse], last: int) -> None:
    """Sequences 1..last, each once, in order."""
    assert [e.sequence for e in events] == list(range(1, last + 1))


def started(events: Sequence[pb.WatchInstanceResponse], step: str) -> list[int]:
    """Attempt numbers of the step_started events of ``step``."""
    return [
        e.step_started.attempt
        for e in events
        if e.WhichOneof("event") == "step_started" and e.step_started.step.name == step
    ]


def watch_all(cluster: Cluster, instance_id: str) -> list[pb.WatchInstanceResponse]:
    """The whole stream of a finished instance, from sequence 1 to its end."""
    stream = cluster.stub.WatchInstance(
        pb.WatchInstanceRequest(instance_id=instance_id), timeout=10
    )
    return list(stream)


def refused(call: Callable[..., object], *args: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and message of ``call(*args)``, an RPC that must fail."""
    try:
        call(*args)
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")


def waiting(cluster: Cluster, instance_id: str) -> pb.Instance | None:
    """The instance once GetStatus shows it WAITING with a wake time."""
    instance = cluster.status(instance_id)
    if instance.status == S.INSTANCE_STATUS_WAITING and instance.HasField("wake_time"):
        return instance
    return None


def has_status(cluster: Cluster, instance_id: str, status: S.ValueType) -> Callable[[], bool]:
    return lambda: cluster.status(instance_id).status == status


def stays(condition: Callable[[], bool], seconds: float) -> None:
    """Observe that ``condition`` holds for ``seconds`` (a negative check, not a sync)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition()
        time.sleep(0.05)
    assert condition()


def settle(cluster: Cluster) -> None:
    """Run a short instance to its end on the new server.

    The restarted server resumes what it will resume before it serves, so by
    the time a fresh instance has completed, anything that was (wrongly)
    resumed has had the time to take its next step.
    """
    sentinel = cluster.create("three-steps")
    done = cluster.finished([sentinel])[sentinel]
    assert done.status == S.INSTANCE_STATUS_COMPLETE


def inbox(cluster: Cluster, instance_id: str) -> list[tuple[str, bool]]:
    """(payload, consumed) of the instance's stored events, oldest first: from a
    copy of the SQLite file, or from the PostgreSQL database."""
    if cluster.store_url is not None:
        url = cluster.store_url

        async def read() -> list[tuple[str, bool]]:
            conn = await asyncpg.connect(url)
            try:
                rows = await conn.fetch(
                    "SELECT payload, consumed_by IS NOT NULL FROM inbox"
                    " WHERE instance_id = $1 ORDER BY id",
                    instance_id,
                )
            finally:
                await conn.close()
            return [(bytes(r[0]).decode(), bool(r[1])) for r in rows]

        return asyncio.run(read())
    store = cluster.store
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / store.name
        for suffix in ("", "-wal"):
            source = store.with_name(store.name + suffix)
            if source.exists():
                shutil.copyfile(source, copy.with_name(copy.name + suffix))
        connection = sqlite3.connect(copy)
        try:
            rows = connection.execute(
                "SELECT payload, consumed_by IS NOT NULL FROM inbox"
                " WHERE instance_id = ? ORDER BY id",
                (instance_id,),
            ).fetchall()
        finally:
            connection.close()
    return [(bytes(payload).decode(), bool(consumed)) for payload, consumed in rows]


def pause(cluster: Cluster, instance_id: str) -> S.ValueType:
    request = pb.PauseInstanceRequest(instance_id=instance_id)
    return cluster.stub.PauseInstance(request, timeout=10).status


def resume(cluster: Cluster, instance_id: str) -> S.ValueType:
    request = pb.ResumeInstanceRequest(instance_id=instance_id)
    return cluster.stub.ResumeInstance(request, timeout=10).status


def terminate(cluster: Cluster, instance_id: str) -> S.ValueType:
    request = pb.TerminateInstanceRequest(instance_id=instance_id)
    return cluster.stub.TerminateInstance(request, timeout=10).status


def send(cluster: Cluster, instance_id: str, payload: Any, type: str = "approval") -> None:
    cluster.stub.SendEvent(
        pb.SendEventRequest(instance_id=instance_id, type=type, payload_json=json.dumps(payload)),
        timeout=10,
    )


# ------------------------------------------------------------------ sleep
def test_a_sleep_spans_a_kill_and_wakes_at_its_original_time(clusters: ClusterFactory) -> None:
    """Naps 3 s; SIGKILL while it sleeps and restart at once: it wakes on the original time.

    Not early and not from scratch ("before" ran once, the
    nap's start is unchanged), and the watch sees RUNNING, WAITING, RUNNING,
    COMPLETE with consecutive sequences across the cut.
    """
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("naps", {"ms": 3000}, instance_id="nap3")
    watcher = Watcher(cluster, instance_id)
    watcher.start()

    asleep = wait_for(lambda: waiting(cluster, instance_id))
    wake = ms(asleep.wake_time)
    nap = steps_by_name(asleep)["nap"]
    assert nap.kind == pb.STEP_KIND_SLEEP
    assert nap.status == pb.STEP_STATUS_RUNNING
    assert ms(nap.next_attempt_time) == wake == ms(nap.start_time) + 3000
    assert cluster.count("nap3:nap-before") == 1
    wait_for(lambda: watcher.last >= asleep.last_sequence)

    cluster.kill()
    cluster.start()
    # The new server knows the sleep as it was: same status, same wake time.
    again = cluster.status(instance_id)
    assert again.status == S.INSTANCE_STATUS_WAITING, again
    assert ms(again.wake_time) == wake
    assert cluster.count("nap3:nap-after") == 0

    done = cluster.finished([instance_id])[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    assert json.loads(done.output_json) == "after"
    steps = steps_by_name(done)
    woke = ms(steps["nap"].end_time)
    # Never early; how late is a latency figure for a benchmark, not a test.
    assert wake <= woke, (woke - wake, cluster.log())
    assert ms(steps["after"].start_time) >= wake
    assert ms(steps["nap"].start_time) == ms(nap.start_time)  # not slept again from scratch
    assert [(s.name, s.status, s.attempts) for s in done.steps] == [
        ("before", pb.STEP_STATUS_SUCCEEDED, 1),
        ("nap", pb.STEP_STATUS_SUCCEEDED, 1),
        ("after", pb.STEP_STATUS_SUCCEEDED, 1),
    ]
    assert cluster.count("nap3:nap-before") == 1
    assert cluster.count("nap3:nap-after") == 1

    events = watcher.finish()
    assert watcher.resumed_after and len(watcher.cuts) == 1
    assert_consecutive(events, done.last_sequence)
    assert names(status_changes(events)) == ["RUNNING", "WAITING", "RUNNING", "COMPLETE"]
    assert (started(events, "before"), started(events, "nap")) == ([1], [1])
    cluster.kill()


def test_a_server_down_past_the_wake_time_wakes_the_instance_right_after_start(
    clusters: ClusterFactory,
) -> None:
    """Naps 1 s; SIGKILL, stay down until 1 s past the wake time, restart: it completes
    at once, without running "before" again."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("naps", {"ms": 1000}, instance_id="nap1")
    wake = ms(wait_for(lambda: waiting(cluster, instance_id)).wake_time)
    cluster.kill()

    # The scenario needs the time to pass with no server at all.
    time.sleep(max(0.0, wake / 1000 + 1.0 - time.time()))
    starting = int(time.time() * 1000)
    cluster.start()
    done = cluster.finished([instance_id], timeout=10)[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    # Woken by the new server as it starts (its timers may fire before it listens).
    woke = ms(steps_by_name(done)["nap"].end_time)
    assert starting <= woke, cluster.log()
    assert cluster.count("nap1:nap-before") == 1
    assert cluster.count("nap1:nap-after") == 1
    cluster.kill()


# ----------------------------------------------------------------- events
def test_events_sent_before_the_waits_are_kept_across_a_kill_and_taken_in_order(
    clusters: ClusterFactory,
) -> None:
    """Two events for two waits, both sent while the first step still runs.

    One before a SIGKILL, one after the restart (while the cut step runs
    again): the first wait takes the first, the second wait the second, each
    once, and "apply" runs once.
    """
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("slow-then-waits-twice", {"ms": 1000}, instance_id="early")
    wait_for(lambda: cluster.in_attempt(instance_id, "slow", "early:slow:1", 1))
    send(cluster, instance_id, {"n": 1})
    # The event came before any wait: the instance is still in its first step.
    instance = cluster.status(instance_id)
    assert instance.status == S.INSTANCE_STATUS_RUNNING
    assert [s.name for s in instance.steps] == ["slow"]
    cluster.kill()

    cluster.start()
    wait_for(lambda: cluster.in_attempt(instance_id, "slow", "early:slow:2", 2))
    send(cluster, instance_id, {"n": 2})
    assert [s.name for s in cluster.status(instance_id).steps] == ["slow"]

    done = cluster.finished([instance_id])[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    assert json.loads(done.output_json) == {
        "slow_attempt": 2,
        "first": {"n": 1},
        "second": {"n": 2},
    }
    steps = steps_by_name(done)
    for name, n in (("first", 1), ("second", 2)):
        wait = steps[name]
        assert wait.kind == pb.STEP_KIND_WAIT_FOR_EVENT
        assert wait.event_type == "approval"
        taken = json.loads(wait.output_json)
        assert (taken["type"], taken["payload"]) == ("approval", {"n": n})
        # Sent before this wait (or any wait) began.
        sent = datetime.fromisoformat(taken["timestamp"]).timestamp() * 1000
        assert sent <= ms(steps["first"].start_time) <= ms(wait.start_time)
    assert cluster.count("early:slow:1") == 1
    assert cluster.count("early:slow:2") == 1
    assert cluster.count("early:applied") == 1
    assert inbox(cluster, instance_id) == [('{"n": 1}', True), ('{"n": 2}', True)]
    cluster.kill()


def test_an_event_after_a_kill_completes_the_wait_once_and_the_second_stays(
    clusters: ClusterFactory,
) -> None:
    """Two Approval instances wait; SIGKILL; restart.

    "approve": an event sent after the restart completes it with its payload,
    "apply" running once. "twice": paused while it waits and sent two events
    before the kill (kept while paused, across the kill); resumed after the
    restart, its single wait takes the first, and the second stays stored,
    untaken. Afterwards SendEvent is refused: FAILED_PRECONDITION for a
    finished instance, NOT_FOUND for an unknown one, and nothing changes.
    """
    cluster = clusters()
    cluster.start()
    approve = cluster.create("approval", instance_id="approve")
    twice = cluster.create("approval", instance_id="twice")
    asleep = wait_for(lambda: waiting(cluster, approve))
    assert steps_by_name(asleep)["approval"].status == pb.STEP_STATUS_RUNNING
    wait_for(lambda: waiting(cluster, twice))
    # Paused, so that both events are stored before the wait can take either.
    pause(cluster, twice)
    wait_for(has_status(cluster, twice, S.INSTANCE_STATUS_PAUSED))
    send(cluster, twice, {"ok": 1})
    send(cluster, twice, {"ok": 2})
    assert cluster.status(twice).status == S.INSTANCE_STATUS_PAUSED
    cluster.kill()

    cluster.start()
    assert cluster.status(approve).status == S.INSTANCE_STATUS_WAITING
    send(cluster, approve, {"ok": 1})
    assert resume(cluster, twice) == S.INSTANCE_STATUS_RUNNING
    done = cluster.finished([approve, twice])
    for instance_id in (approve, twice):
        instance = done[instance_id]
        assert instance.status == S.INSTANCE_STATUS_COMPLETE, instance
        assert json.loads(instance.output_json) == {"approved": {"ok": 1}, "type": "approval"}
        assert cluster.count(f"{instance_id}:requested") == 1
        assert cluster.count(f"{instance_id}:applied") == 1
    assert inbox(cluster, approve) == [('{"ok": 1}', True)]
    assert inbox(cluster, twice) == [('{"ok": 1}', True), ('{"ok": 2}', False)]

    code, message = refused(send, cluster, approve, {"ok": 3})
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "'approve' is complete" in message, message
    code, message = refused(send, cluster, "nobody-here", {"ok": 4})
    assert code == grpc.StatusCode.NOT_FOUND
    assert "nobody-here" in message
    # Refusals change nothing.
    assert cluster.status(approve).last_sequence == done[approve].last_sequence
    assert len(inbox(cluster, approve)) == 1
    cluster.kill()


def test_an_event_wait_times_out_on_time_across_a_kill(clusters: ClusterFactory) -> None:
    """Approval with a 2 s timeout; SIGKILL during the wait; restart: the timeout is
    raised into ``run`` at the original deadline and ``run`` returns it."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("approval", {"timeout": 2000}, instance_id="late")
    asleep = wait_for(lambda: waiting(cluster, instance_id))
    deadline = ms(asleep.wake_time)
    wait = steps_by_name(asleep)["approval"]
    assert ms(wait.next_attempt_time) == deadline == ms(wait.start_time) + 2000
    cluster.kill()

    cluster.start()
    done = cluster.finished([instance_id])[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    assert json.loads(done.output_json) == {"timed_out": "EventTimeoutError"}
    wait = steps_by_name(done)["approval"]
    assert wait.status == pb.STEP_STATUS_FAILED
    assert wait.error.name == "EventTimeoutError"
    assert deadline <= ms(wait.end_time), cluster.log()
    assert cluster.count("late:requested") == 1
    assert cluster.count("late:applied") == 0
    cluster.kill()


# --------------------------------------------------------------- controls
def test_a_pause_holds_across_a_kill_and_resume_goes_on_without_repeating_steps(
    clusters: ClusterFactory,
) -> None:
    """Steps5 (300 ms steps) paused in s1: WAITING_FOR_PAUSE, then PAUSED once s1 is done.

    After SIGKILL and restart it stays PAUSED and runs nothing; resume runs
    s2..s4 and completes; no step body ran twice. The watch, cut by the kill,
    sees RUNNING, WAITING_FOR_PAUSE, PAUSED, RUNNING, COMPLETE.
    """
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("steps5", {"ms": 300}, instance_id="pz")
    watcher = Watcher(cluster, instance_id)
    watcher.start()
    wait_for(lambda: cluster.in_attempt(instance_id, "s1", "pz:s1", 1))

    code, message = refused(resume, cluster, instance_id)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "is running" in message, message

    assert pause(cluster, instance_id) == S.INSTANCE_STATUS_WAITING_FOR_PAUSE
    # The running step finishes first, then the instance stops at the boundary.
    wait_for(has_status(cluster, instance_id, S.INSTANCE_STATUS_PAUSED))
    instance = cluster.status(instance_id)
    assert [(s.name, s.status) for s in instance.steps] == [
        ("s0", pb.STEP_STATUS_SUCCEEDED),
        ("s1", pb.STEP_STATUS_SUCCEEDED),
    ]
    assert (cluster.count("pz:s1"), cluster.count("pz:s2")) == (1, 0)
    code, message = refused(pause, cluster, instance_id)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "is paused" in message, message
    wait_for(lambda: watcher.last >= instance.last_sequence)

    cluster.kill()
    cluster.start()
    settle(cluster)
    stays(
        lambda: (
            cluster.status(instance_id).status == S.INSTANCE_STATUS_PAUSED
            and cluster.count("pz:s2") == 0
        ),
        0.5,
    )
    assert cluster.status(instance_id).last_sequence == instance.last_sequence

    assert resume(cluster, instance_id) == S.INSTANCE_STATUS_RUNNING
    done = cluster.finished([instance_id])[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    assert json.loads(done.output_json) == [0, 1, 2, 3, 4]
    assert [(s.name, s.attempts) for s in done.steps] == [(f"s{i}", 1) for i in range(5)]
    assert [cluster.count(f"pz:s{i}") for i in range(5)] == [1] * 5

    events = watcher.finish()
    assert len(watcher.cuts) == 1 and watcher.resumed_after == [instance.last_sequence]
    assert_consecutive(events, done.last_sequence)
    assert names(status_changes(events)) == [
        "RUNNING",
        "WAITING_FOR_PAUSE",
        "PAUSED",
        "RUNNING",
        "COMPLETE",
    ]
    assert all(started(events, f"s{i}") == [1] for i in range(5))
    code, message = refused(pause, cluster, instance_id)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "is complete" in message, message
    cluster.kill()


def test_a_kill_while_waiting_for_pause_ends_paused_at_the_cut_step(
    clusters: ClusterFactory,
) -> None:
    """Pause during a long attempt, SIGKILL before it ends: after the restart the pause
    is taken at that step's boundary (PAUSED, nothing rerun); resume reruns the cut
    attempt once and completes."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("long-first-attempt", {"first": 60}, instance_id="wfp")
    watcher = Watcher(cluster, instance_id)
    watcher.start()
    wait_for(lambda: cluster.in_attempt(instance_id, "work", "wfp:work:1", 1))
    assert pause(cluster, instance_id) == S.INSTANCE_STATUS_WAITING_FOR_PAUSE
    before = cluster.status(instance_id)
    assert before.status == S.INSTANCE_STATUS_WAITING_FOR_PAUSE
    wait_for(lambda: watcher.last >= before.last_sequence)

    cluster.kill()
    cluster.start()
    wait_for(has_status(cluster, instance_id, S.INSTANCE_STATUS_PAUSED))
    settle(cluster)
    assert cluster.status(instance_id).status == S.INSTANCE_STATUS_PAUSED
    assert cluster.count("wfp:work:2") == 0

    assert resume(cluster, instance_id) == S.INSTANCE_STATUS_RUNNING
    done = cluster.finished([instance_id])[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    assert json.loads(done.output_json) == {"work_attempt": 2, "tag": "wfp"}
    assert (cluster.count("wfp:work:1"), cluster.count("wfp:work:2")) == (1, 1)

    events = watcher.finish()
    assert_consecutive(events, done.last_sequence)
    assert names(status_changes(events))[:2] == ["RUNNING", "WAITING_FOR_PAUSE"]
    assert names(status_changes(events))[-3:] == ["PAUSED", "RUNNING", "COMPLETE"]
    cluster.kill()


def test_a_pending_pause_is_not_reported_running_after_a_kill(clusters: ClusterFactory) -> None:
    """WAITING_FOR_PAUSE at the kill: the new server goes to PAUSED with no RUNNING between."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("long-first-attempt", {"first": 60}, instance_id="wfp2")
    watcher = Watcher(cluster, instance_id)
    watcher.start()
    wait_for(lambda: cluster.in_attempt(instance_id, "work", "wfp2:work:1", 1))
    pause(cluster, instance_id)
    pausing = cluster.status(instance_id).last_sequence
    wait_for(lambda: watcher.last >= pausing)
    cluster.kill()
    cluster.start()
    wait_for(has_status(cluster, instance_id, S.INSTANCE_STATUS_PAUSED))
    paused = cluster.status(instance_id).last_sequence
    wait_for(lambda: watcher.last >= paused)
    assert names(status_changes(watcher.events)) == ["RUNNING", "WAITING_FOR_PAUSE", "PAUSED"]


def test_a_paused_sleep_does_not_wake_across_a_kill_and_resume_finishes_it(
    clusters: ClusterFactory,
) -> None:
    """Naps 1 s, paused while it sleeps: PAUSED drops the wake time. SIGKILL, stay down
    past the original wake time, restart: it stays PAUSED. Resume: the sleep is over,
    it completes at once without running "before" again."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("naps", {"ms": 1000}, instance_id="pnap")
    watcher = Watcher(cluster, instance_id)
    watcher.start()
    wake = ms(wait_for(lambda: waiting(cluster, instance_id)).wake_time)
    assert pause(cluster, instance_id) in (
        S.INSTANCE_STATUS_PAUSED,
        S.INSTANCE_STATUS_WAITING_FOR_PAUSE,
    )
    wait_for(has_status(cluster, instance_id, S.INSTANCE_STATUS_PAUSED))
    instance = cluster.status(instance_id)
    assert not instance.HasField("wake_time")
    wait_for(lambda: watcher.last >= instance.last_sequence)
    cluster.kill()

    # The scenario needs the original wake time to pass, here with the server down.
    time.sleep(max(0.0, wake / 1000 + 0.5 - time.time()))
    cluster.start()
    settle(cluster)
    stays(
        lambda: (
            cluster.status(instance_id).status == S.INSTANCE_STATUS_PAUSED
            and cluster.count("pnap:nap-after") == 0
        ),
        0.5,
    )
    resumed_at = int(time.time() * 1000)
    assert resume(cluster, instance_id) == S.INSTANCE_STATUS_RUNNING
    done = cluster.finished([instance_id], timeout=10)[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    nap = steps_by_name(done)["nap"]
    assert resumed_at <= ms(nap.end_time)
    assert (cluster.count("pnap:nap-before"), cluster.count("pnap:nap-after")) == (1, 1)

    events = watcher.finish()
    assert_consecutive(events, done.last_sequence)
    statuses = [s for s in names(status_changes(events)) if s != "WAITING_FOR_PAUSE"]
    assert statuses == ["RUNNING", "WAITING", "PAUSED", "RUNNING", "COMPLETE"]
    assert started(events, "nap") == [1]
    cluster.kill()


def test_a_terminated_instance_stays_terminated_across_a_kill(clusters: ClusterFactory) -> None:
    """Terminate Steps5 in s1: TERMINATED at once, s1's attempt cancelled; after SIGKILL
    and restart still TERMINATED, no step ran, and a second terminate is refused."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("steps5", {"ms": 1000}, instance_id="term")
    watcher = Watcher(cluster, instance_id)
    watcher.start()
    wait_for(lambda: cluster.in_attempt(instance_id, "s1", "term:s1", 1))

    assert terminate(cluster, instance_id) == S.INSTANCE_STATUS_TERMINATED
    instance = cluster.status(instance_id)
    assert instance.status == S.INSTANCE_STATUS_TERMINATED
    assert instance.HasField("end_time")
    events = watcher.finish()
    assert_consecutive(events, instance.last_sequence)
    assert names(status_changes(events)) == ["RUNNING", "TERMINATED"]

    cluster.kill()
    cluster.start()
    settle(cluster)
    stays(
        lambda: (
            cluster.status(instance_id).status == S.INSTANCE_STATUS_TERMINATED
            and cluster.count("term:s2") == 0
        ),
        0.5,
    )
    after = cluster.status(instance_id)
    assert after.last_sequence == instance.last_sequence
    assert ms(after.end_time) == ms(instance.end_time)
    assert (cluster.count("term:s0"), cluster.count("term:s1"), cluster.count("term:s2")) == (
        1,
        1,
        0,
    )
    assert [e.SerializeToString() for e in watch_all(cluster, instance_id)] == [
        e.SerializeToString() for e in events
    ]

    for verb in (terminate, pause, resume):
        code, message = refused(verb, cluster, instance_id)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, verb.__name__
        assert "is terminated" in message, (verb.__name__, message)
    assert cluster.status(instance_id).last_sequence == instance.last_sequence
    cluster.kill()


def test_restart_of_a_complete_instance_runs_from_scratch_across_a_kill(
    clusters: ClusterFactory,
) -> None:
    """Approval completes with event A; RestartInstance runs it from scratch: it waits
    again (A, already taken, is not taken twice); SIGKILL during that wait; after the
    restart event B completes it with the new output. The watch from 0 shows the whole
    history with consecutive sequences and ends at the new COMPLETE."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("approval", instance_id="again")
    wait_for(lambda: waiting(cluster, instance_id))
    send(cluster, instance_id, "A")
    first = cluster.finished([instance_id])[instance_id]
    assert json.loads(first.output_json) == {"approved": "A", "type": "approval"}

    restarted = cluster.stub.RestartInstance(pb.RestartInstanceRequest(instance_id=instance_id))
    assert restarted.status == S.INSTANCE_STATUS_RUNNING
    asleep = wait_for(lambda: waiting(cluster, instance_id))
    assert [s.name for s in asleep.steps] == ["request", "approval"]
    assert all(ms(s.start_time) >= ms(first.end_time) for s in asleep.steps)
    assert cluster.count("again:requested") == 2
    cluster.kill()

    cluster.start()
    send(cluster, instance_id, "B")
    done = cluster.finished([instance_id])[instance_id]
    assert done.status == S.INSTANCE_STATUS_COMPLETE, done
    assert json.loads(done.output_json) == {"approved": "B", "type": "approval"}
    assert ms(done.end_time) > ms(first.end_time)
    assert [(s.name, s.attempts) for s in done.steps] == [
        ("request", 1),
        ("approval", 1),
        ("apply", 1),
    ]
    assert (cluster.count("again:requested"), cluster.count("again:applied")) == (2, 2)

    events = watch_all(cluster, instance_id)
    assert_consecutive(events, done.last_sequence)
    assert names(status_changes(events)) == [
        "RUNNING",
        "WAITING",
        "RUNNING",
        "COMPLETE",
        "RUNNING",
        "WAITING",
        "RUNNING",
        "COMPLETE",
    ]
    outputs = [
        json.loads(e.status_changed.output_json)
        for e in events
        if e.WhichOneof("event") == "status_changed"
        and e.status_changed.status == S.INSTANCE_STATUS_COMPLETE
    ]
    assert outputs == [{"approved": "A", "type": "approval"}, {"approved": "B", "type": "approval"}]
    assert events[-1].status_changed.status == S.INSTANCE_STATUS_COMPLETE
    assert started(events, "request") == [1, 1]
    cluster.kill()
