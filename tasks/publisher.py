"""A task's event stream: ``seq`` numbering, event types, one terminal event, redelivery.

Events are JSON objects ``{"task_id", "seq", "type", ...data}`` with ``seq`` 0, 1, 2... (see
:mod:`tasks.events`), published live and kept in a capped replay log. A redelivered task
continues the sequence from its log and never writes a second terminal event. The writes
themselves (group commit, the cancel flag read in the same round trip) are
:class:`workers.stream.StreamWriter`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from tasks.errors import TaskCancelled
from tasks.events import ATTEMPT_TYPES, TERMINAL_TYPES, TEXT_TYPES, is_abandoned
from tasks.keys import cancel_key, log_key, stream_channel, task_key
from tasks.lifecycle import Begun, FirstEvent, PendingBegin, StartNotTaken
from tasks.settings import Settings
from tasks.webhooks.outbox import CALLBACK_FIELD, queue_task_webhook
from workers.stream import Commands, Flusher, StreamWriter, encode


class StreamPublisher:
    """One per task execution; not shared between threads except with its writer's flusher
    (by default the process's, shared by every stream on ``client``)."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        task_id: str,
        channel: str,
        log_key: str,
        maxlen: int,
        ttl_s: int,
        cancel_key: str | None = None,
        flusher: Flusher | None = None,
    ) -> None:
        self._redis = client
        self.task_id = task_id
        self._log_key = log_key
        self._cancel_key = cancel_key
        self._writer = StreamWriter(
            client,
            channel=channel,
            log_key=log_key,
            maxlen=maxlen,
            ttl_s=ttl_s,
            flag_key=cancel_key,
            flusher=flusher,
        )
        self._writer.on_flag = self._cancel_seen
        self.next_seq = 0
        self.finished_event: dict[str, Any] | None = None  # a terminal event already in the log
        self.text_since_start = False  # tokens published by the current attempt's stream
        self.cancel_requested = False
        self.quiet = False  # the stream was closed early; this run only stores its result
        self.first_written = False  # event 0 was written by the lease's start step (opened())
        self.has_callback = True  # until open() reads the task record: enqueue if it says so
        self._text_sent = False
        self._pending: PendingBegin | None = None  # a start step sent ahead, its answer unread
        self._not_taken: StartNotTaken | None = None  # what that answer said, if not ok
        self._handed_over = False  # an event was handed to the flusher
        self.on_cancel: Callable[[], None] = lambda: None  # called once, from the flusher

    @classmethod
    def of_task(cls, client: redis.Redis, task_id: str, settings: Settings) -> StreamPublisher:
        """The publisher of a task's stream, with the settings' log cap and TTL."""
        return cls(
            client,
            task_id=task_id,
            channel=stream_channel(task_id),
            log_key=log_key(task_id),
            maxlen=settings.stream_maxlen,
            ttl_s=settings.stream_ttl_s,
            cancel_key=cancel_key(task_id),
        )

    # -- reading the log ------------------------------------------------------------------
    def open(self) -> None:
        """Read the log: continue its ``seq`` and learn whether this task already finished
        (and, in the same round trip, whether it has a webhook to send when it ends)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hexists(task_key(self.task_id), CALLBACK_FIELD)
        pipe.xrevrange(self._log_key, count=1)
        if self._cancel_key:
            pipe.exists(self._cancel_key)
        replies = pipe.execute()
        self.has_callback = bool(replies.pop(0))
        last = replies[0]
        self.cancel_requested = bool(self._cancel_key and replies[1])
        if last:
            event = json.loads(last[0][1][b"e"])
            self.next_seq = int(event["seq"]) + 1
            if event["type"] in TERMINAL_TYPES:
                if is_abandoned(event):
                    # An earlier delivery lost Redis and closed the stream with a retryable
                    # error; this run completes the task without a second terminal event.
                    self.quiet = True
                else:
                    self.finished_event = event
            # An earlier delivery published tokens after its last start: the new attempt restarts.
            self.text_since_start = self._tokens_after_last_start()

    def first_event(self, event_type: str, **data: Any) -> FirstEvent:
        """Event 0, for a first delivery's start step to write with its lease
        (:meth:`tasks.lifecycle.Lease.begin_first`); then tell :meth:`opened` what it did."""
        writer = self._writer
        return FirstEvent(
            log_key=self._log_key,
            channel=writer.channel,
            maxlen=writer.maxlen,
            ttl_s=writer.ttl_s,
            cancel_key=self._cancel_key or "",
            entry=encode({**self._event(event_type, data), "seq": 0}),
        )

    def opened(self, begun: Begun) -> None:
        """The start step wrote event 0 to an empty log (``begun.state`` is ``ok``) and read
        what :meth:`open` would have."""
        self.next_seq = 1
        self.first_written = True
        self.has_callback = begun.has_callback
        self.cancel_requested = begun.cancel_requested

    def opening_sent(self, pending: PendingBegin) -> None:
        """The start step (:meth:`tasks.lifecycle.Lease.send_begin_first`) went out with event
        0 and its answer is still unread: the run goes on as if it started, and :meth:`settle`
        reads the answer before anything else is written (every write does it first)."""
        self._pending = pending
        self.next_seq = 1
        self.first_written = True

    def settle(self) -> None:
        """Read the answer of a start step sent ahead, if one is unread. Raises
        :class:`~tasks.lifecycle.StartNotTaken` if it did not start the task (and again on every
        later write: nothing of this run may reach the stream then)."""
        if self._not_taken is not None:
            raise self._not_taken
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            begun = pending.answer()
        except redis.RedisError as exc:
            self._not_taken = StartNotTaken(None, exc)
            raise self._not_taken from exc
        if begun.state != "ok":
            self._not_taken = StartNotTaken(begun)
            raise self._not_taken
        self.opened(begun)

    def _tokens_after_last_start(self) -> bool:
        for _id, fields in self._redis.xrevrange(self._log_key, count=200):
            event_type = json.loads(fields[b"e"])["type"]
            if event_type in TEXT_TYPES:
                return True
            if event_type in ATTEMPT_TYPES:
                return False
        return False

    # -- writing --------------------------------------------------------------------------
    def emit(self, event_type: str, *, hold: bool = False, **data: Any) -> None:
        """Queue one event; the writer sends it at once or with the next batch.

        A text delta (``token``, ``thinking``) that comes while the last queued event is one of
        its type still waiting for the writer joins that event instead of taking a ``seq``: text
        arriving faster than a Redis round trip costs an event per round trip, not per delta,
        and the log replays exactly what was published live. With ``hold``, the event waits
        for the next one written at once or for :meth:`send_held`
        (:meth:`workers.stream.StreamWriter.append`).
        """
        if self._pending is not None or self._not_taken is not None:
            self.settle()
        if self.quiet:
            return
        text = event_type in TEXT_TYPES
        merge = event_type if text else None
        # The first text goes out from this thread, at once, if no event waits for the
        # flusher (the start went out with the lease): handed to the flusher, it would
        # wait for that thread to wake and to get the GIL from a reader parsing a fast
        # stream (a switch interval). Later text may batch.
        now = text and not self._text_sent and not self._handed_over
        queued = self._writer.append(self._event(event_type, data), merge=merge, now=now, hold=hold)
        self._handed_over = self._handed_over or not now
        if queued:
            self.next_seq += 1
        if text:
            self.text_since_start = self._text_sent = True
        elif event_type in ATTEMPT_TYPES:
            self.text_since_start = False

    def send_held(self) -> None:
        """Hand the text deltas held back to the writer."""
        self._writer.send_held()

    def finish(
        self, event_type: str, timeout_s: float = 30.0, *, wait: bool = True, **data: Any
    ) -> None:
        """Emit the terminal event and wait until everything is written (``wait=False``: hand
        it to the writer, and :meth:`close` later: the streams of many tasks ended together are
        written together). The task's webhook, if it has one, enters the outbox in the same
        transaction as the event."""
        if event_type not in TERMINAL_TYPES:
            raise ValueError(f"{event_type!r} is not a terminal event")
        self.settle()
        webhook = self._webhook(event_type, data) if self.has_callback else None
        if self.quiet:  # an earlier delivery closed the stream early: only the webhook is left
            if webhook is not None:
                webhook(self._redis)
        else:
            # Written from this thread, which waits for it anyway, unless a round trip of this
            # stream is under way.
            self._writer.append(self._event(event_type, data), then=webhook, now=wait)
            self.next_seq += 1
        if wait:
            self.close(timeout_s)

    def _webhook(self, event_type: str, data: dict[str, Any]) -> Commands:
        """Adds the task's webhook to a pipeline (a no-op in Redis if it has no callback)."""
        outcome = data.get("result") if event_type == "done" else data.get("error")
        if event_type == "cancelled":
            reason = data.get("reason", "cancelled")
            outcome = TaskCancelled(reason, task_id=self.task_id).to_dict()
        return partial(
            queue_task_webhook, task_id=self.task_id, event_type=event_type, outcome=outcome or {}
        )

    def emergency_finish(self, event_type: str, **data: Any) -> None:
        """Write a terminal event directly, bypassing a flusher that gave up on Redis."""
        self.settle()
        self._writer.write_now(self._event(event_type, data))
        self.next_seq += 1

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what is buffered and stop writing (idempotent)."""
        self._writer.close(timeout_s)

    def _event(self, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        return {"task_id": self.task_id, "seq": self.next_seq, "type": event_type, **data}

    def _cancel_seen(self) -> None:
        if not self.cancel_requested:
            self.cancel_requested = True
            self.on_cancel()
