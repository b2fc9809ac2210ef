"""The webhook outbox: durable deliveries in Redis, claimed atomically, retried, dead-lettered.

A delivery is a hash (:func:`tasks.keys.webhook_key`: url, body, attempts, last error) and its
id in one of two sorted sets: ``due`` by the time of its next attempt, or ``dead`` once its
attempts ran out. A deliverer *claims* due deliveries in one script that also pushes their due
time past the claim's lease, so two deliverers never send the same attempt at once, and a
deliverer that dies mid-send leaves its claim to lapse and the delivery to be sent again (at
least once: receivers dedupe on ``webhook-id``).

Task webhooks are enqueued in the same atomic step as the task's terminal event: the worker's
(:class:`tasks.publisher.StreamPublisher`), a producer's cancel of a queued task
(:mod:`tasks.lifecycle`) and a queue purge (:mod:`tasks.broker`) all run :data:`TASK_LUA`,
which reads the callback URL from the task record. Other parts (batches) call
:func:`enqueue_webhook`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from tasks.keys import WEBHOOK_DEAD_KEY, WEBHOOK_DUE_KEY, task_key, webhook_key

CALLBACK_FIELD = "callback_url"  # in the task record (corral:task:<id>)
DELIVERED_KEPT_S = 86400  # how long a delivered webhook's id still dedupes an enqueue

# Lua functions shared by every script that ends a task. task_webhook(id, status, field, json)
# enqueues {"type": "task.<status>", "data": {id, kind, model, status, <field>: json}} once per
# task, if its record names a callback URL. The body is assembled as text: cjson would turn an
# empty list into {} and round floats. cancelled_webhook(event) does it for a `cancelled`
# stream event written by a script.
TASK_LUA = f"""
local function task_webhook(id, status, field, outcome)
  local record = '{task_key("")}' .. id
  local url = redis.call('HGET', record, '{CALLBACK_FIELD}')
  if not url or redis.call('HSETNX', record, 'webhook', 1) == 0 then return end
  local kind = redis.call('HGET', record, 'kind') or ''
  local model = redis.call('HGET', record, 'model') or ''
  local body = '{{"type":"task.' .. status .. '","data":{{"id":' .. cjson.encode(id)
    .. ',"kind":' .. cjson.encode(kind) .. ',"model":' .. cjson.encode(model)
    .. ',"status":"' .. status .. '","' .. field .. '":' .. outcome .. '}}}}'
  local clock = redis.call('TIME')
  local now = clock[1] .. '.' .. string.format('%06d', clock[2])
  local msg = 'msg_' .. id
  redis.call('HSET', '{webhook_key("")}' .. msg, 'url', url, 'body', body, 'attempts', 0,
             'created_at', now, 'type', 'task.' .. status)
  redis.call('ZADD', '{WEBHOOK_DUE_KEY}', now, msg)
end
local function cancelled_webhook(event)
  local e = cjson.decode(event)
  local err = cjson.encode({{type = 'TaskCancelled', message = e.reason, retryable = false,
                             task_id = e.task_id}})
  task_webhook(e.task_id, 'cancelled', 'error', err)
end
"""

# ARGV: task id, terminal event type (done, error, cancelled), the result or error as JSON.
_TASK_END = (
    TASK_LUA
    + """
local statuses = {done = {'succeeded', 'result'}, error = {'failed', 'error'},
                  cancelled = {'cancelled', 'error'}}
local s = statuses[ARGV[2]]
task_webhook(ARGV[1], s[1], s[2], ARGV[3])
"""
)

# enqueue_once(id, url, type, body): a delivery, unless its id exists already (pending, dead, or
# delivered within DELIVERED_KEPT_S). For scripts that enqueue in the same step as another change
# (a batch's final status: tasks/batches/).
ENQUEUE_LUA = f"""
local function enqueue_once(id, url, type, body)
  local key = '{webhook_key("")}' .. id
  if redis.call('EXISTS', key) == 1 then return 0 end
  local clock = redis.call('TIME')
  local now = clock[1] .. '.' .. string.format('%06d', clock[2])
  redis.call('HSET', key, 'url', url, 'body', body, 'attempts', 0, 'created_at', now,
             'type', type)
  redis.call('ZADD', '{WEBHOOK_DUE_KEY}', now, id)
  return 1
