"""Following a task's events: the replay log, and the result backend only as a stand-in."""

from __future__ import annotations

import json
import threading
import uuid

import redis

from producers.events import PubSubPool, follow_events
from tasks.keys import log_key
from workers.embedded_redis import EmbeddedRedis


def write_log(client: redis.Redis, task_id: str, types: list[str]) -> None:
    for seq, kind in enumerate(types):
        event = {"task_id": task_id, "seq": seq, "type": kind, "text": f"t{seq}"}
        client.xadd(log_key(task_id), {"e": json.dumps(event)})


def test_an_ended_task_still_yields_its_whole_log(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    write_log(client, task_id, ["start", "token", "token", "done"])
    outcome = {"type": "done", "result": {"from": "backend"}}
    events = list(follow_events(client, task_id, on_idle=lambda: outcome, timeout_s=5))
    assert [e["type"] for e in events] == ["start", "token", "token", "done"]
    assert "result" not in events[-1]  # the log's own terminal event, not the stand-in


def test_the_backend_stands_in_for_an_expired_log(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    outcome = {"type": "done", "result": {"text": "kept"}}
    events = list(follow_events(client, str(uuid.uuid4()), on_idle=lambda: outcome, timeout_s=5))
    assert events == [{"task_id": events[0]["task_id"], "seq": 0, **outcome}]


def test_resume_after_a_seq(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    write_log(client, task_id, ["start", "token", "token", "error"])
    events = list(follow_events(client, task_id, after_seq=1, timeout_s=5))
    assert [e["seq"] for e in events] == [2, 3]


def test_following_survives_a_redis_restart_with_pooled_subscribers(tmp_path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path, appendonly=True).start()
    client = redis.Redis.from_url(server.url)
    pool = PubSubPool(client)
    try:
        first = str(uuid.uuid4())
        write_log(client, first, ["start", "done"])
        list(follow_events(client, first, timeout_s=5, pubsubs=pool))  # one pubsub now pooled
        second = str(uuid.uuid4())
        write_log(client, second, ["start", "token", "done"])
        server.kill()
        restart = threading.Timer(1.0, server.start)  # Redis is down for a second (AOF on)
        restart.start()
        events = list(follow_events(client, second, timeout_s=30, pubsubs=pool))
        restart.join()
        assert [e["type"] for e in events] == ["start", "token", "done"]
    finally:
        pool.close()
        client.close()
        server.stop()
