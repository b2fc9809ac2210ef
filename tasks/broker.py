"""kombu's Redis transport with its lost-message gap closed.

kombu takes a message off its queue with BRPOP and only then records it as unacknowledged (a
pipelined ZADD and HSET). Between the two, the message exists only in the worker's memory:

- if Redis goes away in that moment, kombu drops the message with the connection error;
- if the worker dies in that moment (SIGKILL, OOM), the message dies with it.

Redis with AOF has already persisted the pop, so neither case comes back on its own. Here:

1. **Record patiently.** The unacknowledged record is retried until Redis answers again (up to
   ``RECORD_PATIENCE_S``), so a Redis outage cannot drop a popped message.
2. **A ledger of messages not yet recorded.** Every push to a task queue also writes the message to
   ``corral:ledger`` in the same MULTI, and the worker's record removes it in the same MULTI
   as the unacked entry. An entry older than one sweep interval whose message is neither on
   its queue nor recorded as unacknowledged was lost in between; the periodic sweep (which
   also restores kombu's timed-out messages) pushes it back. It must be seen missing on two
   sweeps first, so a worker in the middle of recording is never second-guessed.
3. **A purge ends what it drops.** Purging a queue forgets its ledger entries too, and ends the
   tasks whose messages it removed (``cancelled``, reason "queue purged"), so that no stream
   waits forever for a run that will never come.
4. **Nothing on a queue stops the worker.** An item that is not a kombu message (not JSON, JSON
   nested too deep to decode, no delivery properties) would make kombu raise in the worker's
   read loop: the worker stops ("Unrecoverable error") and the popped item is lost. It is
   delivered instead as a stand-in message that carries the item as its body, which the
   worker's consumer settles (:mod:`tasks.malformed`).

:func:`install` makes kombu resolve ``redis://`` and ``rediss://`` to this transport, so URLs
keep their usual form (Flower reads them).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from queue import Empty
from typing import Any

import redis
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from tasks.keys import (
    LEDGER_INDEX_KEY,
    LEDGER_KEY,
    LEDGER_STATS_KEY,
    LEDGER_SUSPECTS_KEY,
    PRIORITY_SEP,
    QUEUE_PREFIX,
    lease_key,
    log_key,
    old_priority_lists,
    stream_channel,
    task_key,
)
from tasks.redis_url import SCHEMES  # the URL forms served by Redis (broker and backend)
from tasks.settings import Settings
from tasks.webhooks.outbox import TASK_LUA

log = logging.getLogger("corral.broker")

RECORD_PATIENCE_S = 120.0  # longer than any Redis restart worth waiting for
MAX_REQUEUES = 3  # a message that keeps vanishing (e.g. a foreign consumer) is given up
SWEEP_BATCH = 50  # ledger entries examined per sweep
CONFIRM_AFTER_S = 1.0  # a recording worker takes milliseconds; a lost message stays lost
TRANSPORT_PATH = "tasks.broker:Transport"
UNREADABLE_HEADER = "corral-unreadable"  # on a stand-in: why the queued item was not a message

# Both scripts take the ledger, its index and its suspects as KEYS[1..3].
_FORGET = """
local function forget(tag)
  redis.call('HDEL', KEYS[1], tag)
  redis.call('ZREM', KEYS[2], tag)
  redis.call('HDEL', KEYS[3], tag)
end
"""

# KEYS: ledger, ledger index, suspects, kombu's unacked hash, stats. ARGV: examine entries last seen
# before this time, now, batch size, requeue cap, requeue suspects seen missing before this
# time. Returns the tags requeued and given up. The queue keys come from the entries
# themselves (standalone Redis, as kombu requires).
_SWEEP = (
    _FORGET
    + """
