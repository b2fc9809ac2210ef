"""The model queues: their depths straight from the broker's Redis lists, which of them to
show, and purging one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from tasks.broker import PURGE_REASON, Purged, purge_queue
from tasks.errors import TaskCancelled
from tasks.keys import (
    KOMBU_BINDING_PREFIX,
    MODELS_KEY,
    PRIORITY_SEP,
    PRIORITY_STEPS,
    QUEUE_PREFIX,
    canonical_model,
    model_of_queue,
    queue_name,
)
from tasks.registry import WorkerInfo
from tasks.settings import Settings

if TYPE_CHECKING:
    from celery.backends.base import Backend


@dataclass(frozen=True)
class QueueDepth:
    model: str
    queue: str
    waiting: int


def known_queues(client: redis.Redis) -> list[str]:
    """Every model queue: models ever submitted plus queues declared by producers or workers."""
    names = {queue_name(m.decode()) for m in client.smembers(MODELS_KEY)}
    for key in client.scan_iter(match=f"{KOMBU_BINDING_PREFIX}{QUEUE_PREFIX}*", count=500):
        names.add(key.decode().removeprefix(KOMBU_BINDING_PREFIX))
    names.discard(QUEUE_PREFIX + "default")
    return sorted(names)


def sublists(queue: str) -> list[str]:
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


# The one definition of a queue's depth, for every reader (sync, asyncio, and the gateway's
# admission script, which embeds it): the waiting messages summed over its priority sub-lists.
# KEYS holds the sub-lists of queue 1, then of queue 2...: see depth_keys(); ARGV[1] is
# DEPTH_ARGS[0], the number of sub-lists per queue.
DEPTH_LUA = """
local steps = tonumber(ARGV[1])
local function depth(q)
  local n = 0
  for i = (q - 1) * steps + 1, q * steps do n = n + redis.call('LLEN', KEYS[i]) end
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
DEPTH_ARGS = (len(PRIORITY_STEPS),)


def depth_keys(queues: list[str]) -> list[str]:
    """The KEYS of :data:`DEPTHS_LUA` for ``queues``, in order."""
    return [name for queue in queues for name in sublists(queue)]


def queue_depths(client: redis.Redis, queues: list[str] | None = None) -> list[QueueDepth]:
    """Waiting messages per model queue (every priority sub-list), in one round trip."""
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
    waiting: int
    workers: int
    slots: int


def queue_overview(client: redis.Redis, workers: list[WorkerInfo]) -> list[QueueUse]:
    """Every queue with waiting tasks or a live worker. An empty queue that no worker serves
    (what a mistyped model name leaves behind) is not shown."""
    served = {queue for worker in workers for queue in worker.queues}
    rows = []
    for depth in queue_depths(client, sorted(set(known_queues(client)) | served)):
        serving = [w for w in workers if depth.queue in w.queues]
        if depth.waiting or serving:
            rows.append(
                QueueUse(
                    depth.model,
                    depth.queue,
                    depth.waiting,
                    len(serving),
                    sum(w.slots for w in serving),
                )
            )
    return rows


def purge_model(client: redis.Redis, backend: Backend, model: str, settings: Settings) -> Purged:
    """Remove ``model``'s waiting tasks and forget the model.

    Each purged task ends as cancelled ("queue purged"): its stream and record at once (see
    :mod:`tasks.broker`), and its result, so that it reads as cancelled after its log expired.
    The queue's kombu binding stays: a producer that declared the queue once does not declare
    it again, and without the binding its next message for the model would be dropped.
    """
    lists = sublists(queue_name(model))
    purged = purge_queue(
        client, lists, log_maxlen=settings.stream_maxlen, log_ttl_s=settings.stream_ttl_s
    )
    for task_id in purged.ended:
        backend.mark_as_failure(task_id, TaskCancelled(PURGE_REASON, task_id=task_id))
    client.srem(MODELS_KEY, canonical_model(model))
    return purged
