"""The model queues: their depths, which of them to show, and purging one.

A model's depth is its whole backlog: the messages in its Celery queue (one Redis list,
:func:`sublists`) plus the tasks the scheduler still holds for it (tasks/scheduler/), which reach
the Celery queue only as slots free. Every reader counts it through :data:`DEPTH_LUA`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from tasks.broker import PURGE_REASON, Purged, purge_queue
from tasks.errors import TaskCancelled
from tasks.keys import (
    KOMBU_BINDING_PREFIX,
    MODELS_KEY,
    PRIORITY_STEPS,
    QUEUE_PREFIX,
    SCHED_HOSTS_KEY,
    SCHED_MODELS_KEY,
    canonical_model,
    model_of_queue,
    old_priority_lists,
    priority_list,
    queue_name,
    sched_host_key,
    sched_waiting_key,
)
from tasks.registry import WorkerInfo
from tasks.scheduler import HostState, Scheduler
from tasks.settings import Settings

if TYPE_CHECKING:
    from celery.backends.base import Backend

SCAN_COUNT = 1000  # keys per SCAN step of index_existing()


@dataclass(frozen=True)
class QueueDepth:
    model: str
    queue: str
    waiting: int  # in the Celery queue, plus held by the scheduler


def known_queues(client: redis.Redis) -> list[str]:
    """Every model queue: models ever submitted or served, and queues declared by hand that
    :func:`index_existing` found. Read from the indexes: no keyspace scan."""
    return sorted(queues_of(client.sunion([MODELS_KEY, SCHED_MODELS_KEY])))


def queues_of(models: Iterable[bytes]) -> set[str]:
    """The queues of the models in :data:`MODELS_KEY` and :data:`SCHED_MODELS_KEY` (their
    names as stored: a queue declared by hand may be outside the model grammar)."""
    return {QUEUE_PREFIX + m.decode() for m in models} - {QUEUE_PREFIX + "default"}


def index_existing(client: redis.Redis) -> None:
    """Enter in the indexes the queues and hosts of data written before them, or outside
    corral: kombu's bindings of queues declared by hand, and the scheduler's host hashes.

    Two SCANs of the keyspace, whose cost grows with the tasks in Redis: the exporter runs it
    once when it starts, never per scrape. Everything corral writes keeps the indexes itself.
    """
    binding = KOMBU_BINDING_PREFIX + QUEUE_PREFIX
    models = {
        key.decode().removeprefix(binding)
        for key in client.scan_iter(match=binding + "*", count=SCAN_COUNT)
    }
    prefix = sched_host_key("")
    hosts = {
        key.decode().removeprefix(prefix)
        for key in client.scan_iter(match=sched_host_key("*"), count=SCAN_COUNT)
    }
    pipe = client.pipeline(transaction=False)
    if models:
        pipe.sadd(MODELS_KEY, *models)
    if hosts:
        pipe.sadd(SCHED_HOSTS_KEY, *hosts)
    pipe.execute()


def sublists(queue: str) -> list[str]:
    """The Redis lists kombu pushes ``queue``'s messages to (one: see PRIORITY_STEPS)."""
    return [priority_list(queue, step) for step in PRIORITY_STEPS]


# The one definition of a queue's depth, for every reader (sync, asyncio, Flower): the waiting
# messages in its Redis lists (:func:`sublists`), plus the tasks the scheduler holds for its
# model. KEYS holds the keys of queue 1, then of queue 2...: its sub-lists, then its scheduler
# zset (see depth_keys()); ARGV[1] is DEPTH_ARGS[0], the number of keys per queue.
DEPTH_LUA = """
local steps = tonumber(ARGV[1])
local function depth(q)
  local n = redis.call('ZCARD', KEYS[q * steps])
  for i = (q - 1) * steps + 1, q * steps - 1 do n = n + redis.call('LLEN', KEYS[i]) end
  return n
end
"""
DEPTHS_LUA = (
    DEPTH_LUA
    + """
local depths = {}
for q = 1, #KEYS / steps do depths[q] = depth(q) end
return depths
"""
)
DEPTH_ARGS = (len(PRIORITY_STEPS) + 1,)


def depth_keys(queues: list[str]) -> list[str]:
    """The KEYS of :data:`DEPTHS_LUA` for ``queues``, in order."""
    keys = []
    for queue in queues:
        keys += [*sublists(queue), sched_waiting_key(model_of_queue(queue))]
    return keys


