"""Worker announcements are found through their index, whatever else the database holds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from tasks.keys import WORKERS_KEY, queue_name, task_key, worker_key
from tasks.queues import known_queues
from tasks.registry import INDEX_KEEP_S, WorkerInfo, announce, live_workers
from workers.embedded_redis import EmbeddedRedis

DB = 14


@pytest.fixture(name="client")
def client_fixture(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port, db=DB)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def info(node: str) -> WorkerInfo:
    return WorkerInfo(node, [queue_name("registry-model")], 2, "threads", "http://h:1", 0, 0.0)


def test_live_workers_are_the_announced_ones_among_many_task_records(
    client: redis.Redis,
) -> None:
    pipe = client.pipeline(transaction=False)
    for n in range(5000):  # what a backlog leaves in the keyspace: a record per task
        pipe.hset(task_key(f"t{n}"), mapping={"state": "queued"})
    pipe.execute()
    announce(client, info("a@test"))
    announce(client, info("b@test"))
    assert [w.node for w in live_workers(client)] == ["a@test", "b@test"]
    assert set(client.zrange(WORKERS_KEY, 0, -1)) == {b"a@test", b"b@test"}
    assert known_queues(client) == [queue_name("registry-model")]  # the queue index has it

    client.delete(worker_key("a@test"))  # its announcement lapsed: the index entry alone is not
    assert [w.node for w in live_workers(client)] == ["b@test"]


def test_announcing_drops_index_entries_of_long_gone_workers(client: redis.Redis) -> None:
    client.zadd(WORKERS_KEY, {"gone@test": time.time() - INDEX_KEEP_S - 1})
    announce(client, info("here@test"))
    assert client.zrange(WORKERS_KEY, 0, -1) == [b"here@test"]
    assert [w.node for w in live_workers(client)] == ["here@test"]
