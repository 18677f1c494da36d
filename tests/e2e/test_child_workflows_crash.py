"""Child workflows across SIGKILLs of the real server: every child is created
exactly once, however often its parent is killed and replayed, and every
parent ends with all its children's results.

Each parent starts eight children at once; each child's step sleeps a random
time drawn anew per attempt and per server process, so the kills fall while
some children are being created, some run and some have ended (and their
parents wait, or are being woken).
"""

from __future__ import annotations

import json
import random
import time

from cruzflow.v1 import workflows_pb2 as pb
from tests.e2e.conftest import ClusterFactory

CHILDREN = 8
KILLS = 5


def children_of(cluster: object, parent_id: str) -> list[pb.Instance]:
    stub = cluster.stub  # type: ignore[attr-defined]
    reply = stub.ListInstances(
        pb.ListInstancesRequest(parent_id=parent_id, page_size=1000), timeout=10
    )
    return list(reply.instances)


def create_parent(cluster: object, n: int) -> str:
    created = cluster.stub.CreateInstance(  # type: ignore[attr-defined]
        pb.CreateInstanceRequest(
            workflow="parent",
            instance_id=f"parent-{n}",
            params_json=json.dumps(
                {"children": CHILDREN, "tag": f"p{n}", "kid": {"ms": 400, "random": True}}
            ),
        ),
        timeout=10,
    )
    return str(created.instance_id)


def test_children_are_created_once_across_kills(clusters: ClusterFactory) -> None:
    cluster = clusters()
    cluster.start()
    rng = random.Random(15)
    # A new parent before each kill, the kill soon after: kills fall while
    # one parent creates its children, others wait for theirs or are woken.
    parents: list[str] = []
    seen: dict[str, set[str]] = {}
    midway = 0
    for n in range(KILLS):
        parents.append(create_parent(cluster, n))
        time.sleep(rng.uniform(0.0, 0.3))
        cluster.kill()
        cluster.start()
        ended = total = 0
        for parent_id in parents:
            kids = children_of(cluster, parent_id)
            ids = {c.instance_id for c in kids}
            assert len(ids) <= CHILDREN, (parent_id, sorted(ids))
            # A child once created is the same child ever after.
            assert seen.get(parent_id, set()) <= ids, (parent_id, seen[parent_id] - ids)
            seen[parent_id] = ids
            total += len(ids)
            ended += sum(k.status == pb.INSTANCE_STATUS_COMPLETE for k in kids)
        midway += 0 < ended < total

    results = cluster.finished(parents)
    for n, parent_id in enumerate(parents):
        parent = results[parent_id]
        assert parent.status == pb.INSTANCE_STATUS_COMPLETE, parent
        assert json.loads(parent.output_json) == {
            "kids": [{"n": i, "v": 10 * i} for i in range(CHILDREN)],
            "sum": 10 * sum(range(CHILDREN)),
        }
        kids = children_of(cluster, parent_id)
        steps = {s.name: s for s in parent.steps if s.kind == pb.STEP_KIND_CHILD}
        # Exactly one child per step, each the one its step names, each complete.
        assert len(kids) == CHILDREN
        assert {k.instance_id for k in kids} == {s.child_instance_id for s in steps.values()}
        assert seen[parent_id] <= {k.instance_id for k in kids}
        for kid in kids:
            assert kid.status == pb.INSTANCE_STATUS_COMPLETE
            assert kid.parent_id == parent_id
        for i in range(CHILDREN):
            assert cluster.count(f"p{n}:kid-{i}:done") >= 1
    # Some kills fell while some children had ended and others had not.
    assert midway >= 2, midway
