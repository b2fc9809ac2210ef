"""The playground page in headless Chromium: type a prompt, watch tokens stream in over SSE.

Uses Debian's chromium (never a downloaded browser). The screenshot goes to artifacts/, which
git ignores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sched_support import MODEL, admit_task, sdk_fixture  # noqa: F401
from test_gateway_support import GatewayServer, gateway_url_fixture  # noqa: F401

from producers import Client
from tasks.keys import queue_name
from tasks.scheduler import Scheduler

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium binary (apt-get install -y chromium)", allow_module_level=True)


@pytest.mark.slow
def test_prompt_streams_tokens_into_the_page(gateway_url: str) -> None:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(gateway_url + "/", wait_until="domcontentloaded")
            page.wait_for_selector(
                "#model option[value='llama3.2:latest']", state="attached", timeout=15_000
            )
            page.select_option("#model", "llama3.2:latest")
            page.wait_for_selector("#queues tr[data-model='llama3.2:latest']", timeout=15_000)
            page.fill("#prompt", "Why is the sky blue?")
            page.click("#send")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('done')",
                timeout=30_000,
            )
            text = page.text_content("#output") or ""
            assert len(text.split()) > 3
            assert "corral.llama3.2:latest" in (page.text_content("#task") or "")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_api_docs_render_with_nothing_reachable_but_the_gateway(gateway_url: str) -> None:
    """/docs offline: every request leaving the gateway is refused, and Swagger UI still draws
    the API (it used to load its script from a CDN, leaving a blank page)."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            outside: list[str] = []

            def only_the_gateway(route: sync_api.Route) -> None:
                if route.request.url.startswith(gateway_url):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_the_gateway)
            page.goto(gateway_url + "/docs", wait_until="domcontentloaded")
            page.wait_for_selector(".swagger-ui .opblock", timeout=15_000)
            assert "ollama-corral gateway" in (page.text_content(".swagger-ui .info .title") or "")
            assert page.locator(".swagger-ui .opblock").count() >= 5
            assert outside == []
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "gateway-docs.png"), full_page=False)
        finally:
            browser.close()


@pytest.mark.slow
def test_the_page_shows_a_waiting_tasks_place_in_line(sdk: Client) -> None:
    """The page follows a task that waits in the scheduler: its status line shows the position
    and ETA from the queued events, and moves when a task ahead starts.

    Submission does not go through the scheduler yet, so the page's POST is answered with a
    task admitted by the test; everything after (SSE, queued events, cancel) is the gateway's.
    """
    sched = Scheduler(sdk.redis, sdk.settings)
    sched.finished("earlier", MODEL, run_s=80.0)
    for _ in range(2):
        admit_task(sdk)
    job = admit_task(sdk)
    accepted = {
        "id": job.id,
        "kind": "generate",
        "model": MODEL,
        "queue": queue_name(MODEL),
        "position": 2,
        "status_url": f"/v1/tasks/{job.id}",
        "events_url": f"/v1/tasks/{job.id}/events",
    }
    with GatewayServer(sdk.settings) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.route(
                "**/v1/tasks/generate", lambda route: route.fulfill(status=202, json=accepted)
            )
            page.goto(server.url + "/", wait_until="domcontentloaded")
            page.wait_for_selector(
                f"#model option[value='{MODEL}']", state="attached", timeout=15_000
            )
            row = page.wait_for_selector(f"#queues tr[data-model='{MODEL}']", timeout=15_000)
            assert row is not None
            assert row.inner_text().split()[1:3] == ["3", "3"]  # waiting, of which pending
            page.fill("#prompt", "Why is the sky blue?")
            page.click("#send")
            status = "document.getElementById('status').textContent"
            page.wait_for_function(
                f"{status} === 'queued: position 2, starts in ~40 s'", timeout=15_000
            )
            started = sched.release(MODEL, 1)
            assert sched.started(started[0])
            page.wait_for_function(
                f"{status} === 'queued: position 1, starts in ~40 s'", timeout=15_000
            )
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground-queued.png"), full_page=True)
            page.click("#cancel")
            page.wait_for_function(f"{status} === 'cancelled'", timeout=15_000)
        finally:
            browser.close()