local requeued, given_up = {}, {}
local tags = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, tag in ipairs(tags) do
  local raw = redis.call('HGET', KEYS[1], tag)
  local entry = raw and cjson.decode(raw)
  local missing_since = redis.call('HGET', KEYS[3], tag)
  if not entry or redis.call('HEXISTS', KEYS[4], tag) == 1 then
    forget(tag)
  elseif redis.call('LPOS', entry[1], entry[2]) then
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    redis.call('HDEL', KEYS[3], tag)
  elseif not missing_since then
    redis.call('HSET', KEYS[3], tag, ARGV[2])
  elseif tonumber(missing_since) > tonumber(ARGV[5]) then
    -- seen missing only just now: a worker may be recording it this very moment
  elseif (entry[3] or 0) >= tonumber(ARGV[4]) then
    forget(tag)
    table.insert(given_up, tag)
  else
    redis.call('RPUSH', entry[1], entry[2])
    entry[3] = (entry[3] or 0) + 1
    redis.call('HSET', KEYS[1], tag, cjson.encode(entry))
    redis.call('ZADD', KEYS[2], ARGV[2], tag)
    redis.call('HDEL', KEYS[3], tag)
    table.insert(requeued, tag)
  end
end
if #requeued > 0 then redis.call('HINCRBY', KEYS[5], 'requeued', #requeued) end
return {requeued, given_up}
"""
)


# end_task(id) ends a task that now never runs, so that nobody waits on it forever: its record
# says cancelled, and its stream gets a `cancelled` event unless it already ended (its webhook,
# if any, enters the outbox in the same step). A task that
# already finished, or whose lease a live worker holds (that worker ends it), is left alone.
# ARGV[1..7]: end_task_args() (also for the scheduler's purge of pending work).
END_TASK_LUA = (
    TASK_LUA
    + """
local records, leases, logs, channels = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local reason, maxlen, ttl = ARGV[5], ARGV[6], ARGV[7]
local finished = {succeeded = true, failed = true, cancelled = true}
local terminal = {done = true, error = true, cancelled = true}
local function end_task(id)
  local state = redis.call('HGET', records .. id, 'state')
  if finished[state] or redis.call('EXISTS', leases .. id) == 1 then return false end
  if state then redis.call('HSET', records .. id, 'state', 'cancelled') end
  local last, seq = redis.call('XREVRANGE', logs .. id, '+', '-', 'COUNT', 1)[1], 0
  if last then
    local event = cjson.decode(last[2][2])
    if terminal[event.type] then return true end
    seq = event.seq + 1
  end
  local event = cjson.encode({task_id = id, seq = seq, type = 'cancelled', reason = reason})
  redis.call('XADD', logs .. id, 'MAXLEN', '~', maxlen, '*', 'e', event)
  redis.call('EXPIRE', logs .. id, ttl)
  redis.call('PUBLISH', channels .. id, event)
  cancelled_webhook(event)
  return true
end
"""
)

# Purge a queue: take its messages off its list and the priority sub-lists earlier versions
# may have left, forget their ledger entries (or the sweep would bring them back), and end each
# task that now never runs (END_TASK_LUA). KEYS: ledger, ledger index, suspects, then the
# lists. ARGV: end_task_args(). Returns {messages purged, ids of the tasks ended}.
_PURGE = (
    _FORGET
    + END_TASK_LUA
    + """
local lists, purged, ended = {}, 0, {}
for i = 4, #KEYS do
  lists[KEYS[i]] = true
  for _, raw in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do
    purged = purged + 1
    local ok, message = pcall(cjson.decode, raw)
    local headers = ok and type(message) == 'table' and message.headers
    local id = type(headers) == 'table' and headers.id
    if type(id) == 'string' and end_task(id) then table.insert(ended, id) end
  end
  redis.call('DEL', KEYS[i])