end
"""
_ENQUEUE_ONCE = ENQUEUE_LUA + "return enqueue_once(ARGV[1], ARGV[2], ARGV[3], ARGV[4])"

# KEYS: the delivery, due. ARGV: url, body, type, now. Nothing changes if the id exists already.
_ENQUEUE = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'url', ARGV[1], 'body', ARGV[2], 'attempts', 0, 'created_at',
           ARGV[4], 'type', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], string.sub(KEYS[1], {len(webhook_key("")) + 1}))
return 1
"""

# KEYS: due. ARGV: now, lease end, limit. Claims due deliveries: each one's next due time
# becomes the lease end and its attempts count goes up. Returns {id, url, body, attempt}...
_CLAIM = f"""
local out = {{}}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])) do
  local key = '{webhook_key("")}' .. id
  local fields = redis.call('HMGET', key, 'url', 'body')
  if not fields[1] then
    redis.call('ZREM', KEYS[1], id)  -- its record is gone: nothing to send
  else
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    local attempt = redis.call('HINCRBY', key, 'attempts', 1)
    table.insert(out, id)
    table.insert(out, fields[1])
    table.insert(out, fields[2])
    table.insert(out, attempt)
  end
end
return out
"""

# KEYS: the delivery, due, dead. ARGV: id, attempt, error, next due time or '' (given up), now.
# Only the claim that made this attempt may settle it (a lapsed claim was taken over).
_FAILED = """
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'last_error', ARGV[3], 'last_attempt_at', ARGV[5])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
return 1
"""

# KEYS: due, dead. ARGV: now, then ids (none: every dead delivery). Returns the ids revived.
_RETRY = f"""
local ids = {{}}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then ids = redis.call('ZRANGE', KEYS[2], 0, -1) end
local revived = {{}}
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[2], id) == 1 then
    redis.call('HSET', '{webhook_key("")}' .. id, 'attempts', 0)
    redis.call('ZADD', KEYS[1], ARGV[1], id)
    table.insert(revived, id)
  end
end
return revived
"""


@dataclass(frozen=True)
class Claimed:
    """One attempt of one delivery, claimed by a deliverer."""

    id: str
    url: str
    body: str
    attempt: int


@dataclass(frozen=True)
class Webhook:
    """A delivery as ``corral webhooks list`` shows it."""

    id: str
    type: str
    url: str
    attempts: int
    created_at: float
    last_error: str
    last_attempt_at: float | None
    body: str


def _script(client: Any, source: str) -> Any:
    return client.register_script(source)


def enqueue_webhook(
    client: redis.Redis,
    url: str,
    type: str,
    data: dict[str, Any],
    *,
    webhook_id: str | None = None,
) -> str:
    """Put a ``{"type": type, "data": data}`` delivery to ``url`` in the outbox; return its id.

    For events other than a task's end (``batch.completed``...). Check ``url`` first with
    :func:`tasks.webhooks.check_callback_url` when it is given (at submission, not here). With
    ``webhook_id`` (e.g. ``msg_<batch id>_completed``), enqueueing the same id again (while it
    is pending or dead, or up to a day after its delivery) does nothing, so a caller that
    retries after a crash does not send twice.
    """
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    body = webhook_body(type, data)
    keys = [webhook_key(webhook_id), WEBHOOK_DUE_KEY]
    _script(client, _ENQUEUE)(keys=keys, args=[url, body, type, repr(time.time())], client=client)
    return webhook_id


def webhook_body(type: str, data: dict[str, Any]) -> str:
    """The JSON a delivery POSTs: ``{"type": type, "data": data}``."""
    return json.dumps({"type": type, "data": data}, separators=(",", ":"), ensure_ascii=False)


def queue_webhook(client: Any, webhook_id: str, url: str, type: str, data: dict[str, Any]) -> None:
    """In ``client`` (a pipeline, to be atomic with the change it reports): enqueue a delivery
    once per ``webhook_id``, as :func:`enqueue_webhook` does."""
    client.eval(_ENQUEUE_ONCE, 0, webhook_id, url, type, webhook_body(type, data))


