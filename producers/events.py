"""Follow a task's events: replay from ``seq`` 0, then live, with no gap and no duplicate.

Order matters: subscribe first, then read the replay log, then take live messages. The
ordering itself (duplicates, gaps filled from the log, the end) is :class:`Sequencer`'s; this
module does the Redis I/O around it, riding out a Redis restart. While the task waits, a
``queued`` event says where it stands (:class:`tasks.scheduler.views.QueuedNotices`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from tasks.errors import BrokerUnavailable, TaskTimeout
from tasks.keys import log_key, stream_channel
from tasks.scheduler.views import QueuedNotices, Wait
from tasks.sequencer import LogEntry, Sequencer

POLL_S = 1.0  # re-read the log after this much live silence, in case a message was lost
RECONNECT_BUDGET_S = 60.0  # how long a reader waits for Redis to come back


class PubSubPool:
    """Subscriber connections kept open between tasks.

    Closing a redis-py ``PubSub`` drops its connection, so following one task after another
    would reconnect each time. Instead a finished follower unsubscribes and returns its
    ``PubSub`` here, for the next one to reuse.
    """

    def __init__(self, client: redis.Redis, keep: int = 8) -> None:
        self._client = client
        self._keep = keep
        self._idle: list[redis.client.PubSub] = []
        self._lock = threading.Lock()

    def acquire(self) -> redis.client.PubSub:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._client.pubsub(ignore_subscribe_messages=True)

    def release(self, pubsub: redis.client.PubSub) -> None:
        try:
            pubsub.unsubscribe()
        except redis.RedisError:
            pubsub.close()
            return
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(pubsub)
                return
        pubsub.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pubsub in idle:
            pubsub.close()


def follow_events(
    client: redis.Redis,
    task_id: str,
    *,
    after_seq: int = -1,
    timeout_s: float | None = None,
    on_idle: Callable[[], dict[str, Any] | None] | None = None,
    pubsubs: PubSubPool | None = None,
    waiting: Callable[[], Wait | None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the task's events in ``seq`` order, ending with its terminal event.

    ``on_idle`` is asked after each quiet second; a terminal event it returns (e.g. built from
    the result backend, for a task whose log expired) ends the stream. ``waiting`` reads where
    the task stands while it waits: a ``queued`` event (``seq`` -1) goes out when that changes.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    order = Sequencer(task_id, after_seq)
    notices = QueuedNotices(task_id)
    if waiting is None or after_seq >= 0:
        notices.stop()
    pool = pubsubs or PubSubPool(client, keep=0)
    channel = stream_channel(task_id)
    pubsub = _subscribe(pool, channel)
    try:
        while True:
            yield from order.replay(_read_log(client, task_id, order.log_from))
            if order.ended:
                return
            if on_idle is not None and (outcome := on_idle()) is not None:
                yield from order.conclude(_read_log(client, task_id, order.log_from), outcome)
                return
            if order.expected > 0:
                notices.stop()
            if waiting is not None and notices.due(time.monotonic()):
                queued = None
                with contextlib.suppress(redis.ConnectionError):  # restarting: ask next time
                    queued = notices.take(waiting(), time.monotonic())
                if queued is not None:
                    yield queued
            silent_until = time.monotonic() + POLL_S
            while time.monotonic() < silent_until and not order.gap:
                if deadline is not None and time.monotonic() > deadline:
                    raise TaskTimeout(f"no terminal event for task {task_id} within {timeout_s} s")
                message = _next_message(pubsub, 0.2)
                if message is None or message.get("channel") not in (channel, channel.encode()):
                    continue  # nothing, or a late message for an earlier user of this pubsub
                event = order.live(message["data"])
                if event is not None:
                    yield event
                    if order.ended:
                        return
                    silent_until = time.monotonic() + POLL_S
    finally:
        pool.release(pubsub)


def _subscribe(pool: PubSubPool, channel: str) -> redis.client.PubSub:
    """A subscribed ``PubSub``; pooled ones left stale by a Redis restart are replaced."""
    deadline = time.monotonic() + RECONNECT_BUDGET_S
    while True:
        pubsub = pool.acquire()
        try:
            pubsub.subscribe(channel)
            return pubsub
        except redis.ConnectionError as exc:
            pubsub.close()
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"cannot subscribe to task events: {exc}") from exc
            time.sleep(0.05)  # the next pooled connection, or a new one once Redis is back
        except redis.RedisError as exc:
            pubsub.close()
            raise BrokerUnavailable(f"cannot subscribe to task events: {exc}") from exc


def _read_log(client: redis.Redis, task_id: str, after: str) -> list[LogEntry]:
    deadline = time.monotonic() + RECONNECT_BUDGET_S
    while True:
        try:
            entries = client.xrange(log_key(task_id), min=after)
            break
        except redis.ConnectionError as exc:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"cannot read the task's event log: {exc}") from exc
            time.sleep(0.25)  # Redis is restarting
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot read the task's event log: {exc}") from exc
    return list(entries)


def _next_message(pubsub: redis.client.PubSub, wait_s: float) -> dict[str, Any] | None:
    try:
        return pubsub.get_message(timeout=wait_s)
    except redis.ConnectionError:
        # Redis went away: redis-py reconnects and resubscribes on the next call, and the log
        # fills in whatever was published meanwhile.
        time.sleep(wait_s)
        return None
