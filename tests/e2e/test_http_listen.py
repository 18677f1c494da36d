"""The HTTP listener of a real ``cruzflow serve`` process.

An HTTP address that is taken is refused before the store is opened (as
the gRPC one is, tests/e2e/test_listen.py); a served process answers
``curl``; and a watch stream cut by SIGKILL resumes on the restarted server
with ``afterSequence``, every event exactly once.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ALL_WORKFLOWS, ON_POSTGRES, Stores
from tests.connect_stub import envelope, read_frame
from tests.procs import wait_for, write_config

SERVICE_PATH = "/cruzflow.v1.WorkflowService/"


class HttpServer:
    """``cruzflow serve`` with extra arguments; its gRPC and HTTP addresses
    once it prints both lines."""

    def __init__(self, config: Path, *args: str) -> None:
        self.config = config
        self.log_path = config.parent / "server.log"
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cruzflow.server.cli",
                    "serve",
                    "--config",
                    str(config),
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "CRUZFLOW_TEST_SIDE_FILE": str(config.parent / "side.txt")},
                cwd=config.parent,
            )
        assert self.proc.stdout is not None
        self.address = self.http = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self.http:
            line = self.proc.stdout.readline()
            if line.startswith("cruzflow listening on "):
                self.address = line.split()[-1]
            elif line.startswith("cruzflow http listening on "):
                self.http = line.split()[-1]
            elif not line and self.proc.poll() is not None:
                break
        if not self.http:
            self.stop()
            raise RuntimeError(f"server did not start; its log:\n{self.log_path.read_text()}")

    @property
    def port(self) -> int:
        return int(self.http.rpartition(":")[2])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def servers() -> Iterator[list[HttpServer]]:
    started: list[HttpServer] = []
    yield started
    for server in started:
        server.stop()


def _config(directory: Path, stores: Stores, http: str | None = "127.0.0.1:0") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(
        directory,
        ALL_WORKFLOWS,
        http=http,
        store_url=stores.url(directory.name) if ON_POSTGRES else None,
    )


def _serve(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cruzflow.server.cli", "serve", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
    )


def curl(*args: str) -> str:
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _frame(response: http.client.HTTPResponse) -> tuple[int, Any] | None:
    """The next envelope of a Connect stream, its JSON read; None at a clean end."""
    frame = read_frame(response)
    return None if frame is None else (frame[0], json.loads(frame[1]))


def _open_watch(port: int, instance_id: str, after: int = 0) -> http.client.HTTPResponse:
    body = json.dumps({"instanceId": instance_id, "afterSequence": str(after)}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(
        "POST",
        SERVICE_PATH + "WatchInstance",
        envelope(body),
        {"content-type": "application/connect+json"},
    )
    response = connection.getresponse()
    assert response.status == 200
    return response


def _watch(port: int, instance_id: str, after: int = 0) -> list[Any]:
    """Every event after ``after``, checking the stream ends cleanly."""
    response = _open_watch(port, instance_id, after)
    events: list[Any] = []
    while (frame := _frame(response)) is not None:
        flags, message = frame
        if flags & 0x02:
            assert "error" not in message, message
            assert _frame(response) is None
            return events
        events.append(message)
    raise AssertionError("the stream ended without an end-of-stream envelope")


def test_a_taken_http_address_is_refused_before_the_store_opens(
    tmp_path: Path, stores: Stores
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        by_option = _serve(
            _config(tmp_path / "option", stores, http=None), "--http-listen", address
        )
        by_file = _serve(_config(tmp_path / "file", stores, http=address))
    for result, folder in ((by_option, "option"), (by_file, "file")):
        assert result.returncode == 1, result.stderr
        assert f"cannot listen on {address}: the address is in use" in result.stderr
        assert "choose another address with --http-listen or [http] listen" in result.stderr
        assert "--listen or [server] listen" not in result.stderr
        assert "cruzflow listening on" not in result.stdout
        assert not (tmp_path / folder / "store.db").exists()


def test_a_served_process_answers_curl(
    tmp_path: Path, stores: Stores, servers: list[HttpServer]
) -> None:
    config = _config(tmp_path / "cli", stores, http=None)
    server = HttpServer(config, "--http-listen", "127.0.0.1:0")
    servers.append(server)
    assert server.http.startswith("127.0.0.1:") and server.port != 0
    url = f"http://{server.http}"

    created = json.loads(
        curl(
            "--header", "content-type: application/json",
            "--data", '{"workflow":"three-steps","instanceId":"by-curl","paramsJson":"{\\"k\\":1}"}',
            url + SERVICE_PATH + "CreateInstance",
        )
    )  # fmt: skip
    assert created["instanceId"] == "by-curl"
    triggered = json.loads(
        curl("--data", '{"k":2}', url + "/workflows/three-steps/trigger?id=by-route")
    )
    assert triggered["id"] == "by-route"
    assert triggered["status"] in ("queued", "running")

    def done(instance_id: str) -> Any:
        answer = json.loads(curl(f"{url}/workflows/three-steps/status/{instance_id}"))
        return answer if answer["status"] == "complete" else None

    assert wait_for(lambda: done("by-curl"))["output"] == {"sum": 6, "params": {"k": 1}}
    assert wait_for(lambda: done("by-route"))["output"] == {"sum": 6, "params": {"k": 2}}

    out = curl(
        "--http2-prior-knowledge",
        "--write-out", "\n%{http_version} %{http_code}",
        "--header", "content-type: application/json",
        "--data", '{"lookupKey":""}',
        url + SERVICE_PATH + "ListInstances",
    )  # fmt: skip
    body, _, tail = out.rpartition("\n")
    assert tail == "2 200", out
    assert sorted(i["instanceId"] for i in json.loads(body)["instances"]) == [
        "by-curl",
        "by-route",
    ]


def test_a_watch_cut_by_sigkill_resumes_after_its_last_sequence(
    tmp_path: Path, stores: Stores, servers: list[HttpServer]
) -> None:
    config = _config(tmp_path / "crash", stores)
    first = HttpServer(config)
    servers.append(first)
    triggered = json.loads(
        curl("--data", '{"ms": 300}', f"http://{first.http}/workflows/steps5/trigger?id=cut")
    )
    assert triggered["id"] == "cut"

    response = _open_watch(first.port, "cut")
    seen: list[Any] = []
    while len(seen) < 4:  # running, s0 started and done, s1 started
        frame = _frame(response)
        assert frame is not None and frame[0] == 0, frame
        seen.append(frame[1])
    first.kill()
    try:
        while (frame := _frame(response)) is not None:
            assert frame[0] == 0, "the stream ended cleanly under SIGKILL"
            seen.append(frame[1])
    except (http.client.HTTPException, OSError):
        pass  # the cut
    last = int(seen[-1]["sequence"])
    assert seen[-1].get("statusChanged", {}).get("status") != "INSTANCE_STATUS_COMPLETE"

    second = HttpServer(config)
    servers.append(second)
    rest = _watch(second.port, "cut", after=last)
    assert rest[-1]["statusChanged"]["status"] == "INSTANCE_STATUS_COMPLETE"
    assert json.loads(rest[-1]["statusChanged"]["outputJson"]) == [0, 1, 2, 3, 4]

    sequences = [int(e["sequence"]) for e in seen + rest]
    assert sequences == list(range(1, len(sequences) + 1))
    # The log as a watch from the start reads it: the two parts, nothing more.
    assert _watch(second.port, "cut") == seen + rest
    # The step the kill cut runs again on the second server; no finished one does.
    done = {e["stepSucceeded"]["step"]["name"] for e in seen if "stepSucceeded" in e}
    cut = [e["stepStarted"]["step"]["name"] for e in seen if "stepStarted" in e]
    again = [e["stepStarted"]["step"]["name"] for e in rest if "stepStarted" in e]
    assert "s0" in done and not done & set(again)
    assert cut[-1] in done or cut[-1] == again[0]
