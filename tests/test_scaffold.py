"""`cruzflow new workflow NAME`: the project it writes loads, serves and passes its own test,
also installed in a venv of its own from this repo's wheels, as its README says."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from cruzflow.server import scaffold
from cruzflow.server.config import load_config
from tests import wheels

FILES = [
    ".gitignore",
    "README.md",
    "cruzflow.toml",
    "onboarding/__init__.py",
    "onboarding/workflow.py",
    "pyproject.toml",
    "tests/test_workflow.py",
]


def _new(tmp_path: Path, *argv: str) -> int:
    return scaffold.main_for_tests(["new", "workflow", *argv, "--dir", str(tmp_path)])


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _isolated_env() -> dict[str, str]:
    """The environment of a user's shell: nothing of this repo's test run leaks in."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHON"))}


def test_the_project_is_written_as_the_seed_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _new(tmp_path, "onboarding") == 0
    project = tmp_path / "external-processes" / "onboarding"
    assert _files(project) == FILES
    out = capsys.readouterr().out
    for name in FILES:
        assert f"  {name}\n" in out
    assert f"cd {project}" in out
    assert "cruzflow serve --config cruzflow.toml" in out
    config = tomllib.loads((project / "cruzflow.toml").read_text())
    assert config["workflows"] == [
        {
            "binding": "ONBOARDING_WORKFLOW",
            "name": "onboarding-workflow",
            "class_name": "onboarding.workflow:OnboardingWorkflow",
        }
    ]
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    (dependency,) = (Requirement(r) for r in pyproject["project"]["dependencies"])
    # The release series of the cruzflow that scaffolded it, which resolves.
    assert dependency.name == "cruzflow"
    ours = Version(version("cruzflow"))
    assert dependency.specifier.contains(ours, prereleases=True)
    assert not dependency.specifier.contains(f"{ours.major}.{ours.minor + 1}.0")
    assert pyproject["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]


def test_the_scaffolded_config_loads_and_imports_the_class(tmp_path: Path) -> None:
    assert _new(tmp_path, "invoice-sync") == 0
    project = tmp_path / "external-processes" / "invoice-sync"
    config = load_config(project / "cruzflow.toml")
    spec = config.workflows["invoice-sync-workflow"]
    assert (spec.binding, spec.class_name) == (
        "INVOICE_SYNC_WORKFLOW",
        "invoice_sync.workflow:InvoiceSyncWorkflow",
    )
    assert spec.cls.__name__ == "InvoiceSyncWorkflow"
    assert spec.cls.__module__ == "invoice_sync.workflow"
    assert config.store_path == project / "data" / "cruzflow.db"
    assert config.database_paths() == {"DB": project / "data" / "app.db"}
    assert config.file.vars == {"NOTIFY_URL": "outbox:"}


def test_the_scaffolded_project_passes_its_own_test_and_lint(tmp_path: Path) -> None:
    assert _new(tmp_path, "onboarding") == 0
    project = tmp_path / "external-processes" / "onboarding"
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=project,
        env=_isolated_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_name_ending_in_workflow_is_not_doubled() -> None:
    names = scaffold.Names.of("onboarding-workflow")
    assert (names.package, names.class_name, names.workflow_name, names.binding) == (
        "onboarding_workflow",
        "OnboardingWorkflow",
        "onboarding-workflow",
        "ONBOARDING_WORKFLOW",
    )
    names = scaffold.Names.of("user_signup2")
    assert (names.package, names.class_name, names.workflow_name) == (
        "user_signup2",
        "UserSignup2Workflow",
        "user-signup2-workflow",
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Onboarding", "lower-case"),
        ("2fa", "starting with a letter"),
        ("user signup", "not a valid workflow name"),
        ("user--signup", "not a valid workflow name"),
        ("onboarding-", "not a valid workflow name"),
        ("../escape", "not a valid workflow name"),
        ("a" * 51, "1 to 50"),
        ("json", "hide it"),
        ("grpc", "hide it"),
        ("tests", "hide it"),
        ("class", "hide it"),
    ],
)
def test_bad_names_are_refused_with_how_to_mend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, reason: str
) -> None:
    assert _new(tmp_path, name) == 2
    err = capsys.readouterr().err
    assert err.startswith("cruzflow new workflow: ")
    assert reason in err
    assert "e.g." in err
    assert not (tmp_path / "external-processes").exists()


