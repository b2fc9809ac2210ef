"""A task's life in Redis beyond Celery: claim vs. cancel, the run lease, dead letters.

- ``claim`` (worker) and ``cancel`` (producer) are Lua scripts on the task record, so a queued
  task is either cancelled before it starts (and then never runs) or started and then
  cancelled cooperatively: never both, never a second terminal event. (A first delivery sends
  its request to Ollama right behind its start step, before the step's answer: one that finds
  the task cancelled drops that request at once, before Ollama's first byte.)
- The **lease** says "a live worker runs this task". The worker process's heartbeat renews all
  its leases in one step per beat and also refreshes their messages' entries in kombu's unacked
  index, so Redis does not redeliver a running task however long it takes; a killed worker
  stops renewing, and the message comes back after the short visibility timeout. A second
  delivery that finds a live lease waits for it instead of running.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import redis
from redis.commands.core import Script

from tasks.keys import (
    DLQ_KEY,
    KOMBU_UNACKED_INDEX,
    cancel_key,
    lease_key,
    log_key,
    stream_channel,
    task_key,
)
from tasks.scheduler.lua import (
    DROP_PENDING,
    FINISH_AND_RELEASE_FUNCTION,
    PRELUDE,
    STARTED_FUNCTION,
)
from tasks.webhooks.outbox import CALLBACK_FIELD, TASK_LUA

CANCEL_POLL_S = 0.5  # the longest a running task goes without looking for a cancel request

# Take the lease and mark the task running, in one step. A task cancelled while queued is not
# started: its producer already wrote its terminal event. The record expires like any other,
# also for tasks that arrived without one (e.g. sent through Flower). With ARGV[6..8] (task id,
# now, Ollama host), the scheduler learns in the same step that the task started there; that is
# bookkeeping only, so an error in it does not stop the start.
_BEGIN_FUNCTION = """
local function begin()
  if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'leased' end
  if redis.call('HGET', KEYS[2], 'state') == 'cancelled' then
    redis.call('DEL', KEYS[1])
    return 'cancelled'
  end
  redis.call('HSET', KEYS[2], 'state', 'running', 'started_at', ARGV[3], 'worker', ARGV[4])
  if redis.call('TTL', KEYS[2]) < 0 then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
  if #ARGV >= 8 then pcall(started, ARGV[6], ARGV[7], ARGV[8]) end
  return 'ok'
end
"""
_BEGIN = PRELUDE + STARTED_FUNCTION + _BEGIN_FUNCTION + "return begin()\n"

# A first delivery's start, in one step: if the task's log is empty (no delivery wrote to it),
# take the lease as _BEGIN does and, once taken, write the stream's event 0 (ARGV[12]) to the
# log (KEYS[3]) and its channel (KEYS[4]). The answer also says whether the task has a webhook
# (its record's field ARGV[9]) and whether a cancel was requested (KEYS[5]): what the stream's
# opening reads otherwise. A log that is not empty changes nothing ('logged'): a redelivery
# reads it and takes the lease in steps of their own.
_BEGIN_FIRST = (
    PRELUDE
    + STARTED_FUNCTION
    + _BEGIN_FUNCTION
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {'logged', 0, 0} end
local begun = begin()
if begun ~= 'ok' then return {begun, 0, 0} end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*', 'e', ARGV[12])
redis.call('EXPIRE', KEYS[3], ARGV[11])
redis.call('PUBLISH', KEYS[4], ARGV[12])
return {begun, redis.call('HEXISTS', KEYS[2], ARGV[9]), redis.call('EXISTS', KEYS[5])}
"""
)

