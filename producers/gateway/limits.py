"""Per-key limits (requests per minute, tasks in flight) and per-model backpressure.

All counters live in Redis, so several gateway processes share them. When a limit is hit the
caller gets 429 with ``Retry-After`` in whole seconds.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque

import redis.asyncio as aioredis

from producers.gateway.auth import ApiKey
from tasks.keys import in_flight_key, rate_key, task_key
from tasks.queues import sublists

FINAL_STATES = {b"succeeded", b"failed", b"cancelled"}
MAX_RETRY_AFTER_S = 300


class Refusal(Exception):
    """An HTTP refusal decided by the gateway itself (401, 403, 404, 429, 503...)."""

    def __init__(self, status: int, kind: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


async def check_rate(r: aioredis.Redis, key: ApiKey, default_per_minute: int) -> None:
    """Count this request in the key's current minute; refuse past the limit."""
    limit = key.rate_per_minute or default_per_minute
    now = time.time()
    minute = int(now // 60)
    pipe = r.pipeline(transaction=False)
    pipe.incr(rate_key(key.id, minute))
    pipe.expire(rate_key(key.id, minute), 61)
    count, _ = await pipe.execute()
    if count > limit:
        retry = max(1, math.ceil(60 - now % 60))
        message = f"key {key.id} is over its limit of {limit} requests per minute"
        raise Refusal(429, "RateLimited", message, retry)


async def check_in_flight(r: aioredis.Redis, key: ApiKey, default_limit: int) -> None:
    """Refuse a new task while the key has ``max_in_flight`` unfinished ones."""
    limit = key.max_in_flight or default_limit
    members = await r.zrange(in_flight_key(key.id), 0, -1)
    if len(members) < limit:
        return
    pipe = r.pipeline(transaction=False)
    for task_id in members:
        pipe.hget(task_key(task_id.decode()), "state")
    states = await pipe.execute()
    finished = [m for m, s in zip(members, states, strict=True) if s is None or s in FINAL_STATES]
    if finished:
        await r.zrem(in_flight_key(key.id), *finished)
    if len(members) - len(finished) >= limit:
        raise Refusal(429, "TooManyInFlight",
                      f"key {key.id} already has {limit} unfinished tasks; wait for one to end",
                      1)  # fmt: skip


async def note_in_flight(r: aioredis.Redis, key: ApiKey, task_id: str, ttl_s: int) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.zadd(in_flight_key(key.id), {task_id: time.time()})
    pipe.zremrangebyscore(in_flight_key(key.id), 0, time.time() - ttl_s)  # forgotten tasks
    pipe.expire(in_flight_key(key.id), ttl_s)
    await pipe.execute()


async def queue_depth(r: aioredis.Redis, queue: str) -> int:
    pipe = r.pipeline(transaction=False)
    for name in sublists(queue):
        pipe.llen(name)
    return int(sum(await pipe.execute()))


class ServiceRate:
    """Recent run times per model, observed on the tasks the gateway sees finish.

    The service rate of a model is its live slots divided by its mean recent run time.
    """

    def __init__(self, default_run_s: float, window: int = 32) -> None:
        self.default_run_s = default_run_s
        self._runs: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    def observe(self, model: str, run_s: float) -> None:
        if run_s >= 0:
            self._runs[model].append(run_s)

    def mean_run_s(self, model: str) -> float:
        runs = self._runs.get(model)
        return sum(runs) / len(runs) if runs else self.default_run_s

    def retry_after_s(self, model: str, excess: int, slots: int) -> int:
        """Seconds until ``excess`` queued tasks should have drained at the recent rate."""
        if slots <= 0:
            return 60  # nobody serves the model now; look again in a minute
        per_s = slots / self.mean_run_s(model)
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(excess / per_s))))
