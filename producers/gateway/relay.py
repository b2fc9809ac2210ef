"""Follow a task's events without a thread: asyncio twin of :func:`producers.events.follow_events`.

Same rules: subscribe first (and wait until Redis confirms it), then replay the log, then take
live messages, dropping any ``seq`` already seen and filling a gap from the log. One reader per
HTTP stream costs a pub/sub connection, not a worker thread, so a thousand idle SSE clients do
not exhaust the threadpool that runs the synchronous SDK calls.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis

from tasks.events import TERMINAL_TYPES
from tasks.keys import log_key, stream_channel

POLL_S = 1.0  # re-read the log (and ask ``on_idle``) after this much live silence
IdleCheck = Callable[[], Awaitable[dict[str, Any] | None]]


async def follow(
    r: aioredis.Redis,
    task_id: str,
    *,
    after_seq: int = -1,
    on_idle: IdleCheck | None = None,
    ping_every_s: float | None = None,
) -> AsyncGenerator[dict[str, Any] | None, None]:
    """Yield the task's events after ``after_seq`` in order, ending with its terminal event.

    With ``ping_every_s``, ``None`` is yielded after that much silence (for keep-alive lines).
    ``on_idle`` may return a terminal event (e.g. from the result backend) to end the stream.
    """
    expected = after_seq + 1
    last_entry = "-"
    last_sent = time.monotonic()
    pubsub = r.pubsub()
    try:
        await pubsub.subscribe(stream_channel(task_id))
        await _confirmed(pubsub)
        while True:
            entries = await r.xrange(log_key(task_id), min=last_entry)
            for entry_id, fields in entries:
                last_entry = "(" + entry_id.decode()
                event = json.loads(fields[b"e"])
                if event["seq"] >= expected:
                    expected = event["seq"] + 1
                    last_sent = time.monotonic()
                    yield event
                    if event["type"] in TERMINAL_TYPES:
                        return
            if on_idle is not None and (outcome := await on_idle()) is not None:
                # The task has ended. Its terminal event reaches the log before the backend, so
                # the log now holds the rest of the stream: send it; the outcome only stands in
                # for a log that has expired.
                for _entry_id, fields in await r.xrange(log_key(task_id), min=last_entry):
                    event = json.loads(fields[b"e"])
                    if event["seq"] >= expected:
                        expected = event["seq"] + 1
                        yield event
                        if event["type"] in TERMINAL_TYPES:
                            return
                yield {"task_id": task_id, "seq": expected, **outcome}
                return
            quiet_until = time.monotonic() + POLL_S
            while time.monotonic() < quiet_until:
                if ping_every_s is not None and time.monotonic() - last_sent > ping_every_s:
                    last_sent = time.monotonic()
                    yield None
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
                if message is None:
                    continue
                event = json.loads(message["data"])
                if event["seq"] < expected:
                    continue  # already replayed from the log
                if event["seq"] > expected:
                    break  # a gap: fill it from the log
                expected += 1
                last_sent = time.monotonic()
                yield event
                if event["type"] in TERMINAL_TYPES:
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
