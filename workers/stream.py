"""Group-committed writes of entries to a capped Redis stream and a pub/sub channel, in order.

The producing thread only appends entries (JSON objects) to a buffer; one flusher thread encodes
and writes everything buffered in a single pipelined round trip (for each entry an XADD to the
stream and a PUBLISH on the channel), then takes what arrived meanwhile. When entries come slower
than a round trip, each goes out at once; when they come faster, they batch by themselves. No
timer decides, so nothing waits. The flusher is a spare thread (:mod:`workers.threads`): the
first entry of a stream waits for no thread start.

Deltas of text batch further: while the last entry waits in the buffer, :meth:`StreamWriter.extend`
appends text to it if it was appended with the same ``merge`` key. Many small deltas that arrive
during one round trip then cost one entry, one XADD and one PUBLISH, and every reader, live or
replaying the stream, gets the same text in fewer pieces.

The same round trip can read a flag key (EXISTS), so a caller watching for one (a cancel
request) pays no extra request. An entry may bring commands of its own (``then``): the round
trip that writes it is then one MULTI/EXEC transaction, so they happen if and only if it does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import redis

from workers.threads import spare_threads

Commands = Callable[[Any], None]  # adds commands to a redis-py pipeline
Entry = dict[str, Any]


class _Pending:
    """An entry in the buffer, with what may still be merged into it."""

    __slots__ = ("entry", "merge", "then")

    def __init__(self, entry: Entry, then: Commands | None, merge: Hashable | None) -> None:
        self.entry = entry
        self.then = then
        self.merge = merge


class StreamWriter:
    """One per stream; appended to from one thread, written by its own flusher thread."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        channel: str,
        log_key: str,
        maxlen: int,
        ttl_s: int,
        flag_key: str | None = None,
        text_field: str = "text",
        name: str = "stream-writer",
    ) -> None:
        self._redis = client
        self._channel = channel
        self._log_key = log_key
        self._maxlen = maxlen
        self._ttl_s = ttl_s
        self._flag_key = flag_key
        self._text_field = text_field
        self._name = name
        self._buffer: list[_Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self._failure: BaseException | None = None
        self._flushing = False  # the flusher was started
        self._flushed = threading.Event()  # and has ended
        self.flag_raised = False
        self.on_flag: Callable[[], None] = lambda: None  # called once, from the flusher

    def append(
        self, entry: Entry, then: Commands | None = None, *, merge: Hashable | None = None
    ) -> None:
        """Queue one entry; the flusher writes it at once or with the next batch. ``then``
        adds commands to the pipeline right after the entry, in the same transaction.
        ``merge`` lets :meth:`extend` add text to the entry while it waits.

        Raises the Redis error that made the flusher give up, or RuntimeError once closed;
        either way the entry is not queued.
        """
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise RuntimeError("the stream writer is closed")
        with self._cond:
            self._buffer.append(_Pending(entry, then, merge))
            self._cond.notify()
        if not self._flushing:
            self._flushing = True
            spare_threads.run(self._flush_loop, self._name)

    def extend(self, merge: Hashable, text: str) -> bool:
        """Append ``text`` to the text field of the last entry still waiting in the buffer, if
        it was appended with this ``merge`` key; False (nothing done) if there is none such."""
        if self._failure is not None:
            raise self._failure
        with self._cond:
            buffer = self._buffer
            if buffer and buffer[-1].merge == merge:
                buffer[-1].entry[self._text_field] += text
                return True
        return False

    def write_now(self, entry: Entry) -> None:
        """Write one last entry from the calling thread, bypassing a flusher that gave up on
        Redis, and close."""
        self._failure = None
        self._write(_encoded([_Pending(entry, None, None)]), set_ttl=True)
        self._closed = True

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush what is buffered and stop the flusher (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._flushing and not self._flushed.wait(timeout_s):
            raise TimeoutError("the stream writer could not flush in time")
        if self._failure is not None:
            raise self._failure

    def _flush_loop(self) -> None:
        try:
            self._flush_all()
        finally:
            self._flushed.set()

    def _flush_all(self) -> None:
        first = True
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._cond.wait()
                taken, self._buffer = self._buffer, []
                if not taken and self._closed:
                    return
            batch = _encoded(taken)  # once: a retry writes exactly the same entries
            try:
                self._write(batch, set_ttl=first)
                first = False
            except redis.RedisError as exc:
                if not self._retry_write(batch):
                    self._failure = exc
                    return
                first = False

    def _retry_write(
        self, batch: list[tuple[str, Commands | None]], budget_s: float = 30.0
    ) -> bool:
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

    def _write(self, batch: list[tuple[str, Commands | None]], *, set_ttl: bool) -> None:
        pipe = self._redis.pipeline(transaction=any(then for _, then in batch))
        for entry, then in batch:
            pipe.xadd(self._log_key, {"e": entry}, maxlen=self._maxlen, approximate=True)
            pipe.publish(self._channel, entry)
            if then is not None:
                then(pipe)
        if set_ttl:
            pipe.expire(self._log_key, self._ttl_s)
        if self._flag_key:
            pipe.exists(self._flag_key)
        replies = pipe.execute()
        if self._flag_key and replies[-1] and not self.flag_raised:
            self.flag_raised = True
            self.on_flag()


def _encoded(taken: list[_Pending]) -> list[tuple[str, Commands | None]]:
    dumps = json.dumps
    return [(dumps(p.entry, separators=(",", ":")), p.then) for p in taken]
