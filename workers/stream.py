"""Publish a task's events live (PUBLISH) and into a capped replay log (XADD), in order.

Writes are group-committed: the generating thread only appends to a buffer, and one flusher
thread writes everything buffered in a single pipelined round trip, then takes what arrived
meanwhile. At Ollama's pace every token goes out at once; when tokens come faster than a round
trip, they batch by themselves. No timer decides, so nothing waits.

The same round trip reads the cancel flag, so cancellation costs no extra request.

Events are JSON objects ``{"task_id", "seq", "type", ...data}`` with ``seq`` 0, 1, 2... A
redelivered task continues the sequence from its log and never writes a second terminal event.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from tasks.events import TERMINAL_TYPES, TEXT_TYPES, is_abandoned


class StreamPublisher:
    """One per task execution; not shared between threads except with its own flusher."""

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
    ) -> None:
        self._redis = client
        self.task_id = task_id
        self._channel = channel
        self._log_key = log_key
        self._maxlen = maxlen
        self._ttl_s = ttl_s
        self._cancel_key = cancel_key
        self._buffer: list[str] = []
        self._cond = threading.Condition()
        self._flushing = False
        self._closed = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.next_seq = 0
        self.finished_event: dict[str, Any] | None = None  # a terminal event already in the log
        self.text_since_start = False  # tokens published by the current attempt's stream
        self.cancel_requested = False
        self.quiet = False  # the stream was closed early; this run only stores its result
        self._text_sent = False
        self.on_cancel: Callable[[], None] = lambda: None  # called once, from the flusher

    # -- reading the log ------------------------------------------------------------------
    def open(self) -> None:
        """Read the log: continue its ``seq`` and learn whether this task already finished."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrevrange(self._log_key, count=1)
        if self._cancel_key:
            pipe.exists(self._cancel_key)
        replies = pipe.execute()
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

    def _tokens_after_last_start(self) -> bool:
        for _id, fields in self._redis.xrevrange(self._log_key, count=200):
            event_type = json.loads(fields[b"e"])["type"]
            if event_type in TEXT_TYPES:
                return True
            if event_type in ("start", "restart"):
                return False
        return False

    # -- writing --------------------------------------------------------------------------
    def emit(self, event_type: str, **data: Any) -> None:
        """Queue one event; the flusher writes it at once or with the next batch."""
        if self.quiet:
            return
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("publisher already finished")
        event = {"task_id": self.task_id, "seq": self.next_seq, "type": event_type, **data}
        self.next_seq += 1
        if event_type in TEXT_TYPES:
            self.text_since_start = True
        elif event_type in ("start", "restart"):
            self.text_since_start = False
        encoded = json.dumps(event, separators=(",", ":"))
        with self._cond:
            self._buffer.append(encoded)
            first_text = event_type in TEXT_TYPES and not self._text_sent
            self._text_sent = self._text_sent or event_type in TEXT_TYPES
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._flush_loop, name=f"stream-{self.task_id[:8]}", daemon=True
            )
            self._thread.start()
        if first_text:
            # Let the flusher take the GIL now, so the first token goes out at once: a reader
            # parsing a fast stream would otherwise hold it for a switch interval (5 ms) or more.
            time.sleep(0)

    def finish(self, event_type: str, timeout_s: float = 30.0, **data: Any) -> None:
        """Emit the terminal event and wait until everything is written."""
        if event_type not in TERMINAL_TYPES:
            raise ValueError(f"{event_type!r} is not a terminal event")
        self.emit(event_type, **data)
        self.close(timeout_s)

    def emergency_finish(self, event_type: str, **data: Any) -> None:
        """Write a terminal event directly, bypassing a flusher that gave up on Redis."""
        event = {"task_id": self.task_id, "seq": self.next_seq, "type": event_type, **data}
        self._failure = None
        self._write([json.dumps(event, separators=(",", ":"))], set_ttl=True)
        self.next_seq += 1
        self._closed = True

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what is buffered and stop the flusher (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError("the stream publisher could not flush in time")
        if self._failure is not None:
            raise self._failure

    def _flush_loop(self) -> None:
        first = True
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._cond.wait()
                batch, self._buffer = self._buffer, []
                if not batch and self._closed:
                    return
            try:
                self._write(batch, set_ttl=first)
                first = False
            except redis.RedisError as exc:
                if not self._retry_write(batch):
                    self._failure = exc
                    return
                first = False

    def _retry_write(self, batch: list[str], budget_s: float = 30.0) -> bool:
        """Redis blipped (restart, failover): try again for a while before giving up."""
        deadline = time.monotonic() + budget_s
        delay = 0.1
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                self._write(batch, set_ttl=True)
                return True
            except redis.RedisError:
                continue
        return False

    def _write(self, batch: list[str], *, set_ttl: bool) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for encoded in batch:
            pipe.xadd(self._log_key, {"e": encoded}, maxlen=self._maxlen, approximate=True)
            pipe.publish(self._channel, encoded)
        if set_ttl:
            pipe.expire(self._log_key, self._ttl_s)
        if self._cancel_key:
            pipe.exists(self._cancel_key)
        replies = pipe.execute()
        if self._cancel_key and replies[-1] and not self.cancel_requested:
            self.cancel_requested = True
            self.on_cancel()
