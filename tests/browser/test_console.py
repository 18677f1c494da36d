"""The web console in a real Chromium against a real server process: the
instance list (filters, pages, counts, live refresh), an instance's
timeline, the controls, refusals, and tokens."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.browser.conftest import TRACE_URL, Api, missing, screenshot, serve
from tests.procs import wait_for

if (reason := missing()) is not None:
    pytest.skip(reason, allow_module_level=True)

from playwright.sync_api import BrowserContext, Page, Route, expect

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def create_many(api: Api, workflow: str, n: int, key: str, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    for start in range(0, n, 100):
        api(
            "CreateInstances",
            {
                "requests": [
                    {"workflow": workflow, "instanceId": i, "lookupKey": key, "paramsJson": "{}"}
                    for i in ids[start : start + 100]
                ]
            },
        )
    return ids


def rows(page: Page) -> list[str]:
    ids: list[str] = page.locator("table.instances tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.instance)"
    )
    return ids


def count_chip(page: Page, status: str) -> int:
    return int(
        page.locator(f'.counts button[data-status="{status}"]').get_attribute("data-count") or -1
    )


def test_the_list_filters_pages_counts_and_refreshes(
    page: Page, api: Api, base: str, tmp_path: Path
) -> None:
    a = create_many(api, "quick", 55, "batch-a", "qa")
    wait_for(lambda: api.status(a[-1])["status"] == "INSTANCE_STATUS_COMPLETE")
    time.sleep(0.01)
    between = datetime.now(UTC)
    time.sleep(0.01)
    b = create_many(api, "quick", 2, "batch-b", "qb") + create_many(
        api, "fails", 3, "batch-b", "fb"
    )
    for i in b:
        api.wait_status(i, "complete", "errored")

    calls: list[str] = []
    page.on(
        "request",
        lambda r: calls.append(r.url.rsplit("/", 1)[-1]) if "WorkflowService" in r.url else None,
    )
    page.goto(f"{base}/#/instances?workflow=quick")
    expect(page.locator("table.instances tbody tr")).to_have_count(50)
    # Newest first: the batch-b instances, then batch-a from its last.
    assert rows(page)[:3] == ["qb-001", "qb-000", "qa-054"]
    assert count_chip(page, "complete") == 57
    expect(page.get_by_test_id("count-total")).to_have_text("57 instances")
    # One view is one ListInstances and one CountInstances (after the start's
    # GetCaller, and ListWorkflows for the workflow menu).
    assert sorted(calls) == ["CountInstances", "GetCaller", "ListInstances", "ListWorkflows"]

    page.get_by_role("button", name="Older →").click()
    expect(page.get_by_test_id("page-number")).to_have_text("page 2")
    expect(page.locator("table.instances tbody tr")).to_have_count(7)
    assert rows(page)[-1] == "qa-000"
    expect(page.get_by_role("button", name="Older →")).to_be_disabled()
    page.get_by_role("button", name="← Newer").click()
    expect(page.locator("table.instances tbody tr")).to_have_count(50)

    # By workflow, from the menu.
    page.locator('select[name="workflow"]').select_option("fails")
    expect(page.locator("table.instances tbody tr")).to_have_count(3)
    assert count_chip(page, "errored") == 3 and count_chip(page, "complete") == 0

    # By lookup key over every workflow, then by a status chip.
    page.locator('select[name="workflow"]').select_option("")
    page.locator('input[name="lookupKey"]').fill("batch-b")
    page.locator('input[name="lookupKey"]').press("Enter")
    expect(page.locator("table.instances tbody tr")).to_have_count(5)
    assert (count_chip(page, "complete"), count_chip(page, "errored")) == (2, 3)
    page.locator('.counts button[data-status="errored"]').click()
    expect(page.locator("table.instances tbody tr")).to_have_count(3)
    assert sorted(rows(page)) == ["fb-000", "fb-001", "fb-002"]
    assert "status=errored" in page.url
    # The counts stay per status for the other filters: the chip is a filter.
    assert count_chip(page, "complete") == 2

    # By creation time: from `between`, only the second batch.
    page.goto(f"{base}/#/instances?workflow=quick&from={quote(between.isoformat())}")
    expect(page.locator("table.instances tbody tr")).to_have_count(2)
    assert rows(page) == ["qb-001", "qb-000"]
    # The time inputs set the filter too: from a minute in the future, nothing.
    page.locator('input[name="from"]').fill("2999-01-01T00:00")
    page.locator('input[name="from"]').dispatch_event("change")
    expect(page.locator(".empty")).to_have_text("No instances match these filters.")
    expect(page.get_by_test_id("count-total")).to_have_text("0 instances")

    # Open an instance by its id.
    page.get_by_role("searchbox", name="Instance id").fill("fb-001")
    page.get_by_role("searchbox", name="Instance id").press("Enter")
    expect(page.get_by_test_id("instance-id")).to_have_text("fb-001")
    expect(page.get_by_test_id("instance-error")).to_contain_text("ValueError: no such account")
    expect(page.get_by_test_id("instance-error")).to_contain_text("Raised by step charge")

    # Live: an instance created while the page is open shows up by itself.
    page.goto(f"{base}/#/instances?key=batch-live")
    expect(page.locator(".empty")).to_be_visible()
    api("CreateInstance", {"workflow": "quick", "instanceId": "live-1", "lookupKey": "batch-live"})
    expect(page.locator('tr[data-instance="live-1"]')).to_be_visible()
    expect(page.locator('tr[data-instance="live-1"] .status')).to_have_attribute(
        "data-status", "complete"
    )
    assert page.errors == []  # type: ignore[attr-defined]


def waiting_expense(api: Api, instance_id: str, key: str) -> None:
    """An expense instance waiting for its approval, with the lookup key ``key``."""
    api(
        "CreateInstance",
        {
            "workflow": "expense",
            "instanceId": instance_id,
            "lookupKey": key,
            "paramsJson": '{"sleep_ms": 10}',
        },
    )
    api.wait_status(instance_id, "waiting")


def approve(api: Api, instance_id: str) -> None:
    api(
        "SendEvent", {"instanceId": instance_id, "type": "approval", "payloadJson": '{"by": "ana"}'}
    )


def until(page: Page, condition: Any, timeout: float = 10.0) -> None:
    """Wait for ``condition()`` while Playwright runs: its route handlers and
    listeners only run while one of its calls does (time.sleep stops them)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        page.wait_for_timeout(20)


