"""Follow a task's events: replay from ``seq`` 0, then live, with no gap and no duplicate.

Order matters: subscribe first, then read the replay log, then take live messages, dropping
any ``seq`` already seen. Reading the log first would lose what is published in between. A gap
in the live feed (a message lost while reconnecting) is filled from the log.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from tasks.errors import BrokerUnavailable, TaskTimeout
from tasks.events import TERMINAL_TYPES
from tasks.keys import log_key, stream_channel

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
) -> Iterator[dict[str, Any]]:
    """Yield the task's events in ``seq`` order, ending with its terminal event.

    ``on_idle`` is asked after each quiet second; a terminal event it returns (e.g. built from
    the result backend, for a task whose log expired) ends the stream.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    expected = after_seq + 1
    last_entry = "-"
    pool = pubsubs or PubSubPool(client, keep=0)
    channel = stream_channel(task_id)
    pubsub = _subscribe(pool, channel)
    try:
        while True:
            for entry_id, event in _read_log(client, task_id, last_entry):
                last_entry = "(" + entry_id
                if event["seq"] >= expected:
                    expected = event["seq"] + 1
                    yield event
                    if event["type"] in TERMINAL_TYPES:
                        return
            if on_idle is not None and (outcome := on_idle()) is not None:
                # The task has ended. Its terminal event reaches the log before the backend, so
                # the log now holds the rest of the stream: send it; the outcome only stands in
                # for a log that has expired.
                for _entry_id, event in _read_log(client, task_id, last_entry):
                    if event["seq"] >= expected:
                        expected = event["seq"] + 1
                        yield event
                        if event["type"] in TERMINAL_TYPES:
                            return
                yield {"task_id": task_id, "seq": expected, **outcome}
                return
            silent_until = time.monotonic() + POLL_S
            while time.monotonic() < silent_until:
                if deadline is not None and time.monotonic() > deadline:
                    raise TaskTimeout(f"no terminal event for task {task_id} within {timeout_s} s")
                message = _next_message(pubsub, 0.2)
                if message is None or message.get("channel") not in (channel, channel.encode()):
                    continue  # nothing, or a late message for an earlier user of this pubsub
                event = json.loads(message["data"])
                if event["seq"] < expected:
                    continue  # already seen in the log
                if event["seq"] > expected:
                    break  # a gap: fill it from the log
                expected += 1
                yield event
                if event["type"] in TERMINAL_TYPES:
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


def _read_log(client: redis.Redis, task_id: str, after: str) -> list[tuple[str, dict[str, Any]]]:
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
    return [(entry_id.decode(), json.loads(fields[b"e"])) for entry_id, fields in entries]


def _next_message(pubsub: redis.client.PubSub, wait_s: float) -> dict[str, Any] | None:
    try:
        return pubsub.get_message(timeout=wait_s)
    except redis.ConnectionError:
        # Redis went away: redis-py reconnects and resubscribes on the next call, and the log
        # fills in whatever was published meanwhile.
        time.sleep(wait_s)
        return None
