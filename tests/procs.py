"""Real server processes for the end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def write_config(
    directory: Path,
    workflows: Mapping[str, str],
    *,
    limits: Mapping[str, int] | None = None,
    vars: Mapping[str, str] | None = None,
    databases: Mapping[str, str] | None = None,
    grace: str = "5 seconds",
    listen: str = "127.0.0.1:0",
    store: str = "store.db",
    store_url: str | None = None,
    lease_period: str | None = None,
    http: str | None = None,
) -> Path:
    """A config file in ``directory`` hosting ``{name: "module:Class"}``; on the
    SQLite file ``store``, or on the PostgreSQL database ``store_url``; with
    an HTTP listener on ``http`` (host:port) if given."""
    lines = [
        'name = "cruzflow-test"',
        f"python_path = [{str(ROOT)!r}]",
        "[server]",
        f'listen = "{listen}"',
        f'grace_period = "{grace}"',
        *(["[http]", f'listen = "{http}"'] if http is not None else []),
        "[store]",
        f'url = "{store_url}"' if store_url is not None else f'path = "{store}"',
        *([f'lease_period = "{lease_period}"'] if lease_period is not None else []),
        "[limits]",
    ]
    lines += [f"{k} = {v}" for k, v in (limits or {}).items()]
    for name, target in workflows.items():
        binding = name.upper().replace("-", "_")
        lines += [
            "[[workflows]]",
            f'binding = "{binding}"',
            f'name = "{name}"',
            f'class_name = "{target}"',
        ]
    for binding, path in (databases or {}).items():
        lines += ["[[sqlite_databases]]", f'binding = "{binding}"', f'path = "{path}"']
    lines.append("[vars]")
    lines += [f'{k} = "{v}"' for k, v in (vars or {}).items()]
    config = directory / "cruzflow.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def free_port() -> int:
    """A loopback port nobody listens on right now (for a server to be started on later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """``cruzflow serve`` in a child process; ``address`` once it listens."""

    def __init__(self, config: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.http_address = ""
        """host:port of the HTTP listener, when the config has one."""
        self.log_path = config.parent / "server.log"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child keeps writing to it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cruzflow.server.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=self.env,
            cwd=self.config.parent,
        )
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("cruzflow listening on "):
                self.address = line.split()[-1]
                if "\n[http]\n" not in self.config.read_text():
                    return self
            elif line.startswith("cruzflow http listening on "):
                # Printed right after the gRPC line, when there is a listener.
                self.http_address = line.split()[-1]
                return self
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"server did not start; its log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll until ``condition()`` is truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(interval)


class Restarts:
    """Server processes of ``workflows`` run one after another on one config,
    port and store: ``start`` a first, kill or stop it, ``start`` the next.
    ``store_url``: a PostgreSQL database instead of the folder's SQLite file
    (with a short lease, so a restarted server takes over soon)."""

    def __init__(
        self, directory: Path, workflows: Mapping[str, str], store_url: str | None = None
    ) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.config = write_config(
            directory,
            workflows,
            listen=self.address,
            store_url=store_url,
            lease_period="1 second" if store_url is not None else None,
        )
        self.env = {"CRUZFLOW_TEST_SIDE_FILE": str(directory / "side.txt")}
        self.servers: list[ServerProcess] = []

    async def start(self) -> None:
        server = ServerProcess(self.config, self.env)
        self.servers.append(server)
        await asyncio.to_thread(server.start)
        assert server.address == self.address

    @property
    def current(self) -> ServerProcess:
        return self.servers[-1]

    def close(self) -> None:
        for server in self.servers:
            server.stop()
