"""Three ``cruzflow serve`` processes on one PostgreSQL database: one is
SIGKILLed mid-run, another SIGSTOPped past its lease and let go again.

Every workflow completes exactly once with its output, no step body runs
again after its recorded run, watchers on a surviving server see every event
once and in order, and the dead server's instances are taken over soon after
its lease expires (the time is measured from the database's own clocks and
printed). ``CRUZFLOW_REPLICAS_N`` sets the number of workflows (2,000).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc
from tests.e2e.test_soak import read_marks
from tests.pgcluster import PostgresServer
from tests.postgres import postgres_server  # noqa: F401
from tests.procs import ServerProcess, wait_for, write_config

N = int(os.environ.get("CRUZFLOW_REPLICAS_N", "2000"))
LEASE_S = 2.0
WATCHED = 40
PATIENCE_S = 120.0


def _params(n: int) -> dict[str, Any]:
    return {"n": n, "ms": 1000}


class Watcher(threading.Thread):
    """Follows one instance's WatchInstance stream on one server to its end."""

    def __init__(self, address: str, instance_id: str) -> None:
        super().__init__(daemon=True, name=f"watch-{instance_id}")
        self.address = address
        self.instance_id = instance_id
        self.sequences: list[int] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = workflows_pb2_grpc.WorkflowServiceStub(channel)
                request = pb.WatchInstanceRequest(instance_id=self.instance_id)
                for event in stub.WatchInstance(request, timeout=PATIENCE_S):
                    self.sequences.append(event.sequence)
        except BaseException as exc:
            self.failure = exc


def _scalar(db: PostgresServer, database: str, sql: str) -> str:
    return db.psql(sql, database).strip()


