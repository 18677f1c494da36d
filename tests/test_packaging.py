"""Packaging: pyproject.toml's ranges against constraints.txt, and the server
installed alone, as a user installs it from a checkout.

pyproject.toml declares compatible ranges (cruzflow is a library inside an
application); constraints.txt pins the one set of versions ``make`` and CI
install. These tests fail when the two disagree or the venv has drifted from
the pins, and prove that ``pip install ./clients/python .`` gives a working
``cruzflow`` command in a fresh venv.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import tomllib
from importlib.metadata import PackageNotFoundError, requires
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

from tests import wheels

ROOT = wheels.ROOT
OURS = {canonicalize_name("cruzflow"), canonicalize_name("cruzflow-client")}
# Installed by the install rule beside the requirements, not by them.
TOOLING = {canonicalize_name("pip")}


def _pyproject(path: Path) -> dict[str, object]:
    loaded: dict[str, object] = tomllib.loads(path.read_text())
    return loaded


def _project(path: Path) -> dict[str, object]:
    project = _pyproject(path)["project"]
    assert isinstance(project, dict)
    return project


SERVER = _project(ROOT / "pyproject.toml")
CLIENT = _project(ROOT / "clients" / "python" / "pyproject.toml")


def _requirements(project: dict[str, object], extra: str | None = None) -> list[Requirement]:
    if extra is None:
        listed = project["dependencies"]
    else:
        extras = project["optional-dependencies"]
        assert isinstance(extras, dict)
        listed = extras[extra]
    assert isinstance(listed, list)
    return [Requirement(r) for r in listed]


def _pins() -> dict[NormalizedName, Version]:
    pins: dict[NormalizedName, Version] = {}
    for line in wheels.CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, pinned = line.partition("==")
        assert sep and ";" not in pinned, f"constraints.txt: not an exact pin: {line!r}"
        key = canonicalize_name(name)
        assert key not in pins, f"constraints.txt pins {name} twice"
        pins[key] = Version(pinned)
    return pins


def test_every_declared_dependency_is_a_range_its_pin_satisfies() -> None:
    pins = _pins()
    declared = [
        *_requirements(SERVER),
        *_requirements(SERVER, "dev"),
        *_requirements(CLIENT),
    ]
    wrong = []
    for req in declared:
        key = canonicalize_name(req.name)
        if key in OURS:
            continue
        # A library declares ranges: an exact pin here clashes in an application.
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"pinned: {req}"
        assert any(s.operator in ("<", "~=") for s in req.specifier), f"no upper bound: {req}"
        if req.marker is not None and not req.marker.evaluate():
            continue  # uvloop on Windows: not installed, so not necessarily pinned
        if key not in pins:
            wrong.append(f"{req}: not in constraints.txt")
        elif not req.specifier.contains(pins[key], prereleases=True):
            wrong.append(f"{req}: constraints.txt pins {pins[key]}")
    assert not wrong, "run `make lock`, or mend the range:\n" + "\n".join(wrong)


def test_the_server_depends_on_the_client_of_its_own_release() -> None:
    assert SERVER["version"] == CLIENT["version"], "the two packages are released together"
    (client,) = (r for r in _requirements(SERVER) if canonicalize_name(r.name) in OURS)
    assert canonicalize_name(client.name) == "cruzflow-client"
    ours = Version(str(SERVER["version"]))
    assert client.specifier.contains(ours, prereleases=True), client
    assert not client.specifier.contains(f"{ours.major}.{ours.minor + 1}.0"), client


def test_uvloop_stays_off_windows_where_it_does_not_exist() -> None:
    (uvloop,) = (r for r in _requirements(SERVER) if r.name == "uvloop")
    assert uvloop.marker is not None
    assert not uvloop.marker.evaluate({"sys_platform": "win32"})


def _closure() -> set[NormalizedName]:
    """Every distribution that installing cruzflow[dev] and cruzflow-client pulls
    in, here, read from the installed metadata."""
    done: set[tuple[NormalizedName, str]] = set()
    todo: list[tuple[str, str]] = [("cruzflow", "dev"), ("cruzflow-client", "")]
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in done:
            continue
        done.add((canonicalize_name(name), extra))
        for line in requires(name) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo.extend((req.name, e) for e in [*sorted(req.extras), ""])
    return {name for name, _ in done}


def test_constraints_pin_exactly_what_the_venv_has() -> None:
    pins = _pins()
    wanted = _closure() - OURS
    assert not wanted - pins.keys(), f"not pinned (run `make lock`): {sorted(wanted - pins.keys())}"
    assert not pins.keys() - wanted - TOOLING, (
        f"pinned but installed by nothing (run `make lock`): {sorted(pins.keys() - wanted)}"
    )
    drifted = []
    for key, pinned in pins.items():
        try:
            have = Version(installed_version(key))
        except PackageNotFoundError:
            have = None
        if have != pinned:
            drifted.append(f"{key}: constraints.txt {pinned}, .venv {have}")
    assert not drifted, "the venv is not the constraints' (run `make install`):\n" + "\n".join(
        drifted
    )
    checked = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


WORKFLOW = """
from cruzflow.workflows import WorkflowEntrypoint


