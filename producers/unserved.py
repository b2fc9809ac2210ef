"""Waiting on a model no live worker serves looks like a hang: notice it, and say so.

Such a task is accepted and waits in its queue (a worker may still come), so every way of
waiting on it says what is going on: the SDK warns with :class:`UnservedModelWarning`, the CLI
prints a note on stderr, the gateway's ``/v1`` answers carry a ``warning`` and its event
stream a ``warning`` event. The Ollama facade, whose clients know no such thing, answers 404
at once instead, as Ollama does for a model it does not have.
"""

from __future__ import annotations

import time

import redis

from tasks.keys import model_of_queue, task_key
from tasks.registry import live_workers

NOTICE_AFTER_S = 2.0  # a wait looks once the task has been waiting this long: most start sooner
RECHECK_S = 5.0  # then again this often, until it starts or the notice was given


class UnservedModelWarning(UserWarning):
    """The task waits in the queue of a model that no live worker serves."""


def unserved_message(queue: str) -> str:
    model = model_of_queue(queue)
    return (
        f"no worker serves {queue} yet; the task waits there until one does "
        f"(start one: corral worker --model {model})"
    )


def unserved_notice(client: redis.Redis, task_id: str) -> str | None:
    """What to tell a caller waiting on ``task_id`` if it is queued where no live worker
    consumes, else None."""
    state, queue = (
        v.decode() if isinstance(v, bytes) else v
        for v in client.hmget(task_key(task_id), ["state", "queue"])
    )
    if not queue or (state or "queued") != "queued":
        return None
    if any(queue in worker.queues for worker in live_workers(client)):
        return None
    return f"task {task_id}: {unserved_message(queue)}"


class UnservedWatch:
    """Asked now and then during a wait (cheap when not due); gives the notice once."""

    def __init__(
        self, client: redis.Redis, task_id: str, *, after_s: float = NOTICE_AFTER_S
    ) -> None:
        self._redis = client
        self._task_id = task_id
        self._next_check = time.monotonic() + after_s
        self._told = False

    def due(self) -> bool:
        return not self._told and time.monotonic() >= self._next_check

    def check(self) -> str | None:
        """The notice, the first time it is due and applies; else None."""
        if not self.due():
            return None
        self._next_check = time.monotonic() + RECHECK_S
        try:
            notice = unserved_notice(self._redis, self._task_id)
        except redis.RedisError:
            return None  # Redis is restarting: the wait goes on, and so does the watch
        self._told = notice is not None
        return notice
