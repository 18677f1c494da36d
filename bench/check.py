"""How long ``cruzflow check`` takes over many live instances.

``python -m bench.check [N]`` serves the "order" workflow of
``tests.deploy_workflows`` (OrderV1) from a real ``cruzflow serve`` on a
SQLite store, creates N instances (half of them then approved, so they wait
further on, past the point the new code changes), and times ``cruzflow
check`` of a changed config (OrderVersioned, a step.version guard: all
clean) against the server, then against its store file. Run from the
repository's root.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cruzflow.client import Client, NewInstance
from tests.procs import ServerProcess, write_config

CLI = [sys.executable, "-m", "cruzflow.server.cli"]


async def _populate(address: str, n: int) -> None:
    async with Client(address, timeout=60) as client:
        order = client.workflow("order")
        for start in range(0, n, 100):
            await order.create_batch(
                [NewInstance({"n": i}, id=f"o{i}") for i in range(start, min(n, start + 100))]
            )
        sem = asyncio.Semaphore(64)

        async def approve(i: int) -> None:
            async with sem:
                await client.instance(f"o{i}").send_event("approve", "bench")

        await asyncio.gather(*(approve(i) for i in range(0, n, 2)))
        # Until every instance waits (at "approval", or at "delivered").
        while True:
            counts = await client.count_instances(workflow="order")
            if counts.of(status="running") + counts.of(status="queued") == 0:
                break
            await asyncio.sleep(0.2)


def _check(*args: str) -> tuple[float, dict[str, object]]:
    started = time.monotonic()
    done = subprocess.run([*CLI, "check", "--json", *args], capture_output=True, text=True)
    elapsed = time.monotonic() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"check failed ({done.returncode}): {done.stderr}")
    report: dict[str, object] = json.loads(done.stdout)
    return elapsed, report


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "old").mkdir()
        (base / "new").mkdir()
        old = write_config(base / "old", {"order": "tests.deploy_workflows:OrderV1"})
        new = write_config(base / "new", {"order": "tests.deploy_workflows:OrderVersioned"})
        server = ServerProcess(old).start()
        try:
            made = time.monotonic()
            asyncio.run(_populate(server.address, n))
            print(f"{n:,} instances waiting, made in {time.monotonic() - made:.1f} s")
            for label, args in (
                ("against the server", ["--against", server.address]),
                ("against the store file", ["--store", str(base / "old" / "store.db")]),
            ):
                wall, report = _check("--config", str(new), *args)
                print(
                    f"check {label}: {report['checked']:,} instances replayed, "
                    f"{report['breaking']} would break, {wall:.1f} s in all "
                    f"({report['seconds']:.1f} s reading and replaying)"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
