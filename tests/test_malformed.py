"""Malformed messages published straight onto a model's queue, against a real worker.

Each ends typed: with a readable task id, an ``InvalidRequest`` result and one terminal
``error`` event; without one, a dead letter holding the raw body. None is dropped, none stops
the worker, none holds the queue up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producers import Client
from producers.cli.local_stack import Child, start_worker
from tasks.errors import InvalidRequest, TaskCancelled
from tasks.keys import queue_name, task_name
from tasks.lifecycle import dead_letters
from tasks.registry import live_workers
from tasks.settings import load_settings
from tests.wire_support import offer

DB = 9
MODEL = "llama3.2"
QUEUE = queue_name(MODEL)
GENERATE = task_name("generate")
WAIT_S = 30
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any JSON decoder recurses


@pytest.fixture(scope="module")
def stack(
    redis_server: Any, sim_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Child]]:
    url = f"redis://{redis_server.host}:{redis_server.port}/{DB}"
    redis.Redis.from_url(url).flushdb()
    log = Path(tmp_path_factory.mktemp("malformed")) / "worker.log"
    worker = start_worker(
        [MODEL], redis_url=url, ollama_host=sim_url, name="malformed@test", log_path=log
    )
    yield url, worker
    worker.stop()
    redis.Redis.from_url(url).flushdb()


@pytest.fixture
def client(stack: tuple[str, Child]) -> Iterator[Client]:
    with Client(settings=load_settings(redis_url=stack[0])) as sdk:
        yield sdk


def publish(client: Client, body: str, headers: dict[str, Any]) -> None:
    """A message with exactly this body and these headers, as any kombu producer sends it."""
    with client.app.producer_or_acquire() as producer:
        producer.publish(
            body,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            routing_key=QUEUE,
            exchange="",
        )


def failure_of(client: Client, task_id: str) -> InvalidRequest:
    """The task's typed failure; its stream holds exactly the one terminal ``error`` event."""
    deadline = time.monotonic() + WAIT_S  # sent around the SDK: no record says it exists yet
    while client.backend.get_task_meta(task_id)["status"] == "PENDING":
        assert time.monotonic() < deadline, f"task {task_id} never ended"
        time.sleep(0.05)
    with pytest.raises(InvalidRequest) as caught:
        client.job(task_id).result(timeout=WAIT_S)
    events = list(client.job(task_id).stream(timeout=WAIT_S))
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["error"]["type"] == "InvalidRequest"
    assert client.job(task_id).status() == "failed"
    return caught.value


def dead_letter_with(client: Client, raw_body: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for record in dead_letters(client.redis):
            if record.get("raw_body") == raw_body:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no dead letter holds {raw_body[:40]!r}")


def test_too_many_positional_arguments_end_typed(client: Client) -> None:
    task_id = str(uuid.uuid4())
    payload = {"model": MODEL, "prompt": "hi"}
    client.app.send_task(
        GENERATE, args=[payload, time.time(), None, "one too many"], task_id=task_id, queue=QUEUE
    )
    error = failure_of(client, task_id)
    assert error.field == "args" and "too many positional arguments" in error.message
    assert error.task_id == task_id


def test_a_body_too_deep_to_decode_ends_typed(client: Client) -> None:
    task_id = str(uuid.uuid4())
    publish(client, DEEP, {"id": task_id, "task": GENERATE})
    error = failure_of(client, task_id)
    assert error.field == "body" and "cannot be decoded" in error.message


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        ('"just text"', {"task": GENERATE}, "body"),  # used to stop the worker
        ("{}", {"task": GENERATE}, "body"),
        ('[{"model": "x"}, {}, {}]', {"task": GENERATE}, "args"),
        ("[[], [1], {}]", {"task": GENERATE}, "kwargs"),
        ("[[], {}, []]", {"task": GENERATE}, "embed"),
        ("[[], {}, {}]", {"task": "corral.no-such-kind"}, "headers.task"),
        ("[[], {}, {}]", {}, "headers.task"),
        ("[[], {}, {}]", {"task": GENERATE, "timelimit": 5}, "headers"),  # stopped it too
    ],
)
def test_every_malformed_message_with_an_id_ends_typed(
    client: Client, body: str, headers: dict[str, Any], field: str
) -> None:
    task_id = str(uuid.uuid4())
    publish(client, body, {**headers, "id": task_id})
    error = failure_of(client, task_id)
    assert error.field == field and "malformed task message" in error.message