# A queued task is cancelled on the spot: its stream gets its one terminal event now. The
# answer is the state the cancel found, so that a task which already ended (cancelled, too)
# is told apart from one cancelled by this call, and is left as it is. Its webhook, if any,
# enters the outbox in the same step.
_CANCEL = (
    TASK_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local state = redis.call('HGET', KEYS[1], 'state') or 'queued'
if state == 'queued' then drop_pending(ARGV[5]) end  -- still in the scheduler: never released
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled')
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('PUBLISH', KEYS[4], ARGV[1])
  cancelled_webhook(ARGV[1])
elseif state == 'running' then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
end
return state
"""
)

# Renew leases and their messages' visibility; answer, for each, whether a cancel was requested.
# KEYS: kombu's unacked index, then per lease its key and its cancel key. ARGV: now, then per
# lease its token, TTL (ms) and delivery tag ('' to leave the message alone).
_RENEW = """
local answers = {}
for i = 1, (#KEYS - 1) / 2 do
  local token, ttl, tag = ARGV[3 * i - 1], ARGV[3 * i], ARGV[3 * i + 1]
  if redis.call('GET', KEYS[2 * i]) == token then
    redis.call('PEXPIRE', KEYS[2 * i], ttl)
    if tag ~= '' then redis.call('ZADD', KEYS[1], 'XX', ARGV[1], tag) end
  end
  answers[i] = redis.call('EXISTS', KEYS[2 * i + 1])
end
return answers
"""

# Record the final state and give the lease up (only if it is still ours). With more ARGV (from
# the third: Scheduler.finish_args), the task leaves the scheduler and its slot is released
# into, in the same step; that answer is returned ({} when nothing was released).
_END = (
    PRELUDE
    + FINISH_AND_RELEASE_FUNCTION
    + """
if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], 'state', ARGV[2]) end
local ended = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then ended = redis.call('DEL', KEYS[1]) end
if #ARGV > 2 then return finish_and_release(3) end
return ended
"""
)

# The cancel takes a task still waiting in the scheduler out of it in the same step.
_CANCEL_PENDING = DROP_PENDING + _CANCEL


_scripts: dict[str, Script] = {}  # by text: hashed once, not on every call


def _script(client: Any, script: str) -> Script:
    runner = _scripts.get(script)
    if runner is None:
        runner = _scripts[script] = client.register_script(script)
    return runner


def _run(client: redis.Redis, script: str, keys: list[str], args: Sequence[Any] = ()) -> Any:
    """EVALSHA (the script text travels only when Redis does not have it cached yet)."""
    return _script(client, script)(keys=keys, args=list(args), client=client)


def _begun(answer: Any) -> Begun:
    state, callback, cancel = answer
    return Begun(state.decode(), bool(callback), bool(cancel))


def begin_first_all(
    client: redis.Redis,
    starts: Sequence[tuple[Lease, FirstEvent]],
    *,
    worker: str,
    started_at: float,
    record_ttl_s: int,
    host: str,
) -> list[Begun]:
    """:meth:`Lease.begin_first` for many leases, each with its stream's event 0, in one round
    trip."""
    script = _script(client, _BEGIN_FIRST)
    with client.pipeline(transaction=False) as pipe:
        for lease, first in starts:
            keys, args = lease._first_step(worker, started_at, record_ttl_s, host, first)
            script(keys=keys, args=args, client=pipe)
        return [_begun(answer) for answer in pipe.execute()]


def request_cancel(client: redis.Redis, task_id: str, ttl_s: int) -> str | None:
    """Cancel; returns the state the cancel found: ``queued`` (cancelled now: it never runs),
    ``running`` (it will stop), the final state it had already ended in (nothing changes), or
    None if no such task was recorded."""
    event = json.dumps(
        {"task_id": task_id, "seq": 0, "type": "cancelled", "reason": "cancelled before it started"}
    )
    keys = (task_key(task_id), cancel_key(task_id), log_key(task_id), stream_channel(task_id))
    args = [event, time.time(), 10000, ttl_s, task_id]
    answer = _run(client, _CANCEL_PENDING, list(keys), args)
    return answer.decode() if answer else None


class FirstEvent(NamedTuple):
    """Event 0 of a stream, written by a first delivery's start step (Lease.begin_first)."""

    log_key: str
    channel: str
    maxlen: int
    ttl_s: int
    cancel_key: str
    entry: bytes  # the event's JSON


class Begun(NamedTuple):
    """What :meth:`Lease.begin_first` did and found."""

    state: str  # ok (leased, event 0 written), leased, cancelled, or logged (nothing done)
    has_callback: bool = False  # the task has a webhook (known when ``ok``)
    cancel_requested: bool = False  # (known when ``ok``)


class StartNotTaken(Exception):
    """The start step sent ahead of the call to Ollama (:meth:`Lease.send_begin_first`) did not
    start the task: another delivery wrote its log or holds its lease, or it was cancelled
    while queued (``begun``), or its answer could not be read (``cause``, a Redis error). It
    changed nothing in Redis in the first three cases: the delivery starts again, in order."""

    def __init__(self, begun: Begun | None, cause: redis.RedisError | None = None) -> None:
        super().__init__(begun.state if begun is not None else f"start step failed: {cause}")
        self.begun = begun
        self.cause = cause


