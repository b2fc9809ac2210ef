"""Per-key limits: requests per minute, tasks in flight.

All counters live in Redis, so several gateway processes share them, and each limit is checked
and counted in one atomic step (INCR, or a Lua script), so parallel requests cannot overshoot
it. When a limit is hit the caller gets 429 with ``Retry-After`` in whole seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from producers.gateway.auth import ApiKey
from tasks.keys import in_flight_key, rate_key, task_key


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


# Count one task against its key's in-flight limit, or refuse it, in one step: with separate
# reads and writes, parallel requests all see room and all get in (30 got 202 under a limit of
# 3). KEYS: the key's in-flight zset. ARGV: task id, now, in-flight limit, the task record key
# of "" (for the prefix), grace, in-flight TTL. Returns {verdict, count}. Unfinished tasks
# count; finished ones (by their record's state) are dropped here; an id without a record
# counts for ``grace`` seconds (its submission is under way).
#
# The depth of a model's queue is not the gateway's to bound: the scheduler's admission does,
# atomically, for every way in (tasks/scheduler/, CORRAL_MAX_QUEUE_DEPTH).
_ADMIT = """
local in_flight, task_id, now = KEYS[1], ARGV[1], tonumber(ARGV[2])
local max_in_flight = tonumber(ARGV[3])
local record_prefix, grace, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
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
redis.call('ZADD', in_flight, now, task_id)
redis.call('EXPIRE', in_flight, math.ceil(ttl))
return {'admitted', 0}
"""
ADMIT_GRACE_S = 30.0  # longer than a submission takes, Redis reconnects included


@dataclass(frozen=True)
class Admission:
    """What :func:`admit` decided: ``admitted`` or ``in_flight``, and the count that was over
    its limit (unfinished tasks of the key)."""

    verdict: str
    count: int


async def admit(
    r: aioredis.Redis,
    task_id: str,
    key: ApiKey | None,
    *,
    default_in_flight: int,
    in_flight_ttl_s: float,
) -> Admission:
    """Count ``task_id`` against the key's in-flight limit, or refuse it, atomically. After an
    admission, call :func:`withdraw` if the submission fails."""
    if key is None:
        return Admission("admitted", 0)
    max_in_flight = key.max_in_flight or default_in_flight
    args = [task_id, time.time(), max_in_flight, task_key(""), ADMIT_GRACE_S, in_flight_ttl_s]
    verdict, count = await r.register_script(_ADMIT)(keys=[in_flight_key(key.id)], args=args)
    return Admission(verdict.decode(), int(count))


async def withdraw(r: aioredis.Redis, task_id: str, key: ApiKey | None) -> None:
    """Undo an admission whose submission failed: the task counts against no limit."""
    if key is not None:
        await r.zrem(in_flight_key(key.id), task_id)


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
