"""Follow a task's events without a thread: asyncio twin of :func:`producers.events.follow_events`.

Same order: subscribe first (and wait until Redis confirms it), then replay the log, then take
live messages; :class:`tasks.sequencer.Sequencer` decides what to yield. One reader per
HTTP stream costs a pub/sub connection, not a worker thread, so a thousand idle SSE clients do
not exhaust the threadpool that runs the synchronous SDK calls.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis

from tasks.keys import log_key, stream_channel
from tasks.scheduler.views import QueuedNotices, Wait
from tasks.sequencer import Sequencer

POLL_S = 1.0  # re-read the log (and ask ``on_idle``) after this much live silence
IdleCheck = Callable[[], Awaitable[dict[str, Any] | None]]
NoticeCheck = Callable[[], Awaitable[str | None]]
WaitCheck = Callable[[], Awaitable[Wait | None]]


async def follow(
    r: aioredis.Redis,
    task_id: str,
    *,
    after_seq: int = -1,
    on_idle: IdleCheck | None = None,
    ping_every_s: float | None = None,
    notice: NoticeCheck | None = None,
    waiting: WaitCheck | None = None,
) -> AsyncGenerator[dict[str, Any] | None, None]:
    """Yield the task's events after ``after_seq`` in order, ending with its terminal event.

    With ``ping_every_s``, ``None`` is yielded after that much silence (for keep-alive lines).
    ``on_idle`` may return a terminal event (e.g. from the result backend) to end the stream.
    A text ``notice`` returns after a quiet second is yielded as ``{"type": "warning",
    "message": text}``: a word to the reader, not one of the task's events (it has no seq).
    ``waiting`` reads where the task stands while it waits: a ``queued`` event (``seq`` -1)
    goes out when that changes, at most once a second.
    """
    order = Sequencer(task_id, after_seq)
    notices = QueuedNotices(task_id)
    if waiting is None or after_seq >= 0:
        notices.stop()
    last_sent = time.monotonic()
    pubsub = r.pubsub()
    try:
        await pubsub.subscribe(stream_channel(task_id))
        await _confirmed(pubsub)
        while True:
            for event in order.replay(await r.xrange(log_key(task_id), min=order.log_from)):
                last_sent = time.monotonic()
                yield event
            if order.ended:
                return
            if on_idle is not None and (outcome := await on_idle()) is not None:
                entries = await r.xrange(log_key(task_id), min=order.log_from)
                for event in order.conclude(entries, outcome):
                    yield event
                return
            if notice is not None and (text := await notice()) is not None:
                last_sent = time.monotonic()
                yield {"task_id": task_id, "type": "warning", "message": text}
            if order.expected > 0:
                notices.stop()
            if waiting is not None and notices.due(time.monotonic()):
                queued = notices.take(await waiting(), time.monotonic())
                if queued is not None:
                    last_sent = time.monotonic()
                    yield queued
            quiet_until = time.monotonic() + POLL_S
            while time.monotonic() < quiet_until and not order.gap:
                if ping_every_s is not None and time.monotonic() - last_sent > ping_every_s:
                    last_sent = time.monotonic()
                    yield None
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
                live = None if message is None else order.live(message["data"])
                if live is None:
                    continue
                last_sent = time.monotonic()
                yield live
                if order.ended:
                    return
                quiet_until = time.monotonic() + POLL_S
    finally:
        with anyio.CancelScope(shield=True):  # a disconnected client cancels us: still clean up
            await pubsub.aclose()


async def _confirmed(pubsub: aioredis.client.PubSub, timeout_s: float = 5.0) -> None:
    """Wait for the SUBSCRIBE reply, so that the log read below cannot miss a publish."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = await pubsub.get_message(timeout=0.5)
        if message is not None and message["type"] == "subscribe":
            return
