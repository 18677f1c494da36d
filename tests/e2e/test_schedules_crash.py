"""A schedule firing every second while its server process is SIGKILLed five
times: every due time of the window fires exactly once.

On SQLite one server runs at a time and is killed and started again; on
PostgreSQL (CRUZFLOW_TEST_STORE=postgres) two replicas share the store,
both try every due time, and one of them is killed at a time. A restart
takes far less than the grace (limits.schedule_grace, a minute), so no due
time counts as missed: each second from the first fire to the last has
its one instance, none twice, none left out. The instances are read from
the store at the end (the SQLite file itself; on PostgreSQL through
ListInstances' schedule filter).
"""

from __future__ import annotations

import random
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.conftest import ON_POSTGRES, Stores
from tests.procs import ServerProcess, wait_for, write_config

KILLS = 5
SCHEDULE = "tick"


def _config(directory: Path, store_url: str | None) -> Path:
    path = write_config(
        directory,
        {"three-steps": "tests.workflows:ThreeSteps"},
        store_url=store_url,
        lease_period="1 second" if store_url is not None else None,
    )
    with path.open("a") as config:
        config.write(
            "[[schedules]]\n"
            f'id = "{SCHEDULE}"\n'
            'workflow = "three-steps"\n'
            'cron = "* * * * * *"\n'
            'params = { source = "cron" }\n'
        )
    return path


class _Replica:
    def __init__(self, config: Path, name: str) -> None:
        self.config = config
        self.name = name
        self.process: ServerProcess | None = None
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.WorkflowServiceStub | None = None

    def start(self) -> None:
        self.process = ServerProcess(self.config).start()
        self.channel = grpc.insecure_channel(self.process.address)
        self.stub = pb_grpc.WorkflowServiceStub(self.channel)

    def kill(self) -> None:
        assert self.process is not None and self.channel is not None
        self.process.kill()
        self.channel.close()

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None:
            self.process.stop()


def _fired(stub: pb_grpc.WorkflowServiceStub) -> list[pb.Instance]:
    out: list[pb.Instance] = []
    token = ""
    while True:
        page = stub.ListInstances(
            pb.ListInstancesRequest(schedule_id=SCHEDULE, page_size=1000, page_token=token),
            timeout=10,
        )
        out += page.instances
        token = page.next_page_token
        if not token:
            return out


def _due(instance_id: str) -> int:
    prefix = f"sched-{SCHEDULE}-"
    assert instance_id.startswith(prefix), instance_id
    when = datetime.strptime(instance_id[len(prefix) :], "%Y%m%dT%H%M%SZ")
    return int(when.replace(tzinfo=UTC).timestamp())


def test_a_schedule_fires_each_due_time_once_across_kills(tmp_path: Path, stores: Stores) -> None:
    store_url = stores.url("schedules") if ON_POSTGRES else None
    config = _config(tmp_path, store_url)
    replicas = [_Replica(config, "a")]
    if ON_POSTGRES:
        # A second server of its own folder (its log), on the same database.
        other = tmp_path / "b"
        other.mkdir()
        replicas.append(_Replica(_config(other, store_url), "b"))
    rng = random.Random(15)
    try:
        for replica in replicas:
            replica.start()
        kills = 0
        while kills < KILLS:
            live = replicas[kills % len(replicas)]
            assert live.stub is not None
            seen = len(_fired(live.stub))
            # Two more due times at least, then a kill at a random moment of
            # a second: before, during or after the next fire.
            stub = live.stub

            def fired_since(stub: pb_grpc.WorkflowServiceStub = stub, seen: int = seen) -> bool:
                return len(_fired(stub)) >= seen + 2

            wait_for(fired_since, timeout=60)
            time.sleep(rng.uniform(0, 0.9))
            live.kill()
            kills += 1
            live.start()
        final = replicas[-1]
        assert final.stub is not None
        end_stub = final.stub
        count = len(_fired(end_stub))
        wait_for(lambda: len(_fired(end_stub)) >= count + 3, timeout=60)
        instances = _fired(end_stub)
        for replica in replicas:
            replica.kill()
        if not ON_POSTGRES:
            # The store file itself, with no server running.
            connection = sqlite3.connect(f"file:{tmp_path / 'store.db'}?mode=ro", uri=True)
            try:
                rows = connection.execute(
                    "SELECT id FROM instances WHERE schedule_id = ?", (SCHEDULE,)
                ).fetchall()
            finally:
                connection.close()
            stored = sorted(r[0] for r in rows)
            assert stored[: len(instances)] == sorted(i.instance_id for i in instances)
            ids = stored
        else:
            ids = sorted(i.instance_id for i in instances)
    finally:
        for replica in replicas:
            replica.close()

    dues = sorted(_due(i) for i in ids)
    assert len(set(dues)) == len(dues), "a due time fired twice"
    # Every second from the first fire to the last: none left out.
    assert dues == list(range(dues[0], dues[-1] + 1)), sorted(
        set(range(dues[0], dues[-1] + 1)) - set(dues)
    )
    # The window spans the kills: at least two due times between each.
    assert len(dues) >= 2 * KILLS + 3
    assert all(i.schedule_id == SCHEDULE for i in instances)