def queue_task_webhook(client: Any, task_id: str, event_type: str, outcome: dict[str, Any]) -> None:
    """In ``client`` (a pipeline, to be atomic with the terminal event): enqueue the task's
    webhook if it has a callback URL. ``outcome`` is the result (``done``) or the error."""
    text = json.dumps(outcome, separators=(",", ":"), ensure_ascii=False)
    # EVAL with the text, not EVALSHA: in a pipeline, redis-py checks for the script first (a
    # round trip more per task), and a NOSCRIPT inside MULTI would lose the webhook.
    client.eval(_TASK_END, 0, task_id, event_type, text)


def claim(client: redis.Redis, limit: int, lease_s: float) -> list[Claimed]:
    """Take up to ``limit`` due deliveries for ``lease_s`` seconds (their attempt counts)."""
    now = time.time()
    args = [repr(now), repr(now + lease_s), limit]
    flat = _script(client, _CLAIM)(keys=[WEBHOOK_DUE_KEY], args=args, client=client)
    return [
        Claimed(flat[i].decode(), flat[i + 1].decode(), flat[i + 2].decode(), int(flat[i + 3]))
        for i in range(0, len(flat), 4)
    ]


def delivered(client: redis.Redis, webhook_id: str) -> None:
    """The receiver accepted it: out of the outbox. The record stays for a while, so that
    enqueueing the same id again is still a no-op."""
    pipe = client.pipeline(transaction=True)
    pipe.zrem(WEBHOOK_DUE_KEY, webhook_id)
    pipe.hset(webhook_key(webhook_id), "delivered_at", repr(time.time()))
    pipe.expire(webhook_key(webhook_id), DELIVERED_KEPT_S)
    pipe.execute()


def failed(client: redis.Redis, claimed: Claimed, error: str, retry_at: float | None) -> None:
    """An attempt failed: due again at ``retry_at``, or dead (None)."""
    keys = [webhook_key(claimed.id), WEBHOOK_DUE_KEY, WEBHOOK_DEAD_KEY]
    later = "" if retry_at is None else repr(retry_at)
    args = [claimed.id, claimed.attempt, error[:500], later, repr(time.time())]
    _script(client, _FAILED)(keys=keys, args=args, client=client)


def dead_webhooks(client: redis.Redis) -> list[Webhook]:
    """Deliveries that exhausted their attempts, oldest first."""
    return [w for i in _ids(client, WEBHOOK_DEAD_KEY) if (w := _read(client, i)) is not None]


def pending_webhooks(client: redis.Redis) -> list[Webhook]:
    """Deliveries still to be sent (or being sent), by next attempt."""
    return [w for i in _ids(client, WEBHOOK_DUE_KEY) if (w := _read(client, i)) is not None]


def retry_dead(client: redis.Redis, ids: list[str] | None = None) -> list[str]:
    """Give dead deliveries (``ids``, or all) a fresh set of attempts, due now."""
    args = [repr(time.time()), *(ids or [])]
    keys = [WEBHOOK_DUE_KEY, WEBHOOK_DEAD_KEY]
    revived = _script(client, _RETRY)(keys=keys, args=args, client=client)
    return [i.decode() for i in revived]


def _ids(client: redis.Redis, key: str) -> list[str]:
    ids: list[bytes] = client.zrange(key, 0, -1)  # type: ignore[assignment]
    return [i.decode() for i in ids]


def _read(client: redis.Redis, webhook_id: str) -> Webhook | None:
    raw: dict[bytes, bytes] = client.hgetall(webhook_key(webhook_id))  # type: ignore[assignment]
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    last = fields.get("last_attempt_at")
    return Webhook(
        id=webhook_id,
        type=fields.get("type", ""),
        url=fields.get("url", ""),
        attempts=int(fields.get("attempts", 0)),
        created_at=float(fields.get("created_at", 0)),
        last_error=fields.get("last_error", ""),
        last_attempt_at=float(last) if last else None,
        body=fields.get("body", ""),
    )