def rpc_calls(page: Page) -> list[str]:
    """The API methods the page calls, in order, as they are sent."""
    calls: list[str] = []
    page.on(
        "request",
        lambda r: calls.append(r.url.rsplit("/", 1)[-1]) if "WorkflowService" in r.url else None,
    )
    return calls


def test_the_list_follows_its_unfinished_instances_as_their_events_happen(
    page: Page, api: Api, base: str
) -> None:
    key = "batch-follow"
    waiting_expense(api, "follow-1", key)
    calls = rpc_calls(page)
    page.goto(f"{base}/#/instances?key={key}")
    live = page.locator("label.live")
    row1 = page.locator('tr[data-instance="follow-1"]')
    expect(row1.locator(".status")).to_have_attribute("data-status", "waiting")
    # The unfinished instance on the page is followed by one WatchInstances.
    expect(live).to_have_attribute("data-following", "1")
    until(page, lambda: "WatchInstances" in calls)

    # A refresh brings a new unfinished one: the stream is opened again for both.
    waiting_expense(api, "follow-2", key)
    row2 = page.locator('tr[data-instance="follow-2"]')
    expect(row2.locator(".status")).to_have_attribute("data-status", "waiting")
    expect(live).to_have_attribute("data-following", "2")
    until(page, lambda: calls.count("WatchInstances") == 2)

    # From now on every refresh answers with this list, where both still
    # wait: a row that changes can only have changed by the stream's events.
    stale = api("ListInstances", {"lookupKey": key, "pageSize": 50})
    assert {i["status"] for i in stale["instances"]} == {"INSTANCE_STATUS_WAITING"}
    served: list[str] = []

    def frozen(route: Route) -> None:
        served.append(route.request.url)
        route.fulfill(status=200, content_type="application/json", body=json.dumps(stale))

    page.route("**/cruzflow.v1.WorkflowService/ListInstances", frozen)
    until(page, lambda: len(served) >= 1)
    expect(row1.locator(".status")).to_have_attribute("data-status", "waiting")
    assert "so far" in (row1.locator("td").nth(5).text_content() or "")

    approve(api, "follow-1")
    expect(row1.locator(".status")).to_have_attribute("data-status", "complete", timeout=5_000)
    # Its end came with the event too: the time it ran for stops growing.
    expect(row1.locator("td").nth(5)).not_to_contain_text("so far")
    expect(live).to_have_attribute("data-following", "1")
    # Later refreshes, older than the events, do not move the row back.
    seen = len(served)
    until(page, lambda: len(served) >= seen + 2)
    expect(row1.locator(".status")).to_have_attribute("data-status", "complete")
    expect(row2.locator(".status")).to_have_attribute("data-status", "waiting")

    approve(api, "follow-2")
    expect(row2.locator(".status")).to_have_attribute("data-status", "complete", timeout=5_000)
    # Both ended: the stream ended by itself, and no refresh opens another
    # (the stale answers still list both as waiting).
    expect(live).to_have_attribute("data-following", "0")
    seen = len(served)
    until(page, lambda: len(served) >= seen + 2)
    assert calls.count("WatchInstances") == 2
    assert api.status("follow-1")["status"] == "INSTANCE_STATUS_COMPLETE"
    page.unroute("**/cruzflow.v1.WorkflowService/ListInstances")

    # With "live" off, nothing is followed (nor refreshed) ...
    waiting_expense(api, "follow-3", key)
    row3 = page.locator('tr[data-instance="follow-3"]')
    expect(row3.locator(".status")).to_have_attribute("data-status", "waiting")
    expect(live).to_have_attribute("data-following", "1")
    aborted: list[str] = []
    page.on(
        "requestfailed",
        lambda r: aborted.append(r.url) if r.url.endswith("/WatchInstances") else None,
    )
    live.locator("input").uncheck()
    expect(live).to_have_attribute("data-following", "0")
    until(page, lambda: len(aborted) == 1)
    watches = calls.count("WatchInstances")
    approve(api, "follow-3")
    api.wait_status("follow-3", "complete")
    page.wait_for_timeout(500)
    expect(row3.locator(".status")).to_have_attribute("data-status", "waiting")
    assert calls.count("WatchInstances") == watches
    # ... and back on, the stream brings what was missed at once.
    lists = calls.count("ListInstances")
    live.locator("input").check()
    expect(row3.locator(".status")).to_have_attribute("data-status", "complete")
    assert calls.count("ListInstances") == lists
    assert calls.count("WatchInstances") == watches + 1
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_failing_stream_leaves_the_list_to_its_refreshes(page: Page, api: Api, base: str) -> None:
    key = "batch-cut"
    waiting_expense(api, "cut-1", key)
    refused: list[str] = []

    def refuse(route: Route) -> None:
        refused.append(route.request.url)
        route.fulfill(status=403, content_type="text/plain", body="no streams here")

    page.route("**/cruzflow.v1.WorkflowService/WatchInstances", refuse)
    page.goto(f"{base}/#/instances?key={key}")
    row = page.locator('tr[data-instance="cut-1"]')
    expect(row.locator(".status")).to_have_attribute("data-status", "waiting")
    # Every refresh opens it again, and the page shows no error for it.
    until(page, lambda: len(refused) >= 2)
    expect(page.locator(".alert")).to_have_count(0)
    # The refreshes still bring the changes.
    approve(api, "cut-1")
    expect(row.locator(".status")).to_have_attribute("data-status", "complete")
    expect(page.locator("label.live")).to_have_attribute("data-following", "0")

    # Once streams are allowed again, the next refresh follows the new one.
    page.unroute("**/cruzflow.v1.WorkflowService/WatchInstances")
    waiting_expense(api, "cut-2", key)
    expect(page.locator("label.live")).to_have_attribute("data-following", "1")
    approve(api, "cut-2")
    expect(page.locator('tr[data-instance="cut-2"] .status')).to_have_attribute(
        "data-status", "complete"
    )
    assert page.errors == []  # type: ignore[attr-defined]


