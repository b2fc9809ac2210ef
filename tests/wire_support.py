"""Helpers for the scheduling tests: bounded waits on real state, and serving a model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import redis
from celery import Celery
from kombu import Connection

from tasks.keys import canonical_model, queue_name
from tasks.registry import WorkerInfo, announce
from tasks.scheduler.served import note_offered

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout_s: float = 30.0, what: str = "") -> T:
    """Poll a real state (Redis, the simulator) until ``check`` returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


def offer(client: redis.Redis, models: Iterable[str]) -> None:
    """As an Ollama host behind a live worker would: its /api/tags lists ``models``. They are
    admitted then, and wait, since no worker serves them."""
    note_offered(client, {"models": [{"name": m} for m in models]})


def announce_idle_worker(
    client: redis.Redis, model: str, *, slots: int = 10, host: str | None = None
) -> WorkerInfo:
    """A worker announcement for ``model`` that no process runs: the scheduler releases its
    tasks onto the model's Celery queue (up to ``slots``), where they stay. Its Ollama host is
    its own unless given. It lapses within ANNOUNCE_TTL_S unless announced again."""
    name = canonical_model(model).replace(":", "-")
    node, host = f"idle-{name}@test", host or f"http://idle-{name}:11434"
    info = WorkerInfo(node, [queue_name(model)], slots, "threads", host, 0, time.time())
    announce(client, info)
    return info


def old_priority_connection(app: Celery) -> Connection:
    """A broker connection with kombu's default priority steps, as earlier versions had: a
    message sent on it with a Celery priority goes to a priority sub-list of its queue."""
    options = {**app.conf.broker_transport_options, "priority_steps": [0, 3, 6, 9]}
    return Connection(app.conf.broker_url, transport_options=options)
