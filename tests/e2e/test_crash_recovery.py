"""SIGKILL the real server mid-work and restart it on the same store.

Each test kills ``cruzflow serve`` with SIGKILL (no cleanup of any kind runs),
checks the SQLite file with ``PRAGMA integrity_check``, starts a new process on
the same store and checks what survived: created instances, step results,
the event log, and the guard against code that changed under an instance.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc

from cruzflow.v1 import workflows_pb2 as pb
from tests.e2e import Watcher
from tests.e2e.conftest import ClusterFactory
from tests.procs import wait_for


def steps_by_name(instance: pb.Instance) -> dict[str, pb.Step]:
    return {step.name: step for step in instance.steps}


def test_created_instances_survive_a_kill_right_after_the_response(
    clusters: ClusterFactory,
) -> None:
    """CreateInstance answers only once the instance is durable.

    Many concurrent creates (some queued behind a small running limit); the
    server is SIGKILLed the moment the last response is in. Every id that was
    answered exists after the restart, with its params, and runs to COMPLETE.
    """
    cluster = clusters(limits={"max_running_instances": 2})
    cluster.start()
    count = 24

    def create(i: int) -> tuple[str, str, int]:
        tag = f"create{i}"
        response = cluster.stub.CreateInstance(
            pb.CreateInstanceRequest(
                workflow="sleepy",
                # Half with a chosen id, half with a generated one.
                instance_id=tag if i % 2 else "",
                params_json=json.dumps({"seconds": 0.1, "tag": tag}),
            ),
            timeout=10,
        )
        return response.instance_id, tag, response.status

    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(create, range(count)))
    cluster.kill()
    # The kill cut the work short: some instances were still queued or running.
    assert sum(cluster.count(f"{tag}:after") for _, tag, _ in created) < count

    assert len({instance_id for instance_id, _, _ in created}) == count
    statuses = {status for _, _, status in created}
    assert statuses <= {pb.INSTANCE_STATUS_RUNNING, pb.INSTANCE_STATUS_QUEUED}
    assert pb.INSTANCE_STATUS_QUEUED in statuses  # the queued ones are durable too

    cluster.start()
    for instance_id, tag, _ in created:
        instance = cluster.status(instance_id)  # NOT_FOUND would raise here
        assert instance.workflow == "sleepy"
        assert json.loads(instance.params_json) == {"seconds": 0.1, "tag": tag}
    done = cluster.finished([instance_id for instance_id, _, _ in created])
    for instance_id, tag, _ in created:
        instance = done[instance_id]
        assert instance.status == pb.INSTANCE_STATUS_COMPLETE, instance
        assert json.loads(instance.output_json)["tag"] == tag
        # At least once: a body cut short by the kill before its result was stored reruns.
        assert cluster.count(f"{tag}:after") >= 1


def test_step_results_are_durable_and_replayed_after_a_kill(clusters: ClusterFactory) -> None:
    """A completed step never reruns; the attempt cut short by SIGKILL runs again.

    The restarted server resumes the instances by itself: no RPC is made until
    the side file shows the second attempts running.
    """
    cluster = clusters()
    cluster.start()
    tags = [f"replay{i}" for i in range(6)]
    for tag in tags:
        cluster.create("sleepy", {"seconds": 2, "tag": tag}, instance_id=tag)

    # Every instance is inside "slow", and its attempt 1 is durably recorded.
    wait_for(lambda: all(cluster.in_attempt(tag, "slow", f"{tag}:slow:1", 1) for tag in tags))
    for tag in tags:
        assert cluster.count(f"{tag}:before") == 1
        assert cluster.count(f"{tag}:slow-done") == 0
    cluster.kill()

    cluster.start()
    # Resumed without any request: the second attempts start on their own.
    wait_for(lambda: all(cluster.count(f"{tag}:slow:2") == 1 for tag in tags))
    done = cluster.finished(tags)
    for tag in tags:
        instance = done[tag]
        assert instance.status == pb.INSTANCE_STATUS_COMPLETE, instance
        assert json.loads(instance.output_json) == {"slow_attempt": 2, "tag": tag}
        steps = steps_by_name(instance)
        assert [step.name for step in instance.steps] == ["before", "slow", "after"]
        assert all(step.status == pb.STEP_STATUS_SUCCEEDED for step in instance.steps)
        assert (steps["before"].attempts, steps["slow"].attempts, steps["after"].attempts) == (
            1,
            2,
            1,
        )
        assert json.loads(steps["slow"].output_json) == 2
        # Side effects: "before" ran once, "slow" started twice and finished once.
        assert cluster.count(f"{tag}:before") == 1
        assert cluster.count(f"{tag}:slow:1") == 1
        assert cluster.count(f"{tag}:slow:2") == 1
        assert cluster.count(f"{tag}:slow:3") == 0
        assert cluster.count(f"{tag}:slow-done") == 1
        assert cluster.count(f"{tag}:after") == 1
    cluster.kill()  # and the store is still sound after the work is done


def test_watch_resumes_across_a_kill_without_loss_or_repetition(
    clusters: ClusterFactory,
) -> None:
    """Two watchers of one instance, both cut by SIGKILL, both resume from their last sequence.

    Each gets every event exactly once: sequences 1..N with no gap or
    duplicate, the same events for both, ending with the COMPLETE event.
    """
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("sleepy", {"seconds": 2, "tag": "w"}, instance_id="watched")
    first = Watcher(cluster, instance_id)
    second = Watcher(cluster, instance_id)
    try:
        first.start()
        wait_for(lambda: cluster.in_attempt(instance_id, "slow", "w:slow:1", 1))
        # The second watcher starts late: it catches up from the store, then follows live.
        second.start()
        newest = cluster.status(instance_id).last_sequence
        assert newest >= 4  # created, before started/succeeded, slow started
        wait_for(lambda: first.last >= newest and second.last >= newest)

        cluster.kill()
        wait_for(lambda: len(first.cuts) == 1 and len(second.cuts) == 1)
        cut_at = (first.last, second.last)
        cluster.start()
        events = first.finish()
        assert second.finish()
    finally:
        first.stop()
        second.stop()

    instance = cluster.status(instance_id)
    assert instance.status == pb.INSTANCE_STATUS_COMPLETE
    total = instance.last_sequence
    for watcher, last_before_kill in zip((first, second), cut_at, strict=True):
        assert [code for code, _ in watcher.cuts] == [grpc.StatusCode.UNAVAILABLE]
        assert watcher.resumed_after == [last_before_kill]
        assert last_before_kill >= newest
        assert [e.sequence for e in watcher.events] == list(range(1, total + 1))
        assert all(e.instance_id == instance_id for e in watcher.events)
    assert [e.SerializeToString() for e in first.events] == [
        e.SerializeToString() for e in second.events
    ]

    final = events[-1]
    assert final.WhichOneof("event") == "status_changed"
    assert final.status_changed.status == pb.INSTANCE_STATUS_COMPLETE
    assert json.loads(final.status_changed.output_json) == {"slow_attempt": 2, "tag": "w"}
    assert sum(e.WhichOneof("event") == "status_changed" for e in events) == 2
    slow_started = [
        e.step_started.attempt
        for e in events
        if e.WhichOneof("event") == "step_started" and e.step_started.step.name == "slow"
    ]
    assert slow_started == [1, 2]
    interrupted = [
        e.attempt_failed
        for e in events
        if e.WhichOneof("event") == "attempt_failed" and e.attempt_failed.step.name == "slow"
    ]
    assert [failed.attempt for failed in interrupted] == [1]
    succeeded = [e.step_succeeded.step.name for e in events if e.HasField("step_succeeded")]
    assert succeeded == ["before", "slow", "after"]


def test_changed_step_names_under_a_running_instance_error_it(
    clusters: ClusterFactory,
) -> None:
    """Replay against code whose steps changed: NonDeterminismError, no new step runs."""
    cluster = clusters()
    cluster.start()
    instance_id = cluster.create("versioned", {"names": ["a", "block", "c"]}, instance_id="v1")
    wait_for(lambda: cluster.in_attempt(instance_id, "block", "versioned:block", 1))
    assert cluster.count("versioned:a") == 1
    cluster.kill()

    # The "new code": step 0 is now "x" instead of "a".
    cluster.start(env={"CRUZFLOW_TEST_STEP_NAMES": "x,block,c"})
    instance = cluster.finished([instance_id])[instance_id]
    assert instance.status == pb.INSTANCE_STATUS_ERRORED, instance
    assert instance.error.name == "NonDeterminismError"
    assert "'x'" in instance.error.message
    assert "'a'" in instance.error.message
    assert not instance.output_json
    assert cluster.count("versioned:x") == 0
    assert cluster.count("versioned:a") == 1
    assert cluster.count("versioned:block") == 1
    assert cluster.count("versioned:c") == 0
    steps = steps_by_name(instance)
    assert steps["a"].status == pb.STEP_STATUS_SUCCEEDED
    assert "x" not in steps
    cluster.kill()