end
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if lists[cjson.decode(entries[i + 1])[1]] then forget(entries[i]) end
end
return {purged, ended}
"""
)
PURGE_REASON = "queue purged"

# Move what earlier versions left in kombu's priority sub-lists onto the queue itself, which is
# all a worker now reads, and point their ledger entries (and those of messages popped from a
# sub-list and never recorded, which the sweep would push back there) at the queue. Oldest
# first, behind what the queue holds, as kombu served the sub-lists after the queue.
# KEYS: the ledger, then pairs (old sub-list, its queue). ARGV[1]: the sub-lists' separator as
# the entries' JSON spells it. Returns {messages moved, ledger entries fixed}.
_ADOPT = """
local target, moved, fixed = {}, 0, 0
for i = 2, #KEYS, 2 do
  target[KEYS[i]] = KEYS[i + 1]
  while redis.call('RPOPLPUSH', KEYS[i], KEYS[i + 1]) do moved = moved + 1 end
end
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if string.find(entries[i + 1], ARGV[1], 1, true) then
    local entry = cjson.decode(entries[i + 1])
    local queue = target[entry[1]]
    if queue then
      entry[1] = queue
      redis.call('HSET', KEYS[1], entries[i], cjson.encode(entry))
      fixed = fixed + 1
    end
  end
end
return {moved, fixed}
"""


@dataclass(frozen=True)
class Purged:
    """What a purge removed: how many messages, and the tasks it ended as cancelled."""

    messages: int
    ended: list[str]


def purge_queue(
    client: redis.Redis, sublists: list[str], *, log_maxlen: int, log_ttl_s: int
) -> Purged:
    """Purge a task queue (given as its Redis lists, ``sublists``) and end the tasks it held."""
    keys = [LEDGER_KEY, LEDGER_INDEX_KEY, LEDGER_SUSPECTS_KEY, *sublists]
    args = end_task_args(log_maxlen=log_maxlen, log_ttl_s=log_ttl_s)
    purged, ended = client.register_script(_PURGE)(keys=keys, args=args, client=client)
    return Purged(int(purged), [task_id.decode() for task_id in ended])


def adopt_old_priority_lists(client: redis.Redis, queues: list[str]) -> tuple[int, int]:
    """Move messages an earlier version left in ``queues``' priority sub-lists (never read
    now) onto the queues, in one atomic step; returns (messages moved, ledger entries fixed)."""
    keys = [LEDGER_KEY]
    for queue in queues:
        for old in old_priority_lists(queue):
            keys += [old, queue]
    escaped = dumps(PRIORITY_SEP)[1:-1]
    moved, fixed = client.register_script(_ADOPT)(keys=keys, args=[escaped], client=client)
    return int(moved), int(fixed)


def end_task_args(*, log_maxlen: int, log_ttl_s: int) -> list[str | int]:
    """The ARGV of :data:`END_TASK_LUA`: the key prefixes, the reason, the log's cap and TTL."""
    return [
        task_key(""),
        lease_key(""),
        log_key(""),
        stream_channel(""),
        PURGE_REASON,
        log_maxlen,
        log_ttl_s,
    ]


def add_to_ledger(pipe: Any, tag: str, queue_key: str, raw: str) -> None:
    """Note, in ``pipe``, a message pushed to ``queue_key`` and not yet taken by a worker."""
    pipe.hset(LEDGER_KEY, tag, dumps([queue_key, raw]))
    pipe.zadd(LEDGER_INDEX_KEY, {tag: time.time()})


def sweep_ledger(
    client: redis.Redis, older_than_s: float, confirm_after_s: float = CONFIRM_AFTER_S
) -> tuple[list[str], list[str]]:
    """Push back messages lost between pop and record; returns (requeued, given up) tags.

    An entry is examined once it is ``older_than_s`` old, and requeued when it is still missing
    ``confirm_after_s`` after it was first seen missing.
    """
    now = time.time()
    script = client.register_script(_SWEEP)
    keys = [
        LEDGER_KEY,
        LEDGER_INDEX_KEY,
        LEDGER_SUSPECTS_KEY,
        kombu_redis.Channel.unacked_key,
        LEDGER_STATS_KEY,
    ]
    args = [now - older_than_s, now, SWEEP_BATCH, MAX_REQUEUES, now - confirm_after_s]
    requeued, given_up = script(keys=keys, args=args, client=client)
    return [t.decode() for t in requeued], [t.decode() for t in given_up]