def bars(page: Page, step: str) -> list[dict[str, Any]]:
    """The bars of a step's row, left to right: type, outcome, x, width, hover text."""
    found: list[dict[str, Any]] = page.locator(f'.timeline g.row[data-step="{step}"]').evaluate(
        """row => [...row.querySelectorAll('[data-type]')].map(b => {
            const r = b.tagName === 'rect' ? b : b.querySelector('rect');
            return {type: b.dataset.type, outcome: b.dataset.outcome, attempt: +b.dataset.attempt,
                    x: +r.getAttribute('x'), width: +r.getAttribute('width'),
                    title: b.querySelector('title').textContent};
        })"""
    )
    return found


def test_the_timeline_shows_a_retry_a_sleep_and_an_event_wait(
    page: Page, api: Api, base: str, tmp_path: Path
) -> None:
    api(
        "CreateInstance",
        {
            "workflow": "expense",
            "instanceId": "expense-1",
            "paramsJson": json.dumps({"amount": 42, "sleep_ms": 1500}),
        },
        traceparent=f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    )
    page.goto(f"{base}/#/instances/expense-1")
    # It updates live: the wait for the event shows up while the page is open.
    wait = page.locator('.timeline g.row[data-step="approval"] [data-type="wait"]')
    expect(wait).to_have_attribute("data-outcome", "running")
    expect(page.locator(".page-head .status")).to_have_attribute("data-status", "waiting")

    order = page.locator(".timeline g.row").evaluate_all("rs => rs.map(r => r.dataset.step)")
    assert order == ["fetch-receipt", "cool-off", "approval"]
    fetch = bars(page, "fetch-receipt")
    assert [(b["type"], b["outcome"], b["attempt"]) for b in fetch] == [
        ("attempt", "retrying", 1),
        ("backoff", "planned", 1),
        ("attempt", "succeeded", 2),
    ]
    assert "ConnectionError: receipt service unavailable" in fetch[0]["title"]
    assert fetch[0]["x"] < fetch[2]["x"]
    (sleep,) = bars(page, "cool-off")
    assert (sleep["type"], sleep["outcome"]) == ("sleep", "succeeded")
    assert sleep["x"] >= fetch[2]["x"]
    assert "wait for event 'approval'" in bars(page, "approval")[0]["title"]

    # To scale: the sleep's bar is as wide as its time is of the chart's span.
    chart = page.locator(".timeline svg.chart").evaluate(
        "s => ({start: +s.dataset.start, end: +s.dataset.end, width: +s.getAttribute('width'),"
        " bar: +s.querySelector('g.row[data-step=\"cool-off\"] rect[x]:not(.row-bg)').getAttribute('width')})"
    )
    steps = {s["name"]: s for s in api.status("expense-1")["steps"]}
    slept = _ms(steps["cool-off"]["endTime"]) - _ms(steps["cool-off"]["startTime"])
    assert slept >= 1500
    expected = slept / (chart["end"] - chart["start"]) * (chart["width"] - 190 - 14)
    assert abs(chart["bar"] - expected) <= 0.02 * expected + 3, (chart, slept)

    # The trace id, linked with [console] trace_url.
    link = page.get_by_test_id("trace").locator("a")
    expect(link).to_have_text(TRACE_ID)
    assert link.get_attribute("href") == TRACE_URL.replace("{trace_id}", TRACE_ID)
    screenshot(page, "console-timeline.png", tmp_path)

    # Send the event from the page: the instance completes.
    page.locator('[data-control="event"]').click()
    dialog = page.get_by_role("dialog")
    expect(dialog.locator('input[name="type"]')).to_have_value("approval")
    dialog.locator('textarea[name="payload"]').fill('{"by": "ana"}')
    dialog.get_by_role("button", name="Send").click()
    expect(page.locator(".page-head .status")).to_have_attribute("data-status", "complete")
    assert api.status("expense-1")["outputJson"] == '{"paid":42,"by":"ana"}'
    expect(page.get_by_test_id("output")).to_contain_text('"by": "ana"')
    expect(wait).to_have_attribute("data-outcome", "succeeded")
    expect(
        page.locator('.timeline g.row[data-step="pay"] [data-type="attempt"]')
    ).to_have_attribute("data-outcome", "succeeded")
    expect(page.locator("[data-control]")).to_have_count(1)  # only Restart is left
    # The event log, as WatchInstance streams it: every event once, in order.
    page.locator("details.events summary").click()
    last = int(api.status("expense-1")["lastSequence"])
    sequences = page.locator(".event-log tbody tr").evaluate_all(
        "rows => rows.map(r => +r.dataset.sequence)"
    )
    assert sequences == list(range(1, last + 1))
    expect(page.locator(".event-log tbody tr").last).to_contain_text("status complete")
    expect(page.locator('.event-log tr[data-kind="attemptFailed"]')).to_contain_text(
        "fetch-receipt attempt 1 failed: ConnectionError"
    )
    assert page.errors == []  # type: ignore[attr-defined]


