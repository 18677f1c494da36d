"""The web console's files, served at ``/`` of the HTTP listener.

The console is static: ``index.html``, ``console.css`` and ``console.js``
(built from ``console/`` in the repository and checked in, so running it
needs no Node). In the browser it calls the same Connect API as every client,
with the caller's bearer token; the files themselves hold nothing secret and
are served without one. The only thing the server adds is ``[console]
trace_url``, written into the page's ``<meta name="cruzflow-trace-url">``.

Each file is read once at start, with its gzip form and an ETag: a browser
revalidates (``Cache-Control: no-cache``) and gets a 304 while it is current.
The page forbids everything it does not need (its Content-Security-Policy
allows scripts, styles and calls to its own origin only) and being framed.
"""

from __future__ import annotations

import gzip
import hashlib
import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

_PAGE = "/"
_ASSETS = {
    "/console/console.js": ("console.js", b"text/javascript; charset=utf-8"),
    "/console/console.css": ("console.css", b"text/css; charset=utf-8"),
}
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    gzipped: bytes
    content_type: bytes
    etag: bytes


def _file(body: bytes, content_type: bytes) -> _File:
    etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
    return _File(body, gzip.compress(body, 9, mtime=0), content_type, etag)


class Console:
    """The console's files; ``trace_url`` is ``[console] trace_url``."""

    def __init__(self, trace_url: str = "") -> None:
        folder = resources.files("cruzflow.server") / "console"
        page = (folder / "index.html").read_text("utf-8")
        page = page.replace("{{trace_url}}", html.escape(trace_url, quote=True))
        self._files = {_PAGE: _file(page.encode(), b"text/html; charset=utf-8")}
        for path, (name, content_type) in _ASSETS.items():
            self._files[path] = _file((folder / name).read_bytes(), content_type)

    def serves(self, path: str) -> bool:
        return path in self._files

    async def __call__(
        self,
        scope: dict[str, Any],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        """Answer a request whose path :meth:`serves`; GET and HEAD only."""
        file = self._files[scope["path"]]
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            body = b"the console's files answer GET and HEAD only\n"
            await _send(send, 405, [(b"allow", b"GET, HEAD")], body, b"text/plain")
            return
        headers = dict(scope.get("headers") or ())
        extra = [
            (b"etag", file.etag),
            (b"cache-control", b"no-cache"),
            (b"vary", b"accept-encoding"),
            *_SECURITY_HEADERS,
        ]
        if file.etag in headers.get(b"if-none-match", b"").replace(b" ", b"").split(b","):
            await _send(send, 304, extra, b"", None)
            return
        body = file.body
        if b"gzip" in headers.get(b"accept-encoding", b""):
            body = file.gzipped
            extra.append((b"content-encoding", b"gzip"))
        await _send(
            send, 200, extra, b"" if method == "HEAD" else body, file.content_type, len(body)
        )


async def _send(
    send: Callable[[Any], Awaitable[None]],
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    content_type: bytes | None,
    length: int | None = None,
) -> None:
    head = list(headers)
    if content_type is not None:
        head.append((b"content-type", content_type))
    if status != 304:
        head.append((b"content-length", str(len(body) if length is None else length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