def test_three_replicas_survive_a_kill_and_a_pause(
    tmp_path: Path,
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    database = postgres_server.create_database()
    url = postgres_server.url(database)
    side = tmp_path / "marks"
    servers: list[ServerProcess] = []
    try:
        for i in range(3):
            folder = tmp_path / f"replica-{i}"
            folder.mkdir()
            config = write_config(
                folder,
                {"replicated": "tests.workflows:Replicated"},
                store_url=url,
                lease_period=f"{LEASE_S:g} seconds",
                grace="1 second",
            )
            servers.append(
                ServerProcess(config, env={"CRUZFLOW_TEST_SIDE_FILE": str(side)}).start()
            )
        channels = [grpc.insecure_channel(s.address) for s in servers]
        stubs = [workflows_pb2_grpc.WorkflowServiceStub(c) for c in channels]

        # ---- create N, spread over the three, 100 a call
        ids = [f"r-{n:05d}" for n in range(N)]
        for at in range(0, N, 100):
            chunk = range(at, min(at + 100, N))
            request = pb.CreateInstancesRequest(
                requests=[
                    pb.CreateInstanceRequest(
                        workflow="replicated",
                        instance_id=ids[n],
                        params_json=json.dumps(_params(n)),
                    )
                    for n in chunk
                ]
            )
            stubs[(at // 100) % 3].CreateInstances(request, timeout=60)
        watched = ids[:: max(1, N // WATCHED)][:WATCHED]
        watchers = [Watcher(servers[2].address, i) for i in watched]
        for watcher in watchers:
            watcher.start()

        # ---- SIGKILL the first server while its runs are in their 1 s step
        victim = servers[0]
        assert victim.proc is not None
        owner = f"%-{victim.proc.pid}-%"
        wait_for(
            lambda: (
                int(
                    _scalar(
                        postgres_server,
                        database,
                        f"SELECT count(*) FROM steps s JOIN instances i ON i.id = s.instance_id"
                        f" WHERE s.name = 'b' AND i.owner LIKE '{owner}'",
                    )
                )
                > 0
            ),
            timeout=60,
        )
        victim.kill()
        # ... and at once SIGSTOP the second, whose runs are in that step too:
        # it is let go only after its lease has expired and its instances run
        # elsewhere, so whatever it then writes must be refused.
        paused = servers[1]
        assert paused.proc is not None
        paused.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        held_by_paused = int(
            _scalar(
                postgres_server,
                database,
                f"SELECT count(*) FROM instances WHERE owner LIKE '%-{paused.proc.pid}-%'",
            )
        )
        held = int(
            _scalar(
                postgres_server,
                database,
                f"SELECT count(*) FROM instances WHERE owner LIKE '{owner}'",
            )
        )
        expires = float(
            _scalar(
                postgres_server,
                database,
                "SELECT extract(epoch FROM max(expires_at)) FROM servers"
                f" WHERE owner LIKE '{owner}'",
            )
        )

        def taken_over() -> float | None:
            row = _scalar(
                postgres_server,
                database,
                "SELECT count(*), extract(epoch FROM clock_timestamp()) FROM instances"
                f" WHERE owner LIKE '{owner}'",
            )
            count, now = row.split("|")
            return float(now) if int(count) == 0 else None

        taken_at = wait_for(taken_over, timeout=60, interval=0.05)
        takeover_s = taken_at - expires

        time.sleep(max(0.0, stopped_at + LEASE_S + 1.5 - time.monotonic()))
        paused.proc.send_signal(signal.SIGCONT)

        # ---- everything completes
        wait_for(
            lambda: (
                _scalar(
                    postgres_server, database, "SELECT count(*) FROM instances WHERE status = 6"
                )
                == str(N)
            ),
            timeout=PATIENCE_S,
            interval=0.2,
        )
        for watcher in watchers:
            watcher.join(PATIENCE_S)

        rows = postgres_server.psql(
            "SELECT id, status, convert_from(output, 'UTF8') FROM instances ORDER BY id",
            database,
        ).splitlines()
        outputs = {r.split("|")[0]: (int(r.split("|")[1]), r.split("|", 2)[2]) for r in rows}
        wrong = [
            i
            for n, i in enumerate(ids)
            if outputs.get(i, (0, ""))[0] != 6
            or json.loads(outputs[i][1]) != {"n": n, "result": 3 * n}
        ]
        last_seq = dict(
            line.split("|")
            for line in postgres_server.psql(
                "SELECT instance_id, max(seq) FROM events GROUP BY instance_id", database
            ).splitlines()
        )
        steps = postgres_server.psql(
            "SELECT instance_id, name, convert_from(output, 'UTF8') FROM steps"
            " WHERE status = 2 ORDER BY instance_id, idx",
            database,
        ).splitlines()
        marks = read_marks(side)
        rerun_after_success = []
        for line in steps:
            instance_id, name, output = line.split("|", 2)
            token = json.loads(output)["token"]
            runs = marks[(instance_id, name)]
            done = [n for n, phase, t in runs if phase == "done" and t == token]
            assert len(done) == 1, (instance_id, name, runs)
            if any(n > done[0] and phase == "start" for n, phase, _ in runs):
                rerun_after_success.append(f"{instance_id}:{name}")
        starts = sum(1 for runs in marks.values() for _, phase, _ in runs if phase == "start")
        seen_twice = sum(c - 1 for w in watchers for c in Counter(w.sequences).values() if c > 1)
        out_of_order = [
            w.instance_id
            for w in watchers
            if w.sequences != list(range(1, int(last_seq[w.instance_id]) + 1))
        ]
        # What the paused server tried to write once let go, and was refused.
        wait_for(lambda: "this server's lease" in paused.log(), timeout=30)
        refused = sum(
            int(line.split("refused the writes of ")[1].split()[0])
            for line in paused.log().splitlines()
            if "refused the writes of" in line
        )
        print(
            f"\nreplicas: {N:,} workflows of 3 steps (one of 1 s) on 3 servers, one SIGKILLed"
            f" holding {held} instance(s), one SIGSTOPped for {LEASE_S + 1.5:g} s"
            f" holding {held_by_paused} (lease {LEASE_S:g} s)"
            f"\n  the paused server's writes refused once let go: {refused} instance(s)"
            f"\n  taken over {takeover_s:.2f} s after the killed server's lease expired"
            f"\n  not complete or wrong output: {len(wrong)}"
            f"\n  steps re-run after success: {len(rerun_after_success)} of {len(steps):,}"
            f" recorded ({starts - len(steps):,} runs cut short by the kill or the pause"
            f" ran again)"
            f"\n  watchers: {len(watchers)}, events seen twice: {seen_twice}, out of order or"
            f" missing: {len(out_of_order)}"
        )
        assert held > 0 and held_by_paused > 0
        assert not wrong, wrong[:20]
        assert not rerun_after_success, rerun_after_success[:20]
        assert all(w.failure is None for w in watchers), [w.failure for w in watchers][:3]
        assert seen_twice == 0
        assert not out_of_order, out_of_order[:20]
        assert takeover_s < 2.0
        for channel in channels:
            channel.close()
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
            server.stop()