class DurableQoS(kombu_redis.QoS):
    """Records each delivery as unacknowledged, through a Redis outage, and clears its ledger
    entry in the same step; its periodic sweep also recovers what the ledger shows lost."""

    def append(self, message: Any, delivery_tag: str) -> None:
        give_up_at = time.monotonic() + RECORD_PATIENCE_S
        delay_s = 0.05
        while True:
            try:
                self._record(message, delivery_tag)
                return
            except self.channel.connection_errors as exc:
                if time.monotonic() >= give_up_at:
                    log.error(
                        "could not record message %s as unacknowledged: %s; the ledger "
                        "sweep will queue it again",
                        delivery_tag,
                        exc,
                    )
                    raise
                log.warning(
                    "Redis unavailable while recording message %s (%s); retrying", delivery_tag, exc
                )
                time.sleep(delay_s)
                delay_s = min(1.0, delay_s * 2)

    def _record(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        entry = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, entry)
            pipe.hdel(LEDGER_KEY, delivery_tag)
            pipe.zrem(LEDGER_INDEX_KEY, delivery_tag)
            pipe.execute()
        virtual.QoS.append(self, message, delivery_tag)  # kombu's in-memory bookkeeping

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        super().restore_visible(start, num, interval)
        if (self._vrestore_count - 1) % (interval or 1):
            return  # kombu's throttle skipped this call; so does the ledger
        # A message lost between pop and record is gone at once; the ledger looks at entries
        # one sweep interval old, so recovery takes about three intervals, not the timeout.
        older_than_s = min(self.visibility_timeout, self.channel.unacked_restore_interval)
        try:
            with self.channel.conn_or_acquire() as client:
                requeued, given_up = sweep_ledger(client, older_than_s)
        except redis.ResponseError as exc:  # e.g. a Redis without LPOS (before 6.0.6)
            log.error("the ledger sweep failed: %s", exc)
            return
        for tag in requeued:
            log.warning("message %s was lost between pop and record; queued it again", tag)
        for tag in given_up:
            log.error("message %s vanished %d times; no longer queued again", tag, MAX_REQUEUES)


