"""Celery's Redis result backend, minus the subscription it opens for every task sent.

Celery's Redis backend subscribes the sender to each sent task's result channel, so that a
later ``AsyncResult.get()`` can wait on pub/sub. ollama-corral waits on the task's own event
stream instead (:mod:`producers.events`), so for it those subscriptions are pure cost: a
SUBSCRIBE per task on an extra connection, and an UNSUBSCRIBE when the ``AsyncResult`` is
garbage collected, which raises if Redis has gone away by then. ``AsyncResult.get()`` still
works (Flower uses it): it reads the stored result, then subscribes itself.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend

from tasks.redis_url import SCHEMES

BACKEND_PATH = "tasks.result_backend:StreamingRedisBackend"


class StreamingRedisBackend(RedisBackend):
    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Do not subscribe when sending: results are awaited on the task's event stream."""


def backend_url(redis_url: str) -> str:
    """The ``result_backend`` setting for ``redis_url`` (other URL forms: Celery's choice)."""
    scheme = redis_url.split("://", 1)[0]
    return f"{BACKEND_PATH}+{redis_url}" if scheme in SCHEMES else redis_url
