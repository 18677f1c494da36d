"""Parallel steps across SIGKILLs of the real server: randomised completion
orders, and not one finished step run again.

Each instance runs twelve branches at once, each two steps in a row, each
step sleeping a random time drawn anew per attempt and per server process:
the steps finish, and the second ones begin, in another order every time,
so a replay meets them in another order than they were recorded in. After each SIGKILL the store file is read directly (no server
runs): every step stored as succeeded then is finished for good, and its
body must never start again, whatever the following servers do.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time

from cruzflow.v1 import workflows_pb2 as pb
from tests.e2e.conftest import ClusterFactory

INSTANCES = 6
STEPS = 12
KILLS = 5
SUCCEEDED = 2  # StepStatus.SUCCEEDED


def stored_successes(store: str) -> set[tuple[str, str]]:
    """(instance id, step name) of the steps the store holds as succeeded."""
    connection = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT instance_id, name FROM steps WHERE status = ?", (SUCCEEDED,)
        ).fetchall()
    finally:
        connection.close()
    return {(row[0], row[1]) for row in rows}


def test_finished_parallel_steps_never_rerun_across_kills(clusters: ClusterFactory) -> None:
    cluster = clusters()
    cluster.start()
    rng = random.Random(14)
    ids = []
    for n in range(INSTANCES):
        created = cluster.stub.CreateInstance(
            pb.CreateInstanceRequest(
                workflow="fan-out-random",
                instance_id=f"fan-{n}",
                params_json=json.dumps({"tag": f"fan-{n}", "steps": STEPS, "max_ms": 400}),
            ),
            timeout=10,
        )
        ids.append(created.instance_id)

    # Each step found succeeded after a kill, with the starts of its body then.
    finished: dict[tuple[str, str], int] = {}
    cut_midway = 0
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.12, 0.3))
        cluster.kill()
        done = stored_successes(str(cluster.store))
        parts = {key for key in done if key[1] != "sum"}
        cut_midway += 0 < len(parts) < INSTANCES * STEPS * 2
        for instance_id, name in done - set(finished):
            finished[(instance_id, name)] = cluster.count(f"{instance_id}:{name}:start")
        cluster.start()

    results = cluster.finished(ids)
    for n, instance_id in enumerate(ids):
        instance = results[instance_id]
        assert instance.status == pb.INSTANCE_STATUS_COMPLETE, instance
        assert json.loads(instance.output_json) == {
            "values": [10 * i for i in range(STEPS)],
            "sum": 10 * sum(range(STEPS)),
        }
        # The first steps of the branches take the first positions, in call
        # order; the second ones follow in the order they began; then the sum.
        names = [s.name for s in sorted(instance.steps, key=lambda s: s.index)]
        assert names[:STEPS] == [f"part-{i}" for i in range(STEPS)]
        assert sorted(names[STEPS:-1]) == sorted(f"part-{i}-b" for i in range(STEPS))
        assert names[-1] == "sum"
        assert [s.index for s in instance.steps] == list(range(2 * STEPS + 1))
        for i in range(STEPS):
            # Every body ran to its end at least once.
            assert cluster.count(f"fan-{n}:part-{i}:done") >= 1
            assert cluster.count(f"fan-{n}:part-{i}-b:done") >= 1
    # The kills fell while some steps were done and others were not.
    assert cut_midway >= 2, cut_midway
    assert len(finished) > INSTANCES
    rerun = {
        key: (starts, cluster.count(f"{key[0]}:{key[1]}:start"))
        for key, starts in finished.items()
        if key[1] != "sum" and cluster.count(f"{key[0]}:{key[1]}:start") != starts
    }
    assert rerun == {}, f"finished steps whose body started again: {rerun}"
