"""TLS and mTLS: the server's certificate, client certificates, the loopback default.

Real in-process servers on loopback ports, with certificates made for the
session by the ``openssl`` command (tests/pki.py); clients are the typed
client, the sync client, the CLI and a remote workflow binding.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cruzflow.client import Client, InvalidArgument, SyncClient, tls_credentials
from cruzflow.server.app import Service
from cruzflow.server.config import ConfigError, is_loopback, load_config
from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1 import workflows_pb2_grpc as pb_grpc
from tests.pki import Pki, make_pki, secure_config, token_entry
from tests.procs import ROOT, ServerProcess

CHILD = "tests.workflows:Doubles"
SPAWNS = "tests.workflows:SpawnsChild"
TOKEN = "tls-test-token-0123456789abcdef"

Serve = Callable[[Path], Awaitable[Service]]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start services from config files; all are stopped after the test."""
    started: list[Service] = []

    async def start(path: Path) -> Service:
        service = Service(load_config(path))
        started.append(service)
        await service.start()
        return service

    yield start
    for service in reversed(started):
        await service.stop(0.1)


def tls_keys(pki: Pki, *, mtls: bool = False) -> dict[str, object]:
    keys: dict[str, object] = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    if mtls:
        keys["tls_client_ca_file"] = pki.ca
    return keys


