"""`cruzflow new workflow NAME`: the project it writes loads, serves and passes its own test."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cruzflow.server import scaffold
from cruzflow.server.config import load_config

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
    assert pyproject["project"]["dependencies"][0].startswith("cruzflow")
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
