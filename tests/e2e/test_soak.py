"""Soak: thousands of workflows on one store while the server is SIGKILLed dozens of times.

A driver creates ``tests.workflows:Soak`` instances of four kinds (plain
steps, a step that fails some attempts and retries, a durable sleep, a wait
for an event the driver sends), watchers follow a sample of them across the
restarts, and the server is SIGKILLed at random moments (seeded) and started
again on the same store. Afterwards:

- every instance whose creation was acknowledged exists and is COMPLETE with
  the output its params determine (no instance lost, none wrong);
- no step body started again after the run whose result was recorded had
  finished (the side file orders every body's start and end marks, and the
  stored result names its run by a token): runs cut short by a kill may
  repeat, recorded ones never;
- each watcher saw every sequence of its instance once, in order (half of
  them follow a Connect stream over HTTP, half a gRPC one);
- ``PRAGMA integrity_check`` is ok after every kill.

The size comes from the environment: ``CRUZFLOW_SOAK_WORKFLOWS`` (500),
``CRUZFLOW_SOAK_KILLS`` (10), ``CRUZFLOW_SOAK_SECONDS`` (the span over which
work is created and kills fall, 15), ``CRUZFLOW_SOAK_WATCHERS`` (20) and
``CRUZFLOW_SOAK_SEED`` (6). The defaults are the short form CI runs; ``make
soak`` runs the long one and prints the figures.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cruzflow.v1 import workflows_pb2 as pb
from tests.e2e import FINISHED, Cluster, Watcher
from tests.procs import write_config

WORKFLOWS = int(os.environ.get("CRUZFLOW_SOAK_WORKFLOWS", "500"))
KILLS = int(os.environ.get("CRUZFLOW_SOAK_KILLS", "10"))
SECONDS = float(os.environ.get("CRUZFLOW_SOAK_SECONDS", "15"))
WATCHERS = int(os.environ.get("CRUZFLOW_SOAK_WATCHERS", "20"))
SEED = int(os.environ.get("CRUZFLOW_SOAK_SEED", "6"))

KINDS = ("plain", "retry", "sleep", "event")
# Calls cut by a kill, or made while no server listens: try again on the next one.
RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)
# Past this, a call that keeps failing fails the test (no server came back).
CALL_PATIENCE_S = 120.0


class SoakCluster(Cluster):
    """A cluster whose servers host only the soak workflow."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.config = write_config(
            directory, {"soak": "tests.workflows:Soak"}, store="store.db", http="127.0.0.1:0"
        )


