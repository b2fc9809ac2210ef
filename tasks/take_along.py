"""Pending tasks that a running task takes along into its own calls (embed tasks of a model).

Ollama embeds 256 inputs in one call for about what one costs, but a Celery message per
single-input task costs each of them a consumer's round, a tracer, a result store and an ack:
more than the call itself. So a running embed task, before its first call, takes the next
pending embed tasks of its model out of the scheduler, as many as its call has room for
(:data:`tasks.scheduler.lua.TAKE_ALONG`), and serves them in its own calls, in its own slot:
one message, one slot, one call.

Each task taken along (a :class:`Rider`) keeps everything of its own: its lease, renewed with
the others of the process; its stream (``start``, then one terminal event); its result in
Celery's backend; its Flower events (received, started, succeeded or failed); and its message,
recorded as delivered and unacknowledged, so a worker that dies with it lets it go back to its
queue after the visibility timeout, and another worker runs it as a task of its own. A rider
that cannot be run here (a redelivery, a payload the normal path must refuse) is given back at
once: onto its queue, as kombu restores a message. The Redis writes of the riders are made
together: one step takes them, one starts them, one ends them.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import redis
from celery import Celery

from tasks.broker import add_to_ledger
from tasks.errors import CorralError, InvalidRequest, TaskCancelled
from tasks.execution import task_clock
from tasks.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX
from tasks.kinds.base import TaskKind
from tasks.lifecycle import Lease, add_dead_letter, begin_first_all
from tasks.payloads import validate_payload
from tasks.publisher import StreamPublisher
from tasks.result_backend import StreamingRedisBackend
from tasks.results import Timings
from tasks.scheduler import Scheduler
from tasks.scheduler.messages import short_repr
from tasks.settings import Settings

log = logging.getLogger("corral.worker")

_ARGUMENTS = frozenset({"payload", "submitted_at", "deadline_s"})  # what a kind's task takes
_CELERY_ONLY = ("callbacks", "errbacks", "chain", "chord")  # work Celery's tracer would do
REPR_LIMIT = 256  # characters of a rider's arguments and result in its Flower events


@dataclass(eq=False)
class Rider:
    """A task taken along: what its run needs, and how it ended."""

    task_id: str
    payload: Any  # validated
    kwargs: dict[str, Any]  # as sent: Celery's extended result keeps them
    queue_key: str  # the Redis list its message came from
    raw: str  # its message, as kombu pushed it
    tag: str  # the message's delivery tag
    routing_key: str
    lease: Lease
    publisher: StreamPublisher
    timings: Timings
    deadline: float  # time.time() after which its run stops
    ended: bool = False

    @property
    def cancel_requested(self) -> bool:
        return self.publisher.cancel_requested


@dataclass(frozen=True)
class _Taken:
    """A message taken from the scheduler, read."""

    queue_key: str
    raw: str
    message: dict[str, Any] = field(repr=False)

    @property
    def tag(self) -> str:
        return str(self.message["properties"]["delivery_tag"])


class TakeAlong:
    """Takes riders for the running tasks of one worker process, starts and ends them."""

    def __init__(
        self,
        *,
        app: Celery,
        client: redis.Redis,
        settings: Settings,
        scheduler: Scheduler,
        worker: str,
        host: str,
        consuming: Callable[[], bool] = lambda: True,
    ) -> None:
        self.app = app
        self.redis = client
        self.settings = settings
        self.scheduler = scheduler
        self.worker = worker  # the Celery node name, as in the worker's own events
        self.host = host  # the Ollama host the worker calls
        self.consuming = consuming  # False once the worker's consumer stopped (see Lease)

    # -- taking ---------------------------------------------------------------------------
    def take(
        self, kind: TaskKind[Any, Any], model: str, units: int, wake: threading.Event
    ) -> list[Rider]:
        """Take the next pending tasks of ``kind`` for ``model`` that fit in ``units`` and
        start them: each is leased and its ``start`` written. A rider's cancel sets ``wake``.
        Whatever cannot run here is given back. Nothing is taken if Redis fails."""
        try:
            entries = self.scheduler.take_along(model, kind.task_name, units)
        except redis.RedisError as exc:
            log.warning("could not take pending %s tasks along (%s)", kind.name, exc)
            return []
        taken = [_read(entry) for entry in entries]
        riders, refused = [], []
        started = time.time()
        for item in taken:
            rider = self._rider(kind, item, started, wake)
            if rider is None:
                refused.append(item)
            else:
                riders.append(rider)
        try:
            riders, unstarted = self._start(kind, model, riders, started)
        except redis.RedisError as exc:  # their leases expire and the messages come back
            log.warning("could not start the tasks taken along (%s)", exc)
            return []
        self.give_back([*refused, *(_taken_of(r) for r in unstarted)], unstarted)
        return riders

    def _rider(
        self, kind: TaskKind[Any, Any], item: _Taken, started: float, wake: threading.Event
    ) -> Rider | None:
        """A rider for ``item``, or None if the normal path must run it (it would refuse it,
        or Celery's tracer has work to do for it)."""
        message = item.message
        headers = message.get("headers") or {}
        try:
            args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
            if args or set(kwargs) - _ARGUMENTS or any((embed or {}).get(k) for k in _CELERY_ONLY):
                return None
            payload = validate_payload(kind.name, kwargs.get("payload"), self.settings)
        except (InvalidRequest, ValueError, TypeError, KeyError):
            return None
        task_id = str(headers["id"])
        publisher = StreamPublisher.of_task(self.redis, task_id, self.settings)
        timings, deadline = task_clock(
            kwargs.get("submitted_at"), kwargs.get("deadline_s"), started, self.settings
        )

        def cancelled() -> None:
            publisher.cancel_requested = True
            wake.set()

        return Rider(
            task_id=task_id,
            payload=payload,
            kwargs=kwargs,
            queue_key=item.queue_key,
            raw=item.raw,
            tag=item.tag,
            routing_key=str(message["properties"]["delivery_info"]["routing_key"]),
            lease=Lease(
                self.redis,
                task_id,
                self.settings.lease_ttl_s,
                item.tag,
                cancelled,
                consuming=self.consuming,
            ),
            publisher=publisher,
            timings=timings,
            deadline=deadline,
        )

    def _start(
        self, kind: TaskKind[Any, Any], model: str, riders: list[Rider], started: float
    ) -> tuple[list[Rider], list[Rider]]:
        """Lease each rider and write its ``start``, in one round trip; (started, not)."""
        if not riders:
            return [], []
        data = {"kind": kind.name, "worker": self.worker, "ollama_host": self.host}
        starts = []
        for rider in riders:
            start = {**data, "model": rider.payload.model, "at": started}
            starts.append((rider.lease, rider.publisher.first_event("start", **start)))
        answers = begin_first_all(
            self.redis,
            starts,
            worker=self.worker,
            started_at=started,
            record_ttl_s=self.settings.result_ttl_s,
            host=self.host,
        )
        ok, unstarted = [], []
        for rider, begun in zip(riders, answers, strict=True):
            if begun.state == "ok":
                rider.publisher.opened(begun)
                rider.lease.start_heartbeat()
                ok.append(rider)
            else:  # a redelivery, or cancelled meanwhile: the normal path knows what to do
                unstarted.append(rider)
        self._events(
            [
                ev
                for rider in ok
                for ev in (
                    ("task-received", self._received_fields(kind, rider)),
                    ("task-started", {"uuid": rider.task_id}),
                )
            ]
        )
        return ok, unstarted

    def _received_fields(self, kind: TaskKind[Any, Any], rider: Rider) -> dict[str, Any]:
        return {
            "uuid": rider.task_id,
            "name": kind.task_name,
            "args": "()",
            "kwargs": short_repr(rider.kwargs, REPR_LIMIT),
            "root_id": rider.task_id,
            "parent_id": None,
            "retries": 0,
            "eta": None,
            "expires": None,
        }

    # -- ending ---------------------------------------------------------------------------
    def end(
        self,
        kind: TaskKind[Any, Any],
        outcomes: Sequence[tuple[Rider, dict[str, Any] | CorralError]],
    ) -> None:
        """End riders, each with its result (the ``done`` event's) or its error: the terminal
        events first, then, in one transaction, each lease end, stored result and ack."""
        outcomes = [(rider, outcome) for rider, outcome in outcomes if not rider.ended]
        if not outcomes:
            return
        for rider, outcome in outcomes:
            rider.ended = True
            rider.timings.finished_at = time.time()
            _finish_stream(rider, outcome)
        with self.redis.pipeline(transaction=True) as pipe:
            events = [self._end_in(pipe, kind, rider, outcome) for rider, outcome in outcomes]
            pipe.execute()
        self._events(events)

    def _end_in(
        self,
        pipe: Any,
        kind: TaskKind[Any, Any],
        rider: Rider,
        outcome: dict[str, Any] | CorralError,
    ) -> tuple[str, dict[str, Any]]:
        """A rider's end in ``pipe``, once its stream is written; returns its Celery event."""
        rider.publisher.close()
        rider.lease.release_in(pipe, _final_state(outcome))
        failed = isinstance(outcome, CorralError)
        request = self._request(kind, rider)
        backend = cast(StreamingRedisBackend, self.app.backend)  # the project's, for Redis
        backend.store_in(pipe, rider.task_id, outcome, request, failed=failed)
        pipe.hdel(KOMBU_UNACKED, rider.tag)
        pipe.zrem(KOMBU_UNACKED_INDEX, rider.tag)
        if isinstance(outcome, CorralError):
            if outcome.retryable:
                record = {"kind": kind.name, "payload": rider.kwargs.get("payload")}
                add_dead_letter(pipe, rider.task_id, {**record, "error": outcome.to_dict()})
            return "task-failed", {"uuid": rider.task_id, "exception": repr(outcome)}
        runtime = (rider.timings.finished_at or 0.0) - (rider.timings.started_at or 0.0)
        return "task-succeeded", {
            "uuid": rider.task_id,
            "result": short_repr(outcome, REPR_LIMIT),
            "runtime": runtime,
        }

    def _request(self, kind: TaskKind[Any, Any], rider: Rider) -> SimpleNamespace:
        """What Celery's extended result reads of a task's request."""
        return SimpleNamespace(
            task=kind.task_name,
            args=[],
            kwargs=rider.kwargs,
            hostname=self.worker,
            retries=0,
            delivery_info={"routing_key": rider.routing_key},
            children=[],
        )

    def give_back(self, taken: Sequence[_Taken], started: Sequence[Rider] = ()) -> None:
        """Put messages taken along back at the head of their queue, as kombu restores an
        unacknowledged message, for a worker to run each as a task of its own; the leases of
        those already ``started`` end first (their stream continues where it is)."""
        if not taken:
            return
        try:
            with self.redis.pipeline(transaction=True) as pipe:
                for rider in started:
                    rider.ended = True
                    rider.lease.release_in(pipe, "")
                for item in taken:
                    pipe.rpush(item.queue_key, item.raw)
                    add_to_ledger(pipe, item.tag, item.queue_key, item.raw)
                    pipe.hdel(KOMBU_UNACKED, item.tag)
                    pipe.zrem(KOMBU_UNACKED_INDEX, item.tag)
                pipe.execute()
        except redis.RedisError as exc:  # still unacknowledged: they come back after the timeout
            log.warning("could not give %d tasks back to their queue (%s)", len(taken), exc)

    def give_back_riders(self, riders: Sequence[Rider]) -> None:
        """:meth:`give_back` for riders not ended."""
        left = [rider for rider in riders if not rider.ended]
        self.give_back([_taken_of(rider) for rider in left], left)

    # -- Flower ---------------------------------------------------------------------------
    def _events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Publish Celery task events for riders, as one message (Celery's list form), as the
        worker does for the tasks it runs."""
        if not events or not self.app.conf.worker_send_task_events:
            return
        try:
            with self.app.amqp.producer_pool.acquire(block=True) as producer:
                dispatcher = self.app.events.Dispatcher(
                    producer.connection,
                    hostname=self.worker,
                    channel=producer.channel,
                    buffer_group=["task"],
                    buffer_limit=len(events) + 1,
                )
                for event_type, fields in events:
                    dispatcher.send(event_type, **fields)
                dispatcher.flush(errors=False)
        except Exception as exc:  # monitoring only: the tasks' own records are written
            log.warning("could not send the task events of %d tasks (%s)", len(events), exc)


def _read(entry: str) -> _Taken:
    """A taken ledger entry ``[queue key, message]`` (the script checked the message's
    headers and delivery properties)."""
    queue_key, raw = json.loads(entry)
    return _Taken(queue_key, raw, json.loads(raw))


def _taken_of(rider: Rider) -> _Taken:
    return _Taken(rider.queue_key, rider.raw, json.loads(rider.raw))


def _finish_stream(rider: Rider, outcome: dict[str, Any] | CorralError) -> None:
    """Hand the rider's terminal event to its writer (written with the others')."""
    publisher = rider.publisher
    if not isinstance(outcome, CorralError):
        publisher.finish("done", wait=False, result=outcome)
    elif _final_state(outcome) == "cancelled":
        publisher.finish("cancelled", wait=False, reason=outcome.message)
    else:
        publisher.finish(
            "error", wait=False, error=outcome.with_info(task_id=rider.task_id).to_dict()
        )


def _final_state(outcome: dict[str, Any] | CorralError) -> str:
    if not isinstance(outcome, CorralError):
        return "succeeded"
    return "cancelled" if isinstance(outcome, TaskCancelled) else "failed"
