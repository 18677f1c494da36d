"""``python -m bench.console``: what the web console's views cost as the store grows.

Each view of the console is one or two paged API calls (see README, "The web
console"): the instance list is ListInstances (a page of 50) and
CountInstances with the same filters, an instance is GetStatus (and a
WatchInstance), the workflows page is ListWorkflows and CountInstances over
a time window. This times those calls over HTTP/JSON, as the browser makes
them, one after another, with a small store and again with a large one, so
that a view that grows with the number of stored instances shows.

    python -m bench.console                       # 1,000 then 100,000 instances
    python -m bench.console --sizes 1000 10000    # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.harness import (
    SLEEPER_WORKFLOW,
    WORKFLOW,
    Server,
    open_channels,
    percentile,
    write_config,
)
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc

CALLS = 30


class Http:
    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)
        self.connection.connect()
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, method: str, body: dict[str, Any]) -> Any:
        self.connection.request(
            "POST",
            f"/cruzflow.v1.WorkflowService/{method}",
            json.dumps(body),
            {"content-type": "application/json"},
        )
        answer = self.connection.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{method}: {answer.status} {data.decode()}")
        return json.loads(data)


async def fill(address: str, total: int, have: int) -> None:
    """Creates instances up to ``total``: nine in ten run three steps and
    complete, one in ten sleeps (waiting), each with a lookup key of its own."""
    channels = await open_channels(address, 4)
    stubs = [pb_grpc.WorkflowServiceStub(ch) for ch in channels]
    queue = list(range(have, total, 100))

    async def worker(stub: Any) -> None:
        while queue:
            start = queue.pop()
            requests = [
                pb.CreateInstanceRequest(
                    workflow=SLEEPER_WORKFLOW if n % 10 == 0 else WORKFLOW,
                    lookup_key=f"user:{n}",
                    params_json=f'{{"n":{n}}}',
                )
                for n in range(start, min(start + 100, total))
            ]
            await stub.CreateInstances(pb.CreateInstancesRequest(requests=requests), timeout=120)

    await asyncio.gather(*(worker(s) for s in stubs * 2))
    await asyncio.gather(*(ch.close() for ch in channels))


def settle(client: Http, total: int) -> None:
    while True:
        counts = client.call("CountInstances", {}).get("counts", [])
        busy = sum(
            int(c["count"])
            for c in counts
            if c["status"] in ("INSTANCE_STATUS_RUNNING", "INSTANCE_STATUS_QUEUED")
        )
        done = sum(int(c["count"]) for c in counts)
        if done >= total and busy == 0:
            return
        time.sleep(0.5)


def timed(client: Http, method: str, body: dict[str, Any]) -> dict[str, float]:
    client.call(method, body)  # warm
    took = []
    for _ in range(CALLS):
        start = time.perf_counter()
        client.call(method, body)
        took.append((time.perf_counter() - start) * 1000)
    took.sort()
    return {"p50_ms": round(percentile(took, 50), 2), "p95_ms": round(percentile(took, 95), 2)}


def views(client: Http, some_id: str) -> dict[str, dict[str, float]]:
    day = (datetime.now(UTC) - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    waiting = ["INSTANCE_STATUS_WAITING"]
    return {
        "list: newest 50": timed(client, "ListInstances", {"pageSize": 50}),
        "list: by workflow": timed(client, "ListInstances", {"pageSize": 50, "workflow": WORKFLOW}),
        "list: by status (waiting)": timed(
            client, "ListInstances", {"pageSize": 50, "statuses": waiting}
        ),
        "list: by lookup key": timed(
            client, "ListInstances", {"pageSize": 50, "lookupKey": "user:7"}
        ),
        "count: all": timed(client, "CountInstances", {}),
        "count: by workflow": timed(client, "CountInstances", {"workflow": WORKFLOW}),
        "count: last day": timed(client, "CountInstances", {"createTimeMin": day}),
        "count: by lookup key": timed(client, "CountInstances", {"lookupKey": "user:7"}),
        "instance: GetStatus": timed(client, "GetStatus", {"instanceId": some_id}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cruzflow-console-bench-") as folder:
        server = Server(write_config(Path(folder), uvloop=True, http=True))
        server.start()
        try:
            client = Http(server.http_address)
            have = 0
            for size in sorted(args.sizes):
                started = time.perf_counter()
                asyncio.run(fill(server.address, size, have))
                settle(client, size)
                have = size
                some = client.call("ListInstances", {"pageSize": 1})["instances"][0]["instanceId"]
                measured = views(client, some)
                results[str(size)] = measured
                print(
                    f"{size:,} instances (filled in {time.perf_counter() - started:.0f} s):",
                    file=sys.stderr,
                )
                for name, figures in measured.items():
                    print(
                        f"  {name:28} p50 {figures['p50_ms']:7.2f} ms   p95 {figures['p95_ms']:7.2f} ms",
                        file=sys.stderr,
                    )
        finally:
            server.stop()
    print(json.dumps({"console_views": results}))


if __name__ == "__main__":
    main()