async def refused(address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
    """A call fails fast with UNAVAILABLE: the connection (its handshake) failed.

    A raw stub, not the typed client: the client waits for a connection up to
    its deadline, which would not tell a refused handshake from a slow server.
    """
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, credentials)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.WorkflowServiceStub(channel).ListWorkflows(
                pb.ListWorkflowsRequest(), timeout=30
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value


# ------------------------------------------------------------------- TLS


async def test_tls_serves_clients_that_trust_its_ca(serve: Serve, pki: Pki, tmp_path: Path) -> None:
    service = await serve(secure_config(tmp_path, {"child-workflow": CHILD}, server=tls_keys(pki)))
    port = service.port
    for host in ("127.0.0.1", "localhost"):  # the certificate names both
        async with Client(f"{host}:{port}", credentials=tls_credentials(pki.ca)) as client:
            handle = await client.workflow("child-workflow").create({"n": 2})
            assert (await handle.result(timeout=30))["doubled"] == 4
    # Plaintext, or TLS that does not trust the test CA, does not get through.
    await refused(f"127.0.0.1:{port}")
    await refused(f"127.0.0.1:{port}", tls_credentials())
    await refused(f"127.0.0.1:{port}", tls_credentials(pki.other_ca))
    # Health answers over TLS too (probes need no token and no client certificate).
    channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", tls_credentials(pki.ca))
    async with channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_mtls_wants_a_client_certificate_from_the_configured_ca(
    serve: Serve, pki: Pki, tmp_path: Path
) -> None:
    path = secure_config(tmp_path, {"child-workflow": CHILD}, server=tls_keys(pki, mtls=True))
    address = f"127.0.0.1:{(await serve(path)).port}"
    await refused(address, tls_credentials(pki.ca))
    stranger = tls_credentials(pki.ca, cert_file=pki.stranger_cert, key_file=pki.stranger_key)
    await refused(address, stranger)
    # The server's own certificate is not a client certificate (serverAuth only).
    own = tls_credentials(pki.ca, cert_file=pki.server_cert, key_file=pki.server_key)
    await refused(address, own)
    good = tls_credentials(pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    async with Client(address, credentials=good) as client:
        assert [w.name for w in await client.list_workflows()] == ["child-workflow"]


async def test_the_typed_clients_use_tls_and_a_token(
    serve: Serve, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRUZFLOW_TEST_TLS_TOKEN", TOKEN)
    path = secure_config(
        tmp_path,
        {"child-workflow": CHILD},
        server=tls_keys(pki, mtls=True),
        auth=token_entry("tester", env="CRUZFLOW_TEST_TLS_TOKEN"),
    )
    address = f"127.0.0.1:{(await serve(path)).port}"
    files = {"cert_file": pki.client_cert, "key_file": pki.client_key}
    async with Client(address, credentials=tls_credentials(pki.ca, **files), token=TOKEN) as client:
        handle = await client.workflow("child-workflow").create({"n": 5}, id="tls-async")
        assert (await handle.result(timeout=30))["doubled"] == 10

    def blocking() -> Any:
        credentials = tls_credentials(str(pki.ca), **{k: str(v) for k, v in files.items()})
        with SyncClient(address, credentials=credentials, token=TOKEN) as client:
            return client.workflow("child-workflow").create({"n": 6}).result(timeout=30)

    # The sync client runs its own loop; the server runs on this one.
    assert (await asyncio.to_thread(blocking))["doubled"] == 12


def test_tls_credentials_name_a_file_they_cannot_use(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"ca_file: cannot read .*missing\.pem"):
        tls_credentials(tmp_path / "missing.pem")
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(InvalidArgument, match=r"cert_file: .* is not a PEM file"):
        tls_credentials(pki.ca, cert_file=tmp_path / "not.pem", key_file=pki.client_key)
    with pytest.raises(InvalidArgument, match="cert_file and key_file go together"):
        tls_credentials(pki.ca, cert_file=pki.client_cert)


async def test_a_hosted_binding_calls_its_own_server_under_mtls_and_tokens(
    serve: Serve, pki: Pki, tmp_path: Path, side_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's own bindings cannot pass its client-certificate check nor know
    a configured token: they go through its private socket with a token of its own."""
    monkeypatch.setenv("CRUZFLOW_TEST_TLS_TOKEN", TOKEN)
    path = secure_config(
        tmp_path,
        {"spawns-child": SPAWNS, "child-workflow": CHILD},
        server=tls_keys(pki, mtls=True),
        auth=token_entry("tester", env="CRUZFLOW_TEST_TLS_TOKEN"),
    )
    service = await serve(path)
    socket = service._own_socket
    assert socket is not None and socket.exists()
    assert (socket.parent.stat().st_mode & 0o077) == 0  # only this user may connect
    credentials = tls_credentials(pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    async with Client(f"127.0.0.1:{service.port}", credentials=credentials, token=TOKEN) as client:
        handle = await client.workflow("spawns-child").create({"n": 20})
        output = await handle.result(timeout=60)
    assert output["children"] == [{"doubled": 40, "id": output["child_ids"][0]}]
    # Without the token the private socket refuses like the network port.
    async with Client(f"unix:{socket}", timeout=5, retry=None) as anonymous:
        with pytest.raises(Exception, match="bearer token"):
            await anonymous.list_workflows()
    await service.stop(0.1)
    assert not socket.parent.exists()


async def test_a_remote_binding_reaches_a_server_with_mtls_and_a_token(
    serve: Serve, pki: Pki, tmp_path: Path, side_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRUZFLOW_TEST_CHILD_TOKEN", TOKEN)
    child = await serve(
        secure_config(
            tmp_path / "child",
            {"child-workflow": CHILD},
            server=tls_keys(pki, mtls=True),
            auth=token_entry("parent", env="CRUZFLOW_TEST_CHILD_TOKEN"),
        )
    )
    remote = "\n".join(
        [
            "[[workflows]]",
            'binding = "CHILD_WORKFLOW"',
            'name = "child-workflow"',
            f'address = "127.0.0.1:{child.port}"',
            'token_env = "CRUZFLOW_TEST_CHILD_TOKEN"',
            f'tls_ca_file = "{pki.ca}"',
            f'tls_cert_file = "{pki.client_cert}"',
            f'tls_key_file = "{pki.client_key}"',
        ]
    )
    parent = await serve(secure_config(tmp_path / "parent", {"spawns-child": SPAWNS}, extra=remote))
    async with Client(f"127.0.0.1:{parent.port}") as client:
        handle = await client.workflow("spawns-child").create({"n": 1}, id="parent-1")
        output = await handle.result(timeout=60)
    [child_id] = output["child_ids"]
    assert output["children"] == [{"doubled": 2, "id": child_id}]


async def test_the_cli_speaks_tls_with_a_token_file(serve: Serve, pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    path = secure_config(
        tmp_path / "server",
        {"child-workflow": CHILD},
        server=tls_keys(pki, mtls=True),
        auth=token_entry("cli", file=token_file),
    )
    address = f"127.0.0.1:{(await serve(path)).port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUZFLOW_")}
    env.update(
        CRUZFLOW_ADDRESS=address,
        CRUZFLOW_TLS_CA=str(pki.ca),
        CRUZFLOW_TLS_CERT=str(pki.client_cert),
        CRUZFLOW_TLS_KEY=str(pki.client_key),
    )

    async def cli(*args: str, **extra: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cruzflow.server.cli",
            *args,
            env={**env, **extra},
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await cli("workflows", "--token-file", str(token_file))
    assert (code, out.split()[:1]) == (0, ["NAME"]) and "child-workflow" in out, out
    code, out = await cli("create", "child-workflow", "--params", '{"n": 3}', "--wait",
                          CRUZFLOW_TOKEN_FILE=str(token_file))  # fmt: skip
    assert code == 0 and '"doubled": 6' in out, out
    code, out = await cli("workflows")
    assert code == 1 and "wants credentials" in out and "CRUZFLOW_TOKEN" in out, out
    code, out = await cli("workflows", "--token-file", str(token_file), CRUZFLOW_TLS_CERT="")
    assert code == 2 and "--tls-cert and --tls-key go together" in out, out
    code, out = await cli("workflows", "--tls-ca", str(tmp_path / "nope.pem"))
    assert code == 2 and "--tls-ca: cannot read" in out, out
    assert TOKEN not in out


# ---------------------------------------------------------------- config


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


def test_tls_settings_are_checked_when_the_config_loads(pki: Pki, tmp_path: Path) -> None:
    def error(**keys: object) -> str:
        return config_error(secure_config(tmp_path, {"child-workflow": CHILD}, server=keys))

    assert "server.tls_key_file: tls_cert_file and tls_key_file go together" in error(
        tls_cert_file=pki.server_cert
    )
    assert "server.tls_client_ca_file: client certificates need TLS" in error(
        tls_client_ca_file=pki.ca
    )
    missing = error(tls_cert_file=tmp_path / "nope.pem", tls_key_file=pki.server_key)
    assert "server.tls_cert_file: cannot read" in missing and "nope.pem" in missing
    mismatched = error(tls_cert_file=pki.server_cert, tls_key_file=pki.client_key)
    assert "server.tls_cert_file/tls_key_file: not a PEM certificate chain" in mismatched
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    junk = error(**tls_keys(pki), tls_client_ca_file=tmp_path / "junk.pem")
    assert "server.tls_client_ca_file: not PEM CA certificates" in junk
    for message in (missing, mismatched, junk):
        assert not any(key in message for key in pki.key_texts())
    # Relative paths are relative to the config file.
    config = load_config(
        secure_config(
            pki.folder / "cfg",
            {"child-workflow": CHILD},
            server={"tls_cert_file": "../server.pem", "tls_key_file": "../server.key"},
        )
    )
    assert config.server_tls is not None
    assert config.server_tls.certificate_chain == pki.server_cert.read_bytes()
    assert "server.key" not in repr(config.server_tls) and "PRIVATE" not in repr(config.server_tls)


def test_only_loopback_is_served_without_tls_or_tokens_by_default(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRUZFLOW_TEST_TLS_TOKEN", TOKEN)
    token = token_entry("ops", env="CRUZFLOW_TEST_TLS_TOKEN")
    workflows = {"child-workflow": CHILD}
    for listen in ("127.0.0.1:0", "127.8.0.1:0", "localhost:0", "[::1]:0"):
        assert load_config(secure_config(tmp_path, workflows, listen=listen)).warnings == []
    plaintext = config_error(secure_config(tmp_path, workflows, listen="0.0.0.0:0", auth=token))
    assert "0.0.0.0:0 is not a loopback address, and the server has no TLS" in plaintext
    assert "server.tls_cert_file and server.tls_key_file" in plaintext
    assert "server.allow_plaintext = true" in plaintext
    anonymous = config_error(
        secure_config(tmp_path, workflows, listen="0.0.0.0:0", server=tls_keys(pki))
    )
    assert "no [[auth.tokens]] are configured" in anonymous
    assert "server.allow_unauthenticated = true" in anonymous
    secure = secure_config(
        tmp_path, workflows, listen="0.0.0.0:0", server=tls_keys(pki), auth=token
    )
    assert load_config(secure).warnings == []


async def test_allowed_plaintext_and_no_auth_off_loopback_are_logged(
    serve: Serve, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = secure_config(
        tmp_path,
        {"child-workflow": CHILD},
        listen="0.0.0.0:0",
        server={"allow_plaintext": True, "allow_unauthenticated": True},
    )
    with caplog.at_level(logging.WARNING, logger="cruzflow"):
        await serve(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("serving plaintext on 0.0.0.0:0" in w for w in warnings), warnings
    assert any("without authentication" in w for w in warnings), warnings


def test_is_loopback() -> None:
    for listen in (
        "127.0.0.1:1",
        "127.255.0.9:1",
        "[::1]:1",
        "::1:1",
        "localhost:1",
        "LOCALHOST:1",
    ):
        assert is_loopback(listen), listen
    for listen in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "example.com:1", "192.168.1.2:1"):
        assert not is_loopback(listen), listen


async def test_a_killed_tls_servers_socket_folder_is_swept_by_the_next(
    serve: Serve, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    config = secure_config(tmp_path / "a", {"child-workflow": CHILD}, server=tls_keys(pki))
    killed = ServerProcess(config, {"TMPDIR": str(temp)}).start()
    try:
        assert killed.proc is not None
        (left,) = temp.glob(f"cruzflow-own-{killed.proc.pid}-*")
        assert (left / "own.sock").exists()
        killed.kill()
        assert left.exists()  # nothing cleaned up after a SIGKILL
    finally:
        killed.stop()
    # A folder whose server still runs (pid 1 always does) is left alone.
    alive = temp / "cruzflow-own-1-kept"
    alive.mkdir()
    await serve(secure_config(tmp_path / "b", {"child-workflow": CHILD}, server=tls_keys(pki)))
    assert not left.exists()
    assert alive.exists()
    assert len(list(temp.glob(f"cruzflow-own-{os.getpid()}-*"))) == 1
