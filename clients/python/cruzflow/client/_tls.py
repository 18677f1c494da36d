"""Channel credentials from PEM files, for servers that serve TLS or mTLS."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from cruzflow.client.errors import InvalidArgument

__all__ = ["tls_credentials"]

StrPath = str | os.PathLike[str]


def _read(path: StrPath | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        # Said here rather than as a handshake failure on the first call.
        raise InvalidArgument(f"{what}: {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def tls_credentials(
    ca_file: StrPath | None = None,
    *,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials for ``Client(..., credentials=...)``.

    ``ca_file`` holds the PEM certificates to check the server's certificate
    by (default: the system's roots). ``cert_file`` and ``key_file`` (PEM, the
    key unencrypted) go together: the client certificate a server that
    requires one (mTLS) checks. The files are read now; one that cannot be
    read raises :class:`InvalidArgument` naming it.

    ::

        credentials = tls_credentials("ca.pem", cert_file="client.pem", key_file="client.key")
        async with Client("workflows.internal:50051", credentials=credentials) as client:
            ...
    """
    if (cert_file is None) != (key_file is None):
        raise InvalidArgument("tls_credentials: cert_file and key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "ca_file"),
        private_key=_read(key_file, "key_file"),
        certificate_chain=_read(cert_file, "cert_file"),
    )
