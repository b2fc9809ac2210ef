"""A handle on one submitted task: its status, events, text, result, and cancellation."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import redis
from celery.result import AsyncResult
from pydantic import BaseModel

from producers.events import follow_events
from producers.unserved import UnservedModelWarning, UnservedWatch
from tasks.errors import (
    BrokerUnavailable,
    CorralError,
    TaskCancelled,
    TaskNotFound,
    TaskTimeout,
    error_from_dict,
)
from tasks.events import is_abandoned
from tasks.keys import log_key, task_key
from tasks.kinds.structured import StructuredResult
from tasks.lifecycle import request_cancel
from tasks.results import TaskResult, parse_result
from tasks.scheduler.views import Wait, WaitReader

if TYPE_CHECKING:
    from producers.client import Client

STATES = {
    "PENDING": "queued",
    "RECEIVED": "queued",
    "STARTED": "running",
    "RETRY": "running",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "REVOKED": "cancelled",
}


RESULTS_CHUNK = 256  # jobs read per round trip by results()
TERMINAL_STATES = {"done": "succeeded", "error": "failed", "cancelled": "cancelled"}


class Restart(str):
    """Marker yielded by :meth:`Job.text_stream` when an attempt starts over.

    It is an empty string, so joining stays safe, but the text received before it belongs to a
    failed attempt: discard it (``isinstance(piece, Restart)``).
    """

    reason: str

    def __new__(cls, reason: str) -> Restart:
        marker = super().__new__(cls, "")
        marker.reason = reason
        return marker


class Cancellation(str):
    """What :meth:`Job.cancel` did: ``cancelled`` (it was queued), ``running`` (it stops within
    one chunk), or, with ``ended`` true, the state the task had already ended in."""

    ended: bool

    def __new__(cls, state: str, *, ended: bool) -> Cancellation:
        answer = super().__new__(cls, state)
        answer.ended = ended
        return answer


class Job:
    """Returned by every ``Client`` submission; also ``Client.job(task_id)`` for an existing id."""

    def __init__(
        self,
        client: Client,
        task_id: str,
        *,
        kind: str | None = None,
        schema_model: type[BaseModel] | None = None,
        submitted: bool = False,
    ) -> None:
        self._client = client
        self.id = task_id
        self.kind = kind
        self._schema_model = schema_model
        self._waits: WaitReader | None = None
        # time.monotonic() when this handle's submission was accepted, for a new task
        self._submitted_at = time.monotonic() if submitted else None

    @property
    def client(self) -> Client:
        """The client this job was submitted or looked up with."""
        return self._client

    def __repr__(self) -> str:
        return f"<Job {self.kind or 'task'} {self.id}>"

    @property
    def _async(self) -> AsyncResult:
        return AsyncResult(self.id, app=self._client.app)

    def _not_found(self) -> TaskNotFound:
        return TaskNotFound(
            f"no task {self.id} was submitted (or its records expired)", task_id=self.id
        )

    def _unknown(self) -> bool:
        """Celery says PENDING for any id; only the submission record tells "queued" apart."""
        return self._async.state == "PENDING" and not self.record()

    def _known(self) -> bool:
        """Submitted through this handle, so recently that its record and its log are still
        there: no read is needed to tell it from an unknown id, and its log has its end."""
        if self._submitted_at is None:
            return False
        settings = self._client.settings
        lifetime_s = min(settings.stream_ttl_s, settings.result_ttl_s)
        return time.monotonic() - self._submitted_at < lifetime_s

    def record(self) -> dict[str, str]:
        """The submission record (kind, model, queue, submitted_at, worker...)."""
        try:
            raw = self._client.redis.hgetall(task_key(self.id))
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot read task {self.id}: {exc}") from exc
        return {k.decode(): v.decode() for k, v in raw.items()}

    def status(self) -> str:
        """``queued``, ``running``, ``succeeded``, ``failed`` or ``cancelled``.

        Raises :class:`TaskNotFound` for an id that was never submitted (or has expired), which
        Celery alone would report as PENDING forever.
        """
        state = self._async.state
        if state in ("SUCCESS", "FAILURE", "REVOKED"):
            if state == "FAILURE" and isinstance(self._async.result, TaskCancelled):
                return "cancelled"
            return STATES[state]
        # The stream's terminal event is written just before the backend stores the result.
        last = self._client.redis.xrevrange(log_key(self.id), count=1)
        if last:
            event_type = json.loads(last[0][1][b"e"])["type"]
            if event_type in TERMINAL_STATES:
                return TERMINAL_STATES[event_type]
        if state == "PENDING":
            record = self.record()
            if not record:
                raise self._not_found()
            if record.get("state") == "running":  # the worker holds it (Celery says PENDING)
                return "running"
        return STATES.get(state, state.lower())

    def position(self) -> int | None:
        """How many tasks of its model will start before this one as the scheduler now stands
        (0: it is next); None once it started or ended."""
        wait = self.wait()
        return wait.position if wait else None

    def eta(self) -> float | None:
        """Seconds until it starts, from its position and the model's measured service rate
        (its mean run time over its live slots); None once it started or ended, and while
        no run time was measured yet or no worker serves the model."""
        wait = self.wait()
        return wait.eta_s if wait else None

    def wait(self) -> Wait | None:
        """Position and ETA in one read (see :meth:`position`, :meth:`eta`)."""
        try:
            wait = self._still_waiting()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot read the place of task {self.id}: {exc}") from exc
        if wait is None and self._unknown():
            raise self._not_found()
        return wait

    def result(self, timeout: float | None = None) -> TaskResult:
        """Wait for the result; raise the task's own typed error if it failed.

        It waits on the task's event stream (which survives a Redis restart), with the result
        backend as the authority when the stream is silent or already expired. While the task
        waits in a queue no live worker serves, it warns once (:class:`UnservedModelWarning`).
        """
        if self._known():  # its end will be in its log: wait there, with no read first
            return self._result_after(None, timeout, known=True)
        return self._result_after(self._meta_and_record(), timeout)

    def _result_after(
        self,
        found: tuple[dict[str, Any], dict[bytes, bytes]] | None,
        timeout: float | None,
        *,
        known: bool = False,
    ) -> TaskResult:
        """:meth:`result`, given what :meth:`_meta_and_record` read (nothing if ``known``)."""
        if known:
            terminal, unknown = None, False
        elif found is None:  # Redis is restarting: ask each in turn, with their retries
            terminal = self._terminal_from_backend()
            unknown = terminal is None and self._unknown()
        else:
            meta, record = found
            terminal = self._terminal(meta)
            unknown = terminal is None and meta.get("status") == "PENDING" and not record
        if terminal is None:
            if unknown:
                raise self._not_found()
            watch = self._unserved_watch()
            looked = True  # read just now (or new): an end since then is in the log

            def on_idle() -> dict[str, Any] | None:
                nonlocal looked
                watch()
                if looked:
                    looked = False
                    return None
                return self._terminal_from_backend()

            try:
                for event in follow_events(
                    self._client.redis,
                    self.id,
                    timeout_s=timeout,
                    pubsubs=self._client.pubsubs,
                    on_idle=on_idle,
                ):
                    terminal = event
            except TaskTimeout as exc:
                raise TaskTimeout(
                    f"no result for task {self.id} within {timeout} s; it is still {self.status()}",
                    task_id=self.id,
                ) from exc
        if terminal is not None and is_abandoned(terminal):
            terminal = self._wait_on_backend(timeout)
        assert terminal is not None
        if terminal["type"] == "cancelled":
            raise TaskCancelled(terminal.get("reason", "cancelled"), task_id=self.id)
        if terminal["type"] == "error":
            raise error_from_dict(terminal["error"])
        result = parse_result(terminal["result"])
        if isinstance(result, StructuredResult) and self._schema_model is not None:
            result.data = self._schema_model.model_validate(result.data)
        return result

    def _wait_on_backend(self, timeout: float | None) -> dict[str, Any]:
        """The stream was cut by a Redis outage; the redelivered run stores the result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (outcome := self._terminal_from_backend()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TaskTimeout(
                    f"no result for task {self.id} within {timeout} s", task_id=self.id
                )
            time.sleep(0.2)
        return outcome

    def _meta_and_record(self) -> tuple[dict[str, Any], dict[bytes, bytes]] | None:
        """The result backend's entry for the task and its submission record, in one round
        trip; None if Redis did not answer."""
        return _metas_and_records(self._client, [self])[0]

    def _terminal_from_backend(self) -> dict[str, Any] | None:
        """The stored outcome as a terminal event, or None while the task is unfinished."""
        try:
            meta = self._client.backend.get_task_meta(self.id)
        except redis.RedisError:
            return None  # Redis is restarting; the stream wait goes on
        return self._terminal(meta)

    def _terminal(self, meta: dict[str, Any]) -> dict[str, Any] | None:
        """The outcome in a result-backend entry as a terminal event; None if unfinished."""
        state, value = meta.get("status"), meta.get("result")
        if state == "SUCCESS":
            return {"type": "done", "result": value}
        if state in ("FAILURE", "REVOKED"):
            error = self._client.backend.exception_to_python(value)
            if isinstance(error, TaskCancelled) or state == "REVOKED":
                return {"type": "cancelled", "reason": str(error)}
            if not isinstance(error, CorralError):
                error = CorralError(f"task {self.id} failed: {error!r}", task_id=self.id)
            return {"type": "error", "error": error.to_dict()}
        return None

    def stream(self, timeout: float | None = None, after_seq: int = -1) -> Iterator[dict[str, Any]]:
        """Every event from ``seq`` 0 (or after ``after_seq``), ending at the terminal one.

        While the task waits to start, ``queued`` events (``position``, ``eta_s``) come first,
        at most once a second and only when they change. They are not in the task's log and
        carry ``seq`` -1. While it waits in a queue no live worker serves, it warns once
        (:class:`UnservedModelWarning`).
        """
        return self._follow(timeout, after_seq, queued=True)

    def _follow(
        self, timeout: float | None, after_seq: int, *, queued: bool
    ) -> Iterator[dict[str, Any]]:
        """The events; ``queued`` ones only if asked (each costs reads of the scheduler)."""
        if not self._known() and self._unknown():
            raise self._not_found()
        watch = self._unserved_watch()

        def on_idle() -> None:
            watch()

        return follow_events(
            self._client.redis,
            self.id,
            after_seq=after_seq,
            timeout_s=timeout,
            on_idle=on_idle,
            pubsubs=self._client.pubsubs,
            waiting=self._still_waiting if queued else None,
        )

    def _unserved_watch(self) -> Callable[[], None]:
        """Warns, once, when the task still waits where no live worker consumes."""
        watch = UnservedWatch(self._client.redis, self.id)

        def check() -> None:
            if (notice := watch.check()) is not None:
                warnings.warn(notice, UnservedModelWarning, stacklevel=2)

        return check

    def _still_waiting(self) -> Wait | None:
        if self._waits is None:
            self._waits = WaitReader(self._client.redis, self._client.settings)
        return self._waits.wait(self.id)

    def text_stream(self, timeout: float | None = None, thinking: bool = False) -> Iterator[str]:
        """Only the text as it is generated; a :class:`Restart` marks a fresh attempt.

        A failed task raises its typed error at the end of the stream. It has no use for
        ``queued`` events, so it does not ask the scheduler where the task stands.
        """
        for event in self._follow(timeout, -1, queued=False):
            kind = event["type"]
            if kind == "token" or (thinking and kind == "thinking"):
                yield event["text"]
            elif kind == "restart":
                yield Restart(str(event.get("reason", "")))
            elif kind == "error":
                raise error_from_dict(event["error"])
            elif kind == "cancelled":
                raise TaskCancelled(event.get("reason", "cancelled"), task_id=self.id)

    def cancel(self) -> Cancellation:
        """Stop the task. Queued, it is cancelled at once and never runs; running, the
        worker stops within one chunk and closes its request; ended, nothing changes.

        Returns ``cancelled`` (it was queued), ``running`` or the state it had already ended in;
        ``.ended`` tells the last case apart (e.g. from a task cancelled earlier).
        """
        try:
            found = request_cancel(self._client.redis, self.id, self._client.settings.result_ttl_s)
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"cannot cancel task {self.id}: {exc}") from exc
        if found is None:
            raise self._not_found()
        if found == "queued":
            error = TaskCancelled("cancelled before it started", task_id=self.id)
            self._client.backend.mark_as_failure(self.id, error)
            return Cancellation("cancelled", ended=False)
        return Cancellation(found, ended=found != "running")


