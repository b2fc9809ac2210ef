"""Workers announce themselves in Redis: which models, which Ollama host, how many slots.

The announcement expires unless renewed, so a killed worker drops out on its own. The exporter,
``corral status``, the gateway and every releaser (each producer and worker, every few seconds)
read it to find the Ollama hosts behind the queues. They find the announcements through an
index (``WORKERS_KEY``), not a keyspace scan, whose cost would grow with the tasks in Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass

import redis

from tasks.keys import MODELS_KEY, SCHED_SERVED_KEY, WORKERS_KEY, model_of_queue, worker_key

ANNOUNCE_EVERY_S = 5.0
ANNOUNCE_TTL_S = 15
INDEX_KEEP_S = 10 * ANNOUNCE_TTL_S  # index entries of workers gone this long are dropped


@dataclass(frozen=True)
class WorkerInfo:
    node: str
    queues: list[str]
    slots: int
    pool: str
    ollama_host: str
    pid: int
    started_at: float


def announce(client: redis.Redis, info: WorkerInfo) -> None:
    """Announce the worker, and note that its models are served (admission asks:
    tasks/scheduler/served.py) and that their queues exist."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(worker_key(info.node), json.dumps(asdict(info)), ex=ANNOUNCE_TTL_S)
    pipe.zadd(WORKERS_KEY, {info.node: now})
    pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - INDEX_KEEP_S)
    if info.queues:
        pipe.zadd(SCHED_SERVED_KEY, {model_of_queue(q): now for q in info.queues})
        # the queue index (tasks/queues.py): a queue stays listed after its workers are gone
        pipe.sadd(MODELS_KEY, *(model_of_queue(q) for q in info.queues))
    pipe.execute()


def start_announcing(client: redis.Redis, info: WorkerInfo) -> threading.Event:
    """Announce now and every few seconds until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            with contextlib.suppress(redis.RedisError):  # restarting: the next round announces
                announce(client, info)
            if stop.wait(ANNOUNCE_EVERY_S):
                break
        with contextlib.suppress(redis.RedisError):
            pipe = client.pipeline(transaction=False)
            pipe.delete(worker_key(info.node))
            pipe.zrem(WORKERS_KEY, info.node)
            pipe.execute()

    threading.Thread(target=loop, name="announce", daemon=True).start()
    return stop


def live_workers(client: redis.Redis) -> list[WorkerInfo]:
    """The workers whose announcement has not expired (the index may name lapsed ones)."""
    nodes: list[bytes] = client.zrange(WORKERS_KEY, 0, -1)  # type: ignore[assignment]  # redis-py's union
    keys = [worker_key(node.decode()) for node in nodes]
    values = client.mget(keys) if keys else []
    workers = [WorkerInfo(**json.loads(v)) for v in values if v]
    return sorted(workers, key=lambda w: w.node)


def new_info(node: str, queues: list[str], slots: int, pool: str, ollama_host: str) -> WorkerInfo:
    return WorkerInfo(node, queues, slots, pool, ollama_host, os.getpid(), time.time())
