"""Wheels of this repo and of what it depends on, for the tests that install
cruzflow into a fresh virtual environment the way a user does
(tests/client/test_install.py, tests/test_packaging.py, tests/test_scaffold.py).

Made once per test session (``wheelhouse``):

- ``deps/``: the wheels of every dependency the two distributions declare,
  of the build backend and of a scaffolded project's dev extras, fetched by
  ``pip download`` under constraints.txt, so at the versions ``make`` installs
  (pip's cache makes a repeat fast). Without a package index the tests that
  need it skip, with one line saying so.
- ``dist/``: cruzflow and cruzflow-client built from a copy of the sources as
  ``make dist`` builds them (``pip wheel --no-deps``, with pip's build
  isolation), offline from ``deps/``.

Installs then run with ``--no-index``, the two folders and no pip
configuration of this machine's user: a dependency that is not declared is
not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
TEMPLATE_PYPROJECT = (
    ROOT / "server" / "cruzflow" / "server" / "templates" / "workflow" / "pyproject.toml.tmpl"
)
# What the two distributions are built from (the server's pyproject names README.md).
_SOURCES = ("pyproject.toml", "README.md", "server", "clients/python")
_IGNORE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of this test run's PYTHONPATH or venv."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PYTEST")
    }


def offline_env() -> dict[str, str]:
    """A user's environment for pip, less any PIP_* setting and user pip.conf
    (an index, find-links or constraints of this machine's own)."""
    env = {k: v for k, v in user_env().items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(
    *args: str | Path,
    cwd: Path,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would, capturing its output."""
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=user_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fresh_venv(path: Path) -> Path:
    """``python -m venv PATH`` with this interpreter; returns the venv's python."""
    made = run(sys.executable, "-m", "venv", path, cwd=path.parent)
    assert made.returncode == 0, made.stdout + made.stderr
    return path / "bin" / "python"


def site_packages(python: Path) -> Path:
    """The site-packages folder of a venv's python."""
    found = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=ROOT)
    assert found.returncode == 0, found.stderr
    return Path(found.stdout.strip())


def copy_sources(dest: Path) -> Path:
    """Copy what the two distributions are built from (``pyproject.toml``,
    ``README.md``, ``server/``, ``clients/python/``) to ``dest``, a checkout
    less its build outputs; returns ``dest``."""
    for name in _SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dest / name, ignore=_IGNORE)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@dataclass(frozen=True, slots=True)
class Wheelhouse:
    """The session's two wheel folders."""

    dist: Path
    """``cruzflow-*.whl`` and ``cruzflow_client-*.whl``, as ``make dist`` writes them."""
    deps: Path
    """Every dependency's wheel, at the versions of constraints.txt."""

    def pip_install(self, python: Path, *args: str | Path, cwd: Path, dist: bool = True) -> None:
        """``python -m pip install ARGS`` from the two folders alone (``deps/``
        alone without ``dist``, to build ours from sources); asserts it worked."""
        folders = [self.dist, self.deps] if dist else [self.deps]
        installed = run(
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            *[arg for folder in folders for arg in ("--find-links", folder)],
            *args,
            cwd=cwd,
            env=offline_env(),
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr


def _requirements() -> list[str]:
    """What the wheels need from elsewhere: each distribution's dependencies
    (less cruzflow-client, built here), its build backend, and the dev extras
    and build backend of a scaffolded project."""
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())
    client = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())
    # The template is TOML whose ${...} placeholders sit inside strings.
    template = tomllib.loads(TEMPLATE_PYPROJECT.read_text())
    wanted = [
        *server["project"]["dependencies"],
        *server["build-system"]["requires"],
        *client["project"]["dependencies"],
        *client["build-system"]["requires"],
        *template["project"]["optional-dependencies"]["dev"],
        *template["build-system"]["requires"],
    ]
    ours = {"cruzflow", "cruzflow-client"}
    return list(
        dict.fromkeys(r for r in wanted if canonicalize_name(Requirement(r).name) not in ours)
    )


def _build(folder: Path) -> Wheelhouse | str:
    """Make the wheelhouse in ``folder``; a reason to skip if the index is out of reach."""
    deps, dist, sources = folder / "deps", folder / "dist", folder / "src"
    fetched = run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--constraint",
        CONSTRAINTS,
        "--dest",
        deps,
        *_requirements(),
        cwd=folder,
        # The user's pip configuration: the index and certificates to reach it.
        env=user_env(),
    )
    if fetched.returncode != 0:
        # pip says "no matching distribution" both when the index is out of
        # reach and when our requirements and constraints disagree: tell them
        # apart by fetching pip itself, past the cache.
        probe = run(
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-cache-dir",
            "--only-binary=:all:",
            "--dest",
            folder / "probe",
            "pip",
            cwd=folder,
            env=user_env(),
        )
        if probe.returncode != 0:
            return "the package index is unreachable: no dependency wheels to install from"
        raise AssertionError(f"pip download of the dependencies failed:\n{fetched.stderr}")

    copy_sources(sources)
    # `make dist`'s command, offline: the build backend comes from deps/.
    built = run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--find-links",
        deps,
        "--wheel-dir",
        dist,
        sources / "clients" / "python",
        sources,
        cwd=sources,
        env=offline_env(),
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return Wheelhouse(dist=dist, deps=deps)


_made: Wheelhouse | str | None = None


def wheelhouse(factory: pytest.TempPathFactory) -> Wheelhouse:
    """The session's wheelhouse, made on first use (each test module's session
    fixture calls this, so the modules share one); skips if it cannot be made."""
    global _made
    if _made is None:
        _made = _build(factory.mktemp("wheelhouse"))
    if isinstance(_made, str):
        pytest.skip(_made)
    return _made