class PendingBegin:
    """A start step (:data:`_BEGIN_FIRST`) sent on a connection of its own, its answer unread."""

    def __init__(self, client: redis.Redis, keys: list[str], args: list[Any]) -> None:
        self._redis = client
        self._keys, self._args = keys, args
        pool = client.connection_pool
        connection: Any = pool.get_connection()
        try:
            connection.send_command(
                "EVALSHA", _script(client, _BEGIN_FIRST).sha, len(keys), *keys, *args
            )
        except BaseException:
            connection.disconnect()
            pool.release(connection)
            raise
        self._connection = connection

    def answer(self) -> Begun:
        """Read the step's answer (once); a Redis error is raised as it is."""
        connection: Any = self._connection
        self._connection = None
        if connection is None:
            raise RuntimeError("the start step's answer was read already")
        pool = self._redis.connection_pool
        try:
            found = connection.read_response()  # EVALSHA's reply, as redis-py reads it
        except redis.exceptions.NoScriptError:  # Redis restarted: nothing ran; run it now
            pool.release(connection)
            return _begun(_run(self._redis, _BEGIN_FIRST, self._keys, self._args))
        except BaseException:
            connection.disconnect()  # the answer may still come: the connection is spoilt
            pool.release(connection)
            raise
        pool.release(connection)
        return _begun(found)


class Lease:
    """Held while a worker runs a task; the process's :class:`Heartbeat` renews it (and the
    message's visibility)."""

    def __init__(
        self,
        client: redis.Redis,
        task_id: str,
        ttl_s: float,
        delivery_tag: str | None,
        on_cancel: Callable[[], None] = lambda: None,
        consuming: Callable[[], bool] = lambda: True,
    ) -> None:
        self._redis = client
        self.task_id = task_id
        self.key = lease_key(task_id)
        self._task_key = task_key(task_id)
        self._cancel_key = cancel_key(task_id)
        self._on_cancel = on_cancel
        self._consuming = consuming
        self.ttl_ms = int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._tag = delivery_tag or ""
        self._heartbeat: Heartbeat | None = None

    def begin(
        self, worker: str, started_at: float, record_ttl_s: int, *, host: str | None = None
    ) -> str:
        """``ok`` (leased and running), ``leased`` (another worker holds it) or ``cancelled``.

        With ``host`` (the Ollama host the worker calls), the scheduler learns in the same step
        that the task started there (:meth:`tasks.scheduler.Scheduler.started`)."""
        keys = [self.key, self._task_key]
        args: list[Any] = [self.token, self.ttl_ms, started_at, worker, record_ttl_s]
        if host is not None:
            args += [self.task_id, repr(time.time()), host]
        answer: bytes = _run(self._redis, _BEGIN, keys, args)
        return answer.decode()

    def begin_first(
        self, worker: str, started_at: float, record_ttl_s: int, *, host: str, first: FirstEvent
    ) -> Begun:
        """:meth:`begin` and the stream's opening in one step, for a task whose log is empty
        (its first delivery): the stream's event 0 is written once the lease is taken. A task
        whose log holds events is left as it is (``logged``): read the log, then :meth:`begin`."""
        answer = _run(
            self._redis,
            _BEGIN_FIRST,
            *self._first_step(worker, started_at, record_ttl_s, host, first),
        )
        return _begun(answer)

    def send_begin_first(
        self, worker: str, started_at: float, record_ttl_s: int, *, host: str, first: FirstEvent
    ) -> PendingBegin:
        """:meth:`begin_first`, sent without waiting for its answer: the caller does what it
        can meanwhile (sends its request to Ollama) and reads the answer before anything of
        the run is seen (:meth:`PendingBegin.answer`)."""
        keys, args = self._first_step(worker, started_at, record_ttl_s, host, first)
        return PendingBegin(self._redis, keys, args)

    def _first_step(
        self, worker: str, started_at: float, record_ttl_s: int, host: str, first: FirstEvent
    ) -> tuple[list[str], list[Any]]:
        keys = [self.key, self._task_key, first.log_key, first.channel, first.cancel_key]
        args: list[Any] = [self.token, self.ttl_ms, started_at, worker, record_ttl_s]
        args += [self.task_id, repr(time.time()), host]
        args += [CALLBACK_FIELD, first.maxlen, first.ttl_s, first.entry]
        return keys, args

    def stop_heartbeat(self) -> None:
        """Renew it no more."""
        if self._heartbeat is not None:
            self._heartbeat.discard(self)

    def wait_for_other(self, deadline: float) -> None:
        """Another live worker runs this task: wait until its lease ends (or the deadline)."""
        while self._redis.exists(self.key) and time.time() < deadline:
            self._touch_message()
            time.sleep(min(1.0, self.ttl_ms / 3000))

    def _touch_message(self) -> None:
        if self._tag:
            self._redis.zadd(KOMBU_UNACKED_INDEX, {self._tag: time.time()}, xx=True)

    def start_heartbeat(self) -> None:
        # The beat is also how a cancel reaches a request that Ollama has not answered yet, or a
        # silent stream: beat often enough that a cancel takes effect within a second.
        interval_s = min(CANCEL_POLL_S, self.ttl_ms / 3000)
        self._heartbeat = heartbeat(self._redis, interval_s)
        self._heartbeat.add(self)

    def renewal(self) -> tuple[list[str], list[Any]]:
        """This lease's KEYS and ARGV in a renewal (see _RENEW)."""
        # Keep the message from redelivery only while this worker still consumes: a worker
        # wedged after losing its broker must let the task go to another one.
        tag = self._tag if self._consuming() else ""
        return [self.key, self._cancel_key], [self.token, self.ttl_ms, tag]

    def cancel_seen(self) -> None:
        self._on_cancel()

    def release(
        self,
        final_state: str = "",
        finish: Sequence[Any] = (),
        *,
        then: Sequence[Callable[[Any], Any]] = (),
    ) -> Any:
        """Stop renewing, record ``final_state`` and give the lease up. With ``finish``
        (:meth:`tasks.scheduler.Scheduler.finish_args`), the scheduler frees the task's place
        and releases into it in the same step: its answer is returned (None if Redis failed).

        ``then`` add commands to a pipeline (a result to store), sent in one transaction with
        the lease's end: one round trip. Each may return a callback, called with the replies
        of its commands (an error as an exception)."""
        self.stop_heartbeat()
        keys, args = [self.key, self._task_key], [self.token, final_state, *finish]
        try:  # otherwise the lease expires by itself, and the release timer catches up
            if not then:
                return _run(self._redis, _END, keys, args)
            # By the script's digest: a pipeline given the script would check for it first
            # (a round trip more). Without it in Redis (it restarted), the end runs again alone.
            pipe = self._redis.pipeline(transaction=True)
            pipe.evalsha(_script(self._redis, _END).sha, len(keys), *keys, *args)
            callbacks = []
            for commands in then:
                first = len(pipe.command_stack)
                callbacks.append((commands(pipe), first, len(pipe.command_stack)))
            replies = pipe.execute(raise_on_error=False)
            for callback, first, end in callbacks:
                if callback is not None:
                    callback(replies[first:end])
            if isinstance(replies[0], Exception):
                return _run(self._redis, _END, keys, args)
            return replies[0]
        except redis.RedisError:
            return None

    def release_in(self, pipe: Any, final_state: str) -> None:
        """:meth:`release` without the scheduler's step, as a command of ``pipe``."""
        self.stop_heartbeat()
        _script(pipe, _END)(
            keys=[self.key, self._task_key], args=[self.token, final_state], client=pipe
        )


