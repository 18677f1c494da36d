"""The web console's files, as the HTTP listener serves them (the browser
tests in tests/browser drive the console itself)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from cruzflow.server.config import ConfigError
from tests import test_http
from tests.pki import token_entry
from tests.test_http import Node, Start, _load

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "server" / "cruzflow" / "server" / "console"
start = test_http.start  # the fixture: in-process servers with an HTTP listener


async def test_the_page_and_its_files_are_served_at_the_root(start: Start) -> None:
    node: Node = await start(
        extra='[console]\ntrace_url = "https://jaeger.example/t/{trace_id}?a=1&b=\\"2\\""\n'
    )
    page = await node.http.request("GET", "/")
    assert page.status == 200
    assert page.header("content-type") == "text/html; charset=utf-8"
    html = page.body.decode()
    # The trace link template, escaped into the page's meta tag.
    assert (
        '<meta name="cruzflow-trace-url" content="https://jaeger.example/t/{trace_id}?a=1&amp;b=&quot;2&quot;" />'
        in html
    )
    assert '<script type="module" src="/console/console.js"></script>' in html
    csp = page.header("content-security-policy") or ""
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert page.header("x-content-type-options") == "nosniff"
    assert page.header("referrer-policy") == "no-referrer"

    for path, kind, name in (
        ("/console/console.js", "text/javascript; charset=utf-8", "console.js"),
        ("/console/console.css", "text/css; charset=utf-8", "console.css"),
    ):
        plain = await node.http.request("GET", path)
        assert plain.status == 200 and plain.header("content-type") == kind
        assert plain.body == (FILES / name).read_bytes()
        assert plain.header("cache-control") == "no-cache"
        etag = plain.header("etag")
        assert etag and re.fullmatch(r'"[0-9a-f]{20}"', etag)
        # Revalidation: 304 without a body while the file is the same.
        again = await node.http.request("GET", path, headers={"if-none-match": etag})
        assert (again.status, again.body) == (304, b"")
        other = await node.http.request("GET", path, headers={"if-none-match": '"0"'})
        assert other.status == 200
        zipped = await node.http.request("GET", path, headers={"accept-encoding": "gzip, br"})
        assert zipped.header("content-encoding") == "gzip"
        assert gzip.decompress(zipped.body) == plain.body
        assert len(zipped.body) < len(plain.body)
        head = await node.http.request("HEAD", path)
        assert head.status == 200 and head.body == b""
        assert head.header("content-length") == str(len(plain.body))

    posted = await node.http.request("POST", "/", b"x")
    assert posted.status == 405 and posted.header("allow") == "GET, HEAD"
    # Other paths are the API's 404, which names the console.
    missing = await node.http.request("GET", "/console/nope.js")
    assert missing.status == 404
    assert "the web console is at GET /" in missing.json()["message"]


async def test_the_page_needs_no_token_but_every_call_it_makes_does(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSOLE_TEST_TOKEN", "console-test-token-0123456789")
    node: Node = await start(extra=token_entry("admin", env="CONSOLE_TEST_TOKEN") + "\n")
    assert (await node.http.request("GET", "/")).status == 200
    assert (await node.http.request("GET", "/console/console.js")).status == 200
    refused = await node.http.call("GetCaller", {})
    assert refused.status == 401


async def test_the_console_can_be_switched_off(start: Start) -> None:
    node: Node = await start(extra="[console]\nenabled = false\n")
    for path in ("/", "/console/console.js"):
        reply = await node.http.request("GET", path)
        assert reply.status == 404
        assert "web console" not in reply.json()["message"]
    # The API is still there.
    assert (await node.http.call("ListWorkflows", {})).status == 200


def test_trace_url_is_validated(tmp_path: Path) -> None:
    for n, url in enumerate(
        ("jaeger/{trace_id}", "https://jaeger.example/trace", "ftp://x/{trace_id}")
    ):
        with pytest.raises(ConfigError) as bad:
            _load(tmp_path, f"bad{n}", extra=f'[console]\ntrace_url = "{url}"\n')
        assert "console.trace_url" in str(bad.value)
        assert "{trace_id} where the trace id goes" in str(bad.value)
    good = "http://127.0.0.1:16686/trace/{trace_id}"
    loaded = _load(tmp_path, "good", extra=f'[console]\ntrace_url = "{good}"\n')
    assert loaded.file.console.trace_url == good
    assert _load(tmp_path, "default").file.console.enabled is True
