"""A workflow binding across real server processes: a parent server SIGKILLed
in the middle of a step that created a child on another server finds that same
child when the step runs again after the restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cruzflow.client import StepStatus, SyncClient
from tests.e2e import integrity
from tests.procs import ServerProcess, wait_for, write_config
from tests.test_bindings import remote_entry, spawn_marks


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    """Server processes to stop after the test, whatever happened."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def test_a_parent_killed_mid_step_finds_the_same_child_after_a_restart(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    side = tmp_path / "side.txt"
    env = {"CRUZFLOW_TEST_SIDE_FILE": str(side)}
    (tmp_path / "child").mkdir()
    child = ServerProcess(
        write_config(tmp_path / "child", {"child-workflow": "tests.workflows:Doubles"})
    )
    processes.append(child)
    child.start()

    (tmp_path / "parent").mkdir()
    config = write_config(tmp_path / "parent", {"spawns-child": "tests.workflows:SpawnsChild"})
    with config.open("a") as text:
        text.write(remote_entry("CHILD_WORKFLOW", "child-workflow", child.address))
    parent = ServerProcess(config, env)
    processes.append(parent)
    parent.start()

    with SyncClient(child.address, timeout=30) as children:
        with SyncClient(parent.address, timeout=30) as client:
            client.workflow("spawns-child").create({"n": 21, "block_first": True}, id="order-7")

            def spawned_and_durable() -> bool:
                # The body created the child and sleeps; its attempt is stored as running.
                if not spawn_marks(side, "order-7"):
                    return False
                steps = {s.name: s for s in client.instance("order-7").status().steps}
                spawn = steps.get("spawn")
                return (
                    spawn is not None and spawn.status is StepStatus.RUNNING and spawn.attempts == 1
                )

            wait_for(spawned_and_durable, timeout=60)
        [(_, child_id)] = spawn_marks(side, "order-7")
        assert [i.id for i in children.list_instances(workflow="child-workflow")] == [child_id]

        parent.kill()
        assert integrity(tmp_path / "parent" / "store.db") == "ok"

        restarted = ServerProcess(config, env)
        processes.append(restarted)
        restarted.start()
        with SyncClient(restarted.address, timeout=30) as client:
            output = client.instance("order-7").result(timeout=60)
            steps = {s.name: s for s in client.instance("order-7").status().steps}

        # The interrupted step ran again (attempt 2) and found the child attempt 1 made.
        assert spawn_marks(side, "order-7") == [(1, child_id), (2, child_id)]
        assert steps["spawn"].attempts == 2
        assert output == {"child_ids": [child_id], "children": [{"doubled": 42, "id": child_id}]}
        assert [i.id for i in children.list_instances(workflow="child-workflow")] == [child_id]
