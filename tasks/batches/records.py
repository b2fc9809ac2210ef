"""A batch's record in Redis: its options, status and counters, and each owner's list.

Every change is one atomic step (a Lua script or a single command), so that a submitter, a
collector and a canceller in different processes, any of which may die at any point, never
count a line twice or lose a status change.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from tasks.errors import InvalidRequest, TaskNotFound
from tasks.keys import (
    BATCHES_ACTIVE_KEY,
    batch_key,
    batch_lines_key,
    batch_open_key,
    batch_rejected_key,
    batches_key,
)
from tasks.webhooks import outbox
from tasks.webhooks.outbox import ENQUEUE_LUA

VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
TERMINAL = (COMPLETED, FAILED, EXPIRED, CANCELLED)
DEFAULT_PRIORITY = 2  # the scheduler's batch lane: interactive work (5) overtakes it
STORE_REDIS = "redis"
STORE_FILE = "file"

# Record a submitted line once; the answer is why to stop ('' to go on).
# KEYS: record, lines, open. ARGV: custom_id, task id, the open entry.
_ACCEPT = """
local stop = redis.call('HGET', KEYS[1], 'stop')
if stop then return stop end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'total', 1)
end
return ''
"""

# Record a refused line once. KEYS: record, rejected. ARGV: entry, error line.
_REJECT = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'total', 1)
  redis.call('HINCRBY', KEYS[1], 'failed', 1)
end
return 1
"""

# The submitter read its whole input: the batch runs, or fails when no line was valid (then
# its batch.failed webhook is enqueued in the same step, once).
# KEYS: record, lines, active. ARGV: now, batch id, callback url or '', webhook body, its id.
_READ_DONE = (
    ENQUEUE_LUA
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'validating' then return 0 end
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'failed_at', ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[2])
  if ARGV[3] ~= '' then enqueue_once(ARGV[5], ARGV[3], 'batch.failed', ARGV[4]) end
else
  redis.call('HSET', KEYS[1], 'status', 'in_progress', 'in_progress_at', ARGV[1])
end
return 1
"""
)

# Ask a batch to stop (cancel or expiry), unless it already ended or is stopping.
# KEYS: record. ARGV: why (cancelled, expired), the status to show, now.
_STOP = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'completed' or status == 'failed' or status == 'expired'
   or status == 'cancelled' or redis.call('HEXISTS', KEYS[1], 'stop') == 1 then
  return status
end
redis.call('HSET', KEYS[1], 'stop', ARGV[1], ARGV[1] == 'cancelled' and 'cancelling_at'
           or 'expiring_at', ARGV[3])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[2]) end
return 'stopping'
"""


@dataclass
class BatchInfo:
    """What a batch's record says: OpenAI's batch object, plus corral's own fields."""

    id: str
    status: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window_s: float
    created_at: float
    expires_at: float
    priority: int = DEFAULT_PRIORITY
    tenant: str = "default"
    store: str = STORE_REDIS
    total: int = 0
    completed: int = 0
    failed: int = 0
    stop: str | None = None
    callback_url: str | None = None  # batch.completed, .failed, .expired, .cancelled go there
    input_path: str = ""  # where a submitter that resumes the batch reads its input
    root: str = ""  # the CORRAL_BATCH_DIR its files are under (the store "file")
    models: list[str] = field(default_factory=list)  # the lines may name only these (empty: any)
    metadata: dict[str, str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)  # in_progress_at, completed_at...

    @property
    def done(self) -> int:
        return self.completed + self.failed

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds until every line is done at the rate seen so far (None before one is)."""
        if self.ended:
            return 0.0
        elapsed = (now or time.time()) - self.created_at
        if self.done == 0 or elapsed <= 0:
            return None
        return max(self.total - self.done, 0) * elapsed / self.done

    def to_openai(self) -> dict[str, Any]:
        """The batch as OpenAI's ``batch`` object (the gateway serves it as is)."""
        window = (
            f"{int(self.completion_window_s // 3600)}h"
            if self.completion_window_s >= 3600
            else f"{int(self.completion_window_s)}s"
        )
        times = {
            f"{name}_at": (int(self.times[f"{name}_at"]) if f"{name}_at" in self.times else None)
            for name in (
                "in_progress",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            )
        }
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None,
            "input_file_id": self.input_file_id,
            "completion_window": window,
            "status": self.status,
            # As OpenAI's: null until the batch has such a line (the commit counts a line
            # once it is stored). The files grow as lines end, so a running batch names them.
            "output_file_id": f"{self.id}-output" if self.completed else None,
            "error_file_id": f"{self.id}-errors" if self.failed else None,
            "created_at": int(self.created_at),
            "expires_at": int(self.expires_at),
            **times,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata or None,
        }


WEBHOOK_TYPES = {s: f"batch.{s}" for s in TERMINAL}


def webhook_id(batch_id: str) -> str:
    """The id of the batch's one terminal webhook (its ``webhook-id``): enqueueing it again is
    a no-op, whichever process gives the batch its final status."""
    return f"msg_{batch_id}"