def results(jobs: Sequence[Job], timeout: float | None = None) -> list[TaskResult]:
    """``[job.result(timeout) for job in jobs]``, reading the finished ones in pipelined round
    trips of ``RESULTS_CHUNK`` (the jobs must share one client): raises the first failed task's
    error, in the order of ``jobs``. A job still unfinished when its chunk is read is waited
    for as :meth:`Job.result` waits."""
    out: list[TaskResult] = []
    for start in range(0, len(jobs), RESULTS_CHUNK):
        chunk = jobs[start : start + RESULTS_CHUNK]
        if not chunk:
            break
        found = _metas_and_records(chunk[0].client, chunk)
        out += [job._result_after(read, timeout) for job, read in zip(chunk, found, strict=True)]
    return out


def _metas_and_records(
    client: Client, jobs: Sequence[Job]
) -> list[tuple[dict[str, Any], dict[bytes, bytes]] | None]:
    """Each job's result-backend entry and submission record, in one round trip; None for
    every job if Redis did not answer."""
    backend = client.backend
    pipe = client.redis.pipeline(transaction=False)
    for job in jobs:
        pipe.get(backend.get_key_for_task(job.id))
        pipe.hgetall(task_key(job.id))
    try:
        replies = pipe.execute()
    except redis.RedisError:
        return [None] * len(jobs)
    found: list[tuple[dict[str, Any], dict[bytes, bytes]] | None] = []
    for raw, record in zip(replies[::2], replies[1::2], strict=True):
        meta = backend.decode_result(raw) if raw else {"status": "PENDING", "result": None}
        found.append((meta, record))
    return found