def watched(n: int) -> bool:
    """WATCHERS instances are watched, spread evenly over the run."""
    stride = max(1, WORKFLOWS // max(WATCHERS, 1))
    return n % stride == 0 and n // stride < WATCHERS


def params_of(n: int, rng: random.Random) -> dict[str, Any]:
    kind = KINDS[n % len(KINDS)]
    # Watched instances live a few seconds, so that kills cut their streams.
    long = watched(n)
    step_ms = rng.randrange(300, 800) if long else rng.randrange(0, 40)
    params: dict[str, Any] = {"kind": kind, "n": n, "step_ms": step_ms}
    if kind == "retry":
        params["fail"] = n % 3
    elif kind == "sleep":
        params["ms"] = rng.randrange(2000, 5000) if long else rng.randrange(50, 1500)
    return params


def expected(params: dict[str, Any]) -> dict[str, Any]:
    """What Soak returns for these params (the driver sends k = 3n to "event" ones)."""
    n = params["n"]
    b = 3 * n if params["kind"] == "event" else 2 * n
    return {"kind": params["kind"], "n": n, "result": n + b}


def code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN


@dataclass
class Driver:
    """Creates the instances, sends the events, and keeps count of what happened."""

    cluster: SoakCluster
    rng: random.Random
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    watchers: list[Watcher] = field(default_factory=list)
    retried_calls: int = 0
    failure: BaseException | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _events: list[tuple[float, str, int]] = field(default_factory=list)
    _events_sent: int = 0
    _created: threading.Event = field(default_factory=threading.Event)

    def call(self, method: str, request: Any) -> Any:
        """One RPC on whichever server is up, again until it gets an answer."""
        deadline = time.monotonic() + CALL_PATIENCE_S
        while True:
            try:
                return getattr(self.cluster.stub, method)(request, timeout=10)
            except grpc.RpcError as exc:
                if code_of(exc) not in RETRY_CODES or time.monotonic() > deadline:
                    raise
            with self._lock:
                self.retried_calls += 1
            time.sleep(0.05)

    def create(self, n: int, params: dict[str, Any]) -> None:
        instance_id = f"soak{n:05d}"
        request = pb.CreateInstanceRequest(
            workflow="soak", instance_id=instance_id, params_json=json.dumps(params)
        )
        while True:
            try:
                self.call("CreateInstance", request)
                break
            except grpc.RpcError as exc:
                if code_of(exc) != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            # An earlier try whose answer a kill cut off, or one still being
            # stored: only a stored instance counts as created.
            try:
                self.call("GetStatus", pb.GetStatusRequest(instance_id=instance_id))
                break
            except grpc.RpcError as exc:
                if code_of(exc) != grpc.StatusCode.NOT_FOUND:
                    raise
        with self._lock:
            self.acked[instance_id] = params
            if params["kind"] == "event":
                # Some events arrive before the wait begins, some after.
                later = self.rng.uniform(2.0, 4.0) if watched(n) else self.rng.uniform(0.0, 1.5)
                heapq.heappush(self._events, (time.monotonic() + later, instance_id, 3 * n))
        if watched(n):
            # Every other one over HTTP (a Connect stream), the rest over gRPC.
            http = (n // max(1, WORKFLOWS // max(WATCHERS, 1))) % 2 == 1
            watcher = Watcher(self.cluster, instance_id, timeout=SECONDS + 300, http=http)
            self.watchers.append(watcher)
            watcher.start()

    def creator(self, numbers: list[int], paced_from: float, rate: float) -> None:
        try:
            rng = random.Random(SEED * 1000 + numbers[0] if numbers else SEED)
            for n in numbers:
                pause = paced_from + n / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                self.create(n, params_of(n, rng))
        except BaseException as exc:
            self.failure = exc

    def sender(self) -> None:
        """Sends each "event" instance its "go" event when it is due."""
        try:
            while True:
                with self._lock:
                    head = self._events[0] if self._events else None
                    if head is not None and head[0] <= time.monotonic():
                        heapq.heappop(self._events)
                if head is None:
                    if self._created.is_set():
                        return
                    time.sleep(0.02)
                    continue
                if head[0] > time.monotonic():
                    time.sleep(min(0.02, head[0] - time.monotonic()))
                    continue
                _, instance_id, k = head
                request = pb.SendEventRequest(
                    instance_id=instance_id, type="go", payload_json=json.dumps({"k": k})
                )
                try:
                    self.call("SendEvent", request)
                except grpc.RpcError as exc:
                    # A retry of a send whose answer a kill cut off, after the
                    # instance took the first one and finished: already done.
                    if code_of(exc) != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                self._events_sent += 1
        except BaseException as exc:
            self.failure = exc


def read_marks(side: Path) -> dict[tuple[str, str], list[tuple[int, str, str]]]:
    """(instance, step) -> [(line number, "start" or "done", token)], in file order."""
    marks: dict[tuple[str, str], list[tuple[int, str, str]]] = defaultdict(list)
    with open(side) as lines:
        for number, line in enumerate(lines):
            instance_id, step, phase, _attempt, token = line.strip().split(":")
            marks[(instance_id, step)].append((number, phase, token))
    return marks


def test_soak_sigkill_at_random_moments_loses_nothing_and_reruns_no_recorded_step(
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    rng = random.Random(SEED)
    cluster = SoakCluster(tmp_path / "soak")
    driver = Driver(cluster, random.Random(SEED + 1))
    try:
        cluster.start()
        paced_from = time.monotonic()
        rate = WORKFLOWS / (0.7 * SECONDS)
        creators = [
            threading.Thread(
                target=driver.creator,
                args=(list(range(i, WORKFLOWS, 4)), paced_from, rate),
                name=f"creator-{i}",
                daemon=True,
            )
            for i in range(4)
        ]
        sender = threading.Thread(target=driver.sender, name="sender", daemon=True)
        for thread in [*creators, sender]:
            thread.start()

        # The kills: at random moments spread over SECONDS, each followed by a
        # check of the file and a new server on it at once.
        kills = 0
        mean = SECONDS / max(KILLS, 1)
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 2 * mean - 0.05))
            assert driver.failure is None, driver.failure
            cluster.kill()  # SIGKILL, then PRAGMA integrity_check of the store
            kills += 1
            cluster.start()
        for thread in creators:
            thread.join(CALL_PATIENCE_S + SECONDS)
            assert not thread.is_alive(), "a creator is stuck"
        driver._created.set()
        sender.join(CALL_PATIENCE_S + 10)
        assert not sender.is_alive(), "the event sender is stuck"
        assert driver.failure is None, driver.failure
        assert len(driver.acked) == WORKFLOWS

        # Everything created finishes on the last server, by itself.
        finals = cluster.finished(sorted(driver.acked), timeout=CALL_PATIENCE_S)
        watched = {w.instance_id: w.finish(CALL_PATIENCE_S) for w in driver.watchers}
        cluster.kill()
        kills += 1
        elapsed = time.monotonic() - began

        # ---- every acknowledged instance exists, COMPLETE, with its output
        lost = [i for i in driver.acked if i not in finals]
        wrong = {
            instance_id: (pb.InstanceStatus.Name(instance.status), instance.output_json)
            for instance_id, instance in finals.items()
            if instance.status != pb.INSTANCE_STATUS_COMPLETE
            or json.loads(instance.output_json) != expected(driver.acked[instance_id])
        }

        # ---- no body started again after the recorded run of its step
        marks = read_marks(cluster.side)
        recorded = 0
        rerun_after_success: list[str] = []
        never_finished: list[str] = []
        for instance_id, instance in finals.items():
            for step in instance.steps:
                if step.name not in ("a", "b", "c"):
                    continue  # the sleep and the event wait run no body
                if step.status != pb.STEP_STATUS_SUCCEEDED:
                    never_finished.append(f"{instance_id}:{step.name}")
                    continue
                recorded += 1
                token = json.loads(step.output_json)["token"]
                runs = marks[(instance_id, step.name)]
                done = [n for n, phase, t in runs if phase == "done" and t == token]
                if len(done) != 1:
                    never_finished.append(f"{instance_id}:{step.name}")
                    continue
                if any(n > done[0] and phase == "start" for n, phase, _ in runs):
                    rerun_after_success.append(f"{instance_id}:{step.name}")
        starts = sum(1 for runs in marks.values() for _, phase, _ in runs if phase == "start")
        planned_failures = sum(p.get("fail", 0) for p in driver.acked.values())

        # ---- each watcher saw each sequence once, in order
        seen_twice = 0
        out_of_order: list[str] = []
        resumed = 0
        for instance_id, events in watched.items():
            sequences = [e.sequence for e in events]
            seen_twice += sum(c - 1 for c in Counter(sequences).values())
            if sequences != list(range(1, finals[instance_id].last_sequence + 1)):
                out_of_order.append(instance_id)
            resumed += len(next(w for w in driver.watchers if w.instance_id == instance_id).cuts)

        kinds = Counter(p["kind"] for p in driver.acked.values())
        print(
            f"\nsoak: {len(driver.acked):,} workflows ({', '.join(f'{kinds[k]:,} {k}' for k in KINDS)})"
            f", {kills} SIGKILLs at random moments (seed {SEED}), {elapsed:.1f} s"
            f"\n  instances lost: {len(lost)}; not complete or wrong output: {len(wrong)}"
            f"\n  steps re-run after success: {len(rerun_after_success)} of {recorded:,} recorded"
            f" ({starts - recorded - planned_failures:,} runs cut short by a kill ran again;"
            f" {planned_failures:,} planned failures retried)"
            f"\n  watchers: {len(watched)} ({sum(w.http for w in driver.watchers)} over HTTP),"
            f" events seen twice: {seen_twice}, out of order or"
            f" missing: {len(out_of_order)}, streams cut and resumed: {resumed}"
            f"\n  calls retried across restarts: {driver.retried_calls:,}"
            f"\n  PRAGMA integrity_check: ok after each of the {kills} kills"
        )
        assert not lost, f"instances lost: {lost[:20]}"
        assert not wrong, f"wrong: {list(wrong.items())[:20]}"
        assert not never_finished, f"recorded results no body returned: {never_finished[:20]}"
        assert not rerun_after_success, f"re-run after success: {rerun_after_success[:20]}"
        assert seen_twice == 0
        assert not out_of_order, out_of_order[:20]
        assert all(status in FINISHED for status in (f.status for f in finals.values()))
    finally:
        cluster.close()