def queue_depths(client: redis.Redis, queues: list[str] | None = None) -> list[QueueDepth]:
    """Waiting tasks per model queue (in its Celery queue, and the scheduler's), in one round
    trip."""
    queues = known_queues(client) if queues is None else queues
    if not queues:
        return []
    script = client.register_script(DEPTHS_LUA)
    counts = script(keys=depth_keys(queues), args=list(DEPTH_ARGS), client=client)
    return [QueueDepth(model_of_queue(q), q, int(n)) for q, n in zip(queues, counts, strict=True)]


@dataclass(frozen=True)
class QueueUse:
    """A queue as listings show it: waiting tasks, and the live workers and slots serving it."""

    model: str
    queue: str
    waiting: int  # the whole backlog: in the Celery queue plus held by the scheduler
    workers: int
    slots: int
    pending: int = 0  # of ``waiting``, held by the scheduler until a slot frees
    by_priority: dict[int, int] = field(default_factory=dict)  # aged priority → pending tasks
    oldest_wait_s: float = 0.0  # of the pending tasks
    running: int = 0  # started by a worker, as the scheduler counts them


def queue_overview(
    client: redis.Redis, workers: list[WorkerInfo], settings: Settings
) -> list[QueueUse]:
    """Every queue with waiting tasks or a live worker. An empty queue that no worker serves
    (what a mistyped model name leaves behind) is not shown. Pending work by priority comes
    from :meth:`Scheduler.backlogs`: two more round trips, O(models + tenants) commands."""
    served = {queue for worker in workers for queue in worker.queues}
    depths = queue_depths(client, sorted(set(known_queues(client)) | served))
    backlogs = Scheduler(client, settings).backlogs([d.model for d in depths]) if depths else []
    rows = []
    for depth, backlog in zip(depths, backlogs, strict=True):
        serving = [w for w in workers if depth.queue in w.queues]
        if depth.waiting or serving or backlog.running:
            rows.append(
                QueueUse(
                    depth.model,
                    depth.queue,
                    depth.waiting,
                    len(serving),
                    sum(w.slots for w in serving),
                    pending=backlog.pending,
                    by_priority={b: n for b, n in sorted(backlog.by_band.items()) if n},
                    oldest_wait_s=round(backlog.oldest_wait_s, 3),
                    running=backlog.running,
                )
            )
    return rows


@dataclass(frozen=True)
class HostUse:
    """An Ollama host as the scheduler keeps it: the model it serves and its model switches."""

    host: str
    model: str | None
    since: float | None
    switches: int


def scheduled_hosts(client: redis.Redis) -> list[str]:
    """Ollama hosts the scheduler keeps a state for (its index of them: no keyspace scan)."""
    return sorted(host.decode() for host in client.smembers(SCHED_HOSTS_KEY))


def host_overview(
    client: redis.Redis, settings: Settings, hosts: list[str] | None = None
) -> list[HostUse]:
    """What each Ollama host serves (``hosts``: default, every host the scheduler knows)."""
    hosts = scheduled_hosts(client) if hosts is None else hosts
    scheduler = Scheduler(client, settings)
    states: list[HostState] = [scheduler.host_state(host) for host in hosts]
    return [HostUse(h, s.model, s.since, s.switches) for h, s in zip(hosts, states, strict=True)]


def purge_model(client: redis.Redis, backend: Backend, model: str, settings: Settings) -> Purged:
    """Remove ``model``'s waiting tasks and forget the model.

    Each purged task ends as cancelled ("queue purged"): its stream and record at once (see
    :mod:`tasks.broker`), and its result, so that it reads as cancelled after its log expired.
    The model leaves the queue indexes, so listings and the exporter drop the queue until it
    is used again. Its kombu binding stays: a producer that declared the queue once does not
    declare it again, and without the binding its next message for the model would be dropped
    (so the exporter's start-up scan, :func:`index_existing`, lists the queue again).
    """
    lists = [*sublists(queue_name(model)), *old_priority_lists(queue_name(model))]
    scheduler = Scheduler(client, settings)
    pending = scheduler.purge(model)  # those not released to Celery yet
    purged = purge_queue(
        client, lists, log_maxlen=settings.stream_maxlen, log_ttl_s=settings.stream_ttl_s
    )
    for task_id in purged.ended:  # released, now never started: they hold no slot any more
        scheduler.finished(task_id, model)
    purged = Purged(purged.messages + len(pending), [*pending, *purged.ended])
    for task_id in purged.ended:
        backend.mark_as_failure(task_id, TaskCancelled(PURGE_REASON, task_id=task_id))
    pipe = client.pipeline(transaction=False)
    pipe.srem(MODELS_KEY, canonical_model(model))
    pipe.srem(SCHED_MODELS_KEY, canonical_model(model))
    pipe.execute()
    return purged
