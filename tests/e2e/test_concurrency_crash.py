"""Concurrency limits across SIGKILLs of real server processes.

1,000 instances of a workflow limited to one at a time per key (50 keys),
and 200 of one limited to 3 at a time in all, are created while the server
is SIGKILLed a few times mid-flight (on PostgreSQL: two replicas, each
killed in turn). The steps write a log outside the server ("start <key>
<id> <pid>" as an instance's first step begins, "end ..." as its last one
ends); from that log alone, no two instances of one key were ever in flight
at once, never more than 3 of the capped workflow, and every instance
ended. An instance killed in flight stays open in the log until it ends
after the restart: it holds its key's slot all the while.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from pathlib import Path

import grpc

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc
from tests.conftest import ON_POSTGRES, Stores
from tests.procs import ServerProcess, wait_for, write_config

KEYED = 1000
KEYS = 50
CAPPED = 200
CAP = 3
KILLS = 3

LIMITED = f"""
[[workflows]]
binding = "KEYED"
name = "keyed"
class_name = "tests.workflows:KeyedWork"
concurrency = 1
concurrency_key = "user"

[[workflows]]
binding = "CAPPED"
name = "capped"
class_name = "tests.workflows:KeyedWork"
concurrency = {CAP}
"""


def _config(folder: Path, store_url: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(
        folder,
        {},
        store=str(folder / "store.db"),
        store_url=store_url,
        lease_period="1 second" if store_url is not None else None,
        grace="1 second",
    )
    path.write_text(path.read_text() + LIMITED)
    return path


def _requests(rng: random.Random) -> list[pb.CreateInstanceRequest]:
    requests = [
        pb.CreateInstanceRequest(
            workflow="keyed",
            instance_id=f"k{n}",
            params_json=json.dumps({"user": f"u{rng.randrange(KEYS)}", "nap": 0.01}),
        )
        for n in range(KEYED)
    ]
    requests += [
        pb.CreateInstanceRequest(
            workflow="capped", instance_id=f"c{n}", params_json=json.dumps({"nap": 0.01})
        )
        for n in range(CAPPED)
    ]
    rng.shuffle(requests)
    return requests


def _complete(stub: workflows_pb2_grpc.WorkflowServiceStub) -> int:
    try:
        counts = stub.CountInstances(pb.CountInstancesRequest(), timeout=10).counts
    except grpc.RpcError:
        return 0
    return sum(c.count for c in counts if c.status == pb.INSTANCE_STATUS_COMPLETE)


def _check_log(side: Path) -> tuple[int, int, int]:
    """From the step log: no key ever had two instances in flight, the capped
    workflow never more than CAP; returns the most in flight at once of the
    keyed workflow (across keys) and of the capped one, and how many
    instances a kill cut in flight (begun by one server, ended by another)."""
    open_by_key: dict[str, set[str]] = defaultdict(set)
    ended: set[str] = set()
    began_in: dict[str, str] = {}
    cut = 0
    most_keyed = most_capped = 0
    for line in side.read_text().splitlines():
        what, key, instance_id, pid = line.split()
        if what == "start":
            began_in.setdefault(instance_id, pid)
            if instance_id in ended:
                continue  # its first step again after a kill, its end logged
            others = open_by_key[key] - {instance_id}
            limit = CAP if key == "-" else 1
            assert len(others) < limit, f"{instance_id} began while {sorted(others)} of {key} ran"
            open_by_key[key].add(instance_id)
        else:
            open_by_key[key].discard(instance_id)
            cut += instance_id not in ended and began_in[instance_id] != pid
            ended.add(instance_id)
        in_flight = sum(len(v) for k, v in open_by_key.items() if k != "-")
        most_keyed = max(most_keyed, in_flight)
        most_capped = max(most_capped, len(open_by_key["-"]))
    assert len(ended) == KEYED + CAPPED
    return most_keyed, most_capped, cut


def test_a_concurrency_key_is_never_exceeded_across_kills(tmp_path: Path, stores: Stores) -> None:
    rng = random.Random(15)
    side = tmp_path / "steps.log"
    env = {"CRUZFLOW_TEST_SIDE_FILE": str(side)}
    url = stores.url("limits") if ON_POSTGRES else None
    replicas = 2 if ON_POSTGRES else 1
    configs = [_config(tmp_path / f"server-{i}", url) for i in range(replicas)]
    servers = [ServerProcess(config, env) for config in configs]
    channels: list[grpc.Channel] = []
    try:
        for server in servers:
            server.start()

        def stub(i: int) -> workflows_pb2_grpc.WorkflowServiceStub:
            channel = grpc.insecure_channel(servers[i].address)
            channels.append(channel)
            return workflows_pb2_grpc.WorkflowServiceStub(channel)

        requests = _requests(rng)
        chunks = [requests[at : at + 100] for at in range(0, len(requests), 100)]
        kills = 0
        for n, chunk in enumerate(chunks):
            stub(n % replicas).CreateInstances(
                pb.CreateInstancesRequest(requests=chunk), timeout=30
            )
            if n % 4 == 3 and kills < KILLS:
                # Mid-flight: instances of both workflows run and wait now.
                time.sleep(rng.uniform(0.1, 0.4))
                victim = kills % replicas
                servers[victim].kill()
                kills += 1
                servers[victim] = ServerProcess(configs[victim], env)
                servers[victim].start()
        assert kills == KILLS
        wait_for(lambda: _complete(stub(0)) == KEYED + CAPPED, timeout=240, interval=0.5)
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop()
    most_keyed, most_capped, cut = _check_log(side)
    # The limits were reached, not merely kept: many keys ran side by side;
    # and the kills fell while instances were in flight.
    assert most_capped == CAP
    assert most_keyed > 5, most_keyed
    assert cut >= KILLS, cut
