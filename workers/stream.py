"""Group-committed writes of entries to capped Redis streams and pub/sub channels, in order.

Each stream has a :class:`StreamWriter`; its producing thread only appends entries (JSON objects)
to the writer's buffer. One :class:`Flusher` per Redis client and process writes the buffers of
every stream in one round trip (for each entry an XADD to its stream and a PUBLISH on its
channel), then takes what arrived meanwhile, from every stream. When entries come slower
than a round trip, each goes out at once; when they come faster, or from many streams at once,
they batch by themselves. No timer decides, so nothing waits, and a process relays any number of
streams with one writing thread.

Deltas of text batch further: while the last entry waits in the buffer, :meth:`StreamWriter.append`
adds an entry's text to it instead if both carry the same ``merge`` key. Many small deltas that
arrive during one round trip then cost one entry, one XADD and one PUBLISH, and every reader, live
or replaying the stream, gets the same text in fewer pieces.

A round trip's writes are one script call (:data:`WRITE_SCRIPT`), whatever the number of entries
and streams: it does each entry's XADD and PUBLISH in Redis, in order, so the writing thread packs
one command and parses one reply per round trip instead of two of each per entry.

The same script reads a flag key per stream (a string key that raises the flag by being there),
so a caller watching for one (a cancel request) pays no extra request. An entry may bring
commands of its own (``then``): the round trip that writes it is then one MULTI/EXEC
transaction, so they happen if and only if it does. An error in those commands alone does not
make the flusher write the entries again: they were written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, cast

import orjson
import redis

from workers.threads import spare_threads

Commands = Callable[[Any], None]  # adds commands to a redis-py pipeline
Entry = dict[str, Any]
Encoded = list[tuple[bytes, Commands | None]]

RETRY_BUDGET_S = 30.0  # how long a round trip is tried again while Redis is away
IDLE_S = 10.0  # a flusher with nothing to write this long hands its thread back

log = logging.getLogger(__name__)

# KEYS: the logs of the streams written, then the flag keys to read. ARGV: how many logs, then
# for each log in turn: its channel, its MAXLEN, the TTL to set on it in seconds (0: leave it),
# how many entries follow, then those entries. Returns 1 (raised) or 0 for each flag key.
WRITE_SCRIPT = """
local logs, at = tonumber(ARGV[1]), 2
for k = 1, logs do
  local log, channel, maxlen = KEYS[k], ARGV[at], ARGV[at + 1]
  local ttl, last = tonumber(ARGV[at + 2]), at + 3 + tonumber(ARGV[at + 3])
  for i = at + 4, last do
    redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', 'e', ARGV[i])
    redis.call('PUBLISH', channel, ARGV[i])
  end
  if ttl > 0 then
    redis.call('EXPIRE', log, ttl)
  end
  at = last + 1
