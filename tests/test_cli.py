"""The ``cruzflow`` command driven end to end against a real ``cruzflow serve``.

Every client command runs as its own process (``python -m
cruzflow.server.cli``), as a user or a script would run it; ``watch`` also runs
under a pseudo-terminal, where it redraws a live view. The pure formatting
(durations, the folded live state, the screen redraw) is tested in-process at
the end.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from cruzflow.server import cli, render
from cruzflow.server.render import ErrorView, EventView, InstanceView, SizesView, StepView
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1.workflows_pb2_grpc import WorkflowServiceStub
from tests.conftest import ALL_WORKFLOWS
from tests.procs import ROOT, ServerProcess, wait_for, write_config

# A guard against a hung child, not a bound on how fast anything must be.
HANG_GUARD = 300.0

CLI = [sys.executable, "-m", "cruzflow.server.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the module; each test uses its own instance ids."""
    directory = tmp_path_factory.mktemp("cli-server")
    proc = ServerProcess(write_config(directory, ALL_WORKFLOWS)).start()
    yield proc
    proc.stop()


def _env(address: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUZFLOW_")}
    env.update({"CRUZFLOW_ADDRESS": address, "TERM": "xterm", **extra})
    env.pop("NO_COLOR", None)
    return env


Run = Callable[..., subprocess.CompletedProcess[str]]


def cli_run(
    address: str, *args: str, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """The CLI as a child process, told the server's address by CRUZFLOW_ADDRESS."""
    return subprocess.run(
        [*CLI, *args],
        input=input,
        capture_output=True,
        text=True,
        env=_env(address, **env),
        cwd=ROOT,
        timeout=HANG_GUARD,
    )


@pytest.fixture
def run(server: ServerProcess) -> Run:
    """``run("status", ID)``: the CLI against the module's server."""

    def call(*args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        return cli_run(server.address, *args, input=input, **env)

    return call


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def status_of(run: Run, instance_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ok(run("status", instance_id, "--json")))
    return data


def wait_status(run: Run, instance_id: str, status: str) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (s := status_of(run, instance_id))["status"] == status and s,
        timeout=60,
        interval=0.1,
    )


# --- create, status, list, workflows ---------------------------------------------


def test_create_wait_prints_the_id_then_the_final_status(run: Run) -> None:
    result = run("create", "three-steps", "--params", '{"who": "ada"}', "--id", "cli-3", "--wait")
    out = ok(result)
    lines = out.splitlines()
    assert lines[0] == "cli-3"
    assert re.search(r"^status\s+complete$", out, re.M)
    assert 'output    {"sum": 6, "params": {"who": "ada"}}' in out
    for name in ("one", "two", "three"):
        assert re.search(rf"^  . {name}\s+succeeded  1 attempt  ", out, re.M), out
    assert result.stderr == ""


def test_create_prints_only_the_id_and_trigger_is_its_alias(run: Run, tmp_path: Path) -> None:
    assert ok(run("trigger", "three-steps", "--id", "cli-alias")) == "cli-alias\n"
    generated = ok(run("create", "three-steps")).strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", generated)
    created = json.loads(ok(run("--json", "create", "three-steps", "--id", "cli-json")))
    assert created == {"instance_id": "cli-json"}
    # Params from a file, and from stdin.
    params = tmp_path / "params.json"
    params.write_text('{"from": "file"}')
    ok(run("create", "three-steps", "--id", "cli-file", "--params-file", str(params), "--wait"))
    assert status_of(run, "cli-file")["params"] == {"from": "file"}
    ok(run("create", "three-steps", "--id", "cli-stdin", "--params", "-", input='[1, 2.5, "x"]'))
    assert status_of(run, "cli-stdin")["params"] == [1, 2.5, "x"]


def test_status_human_and_json(run: Run) -> None:
    ok(run("create", "catches", "--id", "cli-status", "--wait", "--lookup-key", "user:7"))
    human = ok(run("status", "cli-status"))
    assert re.search(r"^instance\s+cli-status$", human, re.M)
    assert re.search(r"^workflow\s+catches$", human, re.M)
    assert re.search(r"^lookup key\s+user:7$", human, re.M)
    assert "charge  failed  1 attempt" in human
    assert "error: NonRetryableError: card declined" in human
    assert "refund  succeeded  1 attempt" in human

    data = status_of(run, "cli-status")
    assert data["status"] == "complete"
    assert data["output"] == {"caught": "NonRetryableError", "message": "card declined"}
    assert data["lookup_key"] == "user:7"
    assert [(s["name"], s["status"], s["attempts"]) for s in data["steps"]] == [
        ("charge", "failed", 1),
        ("refund", "succeeded", 1),
    ]
    error = data["steps"][0]["error"]
    assert (error["name"], error["message"]) == ("NonRetryableError", "card declined")
    assert error["traceback"].endswith("NonRetryableError: card declined\n")
    # The failed step's traceback is shown under its line, indented.
    lines = human.splitlines()
    at = next(i for i, line in enumerate(lines) if "charge  failed" in line)
    assert lines[at + 1] == "      Traceback (most recent call last):"
    assert 'raise NonRetryableError("card declined")' in lines[at + 3]
    assert data["create_time"].endswith("Z") and data["end_time"] >= data["create_time"]


def test_create_takes_a_priority_and_status_shows_it(run: Run) -> None:
    ok(run("create", "three-steps", "--id", "cli-priority", "--wait", "--priority", "4"))
    human = ok(run("status", "cli-priority"))
    assert re.search(r"^priority\s+4$", human, re.M)
    # A concurrency key means nothing to a workflow without limits: refused.
    refused = run("create", "three-steps", "--concurrency-key", "user:7")
    assert refused.returncode != 0
    assert "no concurrency or rate limit" in refused.stderr


def test_create_wait_on_an_instance_that_errors_exits_1(run: Run) -> None:
    result = run("create", "raises", "--id", "cli-raises", "--wait")
    assert result.returncode == 1
    assert re.search(r"^status\s+errored$", result.stdout, re.M)
    assert result.stderr.startswith("cruzflow: instance 'cli-raises' errored: ")
    assert "ValueError: bad input row 7" in result.stderr
    # Its code raised: the hint is to look at where, and restart once the code is fixed.
    assert "`cruzflow status cli-raises` shows where it was raised" in result.stderr
    assert "once the workflow's code is fixed" in result.stderr
    # The status printed has the traceback under the error.
    assert re.search(r"^error\s+ValueError: bad input row 7\n\s+Traceback", result.stdout, re.M)
    data = json.loads(run("--json", "status", "cli-raises").stdout)
    error = data["error"]
    assert (error["name"], error["message"]) == ("ValueError", "bad input row 7")
    assert 'raise ValueError("bad input row 7")' in error["traceback"]


def test_list_filters_limits_and_json(run: Run) -> None:
    for i in range(3):
        ok(run("create", "three-steps", "--id", f"cli-list-{i}", "--lookup-key", "batch:cli"))
    errored_run = run(
        "create", "raises", "--id", "cli-list-bad", "--lookup-key", "batch:cli", "--wait"
    )
    assert errored_run.returncode == 1

    table = ok(run("list", "--lookup-key", "batch:cli"))
    header, *rows = table.splitlines()
    assert header.split() == ["ID", "WORKFLOW", "STATUS", "CREATED", "AGE", "LOOKUP", "KEY"]
    # Newest first.
    assert [row.split()[0] for row in rows] == [
        "cli-list-bad",
        "cli-list-2",
        "cli-list-1",
        "cli-list-0",
    ]

    limited = ok(run("list", "--lookup-key", "batch:cli", "--limit", "2")).splitlines()
    assert [row.split()[0] for row in limited[1:3]] == ["cli-list-bad", "cli-list-2"]
    assert limited[-1] == "(the newest 2; --limit N shows more)"

    errored = json.loads(ok(run("list", "--json", "--lookup-key", "batch:cli", "-s", "errored")))
    assert [(i["instance_id"], i["status"]) for i in errored] == [("cli-list-bad", "errored")]
    assert "steps" not in errored[0]

    wait_for(lambda: status_of(run, "cli-list-0")["status"] == "complete")
    both = json.loads(
        ok(run("list", "--json", "--lookup-key", "batch:cli", "--status", "Complete,ERRORED"))
    )
    assert len(both) == 4
    only = ok(run("list", "-w", "raises", "--lookup-key", "batch:cli"))
    assert [row.split()[0] for row in only.splitlines()[1:]] == ["cli-list-bad"]

    assert ok(run("list", "--lookup-key", "no-such-key")) == "no instances match\n"

    bad = run("list", "--status", "sleeping")
    assert bad.returncode == 2
    assert bad.stderr.startswith("cruzflow: --status 'sleeping' is not a status; use one of")
    assert "waitingForPause" in bad.stderr


def test_workflows_lists_the_hosted_ones(run: Run) -> None:
    table = ok(run("workflows")).splitlines()
    assert table[0].split() == ["NAME", "BINDING", "CLASS"]
    assert any(
        row.split() == ["three-steps", "THREE_STEPS", "tests.workflows:ThreeSteps"] for row in table
    )
    hosted = json.loads(ok(run("workflows", "--json")))
    assert {
        "name": "approval",
        "binding": "APPROVAL",
        "class_name": "tests.workflows:Approval",
    } in (hosted)
    assert sorted(w["name"] for w in hosted) == sorted(ALL_WORKFLOWS)


# --- controls and events ----------------------------------------------------------


def test_pause_resume_terminate_restart(run: Run) -> None:
    ok(run("create", "naps", "--id", "cli-ctl", "--params", '{"ms": 3600000}'))
    wait_status(run, "cli-ctl", "waiting")

    assert ok(run("pause", "cli-ctl")) == "cli-ctl: paused\n"
    assert status_of(run, "cli-ctl")["status"] == "paused"
    again = run("pause", "cli-ctl")
    assert again.returncode == 1
    assert again.stderr.startswith("cruzflow: instance 'cli-ctl' is paused; ")
    assert "`cruzflow status cli-ctl` shows where it is" in again.stderr

    resumed = json.loads(ok(run("resume", "cli-ctl", "--json")))
    assert resumed["instance_id"] == "cli-ctl"
    assert resumed["status"] in ("running", "waiting")
    wait_status(run, "cli-ctl", "waiting")

    assert ok(run("terminate", "cli-ctl")) == "cli-ctl: terminated\n"
    assert status_of(run, "cli-ctl")["status"] == "terminated"
    assert run("terminate", "cli-ctl").returncode == 1

    restarted = ok(run("restart", "cli-ctl"))
    assert restarted.startswith("cli-ctl: restarted from scratch (now ")
    data = wait_status(run, "cli-ctl", "waiting")
    assert [s["name"] for s in data["steps"]] == ["before", "nap"]
    ok(run("terminate", "cli-ctl"))


def test_send_event_to_a_waiting_instance(run: Run) -> None:
    ok(run("create", "approval", "--id", "cli-approve"))
    data = wait_status(run, "cli-approve", "waiting")
    assert data["steps"][-1]["kind"] == "waitForEvent"
    assert "waiting for event 'approval'" in ok(run("status", "cli-approve"))

    sent = run("send-event", "cli-approve", "approval", "--payload", '{"ok": true, "by": "ada"}')
    assert ok(sent) == "cli-approve: sent event 'approval'\n"
    # watch, not on a terminal, prints the log and ends with the final status.
    watched = run("watch", "cli-approve", "--json")
    events = [json.loads(line) for line in ok(watched).splitlines()]
    assert events[-1]["kind"] == "status_changed" and events[-1]["status"] == "complete"
    assert events[-1]["output"] == {"approved": {"ok": True, "by": "ada"}, "type": "approval"}

    late = run("send-event", "cli-approve", "approval")
    assert late.returncode == 1
    assert late.stderr.startswith("cruzflow: instance 'cli-approve' is complete")
    bad = run("send-event", "cli-approve", "approval", "--payload", "{ok: true}")
    assert bad.returncode == 2
    assert "--payload is not valid JSON" in bad.stderr


# --- errors and exit codes --------------------------------------------------------


def test_an_unknown_instance_exits_1_and_says_how_to_find_one(run: Run) -> None:
    for command in ("status", "watch", "pause", "resume", "terminate", "restart"):
        result = run(command, "no-such-instance")
        assert result.returncode == 1, (command, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("cruzflow: no instance 'no-such-instance' on 127.0.0.1:")
        assert "`cruzflow list`" in result.stderr
    result = run("send-event", "no-such-instance", "approval")
    assert result.returncode == 1 and "no instance 'no-such-instance'" in result.stderr


def test_bad_input_exits_2(run: Run, tmp_path: Path) -> None:
    result = run("create", "three-steps", "--params", "{userId: 42}")
    assert result.returncode == 2
    assert result.stderr.startswith("cruzflow: --params is not valid JSON (Expecting property")
    assert "single quotes" in result.stderr

    missing = run("create", "three-steps", "--params-file", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("cruzflow: cannot read ")

    # A value only the server can judge: it says how to mend it; still a usage error.
    bad_id = run("create", "three-steps", "--id", "has spaces!")
    assert bad_id.returncode == 2
    assert bad_id.stderr.startswith("cruzflow: instance_id: ")

    # argparse's own usage errors use 2 as well.
    usage = run("status")
    assert usage.returncode == 2 and "the following arguments are required: ID" in usage.stderr
    both = run("create", "three-steps", "--params", "{}", "--params-file", "x")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    assert run("list", "--limit", "0").returncode == 2
    assert run("--timeout", "-1", "workflows").returncode == 2


def test_refusals_exit_1_with_a_way_out(run: Run) -> None:
    unknown = run("create", "no-such-workflow")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("cruzflow: 127.0.0.1:")
    assert "hosts no workflow 'no-such-workflow'; `cruzflow workflows` lists" in unknown.stderr

    ok(run("create", "three-steps", "--id", "cli-taken"))
    taken = run("create", "three-steps", "--id", "cli-taken")
    assert taken.returncode == 1
    assert "an instance 'cli-taken' exists already; choose another --id" in taken.stderr
    assert "--if-exists return" in taken.stderr
    assert ok(run("create", "three-steps", "--id", "cli-taken", "--if-exists", "return")) == (
        "cli-taken\n"
    )


def test_an_unreachable_server_exits_3_and_says_where_to_point() -> None:
    # Nothing listens on a free port once the socket that found it is closed.
    address = f"127.0.0.1:{_free_port()}"
    # A create without --id is sent once, so the client waits up to --timeout
    # for a connection rather than fail at once: a short one keeps this quick.
    create = ["create", "three-steps", "--timeout", "1"]
    for args in (["status", "x"], ["--address", address, "list"], create):
        result = cli_run(address, *args)
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.startswith(f"cruzflow: cannot reach {address} ")
        assert "is `cruzflow serve` running there?" in result.stderr
        assert "--address or CRUZFLOW_ADDRESS" in result.stderr


def test_options_go_before_or_after_the_command_and_the_token_is_never_shown(
    run: Run, server: ServerProcess
) -> None:
    ok(run("create", "three-steps", "--id", "cli-opts", "--wait"))
    wrong = "127.0.0.1:1"
    # --address after the command wins over the environment; before it, too.
    assert status_of(run, "cli-opts")["status"] == "complete"
    result = run("--address", server.address, "status", "cli-opts", CRUZFLOW_ADDRESS=wrong)
    assert "complete" in ok(result)
    result = run("status", "cli-opts", "--address", server.address, CRUZFLOW_ADDRESS=wrong)
    assert "complete" in ok(result)
    secret = "s3cret-token-value"
    for args in (["--help"], ["status", "--help"], ["status", "no-such"], ["list"]):
        shown = run(*args, CRUZFLOW_TOKEN=secret)
        assert secret not in shown.stdout + shown.stderr


def test_help_documents_the_commands_and_exit_codes() -> None:
    text = cli.build_parser().format_help()
    for command in (
        "serve",
        "create",
        "status",
        "watch",
        "list",
        "workflows",
        "pause",
        "resume",
        "terminate",
        "restart",
        "send-event",
    ):
        assert re.search(rf"^    {command}\b", text, re.M), command
    assert "trigger" in text
    for line in ("0  done", "1  the server refused", "2  usage", "3  cannot reach", "130"):
        assert line in text
    assert "CRUZFLOW_ADDRESS" in text and "CRUZFLOW_TOKEN" in text


def test_new_workflow_is_wired(tmp_path: Path) -> None:
    """`new` comes from the scaffold module; its content is tested there."""
    result = cli_run("127.0.0.1:1", "new", "workflow", "billing", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "external-processes" / "billing" / "cruzflow.toml").is_file()
    again = cli_run("127.0.0.1:1", "new", "workflow", "billing", "--dir", str(tmp_path))
    assert again.returncode != 0 and again.stderr.startswith("cruzflow")
    assert "new" in cli.build_parser().format_help()


# --- watch ------------------------------------------------------------------------


def test_watch_without_a_terminal_prints_one_line_per_event(run: Run) -> None:
    ok(run("create", "flaky", "--id", "cli-flaky", "--params", '{"failures": 1}', "--wait"))
    lines = ok(run("watch", "cli-flaky")).splitlines()
    # "#3   18:52:18.163  step flaky attempt 1 failed: ..."
    heads = [line for line in lines if line.startswith("#")]
    texts = [re.sub(r"^#\d+\s+\d\d:\d\d:\d\d\.\d{3}  ", "", line) for line in heads]
    # How long each attempt ran, from its start event.
    texts = [re.sub(r" after \d+ ms", " after N ms", text) for text in texts]
    assert texts == [
        "status running",
        "step flaky started (attempt 1)",
        "step flaky attempt 1 failed after N ms: ConnectionError: attempt 1 failed; retry in 1 ms",
        "step flaky started (attempt 2)",
        "step flaky succeeded after N ms  output 2",
        "status complete  output 2",
    ]
    assert [int(line.split()[0][1:]) for line in heads] == list(range(1, 7))
    # The failed attempt's traceback follows its line, indented.
    failed = lines.index(heads[2])
    assert lines[failed + 1] == "      Traceback (most recent call last):"
    assert lines[failed + 4] == "      ConnectionError: attempt 1 failed"
    assert lines[failed + 5] == heads[3]

    events = [json.loads(line) for line in ok(run("watch", "cli-flaky", "--json")).splitlines()]
    assert [e["sequence"] for e in events] == list(range(1, 7))
    assert events[2]["kind"] == "attempt_failed"
    error = events[2]["error"]
    assert (error["name"], error["message"]) == ("ConnectionError", "attempt 1 failed")
    assert error["traceback"].endswith("ConnectionError: attempt 1 failed\n")
    assert events[2]["retry_delay"] == 0.001
    assert events[4]["step"] == {"index": 0, "name": "flaky", "occurrence": 1, "kind": "do"}


def test_watch_exits_1_when_the_instance_errors(run: Run) -> None:
    ok(run("create", "raises", "--id", "cli-watch-err"))
    result = run("watch", "cli-watch-err")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    final = next(i for i, line in enumerate(lines) if "status errored" in line)
    assert lines[final].endswith("status errored  error ValueError: bad input row 7")
    assert lines[final + 1 :] == [
        "      Traceback (most recent call last):",
        lines[final + 2],
        '          raise ValueError("bad input row 7")',
        "      ValueError: bad input row 7",
    ]
    assert lines[final + 2].endswith(", in boom")
    assert result.stderr.startswith("cruzflow: instance 'cli-watch-err' errored: ValueError")


def test_watch_outlives_a_server_restart(tmp_path: Path) -> None:
    """The watch reconnects after the last event it saw: none lost, none repeated."""
    config = write_config(
        tmp_path, ALL_WORKFLOWS, listen=f"127.0.0.1:{_free_port()}", grace="1 second"
    )
    servers = [ServerProcess(config).start()]
    address = servers[0].address
    watcher: subprocess.Popen[str] | None = None
    try:
        ok(cli_run(address, "create", "approval", "--id", "cli-restart"))
        watcher = subprocess.Popen(
            [*CLI, "watch", "cli-restart", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(address),
            cwd=ROOT,
        )
        assert watcher.stdout is not None
        seen: list[dict[str, Any]] = []
        while not (seen and seen[-1].get("status") == "waiting"):
            line = watcher.stdout.readline()
            assert line, watcher.stderr.read() if watcher.stderr else ""
            seen.append(json.loads(line))
        assert servers[0].terminate() == 0
        servers.append(ServerProcess(config).start())
        ok(cli_run(address, "send-event", "cli-restart", "approval", "--payload", "1"))
        rest, errors = watcher.communicate(timeout=HANG_GUARD)
        assert watcher.returncode == 0, errors
        events = seen + [json.loads(line) for line in rest.splitlines()]
        assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["status"] == "complete"
        assert events[-1]["output"] == {"approved": 1, "type": "approval"}
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        for proc in servers:
            proc.stop()


class Terminal:
    """A CLI child on a pseudo-terminal (100 x 40), its output read from the master side."""

    def __init__(self, address: str, *args: str) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        self.proc = subprocess.Popen(
            [*CLI, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=_env(address),
            cwd=ROOT,
            close_fds=True,
        )
        os.close(slave)
        self.master = master
        self.output = ""

    def read_until(self, done: Callable[[str], bool], timeout: float = HANG_GUARD) -> str:
        """Read until ``done(screen text so far)`` or the child's end; the text."""
        deadline = time.monotonic() + timeout
        while not done(self.output):
            if time.monotonic() > deadline:
                raise AssertionError(f"terminal never showed it; output:\n{self.output!r}")
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                break
            self.output += data.decode("utf-8", "replace")
        return self.output

    def finish(self) -> tuple[int, str]:
        """Read to the end; the exit code and everything written."""
        self.read_until(lambda _: False)
        code = self.proc.wait(timeout=HANG_GUARD)
        os.close(self.master)
        return code, self.output

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def last_frame(output: str) -> list[str]:
    """The lines the live view drew last (each frame starts by clearing the screen)."""
    frame = output.rsplit("\x1b[J", 1)[-1]
    return [line for line in render.strip_ansi(frame).replace("\r", "").split("\n") if line]


def test_watch_on_a_terminal_shows_each_step_of_a_three_step_workflow(
    run: Run, server: ServerProcess
) -> None:
    ok(run("create", "three-steps", "--id", "cli-pty-3"))
    terminal = Terminal(server.address, "watch", "cli-pty-3")
    try:
        code, output = terminal.finish()
    finally:
        terminal.close()
    assert code == 0, output
    assert output.startswith(render.LiveScreen.HIDE_CURSOR)
    assert output.rstrip("\r\n").endswith(render.LiveScreen.SHOW_CURSOR)
    frame = last_frame(output)
    assert re.fullmatch(r"cli-pty-3  three-steps  complete  \S+ m?s", frame[0]), frame
    for name, line in zip(("one", "two", "three"), frame[1:4], strict=True):
        assert re.fullmatch(rf"  ✓ {name}\s+succeeded  1 attempt  \d+ ms", line), frame
    assert frame[4] == 'output {"sum": 6, "params": null}'
    assert "\x1b[32m" in output  # coloured on a terminal


def test_watch_on_a_terminal_follows_an_instance_live(run: Run, server: ServerProcess) -> None:
    ok(run("create", "approval", "--id", "cli-pty-live"))
    wait_status(run, "cli-pty-live", "waiting")
    terminal = Terminal(server.address, "watch", "cli-pty-live")
    try:
        terminal.read_until(lambda text: "waiting for event 'approval'" in text)
        waiting = last_frame(terminal.output)
        assert waiting[0].startswith("cli-pty-live  approval  waiting  ")
        assert re.fullmatch(r"  ✓ request\s+succeeded  1 attempt  \d+ ms", waiting[1])
        assert re.match(
            r"  … approval\s+waiting for event 'approval'  .+  times out in ", waiting[2]
        )
        ok(run("send-event", "cli-pty-live", "approval", "--payload", '"yes"'))
        code, output = terminal.finish()
    finally:
        terminal.close()
    assert code == 0, output
    frame = last_frame(output)
    assert frame[0].startswith("cli-pty-live  approval  complete  ")
    assert [line.split()[:3] for line in frame[1:4]] == [
        ["✓", "request", "succeeded"],
        ["✓", "approval", "succeeded"],
        ["✓", "apply", "succeeded"],
    ]
    assert frame[4] == 'output {"approved": "yes", "type": "approval"}'
    # The view was redrawn in place: the cursor moved up over the previous frame.
    assert re.search(r"\x1b\[\d+F\x1b\[J", output)


def test_watch_on_a_terminal_exits_1_when_terminated(run: Run, server: ServerProcess) -> None:
    ok(run("create", "naps", "--id", "cli-pty-term", "--params", '{"ms": 3600000}'))
    wait_status(run, "cli-pty-term", "waiting")
    terminal = Terminal(server.address, "watch", "cli-pty-term")
    try:
        terminal.read_until(lambda text: "wakes in" in text)
        frame = last_frame(terminal.output)
        assert re.match(r"  … nap\s+sleeping  .+  wakes in ", frame[2]), frame
        ok(run("terminate", "cli-pty-term"))
        code, output = terminal.finish()
    finally:
        terminal.close()
    assert code == 1
    assert "cruzflow: instance 'cli-pty-term' was terminated" in output
    frame = last_frame(output.split("cruzflow:", 1)[0])
    assert frame[0].startswith("cli-pty-term  naps  terminated  ")


def test_watch_on_a_terminal_stops_on_ctrl_c_and_gives_the_cursor_back(
    run: Run, server: ServerProcess
) -> None:
    ok(run("create", "approval", "--id", "cli-pty-int"))
    terminal = Terminal(server.address, "watch", "cli-pty-int")
    try:
        terminal.read_until(lambda text: "waiting for event 'approval'" in text)
        terminal.proc.send_signal(signal.SIGINT)
        code, output = terminal.finish()
    finally:
        terminal.close()
    assert code == 130
    assert output.rstrip("\r\n").endswith(render.LiveScreen.SHOW_CURSOR)
    # The instance goes on: only the watch stopped.
    assert status_of(run, "cli-pty-int")["status"] == "waiting"


# --- the formatting, in-process ------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0004, "0 ms"),
        (0.25, "250 ms"),
        (4.25, "4.2 s"),
        (185, "3 m 05 s"),
        (7800, "2 h 10 m"),
        (3 * 86400 + 4 * 3600, "3 d 4 h"),
        (-1, "0 ms"),
    ],
)
def test_durations_read_well(seconds: float, text: str) -> None:
    assert render.duration(seconds) == text


T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _event(seq: int, kind: str, **fields: Any) -> EventView:
    return EventView("i", seq, T0 + timedelta(seconds=seq), kind, **fields)


def test_the_live_state_folds_events_and_a_restart_clears_old_steps() -> None:
    view = InstanceView("i", "wf", "running", create_time=T0)
    step = {"step_name": "a", "step_index": 0}
    render.apply_event(view, _event(1, "step_started", attempt=1, **step))
    fail = ErrorView("ConnectionError", "down")
    render.apply_event(
        view,
        _event(2, "attempt_failed", attempt=1, error=fail, next_attempt_time=T0, **step),
    )
    assert (view.steps[0].attempts, view.steps[0].error, view.steps[0].status) == (
        1,
        fail,
        "running",
    )
    render.apply_event(view, _event(3, "step_started", attempt=2, **step))
    render.apply_event(view, _event(4, "step_succeeded", attempt=2, output=7, **step))
    render.apply_event(view, _event(5, "step_started", attempt=1, step_name="b", step_index=1))
    assert [(s.name, s.status, s.attempts) for s in view.steps] == [
        ("a", "succeeded", 2),
        ("b", "running", 1),
    ]
    # An event the view already holds is skipped.
    assert not render.apply_event(view, _event(5, "step_succeeded", step_name="b", step_index=1))
    # A restart: the run begins again at position 0.
    render.apply_event(view, _event(6, "status_changed", status="running"))
    render.apply_event(view, _event(7, "step_started", attempt=1, **step))
    assert [(s.name, s.status) for s in view.steps] == [("a", "running")]
    render.apply_event(view, _event(8, "status_changed", status="complete", output=1))
    assert view.final and view.end_time == T0 + timedelta(seconds=8)


def test_the_live_view_and_its_redraw() -> None:
    view = InstanceView(
        "i",
        "wf",
        "running",
        create_time=T0,
        steps=[
            StepView(
                0,
                "fetch",
                status="succeeded",
                attempts=1,
                start_time=T0,
                end_time=T0 + timedelta(milliseconds=40),
            ),
            StepView(
                1,
                "charge",
                attempts=2,
                start_time=T0,
                error=ErrorView("ConnectionError", "refused"),
                next_attempt_time=T0 + timedelta(seconds=12),
            ),
        ],
    )
    now = T0 + timedelta(seconds=2)
    lines = render.live_lines(view, now)
    assert lines == [
        "i  wf  running  2.0 s",
        "  ✓ fetch   succeeded  1 attempt  40 ms",
        "  ↻ charge  running  2 attempts  2.0 s  next attempt in 10.0 s"
        "  last error: ConnectionError: refused",
    ]
    assert render.fit(lines, 20)[2] == "  ↻ charge  running…"
    assert render.clip([str(i) for i in range(10)], 4) == [
        "0",
        "  ... 7 more lines above",
        "8",
        "9",
    ]
    screen = render.LiveScreen()
    first = screen.frame(lines)
    assert first == "\r\x1b[J" + "\n".join(lines) + "\n"
    assert screen.frame(lines) == ""  # nothing changed: nothing written
    assert screen.frame(["x"]).startswith("\x1b[3F\x1b[J")
    coloured = render.Style(color=True).status("errored")
    assert coloured == "\x1b[31merrored\x1b[0m" and render.strip_ansi(coloured) == "errored"


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (1048576, "1 MiB")],
)
def test_sizes_read_well(n: int, text: str) -> None:
    assert render.size(n) == text


def test_status_shows_payload_sizes_against_the_limit_and_flags_one_near_it() -> None:
    limit = 1024 * 1024
    big = int(0.85 * limit)
    view = InstanceView(
        "i",
        "wf",
        "complete",
        create_time=T0,
        end_time=T0,
        payloads=SizesView(22, 41, big, 22 + 41 + 7 + big, limit),
        steps=[
            StepView(0, "small", status="succeeded", attempts=1, output_bytes=7),
            StepView(1, "big", status="succeeded", attempts=1, output_bytes=big),
        ],
    )
    lines = render.instance_lines(view, T0)
    payloads = next(line for line in lines if line.startswith("payloads"))
    assert payloads.endswith(
        "params 22 B, output 41 B, largest step 870.4 KiB (85%); limit 1 MiB each"
    )
    assert lines[-2].endswith("succeeded  1 attempt")  # far from the limit: no size shown
    assert lines[-1].endswith("1 attempt  result 870.4 KiB (85% of the 1 MiB limit)")
    coloured = render.instance_lines(view, T0, render.Style(color=True))
    assert "\x1b[33mlargest step 870.4 KiB (85%)\x1b[0m" in "\n".join(coloured)
    # Below 80 % nothing is flagged; a listing (no steps) shows no step part.
    view.payloads = SizesView(22, 0, 7, 29, limit)
    assert render.payloads_text(view.payloads) == "params 22 B, largest step 7 B; limit 1 MiB each"
    assert render.payloads_text(view.payloads, steps=False) == "params 22 B; limit 1 MiB each"
    assert view.to_json(with_steps=False)["payloads"] == {
        "params_bytes": 22,
        "output_bytes": 0,
        "largest_step_bytes": 7,
        "total_bytes": 29,
        "limit_bytes": limit,
    }
    assert view.steps[1].to_json()["output_bytes"] == big


def test_schedules_list_trigger_pause_resume_delete(run: Run, server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        WorkflowServiceStub(channel).CreateSchedule(
            pb.CreateScheduleRequest(
                schedule=pb.Schedule(
                    schedule_id="cli-weekly",
                    workflow="three-steps",
                    cron="0 9 * * MON",
                    timezone="Europe/Paris",
                    paused=True,
                )
            ),
            timeout=10,
        )
    table = ok(run("schedules", "list")).splitlines()
    assert table[0].split() == [
        "ID",
        "WORKFLOW",
        "CRON",
        "TIMEZONE",
        "STATE",
        "NEXT",
        "DUE",
        "(UTC)",
        "LAST",
    ]
    assert table[1].split() == [
        "cli-weekly",
        "three-steps",
        "0",
        "9",
        "*",
        "*",
        "MON",
        "Europe/Paris",
        "paused",
    ]
    instance_id = ok(run("schedules", "trigger", "cli-weekly")).strip()
    assert instance_id.startswith("sched-cli-weekly-now-")
    listed = json.loads(ok(run("list", "--schedule", "cli-weekly", "--json")))
    assert [i["instance_id"] for i in listed] == [instance_id]
    resumed = ok(run("schedules", "resume", "cli-weekly"))
    assert resumed.startswith("cli-weekly: resumed (next due ") and resumed.endswith(" UTC)\n")
    data = json.loads(ok(run("schedules", "list", "--workflow", "three-steps", "--json")))
    assert [(s["id"], s["paused"], s["catch_up"]) for s in data] == [("cli-weekly", False, "once")]
    assert ok(run("schedules", "pause", "cli-weekly")) == "cli-weekly: paused\n"
    assert (
        ok(run("schedules", "delete", "cli-weekly")) == "cli-weekly: deleted (its instances stay)\n"
    )
    assert ok(run("schedules", "list")) == "no schedules\n"
    missing = run("schedules", "trigger", "cli-weekly")
    assert missing.returncode == 1 and "no schedule 'cli-weekly'" in missing.stderr
    assert run("schedules", "pause").returncode == 2
