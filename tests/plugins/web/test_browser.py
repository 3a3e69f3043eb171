"""The overview in a real browser: Debian's headless Chromium driven by Playwright.

It expands a run and a task, filters, checks the status colours as the browser computes
them, starts a run with "Run now" and watches it go from orange to green without a reload.
The final page is saved as ``test-artifacts/web-overview.png`` for people to look at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_module, require_tool
from tests.plugins.web.conftest import Site

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GREEN = "rgb(26, 127, 55)"
RED = "rgb(207, 34, 46)"
ORANGE = "rgb(217, 115, 13)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium")
    require_module("playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any, site: Site) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(20_000)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(site.url + "/")
    yield opened
    context.close()
    assert not errors, f"script errors on the page: {errors}"


def background(locator: Any) -> str:
    return locator.evaluate("element => getComputedStyle(element).backgroundColor")


def run_row(page: Any, run_id: str) -> Any:
    return page.locator(f'tr.run[data-run-id="{run_id}"]')


def test_overview_colours_expand_and_filter(page: Any, site: Site):
    jobs = page.locator("#jobs-body")
    assert "nightly" in jobs.inner_text() and "weekly full" in jobs.inner_text()
    nightly = page.locator('tr.job[data-job="nightly"]').inner_text()
    assert "0 3 * * *" in nightly
    assert re.search(r"next \w{3} \d{4}-\d\d-\d\d 03:00 CES?T \(in ", nightly), nightly
    pills = {
        outcome: run_row(page, run_id).locator(".pill") for outcome, run_id in site.runs.items()
    }
    assert pills["success"].inner_text() == "success"
    assert background(pills["success"]) == GREEN
    assert background(pills["failure"]) == RED
    assert background(pills["interrupted"]) == ORANGE
    assert "SR_BACKEND_FAILURE_44" in run_row(page, site.runs["failure"]).inner_text()

    # expand the successful run: its VMs, then one VM's tasks with sizes and speeds
    run_row(page, site.runs["success"]).locator("button.expand").click()
    detail = page.locator(f'tr.run-detail[data-run-id="{site.runs["success"]}"]')
    tree = detail.locator(".run-tree")
    tree.wait_for()
    assert "offsite" in tree.locator(".run-head ~ .message.warning").first.inner_text()
    vm_entries = tree.locator("ul.tree.root > li.task")
    assert vm_entries.count() == len(site.vms)
    names = {vm_entries.nth(i).locator(".task-target").first.inner_text() for i in range(3)}
    assert names == set(site.vms.values())
    first = vm_entries.first
    export = first.locator('li.task:has(.task-name:text-is("export"))')
    assert not export.is_visible(), "a task's children show only once it is expanded"
    first.locator("summary").first.click()
    export.wait_for()
    assert "MiB" in export.locator(".figures").inner_text()
    assert "/s" in export.locator(".figures").inner_text()
    export.locator("summary").click()
    assert " disk 0" in export.locator("dl.kv").inner_text()
    assert background(first.locator(".dot").first) == GREEN

    # filters: status, then free text, then VM
    page.select_option('select[name="status"]', "failure")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#runs-body tr.run')]"
        ".every(row => row.dataset.status === 'failure')"
    )
    assert run_row(page, site.runs["failure"]).is_visible()
    assert run_row(page, site.runs["success"]).count() == 0
    page.select_option('select[name="status"]', "")
    page.fill('input[name="q"]', "SR_BACKEND_FAILURE_44")
    page.wait_for_function("() => document.querySelectorAll('#runs-body tr.run').length === 1")
    assert run_row(page, site.runs["failure"]).is_visible()
    assert "q=SR_BACKEND_FAILURE_44" in page.url
    page.fill('input[name="q"]', "")
    page.fill('input[name="vm"]', list(site.vms.values())[-1])
    run_row(page, site.runs["success"]).wait_for()
    page.wait_for_function(
        f"() => !document.querySelector('tr.run[data-run-id=\"{site.runs['failure']}\"]')"
    )


def test_run_now_appears_and_goes_live_to_green(page: Any, site: Site):
    # a slow snapshot keeps the run going long enough to be seen unfinished
    fault = site.sim.arm("VM.snapshot", "delay", seconds=2, times=None)
    try:
        page.locator('tr.job[data-job="nightly"] button.run-now').click()
        pending = page.locator('#runs-body tr.run[data-status="pending"]')
        pending.wait_for()
        run_id = pending.get_attribute("data-run-id")
        assert run_id not in site.runs.values()
        assert background(pending.locator(".pill")) == ORANGE
        assert "started" in page.locator("#toast").inner_text()
        button = page.locator('tr.job[data-job="nightly"] button.run-now')
        page.wait_for_function(
            "() => document.querySelector('tr.job[data-job=\"nightly\"] button.run-now').disabled"
        )
        # the new run is expanded: its live figures show per VM while it runs
        detail = page.locator(f'tr.run-detail[data-run-id="{run_id}"]')
        detail.locator("table.progress").wait_for()
        assert any(name in detail.inner_text() for name in site.vms.values())
        # server-sent events refresh the row when the run ends: no reload
        done = run_row(page, run_id).locator(".pill")
        page.wait_for_function(
            f"() => document.querySelector('tr.run[data-run-id=\"{run_id}\"] .pill')"
            ".textContent === 'success'",
            timeout=60_000,
        )
        assert background(done) == GREEN
        page.wait_for_function(
            "() => !document.querySelector('tr.job[data-job=\"nightly\"] button.run-now').disabled"
        )
        assert button.inner_text() == "Run now"
        assert detail.locator(".run-tree").get_attribute("data-status") == "success"
    finally:
        site.sim.faults.clear()
        fault.release()
    detail.locator("ul.tree.root > li.task summary").first.click()
    detail.locator("ul.tree.root > li.task li.task").first.wait_for()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "web-overview.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000


def test_backups_per_vm_page(page: Any, site: Site):
    page.click("text=Backups per VM")
    page.wait_for_url("**/backups")
    for uuid, name in site.vms.items():
        block = page.locator(f'.vm[data-vm="{uuid}"]')
        assert name in block.locator("h3").inner_text()
        assert block.locator('.remote-col[data-remote="nas"] tbody tr').count() >= 1
    assert "offsite" in page.locator(".error").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-backups.png"), full_page=True)