class Channel(kombu_redis.Channel):
    QoS = DurableQoS
    # The replay log of a task that a purge ends (celery_config passes CORRAL_STREAM_*).
    from_transport_options = (  # type: ignore[assignment]  # kombu types it by its length
        *kombu_redis.Channel.from_transport_options,
        "corral_stream_maxlen",
        "corral_stream_ttl_s",
    )
    corral_stream_maxlen = Settings.model_fields["stream_maxlen"].default
    corral_stream_ttl_s = Settings.model_fields["stream_ttl_s"].default
    _sync_client: Any = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new client object for every command (acks, records, publishes),
        which costs more CPU than the command; one per connection pool serves every thread."""
        if client:
            yield client
            return
        cached = self._sync_client
        if cached is None or cached.connection_pool is not self.pool:
            cached = self._sync_client = self._create_client()
        yield cached

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        tag = message.get("properties", {}).get("delivery_tag")
        plain = kwargs.get("_publish_batch") is None and queue not in self._expires
        if tag is None or not queue.startswith(QUEUE_PREFIX) or not plain:
            super()._put(queue, message, **kwargs)
            return
        key = self._queue_key(queue, message)
        raw = dumps(message)
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.lpush(key, raw)
            add_to_ledger(pipe, tag, key, raw)
            pipe.execute()

    def _do_restore_message(
        self,
        payload: dict[str, Any],
        exchange: str,
        routing_key: str,
        pipe: Any,
        leftmost: bool = False,
    ) -> None:
        """A message put back on its queue is again at risk between pop and record."""
        super()._do_restore_message(payload, exchange, routing_key, pipe, leftmost)
        tag = payload.get("properties", {}).get("delivery_tag")
        queues = self._lookup(exchange, routing_key) if tag else ()
        for queue in (q for q in queues if q.startswith(QUEUE_PREFIX)):
            add_to_ledger(pipe, tag, self._queue_key(queue, payload), dumps(payload))

    def _queue_key(self, queue: str, message: dict[str, Any]) -> str:
        """The priority sub-list ``message`` goes to, as kombu chooses it."""
        return str(self._q_for_pri(queue, self._get_message_priority(message, reverse=False)))

    def _purge(self, queue: str) -> int:
        """``celery purge`` and ``queue_purge``: also end the purged tasks (see _PURGE)."""
        if not queue.startswith(QUEUE_PREFIX):
            return int(super()._purge(queue))
        current = [self._q_for_pri(queue, p) for p in self.priority_steps]
        sublists = list(dict.fromkeys([*current, *old_priority_lists(queue)]))
        with self.conn_or_acquire() as client:
            purged = purge_queue(
                client,
                sublists,
                log_maxlen=self.corral_stream_maxlen,
                log_ttl_s=self.corral_stream_ttl_s,
            )
        return purged.messages

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's, delivering a stand-in for an item that is not a kombu message."""
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next read reconnects
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            self.connection._deliver(self._message_or_stand_in(item, queue), queue)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu does
            flush_reauth = getattr(self, "_flush_brpop_reauth", None)  # kombu >= 5.6
            if flush_reauth is not None:
                flush_reauth()

    def _message_or_stand_in(self, item: bytes, queue: str) -> dict[str, Any]:
        try:
            payload = loads(bytes_to_str(item))
            problem = self._envelope_problem(payload)
        except Exception as exc:  # not JSON, or nested deeper than the decoder goes
            payload, problem = None, f"{type(exc).__name__}: {str(exc)[:300]}"
        if problem is None:
            return payload  # type: ignore[no-any-return]
        log.error("an item on %s is not a kombu message (%s); settling it", queue, problem)
        return stand_in(item, queue, problem, payload)

    def _envelope_problem(self, payload: Any) -> str | None:
        """Why kombu could not build a message from ``payload``, or None."""
        if not isinstance(payload, dict):
            return "not a JSON object"
        properties = payload.get("properties")
        if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
            return "no properties.delivery_tag"
        info = properties.get("delivery_info")
        if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
            return "no properties.delivery_info"
        body = payload.get("body")
        if body is not None and not isinstance(body, str):
            return "the body is not text"
        try:
            self.decode_body(body, properties.get("body_encoding"))
        except Exception as exc:
            return f"the body cannot be read as {properties.get('body_encoding')}: {exc}"
        return None


def stand_in(item: bytes, queue: str, problem: str, payload: Any = None) -> dict[str, Any]:
    """A kombu message carrying ``item``, marked unreadable, for the consumer to settle; it
    keeps the item's task id when one can be read."""
    headers: dict[str, Any] = {UNREADABLE_HEADER: problem}
    found = payload.get("headers") if isinstance(payload, dict) else None
    if isinstance(found, dict) and isinstance(found.get("id"), str):
        headers["id"] = found["id"]
    return {
        "body": base64.b64encode(item).decode(),
        "content-type": "application/octet-stream",
        "content-encoding": "binary",
        "headers": headers,
        "properties": {
            "delivery_tag": uuid.uuid4().hex,
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
        },
    }


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Serve ``redis://`` and ``rediss://`` broker URLs with :class:`Transport` in this process."""
    for scheme in SCHEMES:
        TRANSPORT_ALIASES[scheme] = TRANSPORT_PATH