def _ms(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000


def confirm(page: Page, control: str) -> None:
    page.locator(f'[data-control="{control}"]').click()
    dialog = page.get_by_role("dialog")
    dialog.locator('button[type="submit"]').click()
    expect(dialog).to_have_count(0)


def test_pause_resume_restart_and_terminate_from_the_page(page: Page, api: Api, base: str) -> None:
    api(
        "CreateInstance",
        {"workflow": "ticks", "instanceId": "ticks-1", "paramsJson": '{"count": 400}'},
    )
    page.goto(f"{base}/#/instances/ticks-1")
    status = page.locator(".page-head .status")
    expect(status).to_have_attribute("data-status", "running")

    confirm(page, "pause")
    assert api.wait_status("ticks-1", "paused")["status"] == "INSTANCE_STATUS_PAUSED"
    expect(status).to_have_attribute("data-status", "paused")
    expect(page.locator('.timeline [data-mark="pause"]')).to_have_count(1)
    ticks = len(api.status("ticks-1")["steps"])
    time.sleep(0.5)
    assert len(api.status("ticks-1")["steps"]) == ticks  # paused for real

    confirm(page, "resume")
    api.wait_status("ticks-1", "running")
    expect(status).to_have_attribute("data-status", "running")
    wait_for(lambda: len(api.status("ticks-1")["steps"]) > ticks)

    confirm(page, "restart")
    expect(page.locator('.timeline [data-mark="restart"]')).to_have_count(1)
    expect(page.locator('.timeline g.row[data-run="2"]').first).to_be_visible()

    confirm(page, "terminate")
    assert api.wait_status("ticks-1", "terminated")["status"] == "INSTANCE_STATUS_TERMINATED"
    expect(status).to_have_attribute("data-status", "terminated")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_refused_control_shows_the_servers_message(page: Page, api: Api, base: str) -> None:
    api(
        "CreateInstance",
        {"workflow": "ticks", "instanceId": "ticks-2", "paramsJson": '{"count": 400}'},
    )
    page.goto(f"{base}/#/instances/ticks-2")
    expect(page.locator(".page-head .status")).to_have_attribute("data-status", "running")
    page.locator('[data-control="event"]').click()
    dialog = page.get_by_role("dialog")
    dialog.locator('input[name="type"]').fill("x" * 101)
    dialog.get_by_role("button", name="Send").click()
    alert = dialog.get_by_role("alert")
    expect(alert).to_contain_text("INVALID_ARGUMENT")
    expect(alert).to_contain_text("type")
    # A payload that is not JSON is caught before any call.
    dialog.locator('input[name="type"]').fill("go")
    dialog.locator('textarea[name="payload"]').fill("{nope")
    dialog.get_by_role("button", name="Send").click()
    expect(alert).to_contain_text("The payload is not JSON")
    dialog.get_by_role("button", name="Cancel").click()
    assert api.status("ticks-2")["status"] == "INSTANCE_STATUS_RUNNING"

    # An instance that does not exist: the server's NOT_FOUND, on the page.
    page.goto(f"{base}/#/instances/no-such-instance")
    expect(page.get_by_role("alert")).to_contain_text("NOT_FOUND")
    api("TerminateInstance", {"instanceId": "ticks-2"})


def test_a_parent_and_its_child_link_to_each_other(page: Page, api: Api, base: str) -> None:
    api(
        "CreateInstance",
        {"workflow": "parent", "instanceId": "parent-1", "paramsJson": '{"kid": {"wait": true}}'},
    )
    api.wait_status("parent-1", "waiting")
    child_id = api.status("parent-1")["steps"][0]["childInstanceId"]
    page.goto(f"{base}/#/instances/parent-1")
    link = page.get_by_test_id("child")
    expect(link).to_have_text(f"child {child_id}")
    link.click()
    expect(page.locator(".page-head")).to_contain_text(child_id)
    expect(page.get_by_test_id("parent")).to_have_text("parent-1")
    page.get_by_test_id("parent").locator("a").click()
    expect(page.get_by_test_id("child")).to_be_visible()
    api("TerminateInstance", {"instanceId": "parent-1"})
    assert api.status(child_id)["status"] == "INSTANCE_STATUS_TERMINATED"


def test_a_long_instance_draws_its_newest_steps(page: Page, api: Api, base: str) -> None:
    api(
        "CreateInstance",
        {"workflow": "ticks", "instanceId": "long-1", "paramsJson": '{"count": 320, "ms": 0}'},
    )
    api.wait_status("long-1", "complete")
    page.goto(f"{base}/#/instances/long-1")
    expect(page.get_by_test_id("rows-hidden")).to_have_text(
        "The first 20 of 320 steps are left out; the table below lists them all."
    )
    expect(page.locator(".timeline g.row")).to_have_count(300)
    assert page.locator(".timeline g.row").first.get_attribute("data-index") == "20"
    expect(page.locator("table.steps tbody tr")).to_have_count(320)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tokens = {"ADMIN_TOKEN": "admin-secret-0123456789", "VIEWER_TOKEN": "viewer-secret-0123456789"}
    auth = [
        "[[auth.tokens]]",
        'name = "admin"',
        'env = "ADMIN_TOKEN"',
        'access = "write"',
        "[[auth.tokens]]",
        'name = "viewer"',
        'env = "VIEWER_TOKEN"',
        'access = "read"',
    ]
    process = serve(tmp_path_factory.mktemp("secured"), auth, tokens)
    yield process, tokens
    process.stop()


def sign_in(page: Page, token: str) -> None:
    form = page.locator("form.token-form")
    form.locator('input[name="token"]').fill(token)
    form.get_by_role("button", name="Sign in").click()


def test_tokens_a_read_only_token_sees_no_controls(context: BrowserContext, secured: Any) -> None:
    process, tokens = secured
    admin, viewer = tokens["ADMIN_TOKEN"], tokens["VIEWER_TOKEN"]
    base = f"http://{process.http_address}"
    api = Api(base, admin)
    api(
        "CreateInstance",
        {"workflow": "ticks", "instanceId": "guarded", "paramsJson": '{"count": 400}'},
    )
    page = context.new_page()
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))

    page.goto(f"{base}/#/instances/guarded")
    expect(page.locator("form.token-form")).to_be_visible()
    sign_in(page, "not-a-token")
    expect(page.locator("form.token-form").get_by_role("alert")).to_contain_text("UNAUTHENTICATED")

    sign_in(page, viewer)
    expect(page.get_by_test_id("caller")).to_contain_text("viewer")
    expect(page.get_by_test_id("caller")).to_contain_text("read-only")
    expect(page.locator(".page-head .status")).to_have_attribute("data-status", "running")
    expect(page.get_by_role("toolbar", name="Controls")).to_have_count(0)
    expect(page.locator("[data-control]")).to_have_count(0)
    # The token lives in this tab's session only: not in a URL, not in
    # localStorage, not in a cookie.
    stored = page.evaluate("() => [sessionStorage.getItem('cruzflow.token'), localStorage.length]")
    assert stored == [viewer, 0]
    assert context.cookies() == []
    assert not [u for u in urls if viewer in u or admin in u]

    # Another tab of the same browser asks again.
    other = context.new_page()
    other.goto(f"{base}/#/instances")
    expect(other.locator("form.token-form")).to_be_visible()
    other.close()

    page.get_by_role("button", name="Sign out").click()
    sign_in(page, admin)
    expect(page.get_by_test_id("caller")).to_contain_text("admin")
    expect(page.locator('[data-control="pause"]')).to_be_visible()
    confirm(page, "terminate")
    assert api.wait_status("guarded", "terminated")["status"] == "INSTANCE_STATUS_TERMINATED"
    assert not [u for u in urls if viewer in u or admin in u]