def test_a_message_without_a_readable_id_is_a_dead_letter_with_its_raw_body(
    client: Client,
) -> None:
    body = '[[], {"marker": "' + uuid.uuid4().hex + '"}, {}]'
    publish(client, body, {"task": GENERATE})
    record = dead_letter_with(client, body)
    assert record["error"]["type"] == "InvalidRequest"
    assert record["error"]["field"] == "headers.id"
    assert record["queue"] == QUEUE and record["headers"]["task"] == GENERATE


@pytest.mark.parametrize("raw", ["not JSON at all", '{"hello": 1}', DEEP])
def test_an_item_that_is_not_a_message_is_a_dead_letter(client: Client, raw: str) -> None:
    """Pushed straight onto the Redis list: kombu used to stop the worker and lose it."""
    marked = raw.replace("hello", uuid.uuid4().hex) if "hello" in raw else raw
    client.redis.lpush(QUEUE, marked)
    record = dead_letter_with(client, marked)
    assert record["error"]["field"] == "message"
    assert "not a kombu message" in record["error"]["message"]


def test_an_item_with_an_id_but_no_message_around_it_ends_typed(client: Client) -> None:
    task_id = str(uuid.uuid4())
    client.redis.lpush(QUEUE, json.dumps({"headers": {"id": task_id, "task": GENERATE}}))
    error = failure_of(client, task_id)
    assert error.field == "message" and "no properties" in error.message


def test_a_cancelled_task_keeps_its_outcome(client: Client) -> None:
    """A malformed message for a task cancelled while queued does not add a second end."""
    offer(client.redis, ["nobody-serves-this"])  # on an Ollama host: admitted, and it waits
    job = client.generate("nobody-serves-this", "hi")
    assert job.cancel() == "cancelled"
    publish(client, DEEP, {"id": job.id, "task": GENERATE})
    # a well-formed task behind it runs: the malformed one was settled before it
    client.generate(MODEL, "after", options={"num_predict": 2}).result(timeout=WAIT_S)
    with pytest.raises(TaskCancelled):
        job.result(timeout=WAIT_S)
    assert [e["type"] for e in job.stream(timeout=WAIT_S)] == ["cancelled"]


def test_the_worker_survives_and_the_queue_moves(client: Client, stack: tuple[str, Child]) -> None:
    url, worker = stack
    before = {w.node: w.pid for w in live_workers(client.redis)}["malformed@test"]
    for body in ('"text"', "{}", DEEP):
        publish(client, body, {"task": GENERATE, "id": str(uuid.uuid4())})
    client.redis.lpush(QUEUE, "garbage")
    result = client.generate(MODEL, "still there?", options={"num_predict": 3}).result(
        timeout=WAIT_S
    )
    assert result.metrics.eval_count == 3
    assert client.redis.llen(QUEUE) == 0
    assert {w.node: w.pid for w in live_workers(client.redis)}["malformed@test"] == before
    assert worker.alive() and "Unrecoverable error" not in worker.log_tail(10**7)


def test_a_malformed_dead_letter_is_not_retried(client: Client, stack: tuple[str, Child]) -> None:
    body = '[[], {"marker": "' + uuid.uuid4().hex + '"}, {}]'
    publish(client, body, {"task": GENERATE})
    record = dead_letter_with(client, body)
    env = {**os.environ, "CORRAL_REDIS_URL": stack[0]}
    cli = [sys.executable, "-m", "producers.cli", "dlq"]
    run = subprocess.run(
        [*cli, "retry", record["task_id"]], env=env, text=True, capture_output=True, timeout=60
    )
    assert run.returncode == 2 and "malformed message, not a task" in run.stderr
    listed = subprocess.run([*cli, "list"], env=env, text=True, capture_output=True, timeout=60)
    assert listed.returncode == 0 and record["task_id"] in listed.stdout
