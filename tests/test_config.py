"""The config file: what a good one gives, and what a bad one is told."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cruzflow.server.config import STORE_URL_ENV, ConfigError, load_config
from cruzflow.server.store.postgres import PostgresStore
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
        ("[store]\nurl = 'mysql://h/db'\n", "store.url", "expected a PostgreSQL URL"),
        (
            "[store]\npath = 'a.db'\nurl = 'postgresql://h/db'\n",
            "store.url",
            "give either path (a SQLite file) or url (a PostgreSQL database), not both",
        ),
        (
            "[store]\nurl = 'postgresql://h/db'\nlease_period = 0\n",
            "store.lease_period",
            "more than 0",
        ),
        ("[store]\nlease_period = 'soon'\n", "store.lease_period", "cannot read"),
        (
            "[store]\nurl = 'postgresql://h/db'\nsynchronous = 'EXTRA'\n",
            "store",
            "synchronous is for a SQLite store (path), not with url",
        ),
        ("[store]\nuri = 'postgresql://h/db'\n", "store.uri", "unknown key"),
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


def test_store_is_sqlite_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    config = load_config(_write(tmp_path, ""))
    assert config.store_url is None
    assert config.store_path == tmp_path / "data" / "cruzflow.db"


def test_store_url_from_the_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    url = "postgresql://cruzflow:s3cret-pass@db.internal:5432/flows"
    config = load_config(_write(tmp_path, f"[store]\nurl = {url!r}\nlease_period = '2 seconds'\n"))
    assert config.store_url == url
    assert config.store_lease_period_s == 2.0
    assert "s3cret-pass" not in repr(config.file)
    store = config.postgres_store()
    assert isinstance(store, PostgresStore)
    assert store.url == "postgresql://cruzflow:***@db.internal:5432/flows"
    assert store.lease_period_s == 2.0
    assert "s3cret-pass" not in repr(store)
    # The variable wins over the file's url, and over a path.
    monkeypatch.setenv(STORE_URL_ENV, "postgres://other@db2/flows")
    assert load_config(_write(tmp_path, f"[store]\nurl = {url!r}\n")).store_url == (
        "postgres://other@db2/flows"
    )
    config = load_config(_write(tmp_path, "[store]\npath = 'local.db'\n"))
    assert config.store_url == "postgres://other@db2/flows"
    assert config.store_lease_period_s == 5.0


@pytest.mark.parametrize(
    "url",
    [
        "mysql://cruzflow:hunter2-secret@db/flows",
        "cruzflow:hunter2-secret@db/flows",
        "http://u@h/?password=hunter2-secret",
        "u:hunter2-secret@h://db",
    ],
)
def test_a_store_url_password_is_never_in_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, f"[store]\nurl = {url!r}\n"))
    assert "store.url" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    monkeypatch.setenv(STORE_URL_ENV, url)
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, ""))
    assert STORE_URL_ENV in str(caught.value)
    assert "expected a PostgreSQL URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)


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


_HOSTED = (
    "[[workflows]]\nbinding = 'T'\nname = 'three'\nclass_name = 'tests.workflows:ThreeSteps'\n"
)


def _schedule(**fields: str) -> str:
    values = {"id": "'nightly'", "workflow": "'three'", "cron": "'0 3 * * *'", **fields}
    return "[[schedules]]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def test_schedules_load_checked(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        _HOSTED
        + _schedule(timezone="'Europe/Paris'", params="{ a = 1, b = [true] }", catch_up="'skip'")
        + "[limits]\nschedule_grace = '5 minutes'\n",
    )
    config = load_config(path)
    [spec] = config.schedules
    assert (spec.id, spec.workflow, spec.cron, spec.timezone) == (
        "nightly",
        "three",
        "0 3 * * *",
        "Europe/Paris",
    )
    assert spec.params == b'{"a":1,"b":[true]}' and spec.catch_up.name == "SKIP"
    assert config.limits.schedule_grace_s == 300


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"cron": "'0 3 * *'"}, "schedules[0] ('nightly').cron: '0 3 * *' has 4 fields"),
        ({"cron": "'99 * * * *'"}, "schedules[0] ('nightly').cron: '99 * * * *' is not a valid"),
        (
            {"timezone": "'Moon/Base'"},
            "schedules[0] ('nightly').timezone: 'Moon/Base' is not an IANA",
        ),
        ({"workflow": "'elsewhere'"}, "schedules[0] ('nightly').workflow: 'elsewhere' is not a"),
        ({"id": "'bad id'"}, "schedules[0].id: 'bad id' is not a valid schedule id"),
        ({"catch_up": "'all'"}, "schedules[0].catch_up"),
    ],
)
def test_a_bad_schedule_names_itself_and_the_key(
    tmp_path: Path, fields: dict[str, str], words: str
) -> None:
    path = _write(tmp_path, _HOSTED + _schedule(**fields))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert words in str(caught.value)


def test_a_schedule_id_used_twice_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _HOSTED + _schedule() + _schedule(cron="'0 4 * * *'"))
    with pytest.raises(ConfigError, match=r"schedules\[1\] \('nightly'\)\.id: used twice"):
        load_config(path)
