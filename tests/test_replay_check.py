"""Deploying changed code: the replay sandbox (WorkflowTestEnv.replay and
`cruzflow check`), step.version markers, and exported instances as fixtures.

Histories are recorded by the real engine on a real SQLite store (the test
kit), or by a real `cruzflow serve` process for the CLI and the SIGKILL test
(on the run's store: SQLite, or PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cruzflow.client import Client
from cruzflow.testing import WorkflowTestEnv
from tests import deploy_workflows as dw
from tests.conftest import ON_POSTGRES
from tests.procs import ServerProcess, write_config

ORDER = "order"
CLI = [sys.executable, "-m", "cruzflow.server.cli"]


async def _record(directory: Path) -> dict[str, dict[str, Any]]:
    """Under OrderV1: A waits for approval, B (approved) for delivery, C is
    complete. Returns their exports; the store stays in ``directory``."""
    async with WorkflowTestEnv(dw.OrderV1, name=ORDER, directory=directory) as t:
        a = await t.start({"n": 1}, id="A")
        b = await t.start({"n": 2}, id="B")
        c = await t.start({"n": 3}, id="C")
        for handle in (a, b, c):
            await handle.wait_for_status("waiting")
        for handle in (b, c):
            await handle.send_event("approve", "ada")
            await handle.wait_for_step("ship")
            await handle.wait_for_status("waiting")
        await c.send_event("deliver")
        assert (await c.result()).status == "complete"
        assert await a.status() == await b.status() == "waiting"
        return {h.id: await h.export() for h in (a, b, c)}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return asyncio.run(_record(tmp_path_factory.mktemp("recorded")))


async def _replay(cls: type[Any], fixture: dict[str, Any] | str) -> Any:
    async with WorkflowTestEnv(cls, name=ORDER) as t:
        return await t.replay(fixture)


async def test_unchanged_code_replays_every_history_cleanly_and_runs_no_body(
    recorded: dict[str, dict[str, Any]],
) -> None:
    before = list(dw.CALLS)
    a, b, c = [await _replay(dw.OrderV1, recorded[i]) for i in "ABC"]
    assert (a.outcome, a.next_step.name, a.next_step.index) == ("waiting", "approval", 1)
    assert (b.outcome, b.next_step.name, b.next_step.index) == ("waiting", "delivered", 4)
    assert (c.outcome, c.output) == ("completed", {"charged": 30, "by": "ada"})
    assert c.steps_replayed == 5
    assert not (a.diverged or b.diverged or c.diverged)
    assert before == dw.CALLS  # the sandbox ran no step body


@pytest.mark.parametrize(
    ("cls", "index", "recorded_step", "code_step"),
    [
        (dw.OrderRenamed, 2, ("do", "charge"), ("do", "charge card")),
        (dw.OrderReordered, 2, ("do", "charge"), ("do", "ship")),
        (dw.OrderFraudCheck, 2, ("do", "charge"), ("do", "fraud check")),
        (dw.OrderWithoutDelivery, 4, ("waitForEvent", "delivered"), None),
    ],
    ids=["renamed", "reordered", "inserted", "removed"],
)
async def test_a_change_is_found_where_the_history_went_past_it(
    recorded: dict[str, dict[str, Any]],
    cls: type[Any],
    index: int,
    recorded_step: tuple[str, str],
    code_step: tuple[str, str] | None,
) -> None:
    # A waits before the changed point: the change is safe for it.
    a = await _replay(cls, recorded["A"])
    assert a.outcome == "waiting" and not a.diverged
    # B went past it: the replay names the position, the recorded step and the code's.
    b = await _replay(cls, recorded["B"])
    assert b.outcome == "diverged"
    found = b.divergence
    assert found.index == index
    assert (found.recorded.kind, found.recorded.name) == recorded_step
    assert (None if found.code is None else (found.code.kind, found.code.name)) == code_step
    assert recorded_step[1] in found.message


async def test_a_version_marker_makes_the_same_change_safe(
    recorded: dict[str, dict[str, Any]],
) -> None:
    for name in "ABC":
        result = await _replay(dw.OrderVersioned, recorded[name])
        assert not result.diverged, (name, result)
    c = await _replay(dw.OrderVersioned, recorded["C"])
    # C went past the marker's point before it existed: the old path, v2 False.
    assert c.output == {"charged": 30, "by": "ada", "v2": False}


async def test_a_deploy_with_a_marker_keeps_old_runs_on_the_old_path(tmp_path: Path) -> None:
    """The live engine on the store OrderV1 wrote, now running OrderVersioned:
    A (before the marker's point) takes the new path and records the marker;
    B (past it) keeps the old one; no finished step runs again."""
    recorded = await _record(tmp_path)
    del recorded
    calls = len(dw.CALLS)
    async with WorkflowTestEnv(dw.OrderVersioned, name=ORDER, directory=tmp_path) as t:
        a, b = t.instance("A"), t.instance("B")
        await a.send_event("approve", "bob")
        await a.wait_for_step("ship")
        await a.wait_for_status("waiting")
        for handle in (a, b):
            await handle.send_event("deliver")
        run_a, run_b = await a.result(), await b.result()
        assert run_a.output == {"charged": 10, "by": "bob", "v2": True}
        assert run_b.output == {"charged": 20, "by": "ada", "v2": False}
        assert [s.name for s in run_a.steps] == [
            "reserve", "approval", "fraud-check", "fraud check", "charge", "ship", "delivered",
        ]  # fmt: skip
        assert run_a.step("fraud-check").kind == "version"
        assert "fraud check" not in [s.name for s in run_b.steps]
        exported_a = await a.export()
    # Only A's new steps ran; B ran nothing again.
    assert sorted(dw.CALLS[calls:]) == ["A:charge", "A:fraud check", "A:ship"]
    # Once only runs with the marker are left, the guard can go (keeping the
    # new path): A replays cleanly without the call, its marker passed over.
    # Going back to the old path instead is found.
    assert not (await _replay(dw.OrderFraudCheck, exported_a)).diverged
    old = await _replay(dw.OrderV1, exported_a)
    assert old.diverged and old.divergence.recorded.name == "fraud check"


async def test_a_replay_of_a_failed_step_raises_its_recorded_error(tmp_path: Path) -> None:
    async with WorkflowTestEnv(dw.OrderV1, name=ORDER, skip_event_timeouts=True) as t:
        run = await t.run({"n": 1})
        assert run.status == "errored"
        fixture = await t.instance(run.id).export()
        result = await t.replay(fixture)
    assert result.outcome == "errored"
    assert result.error is not None and result.error[0] == "EventTimeoutError"


async def test_a_fixture_that_is_not_an_export_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"instance": {}}))
    async with WorkflowTestEnv(dw.OrderV1, name=ORDER) as t:
        with pytest.raises(ValueError, match="cruzflow export"):
            await t.replay(path)


# ------------------------------------------------- a real server and the CLI
def _cli(*args: str, address: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUZFLOW_")}
    if address:
        env["CRUZFLOW_ADDRESS"] = address
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def _store_url(request: pytest.FixtureRequest) -> str | None:
    """A PostgreSQL database of its own on a PostgreSQL run; None: SQLite."""
    if not ON_POSTGRES:
        return None
    cluster = request.getfixturevalue("postgres_server")
    url: str = cluster.url(cluster.create_database())
    return url


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """A server running OrderV1 as "order", with A, B and C as above."""
    directory = tmp_path_factory.mktemp("check-server")
    config = write_config(
        directory, {ORDER: "tests.deploy_workflows:OrderV1"}, store_url=_store_url(request)
    )
    proc = ServerProcess(config)
    proc.start()

    async def populate() -> None:
        async with Client(proc.address) as client:
            order = client.workflow(ORDER)
            handles = {i: await order.create({"n": n}, id=i) for n, i in enumerate("ABC", 1)}
            for i in "BC":
                await _until_step(handles[i], "approval")
                await handles[i].send_event("approve", "ada")
                await _until_step(handles[i], "delivered")
            await handles["C"].send_event("deliver")
            await handles["C"].result(timeout=60)
            await _until_step(handles["A"], "approval")

    asyncio.run(populate())
    yield proc
    proc.stop()


async def _until_step(handle: Any, name: str) -> None:
    for _ in range(3000):
        info = await handle.status()
        if any(s.name == name for s in info.steps) and info.status.value == "waiting":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{handle.id} never waited at {name}")


def _config(directory: Path, target: str, name: str = ORDER) -> Path:
    folder = directory / f"{target}-{name}"
    folder.mkdir(exist_ok=True)
    return write_config(folder, {name: f"tests.deploy_workflows:{target}"})


def test_check_against_a_server_passes_unchanged_and_guarded_code(
    server: ServerProcess, tmp_path: Path
) -> None:
    for target in ("OrderV1", "OrderVersioned"):
        done = _cli("check", "--config", str(_config(tmp_path, target)), "--against",
                    server.address, "--finished", "5")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "order: 3 replayed, 3 clean" in done.stdout
        assert "would break" not in done.stdout


def test_check_against_a_server_names_what_breaks_and_exits_1(
    server: ServerProcess, tmp_path: Path
) -> None:
    done = _cli("check", "--config", str(_config(tmp_path, "OrderRenamed")), "--json",
                address=server.address)  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert (report["ok"], report["checked"], report["breaking"]) == (False, 2, 1)
    (order,) = report["workflows"]
    (broken,) = order["breaking"]
    assert broken["instance_id"] == "B" and broken["position"] == 2
    assert broken["recorded"] == {"kind": "do", "name": "charge", "occurrence": 1}
    assert broken["code"] == {"kind": "do", "name": "charge card", "occurrence": 1}
    # The finished ones only with --finished: C completed past the change too.
    text = _cli("check", "--config", str(_config(tmp_path, "OrderWithoutDelivery")),
                "--finished", "10", address=server.address)  # fmt: skip
    assert text.returncode == 1
    assert "order: 3 replayed, 1 clean, 2 would break" in text.stdout
    assert "B (waiting): step #4 waitForEvent 'delivered' was recorded" in text.stdout
    assert "C (complete): step #4 waitForEvent 'delivered' was recorded" in text.stdout


@pytest.mark.skipif(
    ON_POSTGRES, reason="--store reads a SQLite file; PostgreSQL is checked through its server"
)
def test_check_reads_a_store_file_beside_its_running_server(
    server: ServerProcess, tmp_path: Path
) -> None:
    store = server.config.parent / "store.db"
    done = _cli("check", "--config", str(_config(tmp_path, "OrderReordered")), "--store",
                str(store), "--json")  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert [b["instance_id"] for b in report["workflows"][0]["breaking"]] == ["B"]
    # The server was not disturbed: it still serves.
    assert _cli("status", "A", address=server.address).returncode == 0


def test_check_finds_instances_of_a_workflow_the_new_config_drops(
    server: ServerProcess, tmp_path: Path
) -> None:
    done = _cli("check", "--config", str(_config(tmp_path, "OrderV1", name="renamed-order")),
                address=server.address)  # fmt: skip
    assert done.returncode == 1
    assert "order: 2 replayed, 0 clean, 2 would break (not in the new config)" in done.stdout
    assert "is not in the new config" in done.stdout


def test_check_refuses_a_bad_config_or_store_with_exit_2(tmp_path: Path) -> None:
    missing = _cli("check", "--config", str(tmp_path / "nope.toml"), "--store", "x.db")
    assert missing.returncode == 2 and "no such config file" in missing.stderr
    config = _config(tmp_path, "OrderV1")
    no_store = _cli("check", "--config", str(config), "--store", str(tmp_path / "none.db"))
    assert no_store.returncode == 2 and "no such store file" in no_store.stderr
    unknown = _cli("check", "--config", str(config), "--store", "x.db", "--workflow", "nah")
    assert unknown.returncode == 2 and "not a workflow of" in unknown.stderr


def test_an_instance_exported_after_a_sigkill_replays_to_its_result(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Recorded across a SIGKILL and a restart of the server; exported with the
    CLI; replayed in the test kit to the same output, with no body run."""
    config = write_config(
        tmp_path, {ORDER: "tests.deploy_workflows:OrderV1"}, store_url=_store_url(request)
    )
    proc = ServerProcess(config)
    proc.start()
    try:

        async def before_kill() -> None:
            async with Client(proc.address) as client:
                handle = await client.workflow(ORDER).create({"n": 7}, id="K")
                await _until_step(handle, "approval")
                await handle.send_event("approve", "eve")

        asyncio.run(before_kill())
        proc.kill()
        proc.start()

        async def after_restart() -> Any:
            async with Client(proc.address) as client:
                handle = client.instance("K")
                await _until_step(handle, "delivered")
                await handle.send_event("deliver")
                return await handle.result(timeout=60)

        output = asyncio.run(after_restart())
        exported = _cli("export", "K", address=proc.address)
        assert exported.returncode == 0, exported.stderr
    finally:
        proc.stop()
    fixture = tmp_path / "fixture.json"
    fixture.write_text(exported.stdout)
    data = json.loads(exported.stdout)
    assert data["instance"]["status"] == "INSTANCE_STATUS_COMPLETE"
    assert [s["name"] for s in data["instance"]["steps"]][:2] == ["reserve", "approval"]
    assert data["events"][-1]["sequence"] == data["instance"]["lastSequence"]
    calls = list(dw.CALLS)
    result = asyncio.run(_replay(dw.OrderV1, str(fixture)))
    assert (result.outcome, result.output) == ("completed", output)
    assert output == {"charged": 70, "by": "eve"}
    assert calls == dw.CALLS
