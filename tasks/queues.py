"""Read queue depths per model straight from the broker's Redis lists."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from tasks.keys import (
    KOMBU_BINDING_PREFIX,
    MODELS_KEY,
    PRIORITY_SEP,
    PRIORITY_STEPS,
    QUEUE_PREFIX,
    model_of_queue,
    queue_name,
)


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


def queue_depths(client: redis.Redis, queues: list[str] | None = None) -> list[QueueDepth]:
    """Waiting messages per model queue, summed over every priority sub-list, in one round trip."""
    queues = known_queues(client) if queues is None else queues
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for name in sublists(queue):
            pipe.llen(name)
    counts = pipe.execute()
    step = len(PRIORITY_STEPS)
    return [
        QueueDepth(model_of_queue(q), q, sum(counts[i * step : (i + 1) * step]))
        for i, q in enumerate(queues)
    ]
