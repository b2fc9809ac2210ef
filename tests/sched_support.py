"""Helpers for the tests of the scheduler's read side: tasks admitted as the SDK builds them.

Tasks are admitted with the scheduler's own ``admit`` and a message built by its
``MessageBuilder`` from the same record and ``send_task`` arguments as ``Client.submit``.
Most tests run in a database of their own, with a worker announced for ``MODEL`` that no
process runs: its tasks wait in the scheduler until a test releases them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from producers import Client, Job
from tasks.keys import MODELS_KEY, queue_name, task_key, task_name
from tasks.payloads import dump_payload, validate_payload
from tasks.registry import WorkerInfo, announce
from tasks.scheduler import MessageBuilder, Scheduler
from tasks.settings import load_settings
from workers.embedded_redis import EmbeddedRedis

DB = 7
MODEL = "views-model:latest"
HOST = "http://views-host:11434"
SLOTS = 2


def announce_worker(client: Client, model: str = MODEL, slots: int = SLOTS) -> None:
    """A worker announcement for ``model`` (slots for the ETA); nothing consumes its queue."""
    info = WorkerInfo("views@test", [queue_name(model)], slots, "threads", HOST, 0, time.time())
    announce(client.redis, info)


@pytest.fixture(name="sdk")
def sdk_fixture(redis_server: EmbeddedRedis) -> Iterator[Client]:
    """A client on a database of its own, flushed before and after, ``MODEL`` announced."""
    url = f"redis://{redis_server.host}:{redis_server.port}/{DB}"
    with Client(settings=load_settings(redis_url=url)) as client:
        client.redis.flushdb()
        announce_worker(client)
        yield client
        client.redis.flushdb()


def admit_task(
    client: Client,
    *,
    model: str = MODEL,
    prompt: str = "Why is the sky blue?",
    tenant: str = "default",
    priority: int = 5,
) -> Job:
    """Admit a generate task into the scheduler, recorded and built as ``Client.submit`` does."""
    task_id, now = str(uuid.uuid4()), time.time()
    data = {"model": model, "prompt": prompt, "options": {"num_predict": 4}}
    payload = validate_payload("generate", data, client.settings)
    kwargs = {"payload": dump_payload(payload), "submitted_at": now, "deadline_s": None}
    record = {
        "kind": "generate",
        "model": payload.model,
        "queue": queue_name(model),
        "submitted_at": now,
        "state": "queued",
    }
    client.redis.hset(task_key(task_id), mapping=record)
    client.redis.sadd(MODELS_KEY, payload.model)
    with MessageBuilder(client.app) as builder:
        ready = builder.build(
            task_name("generate"), kwargs=kwargs, task_id=task_id, queue=queue_name(model)
        )
    scheduler = Scheduler(client.redis, client.settings)
    admission = scheduler.admit(
        ready, model=model, submitted_at=now, tenant=tenant, priority=priority, now=now
    )
    admission.raise_if_refused()
    return client.job(task_id)


def wait_until(check: Callable[[], object], timeout_s: float = 30.0, what: str = "") -> object:
    """Poll a real state until ``check`` returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")
