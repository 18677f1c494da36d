"""``pip install clients/python`` on its own, into a fresh virtual environment.

The client package is built from a copy of clients/python (with pip's build
isolation, as a user's ``pip install`` does it) and installed without an
index, from the session's folder of dependency wheels (tests/wheels.py): pip
installs only what the client declares, so if it needed anything else, the
script below would fail. The environment must then have no server
dependency, and must create an instance on a real server and get its result.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests import wheels
from tests.conftest import Server

SCRIPT = """
import asyncio, importlib.util, json, sys
from pathlib import Path

def importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False

leaked = [n for n in ("aiosqlite", "opentelemetry.sdk", "pydantic", "cruzflow.server") if importable(n)]
assert not leaked, f"server dependencies importable: {leaked}"

import cruzflow.client, cruzflow.v1
from cruzflow.client import Client, SyncClient

package = Path(cruzflow.client.__file__).parent
assert "site-packages" in str(package), package
assert (package / "py.typed").is_file()
assert (package.parent / "v1" / "py.typed").is_file()
assert (package.parent / "v1" / "workflows_pb2.pyi").is_file()
assert not (package.parent / "__init__.py").exists(), "cruzflow must stay a namespace package"

async def main(address):
    async with Client(address) as client:
        handle = await client.workflow("three-steps").create({"from": "venv"}, id="from-venv")
        return await handle.result(timeout=60)

print(json.dumps(asyncio.run(main(sys.argv[1]))))
"""


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> wheels.Wheelhouse:
    return wheels.wheelhouse(tmp_path_factory)


def _install(tmp_path: Path, house: wheels.Wheelhouse) -> Path:
    """A fresh venv with the client installed from its sources; returns its python."""
    sources = wheels.copy_sources(tmp_path / "src")
    python = wheels.fresh_venv(tmp_path / "venv")
    house.pip_install(python, sources / "clients" / "python", cwd=tmp_path, dist=False)
    return python


async def test_client_installs_and_works_alone(
    tmp_path: Path, server: Server, wheelhouse: wheels.Wheelhouse
) -> None:
    python = await asyncio.to_thread(_install, tmp_path, wheelhouse)
    listed = await asyncio.to_thread(
        wheels.run, python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path
    )
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert {"cruzflow-client", "grpcio", "protobuf"} <= names
    assert not names & {"aiosqlite", "opentelemetry-sdk", "pydantic", "cruzflow"}, names

    script = tmp_path / "uses_client.py"
    script.write_text(SCRIPT)
    # The server runs on this loop: wait for the child without blocking it.
    child = await asyncio.create_subprocess_exec(
        str(python),
        str(script),
        server.address,
        cwd=tmp_path,
        env=wheels.user_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, err.decode()
    assert out.decode().strip() == '{"sum": 6, "params": {"from": "venv"}}'
