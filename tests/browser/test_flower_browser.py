"""A real browser looks at Flower: the workers and every per-model queue, saved as screenshots.

Run: ``pytest tests/browser`` (needs ``apt-get install chromium`` and ``pip install playwright``;
Playwright drives the system Chromium, no browser is downloaded). Screenshots land in
``artifacts/`` (not in git).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitoring.processes import Background, start_flower
from producers import Client
from tasks.keys import MODELS_KEY, queue_name, worker_key
from tasks.queues import sublists
from tests.wire_support import announce_idle_worker

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
AUTH = {"username": "ops", "password": "s3cret"}
CANDIDATES = (
    "/usr/lib/chromium/chromium",
    shutil.which("chromium"),
    shutil.which("chromium-browser"),
)
CHROMIUM = next((p for p in CANDIDATES if p and Path(p).exists()), None)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed "
        "(apt-get install chromium); the browser check needs a real browser",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="playwright is not installed (pip install playwright; it uses the system chromium)",
)


@pytest.fixture(scope="module")
def flower(
    redis_url: str, worker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background]:
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    child = start_flower(
        redis_url, basic_auth=f"{AUTH['username']}:{AUTH['password']}", log_path=log
    )
    yield child
    child.stop()


@pytest.fixture
def waiting_model(client: Client) -> Iterator[str]:
    """A model with a task waiting and no worker: Flower must still list its queue."""
    model = "no-worker-yet:3b"
    gone = announce_idle_worker(client.redis, model)  # released to it, then it went away
    client.generate(model, "waiting for a worker")
    client.redis.delete(worker_key(gone.node))
    yield model
    client.redis.delete(*sublists(queue_name(model)), f"_kombu.binding.{queue_name(model)}")
    client.redis.srem(MODELS_KEY, model)


def test_flower_shows_workers_and_every_model_queue(
    flower: Background, worker, waiting_model: str, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            http_credentials=AUTH,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = context.new_page()
            page.goto(flower.url + "/workers", wait_until="networkidle")
            page.get_by_text(worker.node_name).first.wait_for(timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "flower-workers.png"), full_page=True)

            page.goto(flower.url + "/broker", wait_until="networkidle")
            for model in ("llama3.2:latest", "llava:7b", waiting_model):
                page.get_by_text(queue_name(model), exact=True).first.wait_for(timeout=20_000)
            page.screenshot(path=str(ARTIFACTS / "flower-broker.png"), full_page=True)
            text = page.inner_text("body")
        finally:
            context.close()
    assert queue_name(waiting_model) in text
    assert (ARTIFACTS / "flower-workers.png").stat().st_size > 10_000
    assert (ARTIFACTS / "flower-broker.png").stat().st_size > 10_000
