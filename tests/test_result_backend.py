"""The result backend stores a result as Celery does (same meta, expiry and publish), in one
step, and never overwrites a success."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import states
from celery.app.task import Context
from kombu.utils import json as kombu_json

from tasks.app import create_app
from tasks.result_backend import StreamingRedisBackend
from tasks.settings import Settings


@pytest.fixture
def backend(settings: Settings) -> Iterator[StreamingRedisBackend]:
    app = create_app(settings)
    found = app.backend
    assert isinstance(found, StreamingRedisBackend)
    yield found
    app.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    found = redis.Redis.from_url(redis_url)
    yield found
    found.close()


def stored(client: redis.Redis, backend: StreamingRedisBackend, task_id: str) -> dict[str, object]:
    raw = client.get(backend.get_key_for_task(task_id))
    assert raw is not None
    meta: dict[str, object] = json.loads(raw)
    return meta


def test_a_result_is_stored_with_its_expiry_and_published(
    backend: StreamingRedisBackend, client: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    key = backend.get_key_for_task(task_id)
    pubsub = client.pubsub()
    pubsub.subscribe(key)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    backend.store_result(task_id, {"text": "blue"}, states.SUCCESS)
    meta = stored(client, backend, task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == {"text": "blue"}
    assert meta["task_id"] == task_id
    assert 0 < client.ttl(key) <= backend.expires
    message = pubsub.get_message(timeout=5)
    assert message is not None and json.loads(message["data"]) == meta
    assert backend.get_task_meta(task_id)["result"] == {"text": "blue"}  # Celery reads it back
    pubsub.close()


def test_a_success_is_never_overwritten(
    backend: StreamingRedisBackend, client: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"text": "first"}, states.SUCCESS)
    backend.store_result(task_id, ValueError("a late run"), states.FAILURE)
    backend.store_result(task_id, {"text": "second"}, states.SUCCESS)
    assert stored(client, backend, task_id)["result"] == {"text": "first"}


def test_a_failure_is_overwritten_by_a_later_run(
    backend: StreamingRedisBackend, client: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, ValueError("lost Redis"), states.FAILURE)
    assert stored(client, backend, task_id)["status"] == states.FAILURE
    backend.store_result(task_id, {"text": "done"}, states.SUCCESS)
    meta = stored(client, backend, task_id)
    assert meta["status"] == states.SUCCESS and meta["result"] == {"text": "done"}


def test_a_stored_value_that_is_not_json_is_replaced(
    backend: StreamingRedisBackend, client: redis.Redis
) -> None:
    task_id = str(uuid.uuid4())
    client.set(backend.get_key_for_task(task_id), b"\x80not json")
    backend.store_result(task_id, {"text": "done"}, states.SUCCESS)
    assert stored(client, backend, task_id)["result"] == {"text": "done"}


@pytest.mark.parametrize("scripts_lost", [False, True], ids=["in-the-transaction", "scripts-lost"])
def test_a_success_stored_in_a_transaction_is_not_stored_again(
    backend: StreamingRedisBackend, client: redis.Redis, scripts_lost: bool
) -> None:
    """A task stores its success in its terminal event's transaction; Celery's own store after
    the task then does nothing. If Redis lost the script, Celery stores it as usual."""
    task_id = str(uuid.uuid4())
    request = Context(id=task_id, task="corral.generate", args=[], kwargs={}, ignore_result=False)
    backend.store_result(str(uuid.uuid4()), None, states.SUCCESS)  # Redis knows the script
    if scripts_lost:
        client.script_flush()
    store = backend.success_in(task_id, {"text": "blue"}, request)
    pipe = client.pipeline(transaction=True)
    callback = store(pipe)
    callback(pipe.execute(raise_on_error=False))
    assert request.ignore_result is not scripts_lost
    backend.mark_as_done(task_id, {"text": "by Celery"}, request)  # what Celery does on return
    meta = stored(client, backend, task_id)
    expected = {"text": "by Celery"} if scripts_lost else {"text": "blue"}
    assert meta["status"] == states.SUCCESS and meta["result"] == expected
    assert meta["task_id"] == task_id and meta["name"] == "corral.generate"  # result_extended


def test_plain_results_are_json_for_any_reader_and_typed_values_keep_kombus_form(
    backend: StreamingRedisBackend, client: redis.Redis
) -> None:
    plain = {"text": "café", "vector": [0.1, -2.5e-05, 1e21], "none": None, "big": 2**70}
    typed = {"at": datetime.datetime(2026, 1, 2, 3, 4, 5), "price": decimal.Decimal("1.5")}
    for value in (plain, typed):
        task_id = str(uuid.uuid4())
        backend.store_result(task_id, value, states.SUCCESS)
        assert backend.get_task_meta(task_id)["result"] == value  # Celery reads it back as it was
    assert stored(client, backend, task_id)["result"]["at"]["__type__"] == "datetime"  # type: ignore[index]
    written_by_kombu = kombu_json.dumps({"status": states.SUCCESS, "result": plain})
    assert backend.decode(written_by_kombu.encode())["result"] == plain
