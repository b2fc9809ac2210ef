"""The gateway's limits hold under parallel requests: exactly the limit gets in, nothing more.

Each test fires its requests from threads released together by a barrier, against a running
gateway on its own Redis database, and then counts what Redis holds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis
import requests
from test_gateway_support import GatewayServer, settings_on_db

from producers.gateway.auth import create_key
from tasks.keys import in_flight_key, queue_name, task_key
from tasks.queues import queue_depths
from tasks.scheduler import Scheduler
from tasks.settings import Settings, load_settings
from tests.wire_support import announce_idle_worker, offer

TIMEOUT = (5, 60)
DB = 11
PARALLEL = 30
MODEL = "unserved-limits"  # nobody consumes it: what is admitted stays queued
Call = Callable[[requests.Session], requests.Response]


@pytest.fixture
def isolated(settings: Settings) -> Iterator[tuple[Settings, redis.Redis]]:
    clean = settings_on_db(settings.redis_url, DB)
    client = redis.Redis.from_url(clean.redis_url)
    client.flushdb()
    yield clean, client
    client.flushdb()
    client.close()


def in_parallel(call: Call) -> list[requests.Response]:
    """``call`` from PARALLEL threads at once, each with its own connection."""
    barrier = threading.Barrier(PARALLEL)
    replies: list[requests.Response] = []
    lock = threading.Lock()

    def run() -> None:
        with requests.Session() as session:
            barrier.wait(timeout=30)
            reply = call(session)
        with lock:
            replies.append(reply)

    threads = [threading.Thread(target=run) for _ in range(PARALLEL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(replies) == PARALLEL
    return replies


def submit_from(url: str, token: str | None = None) -> Call:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": MODEL, "prompt": "hi"}
    return lambda s: s.post(f"{url}/v1/tasks/generate", json=body, headers=headers, timeout=TIMEOUT)


def outcome(replies: list[requests.Response]) -> Counter[str]:
    return Counter(
        "admitted" if r.status_code == 202 else f"{r.status_code} {r.json()['error']['type']}"
        for r in replies
    )


def recorded_tasks(client: redis.Redis) -> set[str]:
    prefix = task_key("")
    return {k.decode().removeprefix(prefix) for k in client.scan_iter(match=prefix + "*")}


def waiting(client: redis.Redis) -> int:
    return queue_depths(client, [queue_name(MODEL)])[0].waiting


def test_in_flight_limit_admits_exactly_its_number(isolated: tuple[Settings, redis.Redis]) -> None:
    settings, client = isolated
    announce_idle_worker(client, MODEL, slots=PARALLEL)  # released onto the queue, and left
    token, key = create_key(client, "bulk", max_in_flight=3)
    with GatewayServer(settings) as server:
        replies = in_parallel(submit_from(server.url, token))
    assert outcome(replies) == {"admitted": 3, "429 TooManyInFlight": PARALLEL - 3}
    admitted = {r.json()["id"] for r in replies if r.status_code == 202}
    assert recorded_tasks(client) == admitted  # nothing stored for the refused ones
    assert waiting(client) == 3
    members = {m.decode() for m in client.zrange(in_flight_key(key.id), 0, -1)}
    assert members == admitted


def test_queue_depth_bound_admits_exactly_its_number(
    isolated: tuple[Settings, redis.Redis],
) -> None:
    """The bound is the scheduler's (CORRAL_MAX_QUEUE_DEPTH), checked and counted in its
    admission step: one bound for every way in."""
    settings, client = isolated
    offer(client, [MODEL])  # an Ollama host has it; no worker serves it: admitted work waits
    bounded = load_settings(redis_url=settings.redis_url, max_queue_depth=5)
    with GatewayServer(bounded) as server:
        replies = in_parallel(submit_from(server.url))
    assert outcome(replies) == {"admitted": 5, "429 QueueFull": PARALLEL - 5}
    admitted = {r.json()["id"] for r in replies if r.status_code == 202}
    assert recorded_tasks(client) == admitted  # nothing stored for the refused ones
    assert Scheduler(client, bounded).backlog(MODEL).pending == 5
    refused = next(r for r in replies if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["retryable"] is True and error["bound"] == 5 and error["retry_after_s"] >= 1


def test_rate_limit_admits_exactly_its_number(isolated: tuple[Settings, redis.Redis]) -> None:
    settings, client = isolated
    token, _ = create_key(client, "chatty", rate_per_minute=4)
    if (left_s := 60 - time.time() % 60) < 10:
        time.sleep(left_s)  # the window is the clock's minute: start the burst inside one
    with GatewayServer(settings) as server:
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{server.url}/v1/queues"
        replies = in_parallel(lambda s: s.get(url, headers=headers, timeout=TIMEOUT))
    statuses = Counter(r.status_code for r in replies)
    assert statuses == {200: 4, 429: PARALLEL - 4}
