"""The webhook outbox survives workers killed after a task's terminal event, or mid-delivery."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from webhook_receiver import SECRET, Receiver, serve

from producers.cli.local_stack import Child, start_worker
from producers.client import Client
from tasks.keys import WEBHOOK_DUE_KEY
from tasks.settings import Settings, load_settings
from tests.conftest import FAST_RETRIES

MODEL = "qwen2.5-coder:7b"  # served by the workers of this module only
DELIVERING = {
    **FAST_RETRIES,
    "CORRAL_WEBHOOK_SECRET": SECRET,
    "CORRAL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "CORRAL_WEBHOOK_TIMEOUT_S": "1",
}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found, server = serve()
    yield found
    server.shutdown()
    server.server_close()


@pytest.fixture
def hook_settings(redis_url: str) -> Settings:
    return load_settings(
        redis_url=redis_url, webhook_secret=SECRET, webhook_allowed_hosts="127.0.0.1"
    )


def worker(redis_url: str, sim_url: str, log: Path, env: dict[str, str], name: str) -> Child:
    return start_worker(
        [MODEL], redis_url=redis_url, ollama_host=sim_url, log_path=log, env=env, name=name
    )


def test_a_worker_killed_after_the_terminal_event_still_delivers(
    redis_url: str, sim_url: str, hook_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    # The first worker has no secret: it runs the task but can deliver nothing before it dies.
    first = worker(redis_url, sim_url, tmp_path / "a.log", FAST_RETRIES, "runs@test")
    try:
        with Client(settings=hook_settings) as client:
            job = client.generate(MODEL, "hi", callback_url=f"{receiver.url}/after-kill")
            job.result(timeout=30)  # the terminal event is written
            assert client.redis.zscore(WEBHOOK_DUE_KEY, f"msg_{job.id}") is not None
    finally:
        first.kill()
    assert not receiver.on("/after-kill")
    second = worker(redis_url, sim_url, tmp_path / "b.log", DELIVERING, "delivers@test")
    try:
        [got] = receiver.wait("/after-kill")
        assert got.verified()["data"]["id"] == job.id
    finally:
        second.stop()


def test_a_worker_killed_mid_delivery_leaves_it_to_another(
    redis_url: str, sim_url: str, hook_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    gate = threading.Event()
    receiver.hold["/mid"] = gate
    first = worker(redis_url, sim_url, tmp_path / "a.log", DELIVERING, "sends@test")
    try:
        with Client(settings=hook_settings) as client:
            job = client.generate(MODEL, "hi", callback_url=f"{receiver.url}/mid")
            job.result(timeout=30)
        receiver.wait_arrived("/mid", 1)  # the first worker's attempt hangs on the receiver
    finally:
        first.kill()
    del receiver.hold["/mid"]
    gate.set()  # the killed worker's attempt ends; its answer goes to a closed connection
    started = time.monotonic()
    second = worker(redis_url, sim_url, tmp_path / "b.log", DELIVERING, "takes-over@test")
    try:
        deliveries = receiver.wait("/mid", 2)  # the claim lapsed: sent again (at least once)
        assert {d.headers["webhook-id"] for d in deliveries} == {f"msg_{job.id}"}
        assert deliveries[-1].verified()["data"]["id"] == job.id
        assert time.monotonic() - started < 15
    finally:
        second.stop()