def webhook_body(type: str, info: BatchInfo) -> str:
    return outbox.webhook_body(type, info.to_openai())


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def create(client: redis.Redis, info: BatchInfo) -> bool:
    """Store a new batch's record; False (and nothing changed) when the id exists already."""
    record: dict[Any, Any] = {
        "status": info.status,
        "owner": info.owner,
        "endpoint": info.endpoint,
        "input_file_id": info.input_file_id,
        "completion_window_s": info.completion_window_s,
        "created_at": info.created_at,
        "expires_at": info.expires_at,
        "priority": info.priority,
        "tenant": info.tenant,
        "store": info.store,
        "total": 0,
        "completed": 0,
        "failed": 0,
        "metadata": json.dumps(info.metadata),
        "input_path": info.input_path,
        "root": info.root,
        "models": json.dumps(info.models),
    }
    if info.callback_url:
        record["callback_url"] = info.callback_url
    if not client.hsetnx(batch_key(info.id), "status", info.status):
        return False
    pipe = client.pipeline(transaction=True)
    pipe.hset(batch_key(info.id), mapping=record)
    pipe.zadd(batches_key(info.owner), {info.id: info.created_at})
    pipe.zadd(BATCHES_ACTIVE_KEY, {info.id: info.created_at})
    pipe.execute()
    return True


def load(client: redis.Redis, batch_id: str) -> BatchInfo:
    """The batch's record, or :class:`TaskNotFound` for an unknown (or expired) id."""
    raw = {text(k): text(v) for k, v in client.hgetall(batch_key(batch_id)).items()}
    if "owner" not in raw:
        raise TaskNotFound(
            f"no batch {batch_id} exists (or its records expired); "
            "`corral batch list` shows the batches",
            task_id=batch_id,
        )
    times = {
        k: float(v)
        for k, v in raw.items()
        if k.endswith("_at") and k != "created_at" and k != "expires_at"
    }
    return BatchInfo(
        id=batch_id,
        status=raw["status"],
        owner=raw["owner"],
        endpoint=raw.get("endpoint", ""),
        input_file_id=raw.get("input_file_id", ""),
        tenant=raw.get("tenant", "default"),
        store=raw.get("store", STORE_REDIS),
        stop=raw.get("stop"),
        callback_url=raw.get("callback_url") or None,
        input_path=raw.get("input_path", ""),
        root=raw.get("root", ""),
        models=json.loads(raw.get("models") or "[]"),
        metadata=json.loads(raw.get("metadata") or "{}"),
        times=times,
        priority=int(raw.get("priority", DEFAULT_PRIORITY)),
        total=int(raw.get("total", 0)),
        completed=int(raw.get("completed", 0)),
        failed=int(raw.get("failed", 0)),
        completion_window_s=float(raw.get("completion_window_s", 0)),
        created_at=float(raw.get("created_at", 0)),
        expires_at=float(raw.get("expires_at", 0)),
    )


def list_ids(
    client: redis.Redis, owner: str, *, after: str | None = None, limit: int = 20
) -> tuple[list[str], bool]:
    """An owner's batch ids, newest first, starting after the id ``after``; and whether more
    follow (OpenAI's ``after``/``limit``/``has_more``)."""
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit: expected 1 to 100", field="limit")
    key = batches_key(owner)
    if after is not None:
        rank = client.zrevrank(key, after)
        if not isinstance(rank, int):
            raise InvalidRequest(
                f"after: no batch {after!r} of this owner; pass an id from the previous page",
                field="after",
            )
        ids = client.zrevrange(key, rank + 1, rank + limit + 1)
    else:
        ids = client.zrevrangebyscore(key, "+inf", "-inf", start=0, num=limit + 1)
    names = [text(i) for i in ids]
    return names[:limit], len(names) > limit


class Records:
    """The atomic steps on a batch's record, as scripts registered once per Redis client."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._accept = client.register_script(_ACCEPT)
        self._reject = client.register_script(_REJECT)
        self._read_done = client.register_script(_READ_DONE)
        self._stop = client.register_script(_STOP)

    def accept(self, batch_id: str, custom_id: str, task_id: str, entry: dict[str, Any]) -> str:
        """Record a submitted line (once); answers why to stop submitting ('' to go on)."""
        keys = [batch_key(batch_id), batch_lines_key(batch_id), batch_open_key(batch_id)]
        answer = self._accept(keys=keys, args=[custom_id, task_id, json.dumps(entry)])
        return answer.decode() if isinstance(answer, bytes) else str(answer or "")

    def reject(self, batch_id: str, entry: str, line: str) -> None:
        self._reject(keys=[batch_key(batch_id), batch_rejected_key(batch_id)], args=[entry, line])

    def read_done(self, batch_id: str) -> None:
        """The whole input was read: the batch runs on, or fails if no line was valid."""
        info = load(self.redis, batch_id)
        now = time.time()
        failed = replace(info, status=FAILED, times={**info.times, "failed_at": now})
        keys = [batch_key(batch_id), batch_lines_key(batch_id), BATCHES_ACTIVE_KEY]
        body = webhook_body(WEBHOOK_TYPES[FAILED], failed)
        args: list[str | float] = [now, batch_id, info.callback_url or "", body]
        args.append(webhook_id(batch_id))
        self._read_done(keys=keys, args=args)

    def stop(self, batch_id: str, why: str, shown: str = "") -> str | None:
        """Ask the batch to stop; answers ``stopping``, or the status it had already ended in."""
        answer = self._stop(keys=[batch_key(batch_id)], args=[why, shown, time.time()])
        return answer.decode() if isinstance(answer, bytes) else answer

    def submitted(self, batch_id: str, custom_ids: list[str]) -> list[bool]:
        """Which of these lines were submitted already (a resumed submission skips them)."""
        if not custom_ids:
            return []
        found = self.redis.hmget(batch_lines_key(batch_id), custom_ids)
        return [value is not None for value in found]
