"""Browser tests of the web console: Debian's Chromium, driven by Playwright.

No browser is downloaded: Playwright drives the ``chromium`` on the PATH (or
CRUZFLOW_CHROMIUM). Without it, or without the playwright package, the tests
skip with one line; `.ci/run` installs Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT, ServerProcess, wait_for, write_config

CHROMIUM = os.environ.get("CRUZFLOW_CHROMIUM") or shutil.which("chromium")
WORKFLOWS = {
    "expense": "tests.browser.workflows:Expense",
    "ticks": "tests.browser.workflows:Ticks",
    "quick": "tests.browser.workflows:Quick",
    "fails": "tests.browser.workflows:Fails",
    "parent": "tests.workflows:Parent",
    "kid": "tests.workflows:Kid",
}
TRACE_URL = "http://127.0.0.1:16686/trace/{trace_id}"
SCREENSHOTS = ROOT / "docs" / "images"
"""Where `make screenshots` (CRUZFLOW_SCREENSHOTS=1) writes the README's pictures."""

try:
    from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev extra has it
    sync_playwright = None  # type: ignore[assignment]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if sync_playwright is None:
        return "the playwright package is not installed: the web console is not tested"
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install chromium): the web console is not tested"
    return None


class Api:
    """The server's Connect API over HTTP/JSON, as curl would call it."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base
        self.token = token

    def __call__(self, method: str, body: dict[str, Any], **headers: str) -> Any:
        request = urllib.request.Request(
            f"{self.base}/cruzflow.v1.WorkflowService/{method}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json", **headers},
        )
        if self.token:
            request.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{method} refused: {error.read().decode()}") from None

    def status(self, instance_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self("GetStatus", {"instanceId": instance_id})["instance"]
        return found

    def wait_status(self, instance_id: str, *statuses: str) -> dict[str, Any]:
        wanted = {f"INSTANCE_STATUS_{s.upper()}" for s in statuses}
        found: dict[str, Any] = wait_for(
            lambda: (i := self.status(instance_id))["status"] in wanted and i
        )
        return found


def serve(
    directory: Path, auth: list[str] | None = None, env: dict[str, str] | None = None
) -> ServerProcess:
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, WORKFLOWS, http="127.0.0.1:0", store="store.db")
    text = config.read_text()
    text += f'[console]\ntrace_url = "{TRACE_URL}"\n'
    # Traces go nowhere (a closed port), but instances keep their trace ids.
    text += '[telemetry]\ntraces = "otlp"\notlp_endpoint = "http://127.0.0.1:9"\n'
    text += "\n".join(auth or []) + "\n"
    config.write_text(text)
    return ServerProcess(config, env).start()


# Per module, not per session: Playwright's sync API runs an event loop in
# this thread while it is open, which the asyncio tests after these need.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert sync_playwright is not None and CHROMIUM is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = serve(tmp_path_factory.mktemp("console"))
    yield process
    process.stop()


@pytest.fixture
def base(server: ServerProcess) -> str:
    return f"http://{server.http_address}"


@pytest.fixture
def api(base: str) -> Api:
    return Api(base)


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.set_default_timeout(20_000)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.errors = errors  # type: ignore[attr-defined]
    return opened


def screenshot(page: Page, name: str, tmp_path: Path, full_page: bool = True) -> Path:
    """A picture of the page: into docs/images with CRUZFLOW_SCREENSHOTS=1
    (`make screenshots`), else into the test's own folder."""
    folder = SCREENSHOTS if os.environ.get("CRUZFLOW_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.evaluate("() => document.activeElement?.blur()")
    page.screenshot(path=str(path), full_page=full_page)
    return path