def test_the_workflows_page_counts_and_failure_rate(
    page: Page, api: Api, base: str, tmp_path: Path
) -> None:
    ok = create_many(api, "quick", 3, "wf", "wq")
    bad = create_many(api, "fails", 1, "wf", "wfb")
    for i in ok + bad:
        api.wait_status(i, "complete", "errored")
    counts = api("CountInstances", {})
    expected = {(c["workflow"], c["status"]): int(c["count"]) for c in counts.get("counts", [])}
    page.goto(f"{base}/#/workflows")
    row = page.locator('tr[data-workflow="fails"]')
    expect(row.locator('td[data-status="errored"]')).to_have_text(
        str(expected[("fails", "INSTANCE_STATUS_ERRORED")])
    )
    expect(row.get_by_test_id("failure-rate")).to_have_text("100.0%")
    quick = page.locator('tr[data-workflow="quick"]')
    expect(quick.locator('td[data-status="complete"]')).to_have_text(
        str(expected[("quick", "INSTANCE_STATUS_COMPLETE")])
    )
    expect(quick.get_by_test_id("failure-rate")).to_have_text("0.0%")
    quick.get_by_role("link", name="quick").click()
    expect(page).to_have_url(f"{base}/#/instances?workflow=quick")

    # The README's picture of the list: instances in every state.
    api(
        "CreateInstance",
        {"workflow": "ticks", "instanceId": "ticks-3", "paramsJson": '{"count": 400}'},
    )
    api(
        "CreateInstance",
        {"workflow": "ticks", "instanceId": "ticks-4", "paramsJson": '{"count": 400}'},
    )
    api(
        "CreateInstance", {"workflow": "expense", "instanceId": "expense-2", "lookupKey": "user:42"}
    )
    api("PauseInstance", {"instanceId": "ticks-4"})
    api.wait_status("expense-2", "waiting")
    api.wait_status("ticks-4", "paused")
    page.goto(f"{base}/#/instances")
    expect(page.locator('tr[data-instance="expense-2"] .status')).to_have_attribute(
        "data-status", "waiting"
    )
    screenshot(page, "console-instances.png", tmp_path, full_page=False)
    for done in ("ticks-3", "ticks-4", "expense-2"):
        api("TerminateInstance", {"instanceId": done})


