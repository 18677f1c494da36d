"""The config file: what a good one gives, and what a bad one is told."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cruzflow.server.config import ConfigError, load_config
from tests.procs import ROOT, write_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cruzflow.toml"
    path.write_text(f"python_path = [{str(ROOT)!r}]\n" + text)
    return path


def test_example_config_loads() -> None:
    config = load_config(ROOT / "examples" / "cruzflow.toml")
    assert list(config.workflows) == ["onboarding-workflow", "approval-workflow"]
    spec = config.workflows["onboarding-workflow"]
    assert (spec.binding, spec.cls.__name__) == ("ONBOARDING_WORKFLOW", "OnboardingWorkflow")
    assert config.store_path == ROOT / "examples" / "data" / "cruzflow.db"
    assert config.file.vars["EMAIL_API_URL"] == "outbox:"
    assert config.listen == "127.0.0.1:50051"


def test_limits_and_paths_resolve(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {"three": "tests.workflows:ThreeSteps"},
        limits={"max_running_instances": 3, "max_payload_bytes": 4096},
    )
    config = load_config(path)
    assert config.limits.max_running_instances == 3
    assert config.limits.max_payload_bytes == 4096
    assert config.store_path == tmp_path / "store.db"
    assert config.grace_period == 5.0


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        ("colour = 1\n", "colour", "unknown key"),
        ("[server]\nlisten = 'nowhere'\n", "server.listen", "host:port"),
        ("[server]\ngrace_period = 'soon'\n", "server.grace_period", "cannot read"),
        ("[limits]\nmax_running_instances = 0\n", "limits.max_running_instances", "greater"),
        ("[store]\nsynchronous = 'OFF'\n", "store.synchronous", "match"),
        (
            "[[workflows]]\nbinding = 'A'\nname = 'a'\n",
            "workflows[0].class_name",
            "Field required",
        ),
        (
            "[[workflows]]\nbinding = 'A'\nname = 'a'\nclass_name = 'tests.workflows:ThreeSteps'\n"
            "typo = 1\n",
            "workflows[0].typo",
            "unknown key",
        ),
        (
            "[[workflows]]\nbinding = 'A'\nname = 'a'\nclass_name = 'no.such.module:X'\n",
            "workflows[0].class_name",
            "cannot import module 'no.such.module'",
        ),
        (
            "[[workflows]]\nbinding = 'A'\nname = 'a'\nclass_name = 'tests.workflows:Missing'\n",
            "workflows[0].class_name",
            "no attribute 'Missing'",
        ),
        (
            "[[workflows]]\nbinding = 'A'\nname = 'a'\nclass_name = 'tests.workflows:mark'\n",
            "workflows[0].class_name",
            "not a subclass",
        ),
        (
            "[[workflows]]\nbinding = 'A'\nname = 'a'\nclass_name = 'tests.workflows:ThreeSteps'\n"
            "[[workflows]]\nbinding = 'B'\nname = 'a'\nclass_name = 'tests.workflows:ThreeSteps'\n",
            "workflows[1].name",
            "used twice",
        ),
        ("[vars]\nX = [1, 2]\n", "vars.X", "valid string"),
        ("name = \n", "", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_reason(
    tmp_path: Path, text: str, where: str, reason: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert where in message
    assert reason in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_server_does_not_start_on_a_bad_config(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nlisen = '127.0.0.1:0'\n")
    result = subprocess.run(
        [sys.executable, "-m", "cruzflow.server.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "server.lisen: unknown key" in result.stderr
    assert "listening" not in result.stdout
    assert not (tmp_path / "data").exists()