def test_an_existing_folder_is_refused_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "external-processes" / "onboarding"
    project.mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "cruzflow.toml").write_text("old")
    assert _new(tmp_path, "onboarding") == 1
    err = capsys.readouterr().err
    assert "exists already" in err and "--force" in err
    assert (project / "cruzflow.toml").read_text() == "old"
    assert _new(tmp_path, "onboarding", "--force") == 0
    assert (project / "notes.txt").read_text() == "mine"
    assert "[[workflows]]" in (project / "cruzflow.toml").read_text()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert scaffold.main_for_tests(["new"]) == 2
    assert scaffold.main_for_tests(["new", "workflow"]) == 2
    assert "NAME" in capsys.readouterr().err


def test_the_current_folder_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert scaffold.main_for_tests(["new", "workflow", "billing"]) == 0
    assert (tmp_path / "external-processes" / "billing" / "billing" / "workflow.py").is_file()


@pytest.mark.parametrize(
    ("installed", "wanted"),
    [
        ("0.1.0", "cruzflow>=0.1.0,<0.2"),
        ("0.12.3", "cruzflow>=0.12.3,<0.13"),
        ("1.4.0", "cruzflow>=1.4.0,<2"),
        ("0.2.0.dev1+g1234", "cruzflow>=0.2.0.dev1,<0.3"),
        (None, "cruzflow"),
    ],
)
def test_the_dependency_is_the_series_of_the_cruzflow_that_made_it(
    installed: str | None, wanted: str
) -> None:
    assert scaffold._requirement(installed) == wanted


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> wheels.Wheelhouse:
    return wheels.wheelhouse(tmp_path_factory)


def _readme_install(readme: str) -> list[str]:
    """The arguments of the README's `pip install` after `install`, less its --find-links."""
    (line,) = (line for line in readme.splitlines() if " -m pip install " in line)
    argv = shlex.split(line.split("#")[0])
    assert argv[:4] == [".venv/bin/python", "-m", "pip", "install"], line
    at = argv.index("--find-links")
    return argv[4:at] + argv[at + 2 :]


def test_the_project_installs_in_a_fresh_venv_and_passes_its_tests(
    tmp_path: Path, wheelhouse: wheels.Wheelhouse
) -> None:
    assert _new(tmp_path, "onboarding") == 0
    project = tmp_path / "external-processes" / "onboarding"
    readme = (project / "README.md").read_text()
    # This checkout's cruzflow is installed from it, so the README names its dist/.
    assert f"--find-links {wheels.ROOT / 'dist'} " in readme
    assert "python -m venv .venv" in readme

    # The README's steps, with the session's wheels of this repo and no index.
    python = wheels.fresh_venv(project / ".venv")
    wheelhouse.pip_install(python, *_readme_install(readme), cwd=project)
    tests = wheels.run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=project)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout

    where = wheels.run(
        python,
        "-c",
        "import json, cruzflow.testing, cruzflow.client, onboarding; "
        "print(json.dumps([m.__file__ for m in (cruzflow.testing, cruzflow.client, onboarding)]))",
        cwd=project,
    )
    assert where.returncode == 0, where.stderr
    testing, client, package = (Path(f) for f in json.loads(where.stdout))
    site = wheels.site_packages(python)
    # cruzflow from the wheels, in the venv; the project itself editable, from here.
    assert testing.is_relative_to(site) and client.is_relative_to(site), (testing, client)
    assert package == project / "onboarding" / "__init__.py"
    checked = wheels.run(python, "-m", "pip", "check", cwd=project)
    assert checked.returncode == 0, checked.stdout
