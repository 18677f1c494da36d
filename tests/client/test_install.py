"""``pip install clients/python`` on its own, into a fresh virtual environment.

The client package is built from a copy of clients/python (with pip's build
isolation, as a user's ``pip install`` does it) and installed with its
declared dependencies only, from a folder of wheels, without an index: if it
needed anything else, the install would fail. The environment must then have
no server dependency, and must create an instance on a real server and get
its result.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"

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


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _install(tmp_path: Path) -> Path:
    """A fresh venv with the client installed; returns its python."""
    wheels = tmp_path / "wheels"
    # The versions this checkout runs with, so pip's cache usually has them.
    fetched = _run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
        "--dest",
        wheels,
        f"grpcio=={version('grpcio')}",
        f"protobuf=={version('protobuf')}",
        f"setuptools=={version('setuptools')}",
        cwd=tmp_path,
    )
    if fetched.returncode != 0:
        pytest.skip(f"cannot fetch the dependency wheels from the package index:\n{fetched.stderr}")

    source = tmp_path / "client-src"
    shutil.copytree(
        CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    venv = tmp_path / "venv"
    made = _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-index",
        "--find-links",
        wheels,
        source,
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


async def test_client_installs_and_works_alone(tmp_path: Path, server: Server) -> None:
    python = await asyncio.to_thread(_install, tmp_path)
    listed = await asyncio.to_thread(
        _run, python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path
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
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, err.decode()
    assert out.decode().strip() == '{"sum": 6, "params": {"from": "venv"}}'
