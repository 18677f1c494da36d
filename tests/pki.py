"""A throw-away PKI for the TLS and auth tests, made with the ``openssl`` command.

Two CAs: ``ca`` signs the server's certificate (for IP 127.0.0.1 and
localhost) and a client certificate; ``other`` signs a client certificate
the server must not accept.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import write_config


@dataclass(frozen=True)
class Pki:
    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def ca(self) -> Path:
        return self.path("ca.pem")

    @property
    def server_cert(self) -> Path:
        return self.path("server.pem")

    @property
    def server_key(self) -> Path:
        return self.path("server.key")

    @property
    def client_cert(self) -> Path:
        return self.path("client.pem")

    @property
    def client_key(self) -> Path:
        return self.path("client.key")

    @property
    def other_ca(self) -> Path:
        return self.path("other-ca.pem")

    @property
    def stranger_cert(self) -> Path:
        """A client certificate signed by the other CA."""
        return self.path("stranger.pem")

    @property
    def stranger_key(self) -> Path:
        return self.path("stranger.key")

    def key_texts(self) -> list[str]:
        """The private keys' PEM bodies, to look for where they must not be."""
        out = []
        for key in ("ca.key", "server.key", "client.key", "other-ca.key", "stranger.key"):
            lines = self.path(key).read_text().splitlines()
            out.append("".join(line for line in lines if not line.startswith("-----")))
        return out


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]


def make_pki(folder: Path) -> Pki:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        run(
            "req", "-x509", *_EC, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            "-subj", f"/CN=cruzflow-test-{ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    for name, ca, usage, alt in (
        ("server", "ca", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
        ("client", "ca", "clientAuth", "DNS:client.test"),
        ("stranger", "other-ca", "clientAuth", "DNS:stranger.test"),
    ):
        run(
            "req", "-x509", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", *_EC,
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
            "-addext", f"subjectAltName={alt}",
            "-addext", f"extendedKeyUsage={usage}",
            "-addext", "basicConstraints=CA:FALSE",
        )  # fmt: skip
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return Pki(folder)


def secure_config(
    directory: Path,
    workflows: Mapping[str, str],
    *,
    server: Mapping[str, object] | None = None,
    auth: str = "",
    extra: str = "",
    listen: str = "127.0.0.1:0",
) -> Path:
    """write_config's file with more ``[server]`` keys, then ``auth`` and ``extra``
    (TOML text: ``[auth]``, ``[[auth.tokens]]``, remote ``[[workflows]]``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = write_config(directory, workflows, listen=listen)
    keys = "".join(
        f"{key} = {json.dumps(str(value) if isinstance(value, Path) else value)}\n"
        for key, value in (server or {}).items()
    )
    text = path.read_text().replace("[store]\n", keys + "[store]\n", 1)
    path.write_text(text + auth + extra)
    return path


def token_entry(
    name: str,
    *,
    env: str | None = None,
    file: str | Path | None = None,
    access: str = "write",
    workflows: list[str] | None = None,
) -> str:
    """One ``[[auth.tokens]]`` entry."""
    lines = ["[[auth.tokens]]", f"name = {json.dumps(name)}", f"access = {json.dumps(access)}"]
    if env is not None:
        lines.append(f"env = {json.dumps(env)}")
    if file is not None:
        lines.append(f"file = {json.dumps(str(file))}")
    if workflows is not None:
        lines.append(f"workflows = {json.dumps(workflows)}")
    return "\n".join(lines) + "\n"
