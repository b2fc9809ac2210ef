"""Per-key limits (requests per minute, tasks in flight) and per-model backpressure.

All counters live in Redis, so several gateway processes share them, and each limit is checked
and counted in one atomic step (INCR, or a Lua script), so parallel requests cannot overshoot
it. When a limit is hit the caller gets 429 with ``Retry-After`` in whole seconds.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import redis.asyncio as aioredis

from producers.gateway.auth import ApiKey
from tasks.keys import admitting_key, in_flight_key, rate_key, task_key
from tasks.queues import DEPTH_ARGS, DEPTH_LUA, depth_keys

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


# Admit one task, or refuse it, in one step: with separate reads and writes, parallel requests
# all see room and all get in (30 got 202 under a limit of 3). KEYS: the queue's priority
# sub-lists (DEPTH_LUA), its admitting zset, the key's in-flight zset. ARGV: sub-lists per
# queue, task id, now, depth limit (0: none), in-flight limit (0: none), the task record key
# of "" (for the prefix), grace, in-flight TTL. Returns {verdict, count}.
#
# - In flight: the key's unfinished tasks. Finished ones (by their record's state) are dropped
#   here; an id without a record counts for ``grace`` seconds (its submission is under way).
# - Depth: waiting messages plus tasks admitted and not pushed yet. The push removes the task
#   from the admitting zset in the same transaction, so no task counts twice; an entry whose
#   push never came (a gateway that died meanwhile) stops counting after ``grace``.
_ADMIT = (
    DEPTH_LUA
    + """
local admitting, in_flight = KEYS[steps + 1], KEYS[steps + 2]
local task_id, now = ARGV[2], tonumber(ARGV[3])
local max_depth, max_in_flight = tonumber(ARGV[4]), tonumber(ARGV[5])
local record_prefix, grace, ttl = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
if max_in_flight > 0 then
  redis.call('ZREMRANGEBYSCORE', in_flight, '-inf', now - ttl)
  local members, live = redis.call('ZRANGE', in_flight, 0, -1, 'WITHSCORES'), 0
  for i = 1, #members, 2 do
    local state = redis.call('HGET', record_prefix .. members[i], 'state')
    local final = state == 'succeeded' or state == 'failed' or state == 'cancelled'
    if final or (not state and tonumber(members[i + 1]) < now - grace) then
      redis.call('ZREM', in_flight, members[i])
    else
      live = live + 1
    end
  end
  if live >= max_in_flight then return {'in_flight', live} end
end
if max_depth > 0 then
  redis.call('ZREMRANGEBYSCORE', admitting, '-inf', now - grace)
  local waiting = depth(1) + redis.call('ZCARD', admitting)
  if waiting >= max_depth then return {'queue_full', waiting} end
  redis.call('ZADD', admitting, now, task_id)
  redis.call('EXPIRE', admitting, math.ceil(grace))
end
if max_in_flight > 0 then
  redis.call('ZADD', in_flight, now, task_id)
  redis.call('EXPIRE', in_flight, math.ceil(ttl))
end
return {'admitted', 0}
"""
)
ADMIT_GRACE_S = 30.0  # longer than a submission takes, Redis reconnects included


@dataclass(frozen=True)
class Admission:
    """What :func:`admit` decided: ``admitted``, ``in_flight`` or ``queue_full``, and the
    count that was over its limit (unfinished tasks of the key, or tasks waiting)."""

    verdict: str
    count: int


async def admit(
    r: aioredis.Redis,
    queue: str,
    task_id: str,
    key: ApiKey | None,
    *,
    max_depth: int,
    default_in_flight: int,
    in_flight_ttl_s: float,
) -> Admission:
    """Count ``task_id`` against the queue's depth limit and the key's in-flight limit, or
    refuse it, atomically. After an admission, call :func:`withdraw` if the submission fails."""
    max_in_flight = 0 if key is None else key.max_in_flight or default_in_flight
    if not max_depth and not max_in_flight:
        return Admission("admitted", 0)
    keys = [*depth_keys([queue]), admitting_key(queue), in_flight_key(key.id if key else "")]
    args = [
        *DEPTH_ARGS,
        task_id,
        time.time(),
        max_depth,
        max_in_flight,
        task_key(""),
        ADMIT_GRACE_S,
        in_flight_ttl_s,
    ]
    verdict, count = await r.register_script(_ADMIT)(keys=keys, args=args)
    return Admission(verdict.decode(), int(count))


async def withdraw(r: aioredis.Redis, queue: str, task_id: str, key: ApiKey | None) -> None:
    """Undo an admission whose submission failed: the task counts against no limit."""
    pipe = r.pipeline(transaction=True)
    pipe.zrem(admitting_key(queue), task_id)
    if key is not None:
        pipe.zrem(in_flight_key(key.id), task_id)
    await pipe.execute()


async def check_rate(r: aioredis.Redis, key: ApiKey, default_per_minute: int) -> None:
    """Count this request in the key's current minute; refuse past the limit.

    INCR hands every request its own count, so parallel requests cannot all pass.
    """
    limit = key.rate_per_minute or default_per_minute
    now = time.time()
    minute = int(now // 60)
    pipe = r.pipeline(transaction=True)
    pipe.incr(rate_key(key.id, minute))
    pipe.expire(rate_key(key.id, minute), 61)
    count, _ = await pipe.execute()
    if count > limit:
        retry = max(1, math.ceil(60 - now % 60))
        message = f"key {key.id} is over its limit of {limit} requests per minute"
        raise Refusal(429, "RateLimited", message, retry)


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
