"""The generated gRPC stub's interface over HTTP (Connect, JSON by default),
so that one test or bench runs over either transport unchanged; and the
Connect protocol's stream envelopes, for tests that speak raw HTTP.

``ConnectStub(url).CreateInstance(request, timeout=..., metadata=...)`` is
awaited like the gRPC stub's method and raises a ``grpc.aio.AioRpcError``
with the gRPC status code of the Connect error; ``WatchInstance`` gives a
call to iterate, ``read()`` (``grpc.aio.EOF`` at the end) or ``cancel()``.
Calls go through connectrpc's generated client (``workflows_connect.py``),
on the Connect protocol, with no compression.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError
from pyqwest import Client, HTTPTransport, HTTPVersion

from cruzflow.v1 import workflows_pb2 as pb
from cruzflow.v1.workflows_connect import WorkflowServiceClient

SERVICE = pb.DESCRIPTOR.services_by_name["WorkflowService"]


END_STREAM = 0x02
"""The flag of a Connect stream's last envelope (its JSON: {} or {"error": ...})."""


def envelope(data: bytes) -> bytes:
    """``data`` as one envelope of a Connect stream: flags 0, a 4-byte length."""
    return struct.pack(">BI", 0, len(data)) + data


def unframe(data: bytes) -> list[tuple[int, bytes]]:
    """A whole Connect stream body as its envelopes: (flags, data) each."""
    out = []
    at = 0
    while at < len(data):
        flags, size = struct.unpack(">BI", data[at : at + 5])
        out.append((flags, data[at + 5 : at + 5 + size]))
        at += 5 + size
    assert at == len(data), "a truncated envelope"
    return out


def read_frame(response: http.client.HTTPResponse) -> tuple[int, bytes] | None:
    """The next envelope of a Connect stream being read; None at a clean end."""
    head = response.read(5)
    if not head:
        return None
    flags, size = struct.unpack(">BI", head)
    body = response.read(size)
    if len(body) < size:
        raise http.client.IncompleteRead(body, size - len(body))
    return flags, body


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def rpc_error(exc: ConnectError) -> grpc.aio.AioRpcError:
    """A Connect error as the gRPC error the same refusal gets over gRPC."""
    code = grpc.StatusCode[exc.code.name.replace("CANCELED", "CANCELLED")]
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), exc.message)


def _headers(metadata: Iterable[tuple[str, str]] | None) -> dict[str, str] | None:
    return None if metadata is None else {key: value for key, value in metadata}


def _timeout_ms(timeout: float | None) -> int | None:
    return None if timeout is None else max(1, round(timeout * 1000))


class _Stream:
    """A server stream, as the gRPC stub's call object: iterate, read, cancel."""

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self._source = source
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            item = await self.read()
            if item is grpc.aio.EOF:
                return
            yield item

    async def read(self) -> Any:
        if self._closed:
            return grpc.aio.EOF
        try:
            return await self._source.__anext__()
        except StopAsyncIteration:
            self._closed = True
            return grpc.aio.EOF
        except ConnectError as exc:
            self._closed = True
            raise rpc_error(exc) from None

    def cancel(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        close = getattr(self._source, "aclose", None)
        if close is not None:
            task = asyncio.ensure_future(close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return True


class ConnectStub:
    """See the module's docstring. ``codec``: "json" or "proto"; ``ca``,
    ``cert``, ``key``: PEM of the CA to trust and the client's own (mTLS)."""

    def __init__(
        self,
        base_url: str,
        *,
        codec: str = "json",
        http2: bool = False,
        ca: bytes | None = None,
        cert: bytes | None = None,
        key: bytes | None = None,
    ) -> None:
        # The default transport traces every request through OpenTelemetry's
        # global provider and asks for compressed answers: neither is wanted here.
        transport = HTTPTransport(
            http_version=HTTPVersion.HTTP2 if http2 else None,
            tls_ca_cert=ca,
            tls_cert=cert,
            tls_key=key,
            enable_otel=False,
            enable_gzip=False,
            enable_brotli=False,
            enable_zstd=False,
        )
        self.client = WorkflowServiceClient(
            base_url,
            http_client=Client(transport),
            codec=google_protobuf_json_codec()
            if codec == "json"
            else google_protobuf_binary_codec(),
            send_compression=None,
            accept_compression=(),
        )
        for method in SERVICE.methods:
            call = getattr(self.client, _snake(method.name))
            adapt = self._stream if method.server_streaming else self._unary
            setattr(self, method.name, adapt(call))

    @staticmethod
    def _unary(call: Callable[..., Any]) -> Callable[..., asyncio.Task[Any]]:
        async def unary(request: Any, timeout: float | None, metadata: Any) -> Any:
            try:
                return await call(
                    request, headers=_headers(metadata), timeout_ms=_timeout_ms(timeout)
                )
            except ConnectError as exc:
                raise rpc_error(exc) from None

        def started(
            request: Any,
            timeout: float | None = None,
            metadata: Iterable[tuple[str, str]] | None = None,
        ) -> asyncio.Task[Any]:
            # Under way at once, as a gRPC call is: a test may start calls and
            # await (or cancel) them later.
            return asyncio.ensure_future(unary(request, timeout, metadata))

        return started

    @staticmethod
    def _stream(call: Callable[..., AsyncIterator[Any]]) -> Callable[..., _Stream]:
        def stream(
            request: Any,
            timeout: float | None = None,
            metadata: Iterable[tuple[str, str]] | None = None,
        ) -> _Stream:
            return _Stream(
                call(request, headers=_headers(metadata), timeout_ms=_timeout_ms(timeout))
            )

        return stream

    async def close(self) -> None:
        await self.client.close()