class Heartbeat:
    """Renews every lease of a worker process in one step per beat, from one daemon thread, and
    tells each lease whose task was asked to cancel. Started on first use (and again after a
    fork, whose child has no threads but the forking one)."""

    def __init__(self, client: redis.Redis, interval_s: float) -> None:
        self._redis = client
        self.interval_s = interval_s
        self._leases: dict[Lease, None] = {}  # the leases held, in the order they were taken
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease] = None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
                self._thread.start()

    def discard(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_s)
            with self._lock:
                leases = list(self._leases)
            if leases:
                self.beat(leases)

    def beat(self, leases: list[Lease]) -> None:
        keys, args = [KOMBU_UNACKED_INDEX], [time.time()]
        for lease in leases:
            lease_keys, lease_args = lease.renewal()
            keys += lease_keys
            args += lease_args
        try:
            answers = _run(self._redis, _RENEW, keys, args)
        except redis.RedisError:
            return  # Redis blipped; the next beat tries again
        for lease, cancelled in zip(leases, answers, strict=True):
            if cancelled and lease in self._leases:  # not released meanwhile
                lease.cancel_seen()


_heartbeats: dict[tuple[int, int, float], Heartbeat] = {}


def heartbeat(client: redis.Redis, interval_s: float) -> Heartbeat:
    """The process's heartbeat for leases on ``client`` beating every ``interval_s``. A forked
    child gets its own (with its own lock: the parent's may have been held at the fork)."""
    key = (os.getpid(), id(client), interval_s)
    found = _heartbeats.get(key)
    if found is None:  # setdefault: threads racing here share the one that went in first
        found = _heartbeats.setdefault(key, Heartbeat(client, interval_s))
    return found


def add_dead_letter(client: redis.Redis, task_id: str, record: dict[str, Any]) -> None:
    client.hset(
        DLQ_KEY, task_id, json.dumps({**record, "task_id": task_id, "failed_at": time.time()})
    )


def dead_letters(client: redis.Redis) -> list[dict[str, Any]]:
    records = [json.loads(v) for v in client.hvals(DLQ_KEY)]
    return sorted(records, key=lambda r: r["failed_at"])


def remove_dead_letter(client: redis.Redis, task_id: str) -> bool:
    return bool(client.hdel(DLQ_KEY, task_id))
