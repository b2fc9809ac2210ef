"""Workers announce themselves in Redis: which models, which Ollama host, how many slots.

The announcement expires unless renewed, so a killed worker drops out on its own. The exporter,
``corral status`` and the gateway read it to find the Ollama hosts behind the queues.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass

import redis

from tasks.keys import SCHED_SERVED_KEY, model_of_queue, worker_key

ANNOUNCE_EVERY_S = 5.0
ANNOUNCE_TTL_S = 15


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
    tasks/scheduler/served.py)."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.set(worker_key(info.node), json.dumps(asdict(info)), ex=ANNOUNCE_TTL_S)
    if info.queues:
        pipe.zadd(SCHED_SERVED_KEY, {model_of_queue(q): now for q in info.queues})
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
            client.delete(worker_key(info.node))

    threading.Thread(target=loop, name="announce", daemon=True).start()
    return stop


def live_workers(client: redis.Redis) -> list[WorkerInfo]:
    keys = list(client.scan_iter(match=worker_key("*"), count=500))
    values = client.mget(keys) if keys else []
    workers = [WorkerInfo(**json.loads(v)) for v in values if v]
    return sorted(workers, key=lambda w: w.node)


def new_info(node: str, queues: list[str], slots: int, pool: str, ollama_host: str) -> WorkerInfo:
    return WorkerInfo(node, queues, slots, pool, ollama_host, os.getpid(), time.time())