def _blob(size: int) -> str:
    """Compact JSON params of exactly ``size`` bytes (what the server stores)."""
    text = json.dumps({"blob": ""}, separators=(",", ":"))
    return json.dumps({"blob": "x" * (size - len(text))}, separators=(",", ":"))


def test_payload_sizes_are_shown_against_the_limit_and_warned_of_near_it(
    page: Page, api: Api, base: str
) -> None:
    limit = 1024 * 1024  # the server's default limits.max_payload_bytes
    # "quick" returns its params: params, step result and output are one size.
    for instance_id, params in [
        ("sizes-small", '{"n":1}'),
        ("sizes-79", _blob(int(0.79 * limit))),
        ("sizes-81", _blob(int(0.81 * limit))),
    ]:
        api(
            "CreateInstance", {"workflow": "quick", "instanceId": instance_id, "paramsJson": params}
        )
        done = api.wait_status(instance_id, "complete")
        assert done["payloads"]["paramsBytes"] == str(len(params))
        assert done["payloads"]["limitBytes"] == str(limit)

    page.goto(f"{base}/#/instances/sizes-small")
    for test_id in ("params-size", "output-size", "step-size"):
        expect(page.get_by_test_id(test_id)).to_have_text("7 B of 1 MiB")
        expect(page.get_by_test_id(test_id)).to_have_attribute("data-near", "false")
    expect(page.get_by_test_id("payload-warning")).to_have_count(0)

    # Just under 80 % of the limit: sizes, no warning.
    page.goto(f"{base}/#/instances/sizes-79")
    expect(page.get_by_test_id("params-size")).to_have_text("809 KiB of 1 MiB")
    expect(page.get_by_test_id("step-size")).to_have_attribute("data-near", "false")
    expect(page.get_by_test_id("payload-warning")).to_have_count(0)

    # Past 80 %: each size is marked, and the page says which payloads and why.
    page.goto(f"{base}/#/instances/sizes-81")
    for test_id in ("params-size", "output-size", "step-size"):
        expect(page.get_by_test_id(test_id)).to_have_text("⚠ 829.4 KiB of 1 MiB (81%)")
        expect(page.get_by_test_id(test_id)).to_have_attribute("data-near", "true")
    warning = page.get_by_test_id("payload-warning")
    expect(warning).to_contain_text("Near the payload limit of 1 MiB (limits.max_payload_bytes)")
    expect(warning).to_contain_text(
        "params (829.4 KiB), the result of step only (829.4 KiB), the output (829.4 KiB)"
    )
    assert page.errors == []  # type: ignore[attr-defined]
