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

from celery import states
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


def write_result(
    pipe: Any, backend: RedisBackend, task_id: str, outcome: Any, request: Any, *, failed: bool
) -> None:
    """In ``pipe``: what Celery's worker stores for a task that returned ``outcome`` (or raised
    it, ``failed``), with the extended fields ``request`` gives (a task run outside Celery's
    tracer: tasks/take_along.py). Set and published as the backend does, in one round trip."""
    state = states.FAILURE if failed else states.SUCCESS
    result = backend.encode_result(outcome, state)
    meta = backend._get_result_meta(result=result, state=state, traceback=None, request=request)
    meta["task_id"] = task_id
    key, value = backend.get_key_for_task(task_id), backend.encode(meta)
    if backend.expires:
        pipe.setex(key, backend.expires, value)
    else:
        pipe.set(key, value)
    pipe.publish(key, value)
