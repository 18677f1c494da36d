"""What a schedule's fire costs: CPU per fired due time, in-process on SQLite.

``python -m bench.schedules [N]`` makes N schedules that fire every second
(``* * * * * *``) on a three-step workflow, lets them fire for ten seconds,
and prints the fires and the process's CPU per fire (the instances' runs
included). Run from the repository's root.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

from cruzflow.server.engine.runtime import Engine, Limits
from cruzflow.server.engine.schedules import ScheduleSpec
from cruzflow.server.store.sqlite import SqliteStore
from tests.conftest import specs

SECONDS = 10.0


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _instances(store: SqliteStore) -> int:
    rows = await store._fetch("SELECT count(*) FROM instances")
    return int(rows[0][0])


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = SqliteStore(Path(folder) / "store.db")
        await store.open()
        engine = Engine(store, specs(), None, Limits())
        await engine.start()
        for i in range(n):
            spec = ScheduleSpec(id=f"s{i}", workflow="three-steps", cron="* * * * * *")
            await engine.create_schedule(spec)
        await asyncio.sleep(1.5)  # past the first fires
        cpu, wall, before = _cpu(), time.monotonic(), await _instances(store)
        await asyncio.sleep(SECONDS)
        fires = await _instances(store) - before
        cpu, wall = _cpu() - cpu, time.monotonic() - wall
        print(
            f"{n} schedules: {fires} fires in {wall:.1f} s ({fires / wall:.0f}/s), "
            f"{cpu / fires * 1000:.2f} ms of CPU a fire, {cpu / wall:.0%} of a core"
        )
        await engine.shutdown(1.0)
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