end
local raised = {}
for first = logs + 1, #KEYS, 1000 do  -- unpack() has a limit on how many it spreads
  local values = redis.call('MGET', unpack(KEYS, first, math.min(first + 999, #KEYS)))
  for _, value in ipairs(values) do
    raised[#raised + 1] = value and 1 or 0
  end
end
return raised
"""


class _Pending:
    """An entry in a buffer, with what may still be merged into it."""

    __slots__ = ("entry", "merge", "then")

    def __init__(self, entry: Entry, then: Commands | None, merge: Hashable | None) -> None:
        self.entry = entry
        self.then = then
        self.merge = merge


class StreamWriter:
    """One per stream; appended to from one thread, written by its process's :class:`Flusher`."""

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
        flusher: Flusher | None = None,
    ) -> None:
        self._redis = client
        self._flusher = flusher if flusher is not None else Flusher.of(client)
        self.channel = channel
        self.log_key = log_key
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self.flag_key = flag_key
        self.text_field = text_field
        # Guarded by the flusher's lock:
        self.buffer: list[_Pending] = []
        self.in_flight = False  # some of its entries are in the round trip under way
        self.ttl_set = False  # a round trip that set the log's TTL went through
        self.failure: BaseException | None = None  # why the flusher gave up on it
        self._closed = False
        self.flag_raised = False
        self.on_flag: Callable[[], None] = lambda: None  # called once, from the flusher

    def append(
        self,
        entry: Entry,
        then: Commands | None = None,
        *,
        merge: Hashable | None = None,
        now: bool = False,
        hold: bool = False,
    ) -> bool:
        """Queue one entry; the flusher writes it at once or with the next batch. ``then``
        adds commands to the pipeline after the entry, in the same transaction.

        With a ``merge`` key, when the last entry still waiting in the buffer has the same key,
        the entry's text field is added to that one's instead: then False (no entry queued).
        With ``now``, the calling thread writes it, after what is buffered, unless a round trip
        of this stream is under way: a stream's first token or last event then waits for no
        other thread. With ``hold``, the flusher is not told yet: the entry waits for the next
        one written ``now`` or for :meth:`send_held`. A thread reading a burst of text holds it
        while more is there to read, so that a short answer's text and its end go out in one
        round trip instead of racing the flusher for it.

        Raises the Redis error that made the flusher give up, or RuntimeError once closed;
        either way the entry is not queued (written, with ``now``).
        """
        return self._flusher.add(self, _Pending(entry, then, merge), now=now, hold=hold)

    def send_held(self) -> None:
        """Hand the entries held back (``append(hold=True)``) to the flusher."""
        self._flusher.send(self)

    def check_open(self) -> None:
        """Raise what stops this writer from taking entries (called under the flusher's lock)."""
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise RuntimeError("the stream writer is closed")

    def write_now(self, entry: Entry) -> None:
        """Write one last entry from the calling thread, bypassing a flusher that gave up on
        Redis, and close."""
        self.failure = None
        keys_and_args, _ = _writes(
            [(self, _encoded([_Pending(entry, None, None)]))], [], set_ttl=True
        )
        self._redis.eval(WRITE_SCRIPT, *keys_and_args)  # rare: not worth a cached script
        self._closed = True

    def close(self, timeout_s: float = 30.0) -> None:
        """Wait until everything appended is written, and take no more entries (idempotent).
        Raises the error that made the flusher give up on this stream."""
        self._closed = True
        self._flusher.send(self)
        self._flusher.wait_written(self, timeout_s)
        if self.failure is not None:
            raise self.failure


class Flusher:
    """Writes the buffered entries of every stream of a Redis client, a round trip at a time,
    from one thread: a spare one (:mod:`workers.threads`), so that a stream's first entry waits
    for no thread start, handed back after ``idle_s`` with nothing to write."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        retry_budget_s: float = RETRY_BUDGET_S,
        idle_s: float = IDLE_S,
    ) -> None:
        self._redis = client
        self._retry_budget_s = retry_budget_s
        self._idle_s = idle_s
        # By its digest (EVALSHA): the script's text travels only when Redis lacks it.
        self._write_script = client.register_script(WRITE_SCRIPT)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the flusher waits for entries
        self._written = threading.Condition(self._lock)  # closing writers wait for a round
        self._ready: dict[StreamWriter, None] = {}  # writers with a buffer, in arrival order
        self._running = False  # a thread runs the flush loop
        self.round_trips = 0  # pipelines that went through

    @property
    def running(self) -> bool:
        """Whether a thread runs the flush loop (from the first entry until it idles)."""
        return self._running

    @classmethod
    def of(cls, client: redis.Redis) -> Flusher:
        """The flusher of ``client`` in this process (made on first use)."""
        with _registry_lock:
            flusher = _flushers.get(client)
            if flusher is None:
                flusher = _flushers[client] = cls(client)
            return flusher

    # -- the producing threads' side ------------------------------------------------------
    def add(
        self, writer: StreamWriter, pending: _Pending, *, now: bool = False, hold: bool = False
    ) -> bool:
        start = False
        with self._lock:
            writer.check_open()
            buffer = writer.buffer
            merge = pending.merge
            if merge is not None and buffer and buffer[-1].merge == merge:
                field = writer.text_field
                buffer[-1].entry[field] += pending.entry[field]
                return False
            buffer.append(pending)
            if now and not writer.in_flight:  # this thread writes the buffer: take it
                taken, writer.buffer, writer.in_flight = buffer, [], True
                self._ready.pop(writer, None)
            else:
                taken = None
                if now or not hold:  # an entry to write now is never held back
                    start = self._schedule(writer)
        if taken is None:
            if start:
                spare_threads.run(self._run, "stream-flusher")
            return True
        try:
            self._flush([(writer, taken)])
        except Exception as exc:
            self._finish_round([writer], exc)
            raise
        if writer.failure is not None:
            raise writer.failure
        return True

    def send(self, writer: StreamWriter) -> None:
        """Write what ``writer`` buffered with the next round (what it held back)."""
        with self._lock:
            start = bool(writer.buffer) and self._schedule(writer)
        if start:
            spare_threads.run(self._run, "stream-flusher")

    def _schedule(self, writer: StreamWriter) -> bool:
        """Put ``writer`` in line for the next round (under the lock); True when the flush
        loop must be started."""
        if writer not in self._ready:
            self._ready[writer] = None
            self._work.notify()
        start, self._running = not self._running, True
        return start

    def wait_written(self, writer: StreamWriter, timeout_s: float) -> None:
        with self._lock:
            done = self._written.wait_for(
                lambda: writer.failure is not None or not (writer.buffer or writer.in_flight),
                timeout_s,
            )
        if not done:
            raise TimeoutError("the stream writer could not flush in time")

    # -- the flusher thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._ready:
                    if not self._work.wait(self._idle_s) and not self._ready:
                        self._running = False  # the next entry starts it again
                        return
                writers, self._ready = list(self._ready), {}
                taken = []
                for writer in writers:
                    taken.append((writer, writer.buffer))
                    writer.buffer = []
                    writer.in_flight = True
            try:
                self._flush(taken)
            except Exception as exc:  # never lose the thread that every stream here needs
                log.exception("the stream flusher failed a round; its streams are failed")
                self._finish_round([w for w, _ in taken], exc)

    def _flush(self, taken: list[tuple[StreamWriter, list[_Pending]]]) -> None:
        batch: list[tuple[StreamWriter, Encoded]] = []
        failed: list[tuple[StreamWriter, BaseException]] = []
        for writer, pending in taken:
            try:
                batch.append((writer, _encoded(pending)))  # once: a retry writes the same
            except (TypeError, ValueError) as exc:
                failed.append((writer, exc))
        for writer, error in failed:
            self._finish_round([writer], error)
        if not batch:
            return
        flags: list[StreamWriter] | None
        try:
            flags = self._write(batch, retry=False)
        except redis.RedisError as exc:
            flags = self._retry_write(batch, exc)
            if flags is None:
                self._finish_round([w for w, _ in batch], exc)
                return
        self._finish_round([w for w, _ in batch], None)
        for writer in flags:
            try:
                writer.on_flag()
            except Exception:
                log.exception("a stream's flag callback failed")

    def _retry_write(
        self, batch: list[tuple[StreamWriter, Encoded]], exc: redis.RedisError
    ) -> list[StreamWriter] | None:
        """Redis blipped (restart, failover): try again for a while before giving up."""
        deadline = time.monotonic() + self._retry_budget_s
        delay = 0.1
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                return self._write(batch, retry=True)
            except redis.RedisError:
                continue
        log.warning("gave up writing %d streams after %s", len(batch), exc)
        return None

    def _write(
        self, batch: list[tuple[StreamWriter, Encoded]], *, retry: bool
    ) -> list[StreamWriter]:
        """One round trip; the writers whose flag was seen raised for the first time."""
        watching = [w for w, _ in batch if w.flag_key is not None and not w.flag_raised]
        keys_and_args, thens = _writes(batch, watching, set_ttl=retry)
        flags: list[int]
        if thens:  # they happen if and only if the entries are written
            # EVAL, not EVALSHA: a script missing from Redis would fail inside the transaction
            # while the commands after it ran.
            pipe = self._redis.pipeline(transaction=True)
            pipe.eval(WRITE_SCRIPT, *keys_and_args)
            for then in thens:
                then(pipe)
            replies = pipe.execute(raise_on_error=False)
            if isinstance(replies[0], Exception):
                raise replies[0]
            for error in (r for r in replies[1:] if isinstance(r, Exception)):
                log.warning("a command sent with stream entries failed: %s", error)
            flags = replies[0]
        else:
            count, rest = keys_and_args[0], keys_and_args[1:]
            flags = cast(list[int], self._write_script(keys=rest[:count], args=rest[count:]))
        raised = [writer for writer, flag in zip(watching, flags, strict=True) if flag]
        for writer in raised:
            writer.flag_raised = True
        return raised

    def _finish_round(self, writers: list[StreamWriter], failure: BaseException | None) -> None:
        with self._lock:
            self.round_trips += failure is None
            for writer in writers:
                writer.in_flight = False
                if failure is None:
                    writer.ttl_set = True
                else:
                    # What it buffered meanwhile is never written, as after any failure.
                    writer.failure = failure
                    writer.buffer = []
                    self._ready.pop(writer, None)
            self._written.notify_all()


def encode(entry: Entry) -> bytes:
    """An entry as it is written (compact JSON)."""
    return orjson.dumps(entry)


def _encoded(taken: list[_Pending]) -> Encoded:
    dumps = orjson.dumps
    return [(dumps(p.entry), p.then) for p in taken]


def _writes(
    batch: list[tuple[StreamWriter, Encoded]], watching: list[StreamWriter], *, set_ttl: bool
) -> tuple[list[Any], list[Commands]]:
    """The arguments of the script call (:data:`WRITE_SCRIPT`) that writes ``batch`` and reads
    the flags of ``watching`` (its number of keys first), and the entries' own commands
    (``then``), which must follow it. A log's TTL is set on its first round trip, or on every
    one with ``set_ttl``."""
    keys: list[str] = [writer.log_key for writer, _ in batch]
    keys += [writer.flag_key for writer in watching if writer.flag_key is not None]
    args: list[Any] = [len(batch)]
    thens: list[Commands] = []
    for writer, entries in batch:
        ttl_s = writer.ttl_s if set_ttl or not writer.ttl_set else 0
        args += (writer.channel, writer.maxlen, ttl_s, len(entries))
        for entry, then in entries:
            args.append(entry)
            if then is not None:
                thens.append(then)
    return [len(keys), *keys, *args], thens


_registry_lock = threading.Lock()
_flushers: weakref.WeakKeyDictionary[redis.Redis, Flusher] = weakref.WeakKeyDictionary()


def _forget_flushers() -> None:
    """A forked child has none of its parent's threads: its streams get flushers of their own."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _flushers.clear()


os.register_at_fork(after_in_child=_forget_flushers)