class Tiny(WorkflowEntrypoint):
    async def run(self, event, step):
        one = await step.do("one", lambda: 1)
        two = await step.do("two", lambda: 2)
        return {"sum": one + two, "params": event.payload}
"""

CONFIG = """
name = "tiny"
python_path = ["."]

[server]
listen = "127.0.0.1:50051"
grace_period = "5 seconds"

[store]
path = "data/cruzflow.db"

[[workflows]]
binding = "TINY_WORKFLOW"
name = "tiny-workflow"
class_name = "tiny:Tiny"
"""

CALLS = """
import json, sys
import cruzflow.client, cruzflow.server
from cruzflow.client import SyncClient

with SyncClient(sys.argv[1]) as client:
    handle = client.workflow("tiny-workflow").create({"from": "venv"}, id="tiny-1")
    result = handle.result(timeout=60)
print(json.dumps({"result": result, "files": [cruzflow.client.__file__, cruzflow.server.__file__]}))
"""


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> wheels.Wheelhouse:
    return wheels.wheelhouse(tmp_path_factory)


def test_the_server_installs_alone_and_serves(
    tmp_path: Path, wheelhouse: wheels.Wheelhouse
) -> None:
    # As the README says, in a checkout: `pip install ./clients/python .`; here
    # with only the dependency wheels, so both are built from their sources.
    checkout = wheels.copy_sources(tmp_path / "checkout")
    python = wheels.fresh_venv(tmp_path / "venv")
    wheelhouse.pip_install(python, "./clients/python", ".", cwd=checkout, dist=False)
    cruzflow = python.parent / "cruzflow"
    checked = wheels.run(python, "-m", "pip", "check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout

    helped = wheels.run(cruzflow, "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "serve" in helped.stdout and "new" in helped.stdout

    service = tmp_path / "service"
    service.mkdir()
    (service / "tiny.py").write_text(WORKFLOW)
    (service / "cruzflow.toml").write_text(CONFIG)
    log = service / "server.log"
    with log.open("w") as err:
        server = subprocess.Popen(
            [cruzflow, "serve", "--config", "cruzflow.toml", "--listen", "127.0.0.1:0"],
            cwd=service,
            env=wheels.user_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    # readline() blocks: a server that hangs silently is killed at the deadline.
    watchdog = threading.Timer(60, server.kill)
    watchdog.start()
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert first.startswith("cruzflow listening on "), first + log.read_text()
        address = first.split()[-1]

        (tmp_path / "calls.py").write_text(CALLS)
        called = wheels.run(python, tmp_path / "calls.py", address, cwd=tmp_path, timeout=120)
        assert called.returncode == 0, called.stderr + log.read_text()
        answer = json.loads(called.stdout)
        assert answer["result"] == {"sum": 3, "params": {"from": "venv"}}
        site = wheels.site_packages(python)
        assert all(Path(f).is_relative_to(site) for f in answer["files"]), answer["files"]

        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0, log.read_text()
        assert time.monotonic() - stopping < 10
    finally:
        watchdog.cancel()
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()
